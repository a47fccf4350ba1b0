"""Gradient communication benchmark: all-reduce after backward vs overlapped with it (DDP).

    torchrun ... -m bench.comm RECIPE [key=value ...]      (2+ ranks; srun works too)
    sbatch --nodes=2 slurm/comm.sbatch configs/d4.yaml              (the 2-node wrapper)
    python -m bench.comm configs/d4.yaml --submit          (submits that, waits, prints)

The recipe's model at `--batch` rows × the recipe's sequence, `--accum` micro-steps per step,
random tokens (each rank its own), the recipe's optimizers. Per repeat, on every rank:
- compute: the step's forward/backward micro-steps with no communication at all;
- comm: `optim.allreduce_gradients` of those gradients alone, started from a barrier (the
  bytes every step sends, without waiting for a slower rank);
- after: micro-steps, then allreduce_gradients (the plain loop), then the optimizer step;
- overlapped: the DDP model of nanochat/grad_sync.py (no_sync, then bucketed all-reduce in the
  last backward), then the optimizer step.
Each figure is the slowest rank's (an all-reduce MAX per repeat; every repeat starts at a
barrier). Hidden fraction of a mode = (compute + comm − its forward/backward/sync time) / comm:
0 when nothing overlaps, 1 when the communication is wholly hidden (noise can push it outside
[0, 1]; it is printed as measured). Method: `--warmup` untimed repeats, `--repeats` timed;
median, min and max; CUDA synced around every timer.
"""
from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from nanochat import rendezvous
from bench.harness import timing_args
from nanochat.timing import environment, recipe_step, timed
from nanochat.common import UserError, atomic_write_json, cli_main, print0
from nanochat.optim import allreduce_gradients
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import Runtime, recipe_runtime, teardown_runtime


def _slowest(values: list[float], rt: Runtime) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def bench_comm(recipe, rt: Runtime, batch: int, accum: int, warmup: int, repeats: int) -> dict:
    # the same weights and tokens both ways: the overlapped step's model is a copy of the plain one
    seed = 1000 + rt.dist.rank
    plain = recipe_step(recipe, rt, batch, accum=accum, seed=seed, sync="after")
    ovl = recipe_step(recipe, rt, batch, accum=accum, seed=seed, sync="overlap",
                      model=copy.deepcopy(plain.model))
    p_plain = plain.params
    grad_bytes = sum(p.numel() * p.element_size() for p in p_plain if p.requires_grad)
    rows = []
    for r in range(warmup + repeats):
        rec = {}
        torch.distributed.barrier()
        rec["compute"] = timed(plain.micro_steps, rt.sync)
        torch.distributed.barrier()  # comm alone: without the wait for a slower rank's compute
        rec["comm"] = timed(lambda: allreduce_gradients(p_plain), rt.sync)
        for opt in plain.optimizers:
            opt.zero_grad(set_to_none=True)
        for name, step in (("after", plain), ("overlapped", ovl)):
            torch.distributed.barrier()
            rec[f"{name}_sync"] = timed(lambda s=step: (s.micro_steps(), s.average()), rt.sync)
            rec[f"{name}_step"] = rec[f"{name}_sync"] + timed(step.update, rt.sync)
        keys = sorted(rec)
        rec = dict(zip(keys, _slowest([rec[k] for k in keys], rt)))
        if r >= warmup:
            rows.append(rec)

    def stats(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out = {k: stats([row[k] for row in rows]) for k in rows[0]}
    for mode in ("after", "overlapped"):
        hidden = [(row["compute"] + row["comm"] - row[f"{mode}_sync"]) / row["comm"] for row in rows]
        out[f"{mode}_hidden_fraction"] = stats(hidden)
    cfg = plain.model.config
    out["shape"] = {"batch": batch, "accum": accum, "sequence_len": cfg.sequence_len, "vocab": cfg.vocab_size,
                    "params": sum(p.numel() for p in p_plain), "grad_mb": round(grad_bytes / 2**20, 1)}
    return out


def _print_table(res: dict) -> None:
    def fmt(s, scale=1000.0, unit=" ms"):
        return f"{s['median'] * scale:8.1f}{unit} (min {s['min'] * scale:.1f}, max {s['max'] * scale:.1f})"
    sh = res["shape"]
    print0(f"bench.comm: {res['world_size']} ranks on {', '.join(res['hosts'])}; {res['device']}, "
           f"{res['dtype']}, torch {res['versions']['torch']}")
    print0(f"shape: {sh['params']:,} params ({sh['grad_mb']} MB of fp32 gradients), micro-batch "
           f"{sh['batch']} x {sh['sequence_len']}, {sh['accum']} micro-step(s) per step")
    print0(f"method: {res['method']}")
    print0("figure                         median (min, max) over repeats, slowest rank")
    for key, label in (("compute", "forward/backward, no comm"), ("comm", "all-reduce alone"),
                       ("after_sync", "after: fwd/bwd + all-reduce"),
                       ("overlapped_sync", "overlapped: fwd/bwd (DDP)"),
                       ("after_step", "after: full step"), ("overlapped_step", "overlapped: full step")):
        print0(f"{label:30s} {fmt(res[key])}")
    for mode in ("after", "overlapped"):
        print0(f"{mode + ': comm hidden':30s} {fmt(res[f'{mode}_hidden_fraction'], 100, ' %')}")


def submit(argv: list[str]) -> int:
    """sbatch slurm/comm.sbatch on 2 nodes, wait for it, print its output."""
    repo = Path(__file__).resolve().parents[1]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"nanochat-comm-{os.getpid()}.out"
    cmd = ["sbatch", "--parsable", "--wait", "--nodes=2", f"--output={out}",
           str(repo / "slurm" / "comm.sbatch"), *argv]
    print(f"submitting: {' '.join(cmd)}", flush=True)
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if out.exists():
        sys.stdout.write(out.read_text())
    if res.returncode != 0:
        raise UserError(f"the comm job failed (sbatch exit {res.returncode}): "
                        f"{(res.stderr.strip().splitlines() or ['no stderr'])[-1]}; output: {out}")
    return 0


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m bench.comm",
                          "Gradient all-reduce after backward vs overlapped with it (2+ ranks).")
    # One row, one micro-step by default: on a CPU the compute of a larger step dwarfs the
    # all-reduce (and the others' load on a shared machine swamps it); only the last
    # micro-step communicates anyway (the no_sync ones are covered by tests/test_distributed.py).
    ap.add_argument("--batch", type=int, default=1, help="rows per micro-step")
    ap.add_argument("--accum", type=int, default=1, help="micro-steps per step")
    timing_args(ap, warmup=2, repeats=7)
    ap.add_argument("--submit", action="store_true", help="run it as a 2-node SLURM job and wait")
    args = ap.parse_intermixed_args(argv)
    if args.submit:
        return submit([a for a in argv if a != "--submit"])
    recipe = load_recipe(args.recipe, args.overrides)
    rt = recipe_runtime(recipe)
    try:
        if not rt.dist.is_distributed:
            raise UserError("bench.comm needs 2+ ranks: run it under torchrun or srun "
                            "(or --submit for the 2-node SLURM job)")
        res = bench_comm(recipe, rt, args.batch, args.accum, args.warmup, args.repeats)
        res.update(environment(rt.device, rt.dtype), world_size=rt.dist.world_size,
                   hosts=rendezvous.rank_hosts(),
                   method=f"{args.warmup} warmup + {args.repeats} timed repeats, each from a barrier; "
                          "slowest rank per figure; median/min/max; CUDA synced around timers")
        _print_table(res)
        if args.json and rt.dist.is_master:
            atomic_write_json(args.json, res)
    finally:
        teardown_runtime(rt)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
