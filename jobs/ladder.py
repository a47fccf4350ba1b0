"""(Re)write a run's miniseries curve: curve.log and curve.png, and print the rows.

    python jobs/ladder.py RUN_DIR

One `model` record per rung that finished pretraining (upstream's scripts/curve.py grammar), with
its scheduler cost; the report job writes the same files (jobs/miniseries.py says what they hold).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python jobs/ladder.py` from anywhere

from jobs.miniseries import CURVE, write_curve  # noqa: E402
from nanochat.common import UserError, cli_main  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/ladder.py", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory jobs/launch.py made")
    run_dir = Path(ap.parse_args(argv).run_dir)
    rows = write_curve(run_dir)
    if not rows:
        raise UserError(f"{run_dir}: no rung has finished pretraining (no summary record in any "
                        "base_train.log); wait for the base tasks, see `python jobs/status.py RUN_DIR`")
    print((run_dir / CURVE).read_text(), end="")
    print(f"wrote {run_dir / CURVE} and {run_dir / 'curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
