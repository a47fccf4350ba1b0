"""The compute multiplier (CM) of a variant over a baseline, per common depth, and its seed spread
(`python jobs/compare.py` compares two runs; the report, a launch's `report.compare` axis).

Upstream's conventions (karpathy/nanochat, branch experiment_refactor, scripts/compare.py:1-33,
53-109): for the variant's final val_bpb (the anchor), CM = the baseline's FLOPs to reach it ÷
the variant's FLOPs; the baseline's FLOPs are read off its val_bpb-vs-FLOPs curve (the `eval`
records of its base_train.log) piecewise-linearly in (log FLOPs, log bpb); an anchor outside the
measured range extends the boundary segment, and that CM is marked extrapolated (a trailing "?").
CM > 1: the variant reaches the same quality with less compute. Only depths trained in both are
compared; each depth is one `cm` record (upstream's grammar). One launch can do the same: a
recipe whose grid has model.depth and an idea's axis, with `report.compare: {axis: baseline
value}`, gets the CM of every other value in its report (grid_report_lines).

The seed spread: runs of the baseline's recipe with other seeds. The final val_bpb of the
baseline and those runs scatter by chance alone; through the slope of the baseline's curve that
scatter is a band of CMs (seed_band: the 95% prediction interval of another seed), and a CM
inside it (`within_seed_spread=1`) is no effect beyond chance.
Torch-free.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from nanochat.common import UserError, atomic_path, atomic_write_text
from nanochat.logfmt import STAGE_LOGS, format_record, last_summary, parse_records
from nanochat.recipe import load_recipe, yaml_load

# --------------------------------------------------------------------------------------------
# Reading a run: its rungs' base summaries and training curves, by depth

def rung_dirs(run_dir: Path) -> list[Path]:
    """The base task directories of a run (base/NNN), or the run itself when it is one."""
    run_dir = Path(run_dir)
    if (run_dir / STAGE_LOGS["base"]).exists():
        return [run_dir]
    return sorted(p.parent for p in run_dir.glob(f"base/*/{STAGE_LOGS['base']}"))


def read_run(run_dir: Path) -> dict[int, dict]:
    """depth → rung (read_rungs) of every rung of a run that finished pretraining."""
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: no such run directory; pass the directory jobs/launch.py printed")
    return read_rungs(rung_dirs(run_dir), str(run_dir))


def read_rungs(dirs: list[Path], where: str) -> dict[int, dict]:
    """depth → {summary, curve [(eflops, val_bpb)], dir} for every base task directory in `dirs`
    that finished pretraining (its log has a summary with val_bpb and eflops: upstream's
    read_base_summary). `where` names the set in errors (a run, or one value of a grid axis)."""
    out: dict[int, dict] = {}
    for d in dirs:
        log = Path(d) / STAGE_LOGS["base"]
        summary = last_summary(log)
        if not summary or "val_bpb" not in summary or "eflops" not in summary:
            continue
        curve = [(r["eflops"], r["val_bpb"]) for r in parse_records(log, "eval")
                 if isinstance(r.get("step"), int) and r["step"] > 0 and r.get("eflops", 0) > 0
                 and "val_bpb" in r]
        depth = summary.get("depth")
        if depth in out:
            raise UserError(f"{where}: two rungs of depth {depth} ({out[depth]['dir']}, {d}); "
                            "compare runs with one task per depth")
        out[depth] = {"summary": summary, "curve": curve, "dir": Path(d)}
    return out


# --------------------------------------------------------------------------------------------
# The CM, as upstream computes it

def solve_segment(p0: tuple[float, float], p1: tuple[float, float], target: float) -> float:
    """FLOPs where the line through p0, p1 in (log FLOPs, log bpb) reaches `target`."""
    (f0, b0), (f1, b1) = p0, p1
    w = (math.log(b0) - math.log(target)) / (math.log(b0) - math.log(b1))
    return math.exp((1 - w) * math.log(f0) + w * math.log(f1))


def flops_at_bpb(points: list[tuple[float, float]], target: float) -> tuple[float, bool] | None:
    """(FLOPs, extrapolated) where the curve first reaches `target`; None when degenerate."""
    if len(points) < 2:
        return None
    for (f0, b0), (f1, b1) in zip(points, points[1:]):
        if b1 <= target <= b0 and b0 != b1:
            return solve_segment((f0, b0), (f1, b1), target), False
    segment = (points[0], points[1]) if target > points[0][1] else (points[-2], points[-1])
    if segment[0][1] == segment[1][1]:
        return None
    return solve_segment(*segment, target), True


def compute_multiplier(baseline: dict, variant: dict) -> dict | None:
    """One depth's CM row (anchor = the variant's final val_bpb); None when the baseline's
    curve cannot be inverted there."""
    anchor, v_flops = variant["summary"]["val_bpb"], variant["summary"]["eflops"]
    found = flops_at_bpb(baseline["curve"], anchor)
    if found is None:
        return None
    b_flops, extrapolated = found
    return {"anchor_bpb": anchor, "baseline_eflops": b_flops, "variant_eflops": v_flops,
            "cm": b_flops / v_flops, "extrapolated": extrapolated}


# Student's t, two-sided 95%, by degrees of freedom (beyond the table: the normal's 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def seed_band(baseline: dict, seed_rungs: list[dict]) -> tuple[float, float, int] | None:
    """(lo, hi, n) of the CMs chance alone gives at this depth. The final val_bpb of the baseline
    and its n seed runs (n + 1 values) scatter with a standard deviation sd in log bpb; a further
    run of the same recipe falls, with 95% probability, within t·sd·√(1 + 1/(n+1)) of their mean
    (the prediction interval, t of n degrees of freedom); through the slope of the baseline's
    curve at its end (d log bpb / d log FLOPs) that is a band of CMs around 1. None without a
    seed run or a slope."""
    finals = [math.log(r["summary"]["val_bpb"]) for r in [baseline] + seed_rungs]
    curve = baseline["curve"]
    if len(finals) < 2 or len(curve) < 2:
        return None
    (f0, b0), (f1, b1) = curve[-2], curve[-1]
    slope = (math.log(b1) - math.log(b0)) / (math.log(f1) - math.log(f0))
    if slope == 0:
        return None
    mean = sum(finals) / len(finals)
    sd = math.sqrt(sum((x - mean) ** 2 for x in finals) / (len(finals) - 1))
    n = len(finals)
    half = T95.get(n - 1, 1.96) * sd * math.sqrt(1 + 1 / n) / abs(slope)
    return math.exp(-half), math.exp(half), len(seed_rungs)


def compare(baseline_dir: Path, variant_dir: Path, seed_dirs: list[Path] = ()) -> tuple[list[dict], list[str]]:
    """The `cm` rows per common depth of two runs (compare_rungs)."""
    return compare_rungs(read_run(baseline_dir), read_run(variant_dir), [read_run(d) for d in seed_dirs],
                         str(baseline_dir), str(variant_dir))


def compare_rungs(base: dict[int, dict], var: dict[int, dict], seeds: list[dict[int, dict]] = (),
                  base_name: str = "baseline", var_name: str = "variant") -> tuple[list[dict], list[str]]:
    """The `cm` rows per common depth (with the seed band when seed rungs are given) and the
    notes (depths skipped, and why)."""
    for rungs, name in ((base, base_name), (var, var_name)):
        if not rungs:
            raise UserError(f"{name}: no rung finished pretraining (no summary in any base_train.log)")
    notes = [f"d{d}: skipped, the baseline never trained this depth" for d in sorted(var) if d not in base]
    rows = []
    for depth in sorted(d for d in var if d in base):
        row = compute_multiplier(base[depth], var[depth])
        if row is None:
            notes.append(f"d{depth}: skipped, the baseline's curve is degenerate at the anchor")
            continue
        row = {"model_tag": f"d{depth}", "depth": depth, **row}
        band = seed_band(base[depth], [s[depth] for s in seeds if depth in s])
        if band is not None:
            row.update(seed_runs=band[2], seed_cm_lo=band[0], seed_cm_hi=band[1],
                       within_seed_spread=int(band[0] <= row["cm"] <= band[1]))
        rows.append(row)
    return rows, notes


def cm_record(row: dict) -> str:
    fields = {"model_tag": row["model_tag"], "depth": row["depth"], "anchor_bpb": round(row["anchor_bpb"], 6),
              "baseline_eflops": float(f"{row['baseline_eflops']:.4g}"),
              "variant_eflops": float(f"{row['variant_eflops']:.4g}"),
              "cm": f"{row['cm']:.4f}?" if row["extrapolated"] else f"{row['cm']:.4f}"}
    if "seed_runs" in row:
        fields.update(seed_runs=row["seed_runs"], seed_cm_lo=round(row["seed_cm_lo"], 4),
                      seed_cm_hi=round(row["seed_cm_hi"], 4), within_seed_spread=row["within_seed_spread"])
    return format_record("cm", **fields)


def verdict(row: dict, no_seeds: str = "no seed runs given (--seed-run)") -> str:
    """The sentence a reader needs: better, worse or indistinguishable from seed noise."""
    cm = f"{row['cm']:.3f}" + (" (extrapolated: the anchor lies outside the baseline's measured curve)"
                               if row["extrapolated"] else "")
    if "seed_runs" not in row:
        return f"d{row['depth']}: CM {cm}; {no_seeds}, so the seed spread is unknown"
    band = (f"[{row['seed_cm_lo']:.3f}, {row['seed_cm_hi']:.3f}] (95% prediction interval of another seed, "
            f"from the final val_bpb of the baseline and {row['seed_runs']} seed run(s))")
    if row["within_seed_spread"]:
        return f"d{row['depth']}: CM {cm} is within the seed spread {band}: no effect beyond chance"
    side = "better" if row["cm"] > row["seed_cm_hi"] else "worse"
    return f"d{row['depth']}: CM {cm} is outside the seed spread {band}: the variant is {side}"


# --------------------------------------------------------------------------------------------
# The picture

def plot(base: dict[int, dict], var: dict[int, dict], rows: list[dict], out: Path,
         names: tuple[str, str] = ("baseline", "variant")) -> None:
    """Two panels: both sets' curves and final points per depth; the CM against compute."""
    from nanochat.plots import pyplot
    plt = pyplot()
    fig, (ax, ax_cm) = plt.subplots(1, 2, figsize=(12, 4.8))
    for run, color, name in ((base, "#2a78d6", f"{names[0]} (baseline)"), (var, "#1baf7a", f"{names[1]} (variant)")):
        depths = [r["depth"] for r in rows]
        for d in depths:
            pts = run[d]["curve"]
            ax.plot([p[0] * 1e18 for p in pts], [p[1] for p in pts], "o-", color=color, ms=2, alpha=0.3)
        finals = sorted((run[d]["summary"]["eflops"] * 1e18, run[d]["summary"]["val_bpb"], d) for d in depths)
        ax.plot([f[0] for f in finals], [f[1] for f in finals], "o-", color=color, lw=2, label=name)
        for x, y, d in finals:
            ax.annotate(f"d{d}", (x, y), xytext=(5, -3), textcoords="offset points", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="pretraining compute (FLOPs)", ylabel="val BPB",
           title="final val BPB per depth (faded: training curves)")
    ax.legend(fontsize=8)
    xs = [r["variant_eflops"] * 1e18 for r in rows]
    ax_cm.axhline(1.0, color="#52514e", ls="--", lw=1)
    ax_cm.plot(xs, [r["cm"] for r in rows], "-", color="#1baf7a", lw=2)
    for x, r in zip(xs, rows):
        ax_cm.plot([x], [r["cm"]], "o", color="#1baf7a", mfc="white" if r["extrapolated"] else "#1baf7a")
        ax_cm.annotate(f"d{r['depth']}" + ("?" if r["extrapolated"] else ""), (x, r["cm"]),
                       xytext=(5, -10), textcoords="offset points", fontsize=8)
        if "seed_runs" in r:
            ax_cm.vlines(x, r["seed_cm_lo"], r["seed_cm_hi"], color="#52514e", lw=4, alpha=0.3)
    ax_cm.set(xscale="log", xlabel="pretraining compute (FLOPs)", ylabel="compute multiplier",
              title="CM (open marker: extrapolated; grey bar: seed spread)")
    for a in (ax, ax_cm):
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# An idea's CM in one launch: the recipe's `report.compare: {axis: baseline value}`
#
# Done by the report stage, not a `compare` stage of its own: the report already runs after every
# task (whatever their states), reads the same base logs and is where the result is read; a stage
# would add a job, a time limit, dependency edges and a stage name for the same few milliseconds,
# and `python jobs/report.py RUN` would still have to redo it on a partial or resumed run.

def axis_groups(manifest: dict, axis: str) -> dict:
    """A value of the grid's `axis` → the base task directories with it (in the grid's order),
    read from each task's overrides (`model.bigram_factor=5`), as recipe YAML."""
    groups: dict = {}
    for task in manifest["stages"].get("base", {}).get("tasks", []):
        values = dict(o.split("=", 1) for o in task["overrides"])
        if axis in values:
            groups.setdefault(yaml_load(values[axis]), []).append(Path(task["run_dir"]))
    return groups


def grid_report_lines(run_dir: Path, manifest: dict) -> list[str]:
    """The report's section for `report.compare`: per value of the axis other than the baseline,
    the `cm` records per depth against the baseline's tasks, written to
    RUN/compare_<axis>=<value>.log with its two-panel PNG; [] without report.compare."""
    try:
        spec = load_recipe(Path(run_dir) / "recipe.yaml").report.compare
    except UserError:
        return []
    if not spec:
        return []
    (axis, baseline), = spec.items()
    groups = axis_groups(manifest, axis)
    base_name = f"{axis}={baseline}"
    lines = ["", f"## The compute multiplier of {axis} (report.compare; baseline {base_name})", "",
             "CM: the baseline's training FLOPs to reach the variant's final val BPB ÷ the variant's "
             "(> 1: the variant needs less compute); `?` marks an anchor outside the baseline's curve "
             "(docs/ladder.md)."]
    base = read_rungs(groups.get(baseline, []), base_name)
    for value, dirs in groups.items():
        if value == baseline:
            continue
        name = f"{axis}={value}"
        stem = "compare_" + re.sub(r"[^\w.=+-]", "_", name)
        lines += ["", f"### {name} against {base_name}", ""]
        var = read_rungs(dirs, name)
        try:
            rows, notes = compare_rungs(base, var, [], base_name, name)
        except UserError as e:
            lines.append(f"Not compared: {e}")
            continue
        records = notes + [cm_record(r) for r in rows]
        atomic_write_text(Path(run_dir) / f"{stem}.log", "".join(line + "\n" for line in records))
        lines += ["```"] + records + ["```", ""]
        lines += [f"- {verdict(r, 'no seed runs in this launch (jobs/compare.py --seed-run takes them)')}"
                  for r in rows]
        if rows:
            plot(base, var, rows, Path(run_dir) / f"{stem}.png", (base_name, name))
            lines += ["", f"![{name} against {base_name}]({stem}.png)"]
    return lines
