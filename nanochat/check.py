"""The cluster check:  python -m nanochat.check RECIPE [section.key=value ...] [flags]

    torchrun --standalone --nproc-per-node 8 -m nanochat.check configs/d12.yaml
    sbatch --nodes 2 --gpus-per-node 8 slurm/check.sbatch configs/d12.yaml

Is this allocation healthy, and how fast is it? On every rank: the host, device, memory, CPUs,
torch/CUDA/NCCL versions; all-reduce bus bandwidth (nccl-tests' busbw, nanochat/scaling.py)
from 1 MB to 1 GB (×4; `--max-mb` caps it) within each node and across nodes; one compiled
training step of the recipe (`--no-compile`: eager) with its MFU; then the predicted
data-parallel scaling efficiency of the recipe on this allocation from the measured step time,
the gradient bytes and the measured busbw (nanochat/scaling.py says the model and its overlap
assumption). Writes check.json (atomic; `--out`, default <run_dir>/check.json), prints a table.

Failures: ranks meet between phases on the rendezvous store (nanochat/rendezvous.py `gather`, no
collective), each leaving its result or its error there; a rank that raised is named with its host and error, a rank that
never answers within `--timeout` seconds is named as such, and every rank then exits 1. A
collective that a failed rank left half-done ends at the process group's timeout (`--timeout`
too). `--fail-rank R` makes rank R fail on purpose (`--fail-how raise`: an exception; `exit`: the
process dies) in `--fail-phase`: the test of that reporting path.
"""
from __future__ import annotations

import os
import platform
import socket
import statistics
import sys
from pathlib import Path

import torch

from nanochat import rendezvous
from nanochat.checkpoint import refuse_launcher_dir
from nanochat.scaling import MB, measure_scopes, message_sizes, slowest_busbw
from nanochat.common import UserError, atomic_write_json, cli_main, now_iso
from nanochat.config import grad_accum_steps
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import DistInfo, dist_info_from_env, mfu_percent, peak_flops, setup_runtime, teardown_runtime
from nanochat.scaling import efficiency
from nanochat.timing import recipe_step, seconds_per_call, timed

PHASES = ("info", "busbw", "step")


class CheckFailed(Exception):
    """Some rank failed or did not answer: {rank: error text, or None for no answer}."""

    def __init__(self, phase: str, failures: dict[int, str | None], hosts: dict[int, str]):
        self.phase, self.failures, self.hosts = phase, failures, hosts
        super().__init__(describe_failures(phase, failures, hosts))


def describe_failures(phase: str, failures: dict[int, str | None], hosts: dict[int, str]) -> str:
    parts = []
    for rank in sorted(failures):
        host = hosts.get(rank, "host unknown")
        err = failures[rank]
        parts.append(f"rank {rank} on {host}: " + (err if err is not None else "did not answer"))
    return f"check failed in phase {phase}: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Meeting on the rendezvous store (nanochat/rendezvous.py `gather`): every rank leaves
# {"error", "result"} for the phase, then waits for every other rank's until the deadline. No
# collective, so one failed rank cannot hang it.

class Gate:
    def __init__(self, info: DistInfo, timeout_s: float):
        self.info, self.timeout_s = info, timeout_s
        self.hosts: dict[int, str] = dict(enumerate(rendezvous.rank_hosts()))  # from the roll call

    def meet(self, phase: str, result=None, error: str | None = None, wait_s: float | None = None) -> dict[int, dict]:
        """Every rank's payload for `phase`; raises CheckFailed naming the ranks that failed and
        the ranks that did not answer within `wait_s` (default: the gate's timeout)."""
        try:
            payloads = rendezvous.gather(phase, {"error": error, "result": result},
                                         self.timeout_s if wait_s is None else wait_s)
        except RuntimeError as e:  # DistNetworkError: the store's host (rank 0 under srun) is gone
            raise CheckFailed(phase, {0: f"the rendezvous store closed ({str(e).splitlines()[0][:120]})"},
                              self.hosts) from None
        failures = {r: (p["error"] if p is not None else None) for r, p in payloads.items()
                    if p is None or p["error"] is not None}
        if failures:
            raise CheckFailed(phase, failures, self.hosts)
        return payloads

    def finish(self, wait_s: float) -> None:
        """Leave: rank 0, which hosts the store under plain srun, waits (up to `wait_s`) until
        every other rank has said it is done reading, so none of them loses the store mid-read."""
        try:
            rendezvous.gather("end", {"error": None, "result": None}, wait_s if self.info.rank == 0 else 0)
        except RuntimeError:
            pass  # the store is gone already: nothing left to wait for


# --------------------------------------------------------------------------------------------
# The phases

def rank_info(rt, info: DistInfo) -> dict:
    device = rt.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, mem_gb = props.name, props.total_memory / 2**30
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    nccl = None
    if torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {"host": socket.gethostname(), "rank": info.rank, "local_rank": info.local_rank,
            "world_size": info.world_size, "device": str(device), "device_name": name,
            "memory_gb": round(mem_gb, 1), "cpus": len(os.sched_getaffinity(0)),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "slurm_cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
            "python": platform.python_version()}


def training_step(recipe, rt, compile_model: bool, batch: int, steps: int) -> dict:
    """One training step of the recipe's model (forward, backward, Muon + AdamW; no collective)
    on random tokens at `batch` rows: the first step (compilation) timed apart, then `steps`
    steps, each between device syncs; the step's tokens/s and MFU from the median."""
    step = recipe_step(recipe, rt, batch, compile=compile_model, seed=rt.dist.rank)
    first = timed(step, rt.sync)
    times = seconds_per_call(step, rt.sync, 0, steps, 1)
    t, model, tokens = statistics.median(times), step.model, step.tokens
    flops = model.flops_per_token()
    peak, peak_kind = peak_flops(rt.device, rt.dtype)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"compile": compile_model, "batch": batch, "sequence_len": model.config.sequence_len,
            "first_step_s": round(first, 3), "step_s": t, "step_s_min": min(times), "step_s_max": max(times),
            "steps": steps, "tok_per_s": round(tokens / t, 1), "flops_per_token": flops,
            "params": model.num_params()["total"], "grad_bytes": grad_bytes,
            "mfu_percent": round(mfu_percent(flops, tokens / t, peak), 2), "peak_flops": peak,
            "peak": peak_kind, "dtype": str(rt.dtype).replace("torch.", "")}


def predict(recipe, steps: dict[int, dict], busbw: dict, world: int, overlap: float) -> dict:
    """The recipe's optimizer step on this allocation: the slowest rank's micro-step × the
    accumulation steps at this world size, plus one all-reduce of the gradients at the measured
    busbw of the scope that spans every rank (the network's when there are several nodes)."""
    slowest = max(steps.values(), key=lambda s: s["step_s"])
    B, T = slowest["batch"], slowest["sequence_len"]
    total = recipe.train.total_batch_size
    try:
        accum = grad_accum_steps(total, B, T, world)
    except UserError:
        accum = total / (B * T * world)  # not an exact split: the model still holds
    compute = accum * slowest["step_s"]
    grad_bytes = slowest["grad_bytes"]
    scope = next((s for s in ("world", "inter-node", "intra-node") if s in busbw), None)
    bw = slowest_busbw(busbw[scope], grad_bytes) if scope else 0.0
    m = efficiency(compute, grad_bytes, bw, world, overlap)
    return {"world_size": world, "grad_accum": accum, "grad_bytes": grad_bytes, "busbw_scope": scope,
            "busbw_gbps": round(bw / 1e9, 4), "compute_s": round(compute, 4),
            "allreduce_s": round(m.comm_s, 4), "exposed_s": round(m.exposed_s, 4),
            "overlap": m.overlap, "efficiency": round(m.efficiency, 4),
            "assumption": f"{100 * overlap:.0f}% of the gradient all-reduce hidden behind backward "
                          "(0%: one all-reduce after backward); one all-reduce per optimizer step; "
                          "busbw at the largest measured size ≤ the gradient bytes"}


# --------------------------------------------------------------------------------------------

def run_check(recipe, opts, out_path: Path) -> dict:
    info = dist_info_from_env()
    if info.is_distributed:
        rendezvous.check_master_addr(info.rank)  # one line, before any report is written
    gate = None
    report = {"recipe": opts.recipe, "overrides": opts.overrides, "started": now_iso(),
              "world_size": info.world_size, "status": "running"}
    rt = None
    try:
        # the rendezvous (roll call, process group: NCCL on CUDA, gloo on CPU) with the check's
        # timeout for the store's waits and the collectives alike
        rt = setup_runtime(recipe.train, timeout_min=opts.timeout / 60, init_timeout_min=opts.timeout / 60)
        gate = Gate(info, opts.timeout)
        fail = lambda phase: _maybe_fail(opts, info, phase)  # noqa: E731
        infos = gate.meet("info", *_attempt(lambda: (fail("info"), rank_info(rt, info))[1]))
        report["ranks"] = [infos[r]["result"] for r in sorted(infos)]
        gate.hosts = {r["rank"]: r["host"] for r in report["ranks"]}
        max_mb = opts.max_mb or (1024 if rt.device.type == "cuda" else 16)
        sizes = message_sizes(MB, max_mb * MB, opts.size_factor)
        hosts = [r["host"] for r in report["ranks"]]
        busbw = gate.meet("busbw", *_attempt(lambda: (fail("busbw"), measure_scopes(
            hosts, rt.device, sizes, opts.warmup, opts.iters) if info.is_distributed else {})[1]))
        report["busbw"] = busbw[0]["result"]
        batch = recipe.train.device_batch_size if isinstance(recipe.train.device_batch_size, int) \
            else opts.device_batch
        steps = gate.meet("step", *_attempt(lambda: (fail("step"), training_step(
            recipe, rt, not opts.no_compile, batch, opts.steps))[1]))
        report["step"] = {r: steps[r]["result"] for r in sorted(steps)}
        report["prediction"] = predict(recipe, {r: p["result"] for r, p in steps.items()},
                                       report["busbw"], info.world_size, opts.overlap)
        report["status"] = "ok"
    except CheckFailed as e:
        report.update(status="failed", failed_phase=e.phase, error=str(e),
                      failures={r: {"host": e.hosts.get(r), "error": err} for r, err in e.failures.items()})
        raise
    except BaseException as e:  # bad input (UserError) or an interrupt before the ranks met
        report.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        report["finished"] = now_iso()
        if info.rank == 0:
            atomic_write_json(out_path, report)
        if gate is not None:
            gate.finish(min(60.0, opts.timeout))
        if rt is not None and report["status"] == "ok":
            teardown_runtime(rt)  # a failed collective could hold the group's destruction
        else:
            rendezvous.leave()
    return report


def _attempt(fn) -> tuple:
    """(result, None) or (None, "Type: message") — a raising rank reports instead of vanishing."""
    try:
        return fn(), None
    except CheckFailed:
        raise
    except Exception as e:  # any failure of this rank is the check's finding, reported by host
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def _maybe_fail(opts, info: DistInfo, phase: str) -> None:
    if opts.fail_rank != info.rank or opts.fail_phase != phase:
        return
    if opts.fail_how == "exit":
        os._exit(3)  # a rank that dies: the others' gate times out naming it
    raise RuntimeError(f"forced failure (--fail-rank {info.rank} --fail-phase {phase})")


def render(report: dict) -> str:
    lines = ["| rank | host | device | memory GB | CPUs | torch | CUDA | NCCL |", "|---:|---|---|---:|---:|---|---|---|"]
    for r in report.get("ranks", []):
        lines.append(f"| {r['rank']} | {r['host']} | {r['device_name']} ({r['device']}) | {r['memory_gb']} | "
                     f"{r['cpus']} | {r['torch']} | {r['cuda'] or '-'} | {r['nccl'] or '-'} |")
    for scope, s in (report.get("busbw") or {}).items():
        lines.append(f"all-reduce {scope}, {s['n']} ranks per group ({len(s['ranks'])} group(s)): busbw GB/s "
                     "(slowest group) " + ", ".join(
                         f"{row['bytes'] // MB} MB {min(g[i]['busbw_gbps'] for g in s['by_group']):.3f}"
                         for i, row in enumerate(s["by_group"][0])))
    for rank, s in (report.get("step") or {}).items():
        lines.append(f"step rank {rank}: {'compiled' if s['compile'] else 'eager'}, batch {s['batch']}×"
                     f"{s['sequence_len']}, first {s['first_step_s']:.2f} s, median {s['step_s']:.3f} s "
                     f"(min {s['step_s_min']:.3f}, max {s['step_s_max']:.3f}, {s['steps']} steps), "
                     f"{s['tok_per_s']:,.0f} tok/s, MFU {s['mfu_percent']:.1f}% of {s['peak']}")
    p = report.get("prediction")
    if p:
        lines.append(f"predicted scaling efficiency on {p['world_size']} rank(s): {p['efficiency']:.3f} "
                     f"(compute {p['compute_s']:.3f} s per optimizer step = {p['grad_accum']} micro-steps, "
                     f"all-reduce of {p['grad_bytes'] / 1e6:.1f} MB {p['allreduce_s']:.3f} s at "
                     f"{p['busbw_gbps']:.3f} GB/s {p['busbw_scope'] or '(single rank)'}, exposed "
                     f"{p['exposed_s']:.3f} s; assumed: {p['assumption']})")
    return "\n".join(lines)


def parse_options(argv: list[str]):
    ap = recipe_argparser("python -m nanochat.check", "Cluster check: ranks, all-reduce busbw, one step, predicted scaling.")
    ap.add_argument("--out", help="where check.json goes (default: <run_dir>/check.json)")
    ap.add_argument("--preflight", action="store_true",
                    help="only check the recipe and where check.json goes, then exit (slurm/check.sbatch "
                         "runs it once before torchrun, so a bad one is one line, not a traceback per rank)")
    ap.add_argument("--no-compile", action="store_true", help="time the step eagerly (fast on CPU)")
    ap.add_argument("--max-mb", type=int, default=None,
                    help="largest all-reduce in MB, from 1 MB ×--size-factor (default 1024 on CUDA, 16 on CPU)")
    ap.add_argument("--size-factor", type=int, default=4, choices=[2, 4])
    ap.add_argument("--warmup", type=int, default=2, help="untimed all-reduces per size")
    ap.add_argument("--iters", type=int, default=5, help="timed all-reduces per size (median)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps after the first")
    ap.add_argument("--device-batch", type=int, default=4, help="rows per step when the recipe's is auto")
    ap.add_argument("--overlap", type=float, default=0.0, help="fraction of the all-reduce hidden behind backward")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a rank waits for the others (and for a collective)")
    ap.add_argument("--fail-rank", type=int, default=-1, help="testing: this rank fails on purpose")
    ap.add_argument("--fail-phase", choices=PHASES, default="step")
    ap.add_argument("--fail-how", choices=["raise", "exit"], default="raise")
    opts = ap.parse_intermixed_args(argv)
    if (opts.max_mb is not None and opts.max_mb < 1) or opts.timeout <= 0 or opts.steps < 1 \
            or not 0 <= opts.overlap <= 1:
        raise UserError("--max-mb and --steps must be ≥ 1, --timeout > 0, --overlap in [0, 1]")
    return opts


def main(argv: list[str]) -> int:
    opts = parse_options(argv)
    recipe = load_recipe(opts.recipe, opts.overrides)
    if not opts.out:  # an --out the user names is theirs to choose
        refuse_launcher_dir(recipe.out_dir, "python -m nanochat.check", hint=", or --out check.json")
    if opts.preflight:
        return 0
    out = Path(opts.out) if opts.out else recipe.out_dir / "check.json"
    rank = dist_info_from_env().rank
    try:
        report = run_check(recipe, opts, out)
    except CheckFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if rank == 0:
            print(f"check.json: {out}", flush=True)
        sys.stdout.flush()
        os._exit(1)  # a failed collective may leave threads that would hold the exit
    if rank == 0:
        print(render(report), flush=True)
        print(f"check: ok, {report['world_size']} rank(s) on {len({r['host'] for r in report['ranks']})} "
              f"host(s); check.json: {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
