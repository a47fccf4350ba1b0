"""The compute multiplier (CM) of a variant run over a baseline run, per common depth.

    python jobs/compare.py BASELINE_RUN VARIANT_RUN [--seed-run RUN ...] [--plot FILE]

Prints one `cm` record per depth trained in both runs (upstream's grammar; jobs/multiplier.py
says how the CM is read off the baseline's curve) and a verdict per depth, and writes the records
to VARIANT_RUN/compare_vs_<baseline>.log with a two-panel PNG beside it (curves; CM vs compute).
`--seed-run` names runs of the baseline's recipe with other seeds: each depth's verdict then says
whether the variant's CM lies within the seed spread (no effect beyond chance) or outside it.
Torch-free.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python jobs/compare.py` from anywhere

from jobs.multiplier import cm_record, compare_rungs, plot, read_run, verdict  # noqa: E402
from nanochat.common import UserError, atomic_write_text, cli_main  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/compare.py", description=__doc__.splitlines()[0])
    ap.add_argument("baseline", help="the baseline's run directory")
    ap.add_argument("variant", help="the variant's run directory")
    ap.add_argument("--seed-run", action="append", default=[], metavar="RUN",
                    help="a run of the baseline's recipe with another seed (repeatable): the seed spread")
    ap.add_argument("--plot", help="the PNG's path [VARIANT/compare_vs_<baseline>.png]; 'none' for no plot")
    args = ap.parse_args(argv)
    baseline, variant = Path(args.baseline), Path(args.variant)
    base, var = read_run(baseline), read_run(variant)
    rows, notes = compare_rungs(base, var, [read_run(Path(s)) for s in args.seed_run], str(baseline), str(variant))
    lines = notes + [cm_record(r) for r in rows]
    for line in lines + [verdict(r) for r in rows]:
        print(line)
    stem = f"compare_vs_{baseline.resolve().name}"
    atomic_write_text(variant / f"{stem}.log", "".join(line + "\n" for line in lines))
    if rows and args.plot != "none":
        out = Path(args.plot) if args.plot else variant / f"{stem}.png"
        plot(base, var, rows, out, (baseline.resolve().name, variant.resolve().name))
        print(f"wrote {variant / (stem + '.log')} and {out}")
    if not rows:
        raise UserError(f"no depth to compare: {'; '.join(notes) or 'the runs share no depth'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
