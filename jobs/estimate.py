"""What a recipe costs before it is launched:  python jobs/estimate.py RECIPE [key=value ...] [flags]

    python jobs/estimate.py configs/d24.yaml --nodes 1 2 4 [--gpu h100|a100] [--mfu 0.4] [--overlap 0]
    python jobs/estimate.py configs/ladder.yaml --gpu a100 --nodes 3   # a grid: each rung's hours, the makespan

One node's time = the recipe's training FLOPs (its model's FLOPs per token × its tokens) ÷ (GPUs ×
the datasheet's bf16 dense peak × an assumed MFU, `--mfu`); N nodes add the inter-node all-reduce
of nanochat/scaling.py's step model at InfiniBand's bus bandwidth — a model, not a measurement
(docs/scaling.md). What a launched run did cost, from the scheduler: jobs/cost.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python jobs/estimate.py` from anywhere

from jobs.plan import grid_overrides, grid_recipes  # noqa: E402
from nanochat.common import UserError, cli_main  # noqa: E402
from nanochat.recipe import load_recipe  # noqa: E402
from nanochat.scaling import StepModel, efficiency, model_sizes  # noqa: E402

# Datasheet figures (NVIDIA H100 SXM datasheet; NVIDIA Quantum-2 NDR InfiniBand), assumptions,
# not measurements: NVLink 4 is 900 GB/s per GPU (both directions together), an NDR port
# 400 Gb/s = 50 GB/s, one port per GPU being the usual H100 cluster design.
H100_BF16_DENSE = 989e12
A100_BF16_DENSE = 312e12   # NVIDIA A100 datasheet, bf16 dense tensor core
PEAKS = {"h100": H100_BF16_DENSE, "a100": A100_BF16_DENSE}
NVLINK_GBPS = 900.0
IB_NDR_GBPS_PER_GPU = 400 / 8
# Upstream nanochat's measured record (dev/LEADERBOARD.md, run 6, Mar 2026): GPT-2 CORE on one
# 8×H100 node in 1.65 h of training, d24 at param:data ratio 8, ~50% bf16 MFU (with FP8).
UPSTREAM_HOURS = 1.65
UPSTREAM_MFU = 0.50
# The MFU the model assumes unless told (--mfu): below upstream's FP8 record, since this kit
# trains in bf16 and has not yet measured its own MFU on a GPU.
ASSUMED_MFU = 0.40


def cluster_table(recipe, nodes: list[int], gpus_per_node: int = 8, overlap: float = 0.0,
                  grad_bytes_per_param: int = 4, mfu: float = ASSUMED_MFU, gpu: str = "h100",
                  hours_1node: float | None = None) -> dict:
    """Time to train the recipe on each node count. One node: the recipe's training FLOPs at
    `mfu` of `gpus_per_node` × the `gpu`'s bf16 peak (or a measured `hours_1node`, which already
    holds that node's NVLink all-reduces). N nodes: per optimizer step, one node's time split over
    N plus the inter-node all-reduce at InfiniBand busbw (the ring crosses the network: its
    slowest link is a GPU's NIC), a fraction `overlap` hidden."""
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    sizes = model_sizes(recipe)
    tr = recipe.train
    tokens = tr.target_param_data_ratio * sizes["params"]["scaling"] if tr.num_iterations <= 0 \
        else tr.num_iterations * tr.total_batch_size
    steps = math.ceil(tokens / tr.total_batch_size)
    flops = sizes["flops_per_token"] * tokens
    peak = PEAKS[gpu]
    modelled = hours_1node is None
    if modelled:
        hours_1node = flops / (gpus_per_node * peak * mfu) / 3600
    step_1node = hours_1node * 3600 / steps
    grad_bytes = sizes["params"]["total"] * grad_bytes_per_param
    rows = []
    for n_nodes in nodes:
        ranks = n_nodes * gpus_per_node
        if n_nodes == 1:
            m = StepModel(step_1node, 0.0, overlap)  # a node's own NVLink all-reduce: inside its time
        else:
            m = efficiency(step_1node / n_nodes, grad_bytes, IB_NDR_GBPS_PER_GPU * 1e9, ranks, overlap)
        hours = m.step_s * steps / 3600
        rows.append({"nodes": n_nodes, "gpus": ranks, "step_s": round(m.step_s, 4),
                     "compute_s": round(m.compute_s, 4), "allreduce_s": round(m.comm_s, 4),
                     "exposed_s": round(m.exposed_s, 4), "efficiency": round(hours_1node / (n_nodes * hours), 4),
                     "hours": round(hours, 3), "gpu_hours": round(hours * ranks, 2)})
    return {"params": sizes["params"]["total"], "scaling_params": sizes["params"]["scaling"],
            "flops_per_token": sizes["flops_per_token"], "tokens": tokens, "steps": steps,
            "tokens_per_step": tr.total_batch_size, "grad_bytes": grad_bytes, "flops": flops,
            "gpu": gpu, "peak_flops": peak, "gpus_per_node": gpus_per_node,
            "mfu": round(mfu if modelled else flops / (hours_1node * 3600 * gpus_per_node * peak), 4),
            "modelled": modelled, "hours_1node": round(hours_1node, 3), "overlap": overlap, "rows": rows}


def render_table(t: dict) -> str:
    gpu = t["gpu"].upper()
    how = (f"modelled, not measured: {t['flops']:.3e} training FLOPs at an assumed {100 * t['mfu']:.0f}% MFU "
           f"of {t['gpus_per_node']} × {gpu} bf16 dense {t['peak_flops'] / 1e12:.0f} TFLOP/s (datasheet) "
           f"per node (upstream's d24 record, dev/LEADERBOARD.md: {UPSTREAM_HOURS} h on 8 H100 at "
           f"~{100 * UPSTREAM_MFU:.0f}% MFU with FP8)" if t["modelled"] else
           f"one node's time given ({t['hours_1node']} h: {100 * t['mfu']:.1f}% MFU with this model's FLOPs)")
    lines = [
        f"model: {t['params']:,} params ({t['scaling_params']:,} scaling), "
        f"{t['flops_per_token']:.3e} FLOPs/token; {t['tokens']:,.0f} tokens = {t['steps']:,} steps "
        f"of {t['tokens_per_step']:,}; gradients {t['grad_bytes'] / 1e9:.2f} GB per step",
        how,
        f"assumed (datasheets): NVLink {NVLINK_GBPS:.0f} GB/s (a node's own all-reduces: inside its time); "
        f"InfiniBand NDR {IB_NDR_GBPS_PER_GPU:.0f} GB/s per GPU as the busbw across nodes; "
        f"{100 * t['overlap']:.0f}% of the all-reduce overlapped with backward",
        "| nodes | GPUs | step s | compute s | all-reduce s | exposed s | efficiency | hours | GPU-hours |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in t["rows"]:
        lines.append(f"| {r['nodes']} | {r['gpus']} | {r['step_s']:.3f} | {r['compute_s']:.3f} | "
                     f"{r['allreduce_s']:.3f} | {r['exposed_s']:.3f} | {r['efficiency']:.3f} | "
                     f"{r['hours']:.2f} | {r['gpu_hours']:.1f} |")
    return "\n".join(lines)


def ladder_table(recipe, nodes: list[int], gpus_per_node: int = 8, mfu: float = ASSUMED_MFU,
                 gpu: str = "h100") -> dict:
    """A grid recipe (a ladder: one base training per combination) before launching: each rung's
    modelled hours on its own allocation (cluster.nodes nodes; one node's model above) and the
    ladder's makespan when N nodes run the rungs side by side (the launcher submits them as one
    array): longest rung first onto the least-loaded group of cluster.nodes nodes (LPT list
    scheduling). Base pretraining only: SFT, evaluation and the benchmark are not modelled."""
    rungs = []
    for overrides, r in zip(grid_overrides(recipe), grid_recipes(recipe)):
        t = cluster_table(r, [r.cluster.nodes], gpus_per_node, mfu=mfu, gpu=gpu)
        row = t["rows"][0]
        rungs.append({"grid": " ".join(overrides), "depth": r.model.depth, "params": t["params"],
                      "flops": t["flops"], "tokens": t["tokens"], "steps": t["steps"], "nodes": r.cluster.nodes,
                      "hours": row["hours"], "gpu_hours": row["gpu_hours"]})
    per_rung = max(r["nodes"] for r in rungs)
    spans = []
    for n in nodes:
        slots = n // per_rung
        if slots < 1:
            raise UserError(f"--nodes {n}: each rung needs cluster.nodes={per_rung} nodes; give at least {per_rung}")
        load = [0.0] * slots
        for r in sorted(rungs, key=lambda r: -r["hours"]):
            i = load.index(min(load))
            load[i] += r["hours"]
        spans.append({"nodes": n, "makespan_hours": round(max(load), 3)})
    return {"gpu": gpu, "mfu": mfu, "gpus_per_node": gpus_per_node, "rungs": rungs,
            "serial_hours": round(sum(r["hours"] for r in rungs), 3),
            "gpu_hours": round(sum(r["gpu_hours"] for r in rungs), 2), "makespans": spans}


def render_ladder(t: dict) -> str:
    gpu = t["gpu"].upper()
    lines = [f"ladder of {len(t['rungs'])} rungs, base pretraining modelled (not measured) at an assumed "
             f"{100 * t['mfu']:.0f}% MFU of {gpu} bf16 dense {PEAKS[t['gpu']] / 1e12:.0f} TFLOP/s (datasheet), "
             f"{t['gpus_per_node']} GPUs a node; SFT, evaluation and benchmarks not included",
             "| rung | depth | params | tokens | training FLOPs | steps | nodes | hours | GPU-hours |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in t["rungs"]:
        lines.append(f"| {r['grid'] or '-'} | {r['depth']} | {r['params']:,} | {r['tokens']:,.0f} | {r['flops']:.3e} | {r['steps']:,} | "
                     f"{r['nodes']} | {r['hours']:.2f} | {r['gpu_hours']:.1f} |")
    lines.append(f"one rung after another on one allocation (upstream's runs/run.sh loop): {t['serial_hours']:.2f} h; "
                 f"{t['gpu_hours']:.1f} GPU-hours and {sum(r['tokens'] for r in t['rungs']):,.0f} tokens in all")
    for m in t["makespans"]:
        lines.append(f"makespan on {m['nodes']} node{'s' if m['nodes'] > 1 else ''} "
                     f"({m['nodes'] * t['gpus_per_node']} × {gpu}), rungs side by side: {m['makespan_hours']:.2f} h")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/estimate.py", description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="YAML recipe, e.g. configs/d24.yaml")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4], help="node counts to model [1 2 4]")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node [8]")
    ap.add_argument("--gpu", choices=sorted(PEAKS), default="h100",
                    help="whose datasheet bf16 dense peak the MFU applies to [h100]")
    ap.add_argument("--mfu", type=float, default=ASSUMED_MFU,
                    help=f"assumed model FLOPs utilisation of that peak [{ASSUMED_MFU}]")
    ap.add_argument("--overlap", type=float, default=0.0,
                    help="fraction of the all-reduce hidden behind backward (0: after backward)")
    ap.add_argument("--grad-bytes", type=int, default=4, choices=[2, 4],
                    help="bytes per gradient element (4: fp32, this project's; 2: bf16)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_intermixed_args(argv)
    if any(n < 1 for n in args.nodes):
        raise UserError(f"--nodes must be ≥ 1, got {args.nodes}")
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.grid:  # a ladder (or any grid): per-rung hours and the makespan on --nodes
        t = ladder_table(recipe, args.nodes, args.gpus_per_node, args.mfu, args.gpu)
        print(json.dumps(t, indent=2) if args.json else render_ladder(t))
        return 0
    t = cluster_table(recipe, args.nodes, args.gpus_per_node,
                      args.overlap, args.grad_bytes, args.mfu, args.gpu)
    print(json.dumps(t, indent=2) if args.json else render_table(t))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
