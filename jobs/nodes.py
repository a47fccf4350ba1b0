"""Where a SLURM node is reached: its NodeAddr (a node's name need not resolve on every node, or
may resolve to 127.0.0.1 on itself). The one rule for it, asked by the launcher's ranks
(jobs/tasks.py), by the launcher's batch shell once per multi-node job (jobs/plan.py
MASTER_ADDR_LINE) and by the plain sbatch scripts (slurm/torchrun.sh):

    python -m jobs.nodes master      the job's first node ($SLURM_JOB_NODELIST): the rendezvous
    python -m jobs.nodes self        this node ($SLURMD_NODENAME): torchrun's --local-addr

Each prints one address (the node's name when SLURM gives none). Imports nothing but the standard
library: the shell scripts start it on every node.
"""
from __future__ import annotations

import os
import subprocess
import sys


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def node_address(node: str) -> str:
    """NodeAddr of a SLURM node (falls back to the name)."""
    for field in _scontrol("show", "node", node).split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return node


def first_node(nodelist: str) -> str:
    """The first host of a SLURM node list (`node[1-4]` → node1), as SLURM expands it."""
    hosts = _scontrol("show", "hostnames", nodelist).split()
    return hosts[0] if hosts else nodelist


def main(argv: list[str]) -> int:
    if argv == ["master"] and os.environ.get("SLURM_JOB_NODELIST"):
        print(node_address(first_node(os.environ["SLURM_JOB_NODELIST"])))
    elif argv == ["self"] and os.environ.get("SLURMD_NODENAME"):
        print(node_address(os.environ["SLURMD_NODENAME"]))
    else:
        print("usage: python -m jobs.nodes {master|self}, inside a SLURM job (SLURM_JOB_NODELIST, "
              "SLURMD_NODENAME)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
