"""Follow a launched run:  python jobs/status.py RUN_DIR [--cancel] [--watch]

Per stage and task: the job state, elapsed time, progress or result, why a task failed or was
cancelled, and where a running training task's time went (jobs/monitor.py says what each column
holds). A ladder (a grid over model.depth) shows one line per rung instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.monitor import WATCH_EVERY_S, WATCH_MAX_S, cancel, collect, show, watch  # noqa: E402
from nanochat.common import UserError, cli_main  # noqa: E402
from nanochat.config import home_unset_hint  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/status.py", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="the run directory jobs/launch.py printed, e.g. runs/tiny")
    ap.add_argument("--cancel", action="store_true", help="cancel the run's jobs")
    ap.add_argument("--watch", action="store_true", help="refresh until every job has ended")
    ap.add_argument("--every", type=float, default=WATCH_EVERY_S, metavar="SECONDS",
                    help=f"--watch: seconds between refreshes, doubled up to {WATCH_MAX_S:.0f} while nothing "
                         f"changes [{WATCH_EVERY_S:.0f}]")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        hint = home_unset_hint()
        raise UserError(f"run directory {run_dir} not found; pass the run directory that jobs/launch.py "
                        f"printed{'; ' + hint if hint else ''}")
    if args.cancel:
        cancel(run_dir)
        return 0
    if args.json:
        print(json.dumps(collect(run_dir), indent=2))
        return 0
    if args.every <= 0:
        raise UserError(f"--every {args.every:g}: give a positive number of seconds")
    if args.watch:
        return watch(run_dir, args.every)
    return 1 if show(run_dir)[1] else 0  # states the scheduler could not confirm: not a clean answer


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
