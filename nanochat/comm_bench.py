"""All-reduce bus bandwidth, as nccl-tests defines it, within a node and across nodes.

nccl-tests (doc/PERFORMANCE.md) reports two figures for an all-reduce of S bytes over n ranks
that took t seconds: the algorithm bandwidth algbw = S / t, and the bus bandwidth

    busbw = algbw · 2(n−1)/n

A ring all-reduce moves 2(n−1)/n · S bytes through every rank's link (a reduce-scatter then an
all-gather, each (n−1)/n · S), so busbw is the speed of the slowest link and can be compared
with its hardware peak (NVLink, InfiniBand) whatever n is. The same factor turns a measured
busbw back into the time of an all-reduce of any size: t = 2(n−1)/n · S / busbw
(`allreduce_seconds`, used by nanochat/scaling.py).

Scopes (`scope_groups`): "intra-node" (each node's ranks, all nodes at once), "inter-node" (one
rank per node: the network) and "world" (every rank), each only where it has ≥ 2 ranks and
differs from the ones before. Timing: `warmup` untimed all-reduces, then `iters` timed ones
between device syncs; a size's time is the slowest rank's (a MAX all-reduce of the times), as
the collective is only done when its slowest member is.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

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
    me = dist.get_rank()
    mine: dict[str, object | None] = {}
    for scope, groups in scopes.items():
        mine[scope] = None
        for ranks in groups:
            g = dist.new_group(ranks)
            if me in ranks:
                mine[scope] = g
    return mine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_allreduce(group, device: torch.device, nbytes: int, warmup: int, iters: int) -> float:
    """Median seconds of one all-reduce of `nbytes` (fp32) in `group`, the slowest rank's."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    for _ in range(warmup):
        dist.all_reduce(x, group=group)
    times = []
    for _ in range(iters):
        _sync(device)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        dist.all_reduce(x, group=group)
        _sync(device)
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def sweep(group, device: torch.device, sizes: list[int], warmup: int = 2, iters: int = 5) -> list[dict]:
    """{bytes, seconds, algbw_gbps, busbw_gbps} per size (GB/s = 1e9 B/s, as nccl-tests prints)."""
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
