"""What every benchmark command shares: its timing flags and how it reports (JSON on stdout, and
a file with --json). Benchmarks live in the checkout, not the installed package: run them from the
repository root, `python -m bench.NAME`."""
from __future__ import annotations

import json

from nanochat.common import atomic_write_json


def timing_args(ap, warmup: int, repeats: int, json_file: bool = True) -> None:
    """The flags every benchmark's method shares: untimed warm-up runs, timed repeats (median,
    min and max over them) and, with `json_file`, `--json PATH` for `emit`."""
    ap.add_argument("--warmup", type=int, default=warmup,
                    help=f"untimed runs first: compilation, allocation, caches (default {warmup})")
    ap.add_argument("--repeats", type=int, default=repeats,
                    help=f"timed runs: median, min and max over them (default {repeats})")
    if json_file:
        ap.add_argument("--json", help="also write the report to this file (atomically)")


def emit(report: dict, json_path=None) -> None:
    """Print a benchmark's report (JSON); with `--json PATH` also write it there, atomically."""
    print(json.dumps(report, indent=2))
    if json_path:
        atomic_write_json(json_path, report)
