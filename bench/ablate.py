"""Ablation of the current-architecture switches:  python -m bench.ablate RECIPE [key=value ...]

Trains the recipe's model (e.g. configs/tiny.yaml, on the offline corpus) once with every switch
off ("dense"), once with each switch on alone, and once with all of them on ("all"), and prints
a table: final validation BPB, training tokens/s, parameters, FLOPs/token and wall time.

Every run is `python -m nanochat.train` in a fresh process (the real training path, nothing
re-implemented here) with the same recipe, seed and data: the same `--steps` optimizer steps of
`--rows` rows × sequence_len tokens (one micro-batch per step), so every run sees exactly the
same tokens in the same order; the table records each run's seed and the loader position its
final checkpoint stopped at, to show it. The switches take upstream's values and
initialisations (SWITCHES below); nothing is tuned to this table.

Method: tokens/s = training tokens / training seconds (the loop's train_s: evaluation and
checkpoints excluded), one run each, on a machine that may be shared — differences of a few
percent are within the noise; wall time is the whole process (start-up, evaluation included).
`--only a,b` ablates only those switches ("all" then means all of them); `--out DIR` keeps the
runs there (default: a temporary directory) and writes ablate.json and ablate.png (final BPB
bars and validation curves).

Because one run's tokens/s is at the mercy of whatever else the machine runs meanwhile, the
bench then times dense against all in this one process with their windows interleaved
(`--speed-windows`, `--speed-steps`; random tokens, same rows): the figure for the
"switches together cost ≤ 15% tokens/s" question.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanochat.common import UserError, atomic_path, atomic_write_json, cli_main
from nanochat.plots import pyplot, read_jsonl
from nanochat.recipe import load_recipe, recipe_argparser

# switch → the overrides that turn it on, at upstream's values (karpathy/nanochat master;
# ../shared/notes/nanochat-current.md). "dense" is the recipe with none of them.
SWITCHES = {
    "value_embeds": {"model.value_embeds": "true"},
    "window_pattern": {"model.window_pattern": "SSSL"},
    "smear": {"model.smear": "true"},
    "backout": {"model.backout": "true"},
    "residual_scalars": {"model.residual_scalars": "true"},
    "qk_gain": {"model.qk_gain": "1.2"},
    "rotary_base": {"model.rotary_base": "100000"},
    # Muon's variance reduction and cautious weight decay at upstream's 0.28 (cosine-decayed)
    "optim": {"optim.variance_reduction": "true", "optim.muon_weight_decay": "0.28"},
}
# Not ablated: optim.lr_batch_scaling and optim.wd_scaling. They are rules that carry d12's tuned
# values to another batch and horizon, not features, and a CPU-sized run is far outside their
# range: at 2,048 tokens/step and ~10^5 tokens they give LRs × 0.06 and Muon weight decay × ~10^4
# (1 − lr·wd < 0: every step would flip the weights' sign) — a broken run, not a measurement.
# The kit's additions measured on top of upstream's recipe (`--plan kit`): the baseline is every
# switch above plus Muon's row equilibration and Muon+ (upstream merged both: its Muon step is
# row equilibration → Polar Express → Muon+ → variance reduction), i.e. configs/d12.yaml at a CPU
# shape; the rows add the hashed bigram (configs/d16_bigram.yaml's factor 5) and take row
# equilibration + Muon+ out — a 2 × 2 design, so "both" is measured too.
PARITY = {k: v for o in SWITCHES.values() for k, v in o.items()} | {
    "optim.row_equilibrate": "true", "optim.muon_plus": "true"}
KIT_RUNS = {
    "parity": {},
    "+bigram": {"model.bigram_factor": "5"},
    "-roweq/muon+": {"optim.row_equilibrate": "false", "optim.muon_plus": "false"},
    "+bigram -roweq/muon+": {"model.bigram_factor": "5", "optim.row_equilibrate": "false",
                             "optim.muon_plus": "false"},
}
COLUMNS = ("run", "val_bpb", "d_bpb", "tok_per_s", "d_tok_s_pct", "params", "flops_per_token",
           "wall_s", "tokens", "seed", "loader_end")


def plan(only: list[str] | None) -> dict[str, dict]:
    """Run name → overrides: dense, each switch alone, all together."""
    names = list(SWITCHES) if not only else only
    unknown = [n for n in names if n not in SWITCHES]
    if unknown:
        raise UserError(f"--only: unknown switch {', '.join(unknown)}; the switches are "
                        f"{', '.join(SWITCHES)}")
    runs = {"dense": {}}
    runs.update({n: dict(SWITCHES[n]) for n in names})
    if len(names) > 1:
        runs["all"] = {k: v for n in names for k, v in SWITCHES[n].items()}
    return runs


def common_overrides(recipe, steps: int, rows: int, evals: int) -> dict:
    """What every run shares: steps, batch (no accumulation), evaluation cadence, no discovery."""
    seq = recipe.model.sequence_len
    return {"train.num_iterations": str(steps), "train.total_batch_size": str(rows * seq),
            "train.device_batch_size": str(rows), "train.eval_every": str(max(1, steps // evals)),
            "train.save_every": "-1", "train.keep_checkpoints": "1", "train.progress_bar": "false",
            "train.train_log_every": str(max(1, steps // 10))}


def run_one(recipe_path: str, overrides: list[str], run_dir: Path) -> dict:
    """One training run in its own process; its figures from the run folder it leaves."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "nanochat.train", recipe_path, *overrides, f"run_dir={run_dir}"]
    root = str(Path(__file__).resolve().parents[1])  # the checkout this benchmark runs from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"ablation run {run_dir.name} failed (exit {rc}): {tail[0]}; the whole log "
                        f"is {run_dir / 'train.log'}")
    run = json.loads((run_dir / "run.json").read_text())
    progress = read_jsonl(run_dir / "progress.jsonl")
    train = [r for r in progress if r.get("event") == "train"]
    evals = [r for r in progress if r.get("event") == "eval" and "val_bpb" in r]
    final = max((p for p in (run_dir / "checkpoints").glob("step_*")), key=lambda p: p.name)
    meta = json.loads((final / "meta.json").read_text())
    tokens = run["num_iterations"] * run["tokens_per_step"]
    return {"val_bpb": round(evals[-1]["val_bpb"], 4), "tok_per_s": round(tokens / train[-1]["train_s"], 1),
            "params": run["params"]["total"], "flops_per_token": run["flops_per_token"],
            "wall_s": round(wall, 1), "tokens": tokens, "seed": meta["recipe"]["train"]["seed"],
            "loader_end": meta["loader"], "curve": [(r["step"], r["val_bpb"]) for r in evals],
            "overrides": overrides}


def interleaved_speed(recipe_path: str, overrides: list[str], runs: dict[str, dict], rows: int,
                      windows: int, steps: int) -> dict:
    """Training tokens/s of each run's model in this one process, the runs' timed windows
    interleaved (A B A B ...) so that a change in the machine's load hits every run alike:
    `windows` windows of `steps` optimizer steps (forward, backward, Muon/AdamW) on random
    tokens at `rows` rows, one untimed warm-up step each, a device sync around each window."""
    import dataclasses
    import statistics
    import torch
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.optim import build_optimizers, optimizer_step
    from nanochat.runtime import recipe_runtime
    built = {}
    for name, switch in runs.items():
        r = load_recipe(recipe_path, list(overrides) + [f"{k}={v}" for k, v in switch.items()])
        rt = recipe_runtime(r)
        torch.manual_seed(r.train.seed)
        config = GPTConfig.from_args(r.model, r.model.vocab_size or r.tokenizer.vocab_size)
        model = build_model(config, rt.device).train()
        # the batch/horizon rules change LR and decay values, not the work: leave them out
        optim = dataclasses.replace(r.optim, lr_batch_scaling=False, wd_scaling=False)
        opts = build_optimizers(model.param_groups(), optim, config.n_embd,
                                all_params=model.parameters())
        gen = torch.Generator().manual_seed(0)
        xy = torch.randint(0, config.vocab_size, (rows, config.sequence_len + 1), generator=gen)
        built[name] = (model, opts, xy.to(rt.device), rt)

    def step(name):
        model, opts, xy, rt = built[name]
        with rt.autocast():
            loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        optimizer_step(list(model.parameters()), opts, 0.0)

    rates = {name: [] for name in built}
    for name in built:
        step(name)
    for _ in range(windows):
        for name, (_, _, xy, rt) in built.items():
            rt.sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name)
            rt.sync()
            rates[name].append(steps * rows * (xy.size(1) - 1) / (time.perf_counter() - t0))
    return {name: {"median": round(statistics.median(v), 1), "min": round(min(v), 1),
                   "max": round(max(v), 1), "n": len(v)} for name, v in rates.items()}


def table(rows: list[dict]) -> str:
    """The printed (markdown) table; Δ against the dense run."""
    head = "| run | val BPB | Δ BPB | tokens/s | Δ tok/s | params | FLOPs/token | wall s |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['val_bpb']:.4f} | {r['d_bpb']:+.4f} | {r['tok_per_s']:,.0f} | "
                     f"{r['d_tok_s_pct']:+.1f}% | {r['params']:,} | {r['flops_per_token']:.3e} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out_png: Path) -> Path:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["run"] for r in rows]
    ax1.barh(names, [r["val_bpb"] for r in rows], color=["C0" if n == "dense" else "C1" for n in names])
    lo = min(r["val_bpb"] for r in rows)
    ax1.set_xlim(lo - 0.05 * lo, max(r["val_bpb"] for r in rows) * 1.01)
    ax1.axvline(rows[0]["val_bpb"], color="k", lw=0.8, ls="--")
    ax1.invert_yaxis()
    ax1.set(xlabel="final validation BPB (lower is better)", title="final val BPB, same tokens")
    for r in rows:
        steps, bpb = zip(*r["curve"])
        ax2.plot(steps, bpb, "o-", ms=3, lw=1.5 if r["run"] in ("dense", "all") else 0.8, label=r["run"])
    ax2.set(xlabel="step", ylabel="validation BPB", title="validation BPB during training")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png


def report_speed(args, runs: dict[str, dict]) -> dict | None:
    """The interleaved timing of `runs` (dense first), printed with each run's ratio to dense."""
    if args.speed_windows < 1 or len(runs) < 2:
        return None
    speed = interleaved_speed(args.recipe, args.overrides, runs, args.rows, args.speed_windows,
                              args.speed_steps)
    dense = speed["dense"]["median"]
    for n, v in speed.items():
        v["over_dense"] = round(v["median"] / dense, 3)
        print(f"[ablate] interleaved speed {n}: {v['median']:,.0f} tok/s median ({v['min']:,.0f}–"
              f"{v['max']:,.0f}, {v['n']} windows of {args.speed_steps} steps), "
              f"{100 * (v['over_dense'] - 1):+.1f}% vs dense")
    if "all" in speed:
        print(f"[ablate] all / dense tokens/s: {speed['all']['over_dense']:.3f}")
    return {"method": f"{args.speed_windows} windows × {args.speed_steps} optimizer steps per run, "
                      f"interleaved, random tokens, {args.rows} rows", **speed}


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m bench.ablate", __doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--rows", type=int, default=4, help="rows (sequences) per step, one micro-batch")
    ap.add_argument("--evals", type=int, default=2, help="validation evaluations per run (curve points)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="validation tokens per evaluation")
    ap.add_argument("--only", default="", help=f"comma-separated switches, of {', '.join(SWITCHES)}")
    ap.add_argument("--out", default=None, help="keep the runs here and write ablate.json, ablate.png")
    ap.add_argument("--speed-windows", type=int, default=5,
                    help="then time dense vs all in this process, interleaved: windows per run (0 = skip)")
    ap.add_argument("--speed-steps", type=int, default=3, help="optimizer steps per speed window")
    ap.add_argument("--speed-only", action="store_true",
                    help="no training runs: only the interleaved timing, of every run of the plan")
    ap.add_argument("--plan", choices=("switches", "kit"), default="switches",
                    help="switches: dense, each switch, all; kit: upstream's recipe (PARITY) as the "
                         "baseline, ± the kit's additions (KIT_RUNS), over --seeds seeds")
    ap.add_argument("--seeds", type=int, default=3, help="--plan kit: training seeds per run (≥ 2)")
    args = ap.parse_intermixed_args(argv)
    if args.plan == "kit":
        return kit_main(args)
    if args.steps < 1 or args.rows < 1 or args.evals < 1:
        raise UserError("--steps, --rows and --evals must be ≥ 1")
    recipe = load_recipe(args.recipe, args.overrides)  # a bad recipe fails here, before any run
    runs = plan([s.strip() for s in args.only.split(",") if s.strip()])
    if args.speed_only:
        report_speed(args, runs)
        return 0
    shared = {**common_overrides(recipe, args.steps, args.rows, args.evals),
              "train.eval_tokens": str(args.eval_tokens)}
    with tempfile.TemporaryDirectory(prefix="ablate_") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        rows = []
        for name, switch in runs.items():
            overrides = list(args.overrides) + [f"{k}={v}" for k, v in {**shared, **switch}.items()]
            print(f"[ablate] {name}: {' '.join(f'{k}={v}' for k, v in switch.items()) or 'every switch off'}",
                  flush=True)
            r = {"run": name, **run_one(args.recipe, overrides, out / "runs" / name)}
            print(f"[ablate] {name}: val_bpb {r['val_bpb']:.4f}, {r['tok_per_s']:,.0f} tok/s, "
                  f"{r['wall_s']:.0f} s", flush=True)
            rows.append(r)
        base = rows[0]
        for r in rows:
            r["d_bpb"] = round(r["val_bpb"] - base["val_bpb"], 4)
            r["d_tok_s_pct"] = round(100 * (r["tok_per_s"] / base["tok_per_s"] - 1), 1)
        report = {"benchmark": "ablation of the architecture and optimizer switches",
                  "recipe": args.recipe, "overrides": args.overrides,
                  "method": {"steps": args.steps, "rows_per_step": args.rows,
                             "sequence_len": recipe.model.sequence_len, "evals": args.evals,
                             "eval_tokens": args.eval_tokens,
                             "tok_per_s": "training tokens / the loop's train_s, one run each",
                             "process": "python -m nanochat.train per run, same seed and data"},
                  "switches": {n: SWITCHES[n] for n in runs if n in SWITCHES},
                  "rows": rows}
        print(table(rows))
        speed = report_speed(args, {n: runs[n] for n in ("dense", "all") if n in runs})
        if speed:
            report["speed_interleaved"] = speed
        if args.out:
            atomic_write_json(out / "ablate.json", report)
            print(f"[ablate] wrote {out / 'ablate.json'} and {plot(rows, out / 'ablate.png')}")
    return 0


def kit_table(report: dict) -> str:
    """Mean final val BPB (min–max over seeds) and the difference from the baseline, paired by
    seed (mean ± sample std, min..max), with what it says."""
    lines = ["| run | val BPB mean (min–max) | Δ vs parity, mean ± std (min..max) | verdict |",
             "|---|---|---|---|"]
    for name, r in report["runs"].items():
        d = r.get("d_bpb")
        cell = "—" if d is None else f"{d['mean']:+.4f} ± {d['std']:.4f} ({d['min']:+.4f}..{d['max']:+.4f})"
        lines.append(f"| {name} | {r['mean']:.4f} ({r['min']:.4f}–{r['max']:.4f}) | {cell} | "
                     f"{r.get('verdict', 'baseline')} |")
    return "\n".join(lines)


def kit_main(args) -> int:
    """--plan kit: every run of KIT_RUNS on top of PARITY, --seeds seeds each (train.seed
    42, 43, ...: the initialisation; the data and its order are the same for all)."""
    import statistics
    if args.seeds < 2:
        raise UserError("--seeds must be ≥ 2 for a spread")
    recipe = load_recipe(args.recipe, args.overrides)
    shared = {**common_overrides(recipe, args.steps, args.rows, args.evals),
              "train.eval_tokens": str(args.eval_tokens), **PARITY,
              # upstream's LR schedule but its 40 warmup steps (a CPU run is a few hundred)
              "train.warmdown_ratio": "0.65", "train.final_lr_frac": "0.05"}
    seeds = [42 + k for k in range(args.seeds)]
    with tempfile.TemporaryDirectory(prefix="ablate_") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        bpb: dict[str, list[float]] = {}
        for name, extra in KIT_RUNS.items():
            for seed in seeds:
                overrides = list(args.overrides) + [f"{k}={v}" for k, v in
                                                    {**shared, **extra, "train.seed": seed}.items()]
                tag = name.replace("+", "p").replace("-", "m").replace("/", "_").replace(" ", "")
                r = run_one(args.recipe, overrides, out / "runs" / f"{tag}_s{seed}")
                print(f"[ablate] {name} seed {seed}: val_bpb {r['val_bpb']:.4f} ({r['wall_s']:.0f} s)",
                      flush=True)
                bpb.setdefault(name, []).append(r["val_bpb"])
        base = bpb["parity"]
        runs = {}
        for name, v in bpb.items():
            row = {"val_bpb": v, "mean": round(statistics.mean(v), 4), "min": min(v), "max": max(v)}
            if name != "parity":
                d = [a - b for a, b in zip(v, base)]
                row["d_bpb"] = {"per_seed": [round(x, 4) for x in d], "mean": round(statistics.mean(d), 4),
                                "std": round(statistics.stdev(d), 4), "min": round(min(d), 4),
                                "max": round(max(d), 4)}
                row["verdict"] = ("better on every seed" if max(d) < 0 else
                                  "worse on every seed" if min(d) > 0 else "within the spread")
            runs[name] = row
        report = {"benchmark": "the kit's additions on top of upstream's recipe",
                  "recipe": args.recipe, "overrides": args.overrides, "parity": PARITY,
                  "variants": KIT_RUNS, "seeds": seeds,
                  "method": {"steps": args.steps, "rows_per_step": args.rows,
                             "sequence_len": recipe.model.sequence_len,
                             "eval_tokens": args.eval_tokens,
                             "process": "python -m nanochat.train per run; same data, same order"},
                  "runs": runs}
        print(kit_table(report))
        if args.out:
            atomic_write_json(out / "ablate_kit.json", report)
            print(f"[ablate] wrote {out / 'ablate_kit.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
