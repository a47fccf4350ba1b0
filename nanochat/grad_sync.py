"""Gradient averaging across ranks, overlapped with backward; the warm-up before the first collective.

Overlap. With the plain loop every rank runs all its backward passes, then averages every
gradient in one burst (`optim.allreduce_gradients`): across nodes that burst is on the critical
path of every step. Here the training model is wrapped in torch's DistributedDataParallel: its
reducer groups parameters into 25 MB buckets (torch's default) in reverse order of use and
launches each bucket's all-reduce as soon as backward has produced all of its gradients, so the
all-reduce of the last layers runs while backward is still computing the first ones. (The first
synced step runs with one bucket; DDP then rebuilds them in the order gradients became ready,
the first of 1 MB so that it goes out early — torch uses that small first bucket only with its
default bucket size, so none is passed.) Accumulation micro-steps run under `no_sync()`
(gradients accumulate locally) and only the last one communicates — the
same bytes per step as before. `gradient_as_bucket_view=True` makes each `.grad` a view into its
bucket: no second copy of the gradients, so batch-size discovery's probes (which run on rank 0
alone, with no DDP) measure the memory training uses. Under torch.compile, dynamo's
DDPOptimizer splits the graph at bucket boundaries so the buckets still go out during the
compiled backward (PyTorch docs, "TorchDynamo-based DDP"; `torch._dynamo.config.optimize_ddp`).

Why not upstream nanochat's distributed optimizer (reduce-scatter the gradients, each rank
steps its share, all-gather the weights)? It sends the same bytes as all-reduce + Muon's
broadcast of its share, but upstream launches its reduce-scatters in `step()`, after backward:
nothing overlaps backward, which is the point here. Muon keeps its own sharding
(`optim.Muon.step`: each rank orthogonalizes a share and broadcasts it, async, overlapping the
next share's work); AdamW's elementwise step stays replicated (cheap).

Exactness: DDP sums each bucket then divides by the world size, as `allreduce_gradients` does;
with two ranks both orders give the same bits (a + b = b + a, a division by 2 is exact), which
tests/test_distributed.py checks against the plain path. Steps where an out-of-memory may be
retried (nanochat/batchsize/verify.py: the ranks must agree before any gradient is averaged) run with
no overlap: every micro-step under no_sync, then `allreduce_gradients`.

Warm-up. `warm_up` runs one forward/backward on every rank with no collective (under no_sync,
its gradients dropped): that is where torch.compile compiles, minutes on a cold kernel cache.
Then the ranks meet in a store barrier with a long timeout (nanochat/rendezvous.py) — a rank
still compiling can no longer trip the collective timeout of a rank that is already training
(upstream nanochat's issue #722). `NANOCHAT_WARMUP_DELAY_S="RANK:SECONDS[,RANK:SECONDS]"`
makes those ranks sleep that long in their warm-up: a slow compile on demand, for tests and
for trying a cluster's timeouts.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat import rendezvous
from nanochat.common import UserError, print0
from nanochat.config import TrainArgs
from nanochat.optim import allreduce_gradients
from nanochat.runtime import Runtime, maybe_compile

DELAY_ENV = "NANOCHAT_WARMUP_DELAY_S"
# torch.compile modes that capture CUDA graphs (PyTorch docs, torch.compile `mode`)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def training_model(model: torch.nn.Module, rt: Runtime, args: TrainArgs,
                   overlap: bool = True) -> torch.nn.Module:
    """The module the loop calls for forward/backward: `model` wrapped in DDP when distributed
    and `overlap`, then compiled per the recipe. `model` itself stays the plain module (saved,
    evaluated). DDP's constructor broadcasts rank 0's weights (identical anyway: same seed or
    the same checkpoint) and checks the shapes: the ranks meet in the store first."""
    if rt.dist.is_distributed and args.compile and args.compile_mode in CUDA_GRAPH_MODES:
        raise UserError(f"train.compile_mode={args.compile_mode} records CUDA graphs, which this "
                        f"kit has not tested with several ranks (DDP's buckets, no_sync "
                        f"accumulation, the watched steps' all-reduce); use compile_mode default "
                        f"or max-autotune-no-cudagraphs for a {rt.dist.world_size}-rank run")
    if rt.dist.is_distributed and overlap:
        rendezvous.barrier("every rank's model, before DDP's first broadcast")
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                    gradient_as_bucket_view=True, **no_forward_buffer_sync())
    return maybe_compile(model, args)


def no_forward_buffer_sync(ddp_parameters=None) -> dict:
    """DDP's switch that stops it broadcasting buffers before every forward: the buffers (rotary
    tables) are computed alike on every rank and never trained, so they are synced once, at
    construction. torch 2.13 added `forward_sync_buffers` and deprecates `broadcast_buffers`
    for it; older releases have only the old name (passing the new one there is a TypeError
    when DDP is built). pyproject declares 2.13 as the floor (what CI tests); the old name
    stays for a site whose torch is older. `ddp_parameters`: the names DDP's constructor
    takes (default: the installed torch's)."""
    if ddp_parameters is None:
        ddp_parameters = inspect.signature(DDP.__init__).parameters
    if "forward_sync_buffers" in ddp_parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def ddp_of(step_model: torch.nn.Module) -> DDP | None:
    """The DDP wrapper inside `step_model` (compiled or not), or None."""
    inner = getattr(step_model, "_orig_mod", step_model)
    return inner if isinstance(inner, DDP) else None


def clear_to_none(step_model: torch.nn.Module) -> bool:
    """How the step clears gradients (optim.optimizer_step's `set_to_none`): in place under
    DDP, whose `.grad`s are views into its buckets (`gradient_as_bucket_view`) and must stay
    so — dropped, the next no_sync micro-steps would allocate a second copy beside the
    buckets; dropped otherwise (frees them between steps)."""
    return ddp_of(step_model) is None


def micro_step_context(step_model: torch.nn.Module, communicate: bool):
    """Around one micro-step's forward and backward: DDP's no_sync() unless this backward is
    to launch the step's all-reduce (the last micro-step of an overlapped step)."""
    ddp = ddp_of(step_model)
    if ddp is None or communicate:
        return contextlib.nullcontext()
    return ddp.no_sync()


def finish_step_sync(step_model: torch.nn.Module, params, rt: Runtime, overlapped: bool) -> None:
    """After the micro-steps: every rank holds the averaged gradients. An overlapped step's
    DDP reduction completed inside the last backward; otherwise average them here."""
    if not rt.dist.is_distributed:
        return
    if overlapped and ddp_of(step_model) is not None:
        return
    allreduce_gradients(params)


def injected_delay(rank: int, env=None) -> float:
    """Seconds this rank sleeps in its warm-up, from NANOCHAT_WARMUP_DELAY_S (0 when unset)."""
    spec = (os.environ if env is None else env).get(DELAY_ENV, "").strip()
    if not spec:
        return 0.0
    delays = {}
    for part in spec.split(","):
        r, sep, sec = part.partition(":")
        try:
            delays[int(r)] = float(sec)
            assert sep and delays[int(r)] >= 0
        except (ValueError, AssertionError):
            raise UserError(f"{DELAY_ENV}={spec!r}: expected RANK:SECONDS[,RANK:SECONDS], e.g. "
                            "1:30; unset it to train without an injected delay") from None
    return delays.get(rank, 0.0)


def warm_up(step_model: torch.nn.Module, x, y, rt: Runtime) -> float:
    """One forward/backward with no collective (compiles the step), gradients dropped; then
    every rank waits for the others with the long timeout. Returns this rank's seconds."""
    if not rt.dist.is_distributed:
        return 0.0
    t0 = time.perf_counter()
    with micro_step_context(step_model, communicate=False), rt.autocast():
        loss = step_model(x, y)
    loss.backward()
    for p in getattr(step_model, "_orig_mod", step_model).parameters():
        p.grad = None
    del loss
    delay = injected_delay(rt.dist.rank)
    if delay:
        print(f"rank {rt.dist.rank}: warm-up sleeps {delay:g} s ({DELAY_ENV})", flush=True)
        time.sleep(delay)
    rt.sync()
    seconds = time.perf_counter() - t0
    rendezvous.barrier("every rank's warm-up step (compilation)")
    print0(f"warm-up: rank 0 compiled and ran one step in {seconds:.1f} s; all ranks ready")
    return seconds
