"""Predicted data-parallel scaling efficiency, from step time, gradient bytes and bus bandwidth.

The model (one optimizer step of a data-parallel run with a fixed global batch):
- compute: the step's forward/backward/optimizer time on one rank, split evenly over more ranks
  (the same tokens per step shared by n ranks; per-GPU efficiency assumed unchanged);
- communication: one all-reduce of every gradient per optimizer step (accumulation micro-steps
  communicate nothing), a ring all-reduce taking 2(n−1)/n · bytes / busbw (nccl-tests' busbw,
  below), bytes = all parameters × the gradient dtype's size;
- overlap: a fraction `overlap` of that time hidden behind backward (0 = the all-reduce runs after
  backward, in one burst; buckets launched during backward, as DistributedDataParallel does,
  hide up to the backward's length: see `efficiency`);
- efficiency = compute / (compute + non-overlapped communication).

`python -m nanochat.check` feeds it measured figures for the allocation it runs on;
`python jobs/estimate.py RECIPE` models a recipe's hours on N nodes before launch with it.
Bus bandwidth, measured (`measure_scopes`, what the cluster check runs). All-reduce bus bandwidth, as nccl-tests defines it, within a node and across nodes.

nccl-tests (doc/PERFORMANCE.md) reports two figures for an all-reduce of S bytes over n ranks
that took t seconds: the algorithm bandwidth algbw = S / t, and the bus bandwidth

    busbw = algbw · 2(n−1)/n

A ring all-reduce moves 2(n−1)/n · S bytes through every rank's link (a reduce-scatter then an
all-gather, each (n−1)/n · S), so busbw is the speed of the slowest link and can be compared
with its hardware peak (NVLink, InfiniBand) whatever n is. The same factor turns a measured
busbw back into the time of an all-reduce of any size: t = 2(n−1)/n · S / busbw
(`allreduce_seconds`, the model's communication time).

Scopes (`scope_groups`): "intra-node" (each node's ranks, all nodes at once), "inter-node" (one
rank per node: the network) and "world" (every rank), each only where it has ≥ 2 ranks and
differs from the ones before. Timing: `warmup` untimed all-reduces, then `iters` timed ones
between device syncs; a size's time is the slowest rank's (a MAX all-reduce of the times), as
the collective is only done when its slowest member is.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nanochat.common import UserError

if TYPE_CHECKING:
    import torch

# --- all-reduce bus bandwidth, as nccl-tests defines it (torch imported where measured: the
# model above runs on a login node without it) -------------------------------------------
MB = 2 ** 20


def bus_bandwidth(nbytes: int, seconds: float, n: int) -> float:
    """nccl-tests' busbw of an all-reduce of `nbytes` over `n` ranks that took `seconds` (B/s)."""
    return nbytes / seconds * 2 * (n - 1) / n


def allreduce_seconds(nbytes: float, busbw: float, n: int) -> float:
    """Time of a ring all-reduce of `nbytes` over `n` ranks at bus bandwidth `busbw` (B/s)."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / busbw


def message_sizes(min_bytes: int = MB, max_bytes: int = 1024 * MB, factor: int = 4) -> list[int]:
    """min, min·factor, ... up to and including max (nccl-tests' -b/-e/-f)."""
    if min_bytes < 4 or max_bytes < min_bytes or factor < 2:
        raise ValueError(f"sizes need 4 ≤ min ≤ max and factor ≥ 2, got {min_bytes}, {max_bytes}, {factor}")
    sizes, s = [], min_bytes
    while s <= max_bytes:
        sizes.append(s)
        s *= factor
    return sizes


def scope_groups(hosts: list[str]) -> dict[str, list[list[int]]]:
    """Rank lists per scope from each rank's host (rank i runs on hosts[i]): intra-node (one list
    per node with ≥ 2 ranks), inter-node (the first rank of every node, with ≥ 2 nodes), world
    (all ranks, when it is neither of those)."""
    nodes: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        nodes.setdefault(host, []).append(rank)
    out: dict[str, list[list[int]]] = {}
    intra = [ranks for ranks in nodes.values() if len(ranks) >= 2]
    if intra:
        out["intra-node"] = intra
    if len(nodes) >= 2:
        out["inter-node"] = [[ranks[0] for ranks in nodes.values()]]
    world = list(range(len(hosts)))
    if len(world) >= 2 and all(world not in groups for groups in out.values()):
        out["world"] = [world]
    return out


def new_groups(scopes: dict[str, list[list[int]]]) -> dict[str, object | None]:
    """The process group this rank belongs to in each scope (None where it is in none). Every
    rank must call this with the same scopes: `dist.new_group` is collective over the world."""
    import torch.distributed as dist
    me = dist.get_rank()
    mine: dict[str, object | None] = {}
    for scope, groups in scopes.items():
        mine[scope] = None
        for ranks in groups:
            g = dist.new_group(ranks)
            if me in ranks:
                mine[scope] = g
    return mine


def time_allreduce(group, device: torch.device, nbytes: int, warmup: int, iters: int) -> float:
    """Median seconds of one all-reduce of `nbytes` (fp32) in `group`, the slowest rank's."""
    import torch
    import torch.distributed as dist

    from nanochat.timing import device_sync
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    for _ in range(warmup):
        dist.all_reduce(x, group=group)
    times = []
    for _ in range(iters):
        device_sync(device)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        dist.all_reduce(x, group=group)
        device_sync(device)
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def sweep(group, device: torch.device, sizes: list[int], warmup: int = 2, iters: int = 5) -> list[dict]:
    """{bytes, seconds, algbw_gbps, busbw_gbps} per size (GB/s = 1e9 B/s, as nccl-tests prints)."""
    import torch.distributed as dist
    n = dist.get_world_size(group)
    rows = []
    for nbytes in sizes:
        t = time_allreduce(group, device, nbytes, warmup, iters)
        rows.append({"bytes": nbytes, "seconds": t, "algbw_gbps": round(nbytes / t / 1e9, 4),
                     "busbw_gbps": round(bus_bandwidth(nbytes, t, n) / 1e9, 4)})
    return rows


def measure_scopes(hosts: list[str], device: torch.device, sizes: list[int], warmup: int = 2,
                   iters: int = 5) -> dict[str, dict]:
    """Every scope of `scope_groups(hosts)`, one after another (all ranks take part in each call;
    ranks outside a scope's groups wait at the world barrier that follows it). Returns, on every
    rank, {scope: {"ranks": [[...]], "n": ranks per group, "by_group": [rows per group]}}, the
    rows of each group as measured by its first rank and shared with all."""
    import torch.distributed as dist
    scopes = scope_groups(hosts)
    groups = new_groups(scopes)
    out: dict[str, dict] = {}
    for scope, rank_lists in scopes.items():
        g = groups[scope]
        rows = sweep(g, device, sizes, warmup, iters) if g is not None else None
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)  # gloo/nccl alike; also the barrier between scopes
        out[scope] = {"ranks": rank_lists, "n": len(rank_lists[0]),
                      "by_group": [gathered[ranks[0]] for ranks in rank_lists]}
    return out


def slowest_busbw(scope: dict, nbytes: int) -> float:
    """B/s of the slowest group of a scope at the measured size nearest to `nbytes` from below
    (the largest size when `nbytes` exceeds them all; the smallest when below them all)."""
    rows = scope["by_group"][0]
    sizes = [r["bytes"] for r in rows]
    pick = max([s for s in sizes if s <= nbytes] or [min(sizes)])
    return min(next(r for r in g if r["bytes"] == pick)["busbw_gbps"] for g in scope["by_group"]) * 1e9


@dataclass
class StepModel:
    compute_s: float        # the optimizer step's compute on the allocation (already split over ranks)
    comm_s: float           # one all-reduce of the gradients
    overlap: float          # fraction of comm_s hidden behind backward

    @property
    def exposed_s(self) -> float:
        return (1 - self.overlap) * self.comm_s

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def efficiency(self) -> float:
        return self.compute_s / self.step_s if self.step_s > 0 else 1.0


def efficiency(compute_s: float, grad_bytes: float, busbw: float, n: int, overlap: float = 0.0) -> StepModel:
    """One step of compute `compute_s` on n ranks exchanging `grad_bytes` at bus bandwidth `busbw`
    (B/s), a fraction `overlap` of the exchange hidden (the compute, not the step, bounds what can
    hide: at most ~2/3 of it is backward)."""
    if not 0 <= overlap <= 1:
        raise UserError(f"overlap must be in [0, 1], got {overlap}")
    if n > 1 and busbw <= 0:
        raise UserError(f"bus bandwidth must be > 0 for {n} ranks, got {busbw}")
    comm = allreduce_seconds(grad_bytes, busbw, n)
    hidden = min(overlap * comm, 2 / 3 * compute_s)
    return StepModel(compute_s, comm, hidden / comm if comm > 0 else overlap)


def model_sizes(recipe) -> dict:
    """Parameters and training FLOPs per token of the recipe's model, built on the meta device
    (no memory), with the tokenizer's vocabulary when the model section gives none."""
    import torch

    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig.from_args(recipe.model, recipe.model.vocab_size or recipe.tokenizer.vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    return {"params": model.num_params(), "flops_per_token": model.flops_per_token()}
