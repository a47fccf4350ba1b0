"""What a launch checks before it submits anything — and a dry run checks the same, so that
`--dry-run` passing means the launch will not be refused for these reasons:

- no `YOUR_...` placeholder of configs/site.example.yaml is left in the recipe (an account
  named YOUR_ACCOUNT is accepted by sites that don't enforce accounts; /scratch/YOUR_USER/...
  would be created as it stands);
- the partition exists (sinfo), and the account is one of the user's (sacctmgr), where the
  cluster enforces accounts (AccountingStorageEnforce): otherwise sbatch takes any account;
- the jobs (array tasks, one each) the launch queues at once, with the user's jobs already
  queued, fit the site's MaxSubmitJobs (the user's associations, the jobs' QOS: sacctmgr),
  where accounting answers — sbatch would otherwise refuse a stage midway;
- in a dry run, every stage's script as sbatch would receive it (`sbatch --test-only`, which
  queues nothing): node configuration, GPUs, QOS and whatever else the controller refuses.
"""
from __future__ import annotations

import dataclasses
import getpass
import re
import subprocess
import tempfile

from nanochat.common import UserError

PLACEHOLDER = re.compile(r"YOUR_[A-Z]+")
_ENFORCE_ACCOUNTS = ("associations", "limits", "qos", "safe")  # each implies associations


def _leaves(value, key: str = ""):
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _leaves(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key, value


def check_placeholders(recipe) -> None:
    for key, value in _leaves(recipe):
        if isinstance(value, str) and (m := PLACEHOLDER.search(value)):
            raise UserError(f"{key} is {value!r}: {m.group(0)} is a placeholder from "
                            "configs/site.example.yaml; put your own value in your site file; "
                            "nothing was submitted")


def _run(*cmd: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    # -a: hidden partitions, and those of groups the user is not in, are partitions too (sbatch decides)
    res = _run("sinfo", "-a", "-h", "-o", "%R")
    out = res.stdout.split() if res else []
    if partition not in out:
        raise UserError(f"cluster.partition {partition!r} is not a partition of this cluster "
                        f"(sinfo lists: {', '.join(out) or 'none'}); nothing was submitted")


def check_account(account: str | None) -> None:
    """Only where the controller enforces accounts, and only against an answer from sacctmgr:
    a site without accounting, or whose sacctmgr can't be asked, is left to sbatch."""
    if account is None:
        return
    config = _run("scontrol", "show", "config")
    enforce = re.search(r"AccountingStorageEnforce\s*=\s*(\S*)", config.stdout if config else "")
    if not enforce or not any(w in enforce.group(1) for w in _ENFORCE_ACCOUNTS):
        return
    user = getpass.getuser()
    res = _run("sacctmgr", "-nP", "show", "assoc", f"user={user}", "format=account")
    mine = sorted({a.strip() for a in res.stdout.split()}) if res and res.returncode == 0 else []
    if mine and account not in mine:
        raise UserError(f"cluster.account {account!r} is not one of {user}'s accounts (sacctmgr lists: "
                        f"{', '.join(mine)}); set cluster.account in your site file; nothing was submitted")


def preflight(recipe, slurm: bool) -> None:
    """The checks of a launch (and of its dry run); the cluster's only where SLURM answers."""
    check_placeholders(recipe)
    if slurm:
        for partition in sorted({recipe.cluster.partition, *recipe.cluster.stage_partition.values()} - {None}):
            check_partition(partition)
        check_account(recipe.cluster.account)


def submit_limits(assoc: str, qos: str, account: str | None, partitions: set[str],
                  wanted_qos: str | None) -> list[tuple[int, str]]:
    """The MaxSubmitJobs limits that bind this launch, as (limit, where) from sacctmgr's parsable
    answers: `assoc`, `show assoc user=U format=Account,Partition,MaxSubmitJobs,DefaultQOS,QOS`
    (the user's associations: of `account`, where the recipe names one; of the launch's
    partitions, or of none), and `qos`, `show qos format=Name,MaxSubmitJobsPerUser` (the QOS the
    jobs run under: the recipe's, else the association's default, else its only one)."""
    limits, under = [], set()
    for line in assoc.splitlines():
        acct, part, limit, default_qos, allowed = (line.split("|") + [""] * 5)[:5]
        if (account and acct != account) or (part and part not in partitions):
            continue
        if limit.strip().isdigit():
            limits.append((int(limit), f"the association of account {acct}{' partition ' + part if part else ''}"))
        allowed_list = [q for q in allowed.split(",") if q]
        under |= {wanted_qos or default_qos or (allowed_list[0] if len(allowed_list) == 1 else "")} - {""}
    for line in qos.splitlines():
        name, _, limit = line.partition("|")
        if name in under and limit.split("|")[0].strip().isdigit():
            limits.append((int(limit.split("|")[0]), f"QOS {name} (MaxSubmitJobsPerUser)"))
    return limits


def check_submit_limit(recipe, new_jobs: int, freed: int = 0) -> None:
    """Refuse, before anything is submitted, a launch whose `new_jobs` (array tasks one each;
    `freed`: this launch's own pending jobs it cancels first) would pass a MaxSubmitJobs limit with
    the user's jobs already queued. A site without accounting, or a sacctmgr that can't be
    asked, is left to sbatch."""
    user = getpass.getuser()
    # one slurmdbd may serve several clusters: this one's associations only
    config = _run("scontrol", "show", "config")
    name = re.search(r"^ClusterName\s*=\s*(\S+)", config.stdout if config else "", re.M)
    assoc = _run("sacctmgr", "-nP", "show", "assoc", f"user={user}", *([f"cluster={name.group(1)}"] if name else []),
                 "format=Account,Partition,MaxSubmitJobs,DefaultQOS,QOS")
    qos = _run("sacctmgr", "-nP", "show", "qos", "format=Name,MaxSubmitJobsPerUser")
    if not assoc or assoc.returncode != 0:
        return
    partitions = {recipe.cluster.partition, *recipe.cluster.stage_partition.values()} - {None}
    limits = submit_limits(assoc.stdout, qos.stdout if qos and qos.returncode == 0 else "",
                           recipe.cluster.account, partitions, recipe.cluster.qos)
    if not limits:
        return
    queue = _run("squeue", "-h", "-r", "-u", user, "-o", "%i")
    queued = max(0, len(queue.stdout.split()) - freed) if queue and queue.returncode == 0 else 0
    limit, where = min(limits)
    if queued + new_jobs > limit:
        raise UserError(f"this launch would queue {new_jobs} jobs (array tasks count one each) and {user} has "
                        f"{queued} queued: {where} allows {limit} at once (MaxSubmitJobs); wait for some to "
                        "end, or launch fewer grid points; nothing was submitted")


def sbatch_would_accept(stage: str, script: str) -> None:
    """`sbatch --test-only` of one stage's script (its dependency left out: the ids don't exist
    yet): the controller's own verdict, without queueing anything."""
    script = re.sub(r"^#SBATCH --(dependency|kill-on-invalid-dep)=.*\n", "", script, flags=re.M)
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(script)
        f.flush()
        res = _run("sbatch", "--test-only", f.name)
    if res is None:
        return  # sbatch could not be asked: the launch will ask it
    if res.returncode != 0:
        errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()] or res.stderr.splitlines()
        reason = (errors[-1] if errors else "sbatch failed").removeprefix("sbatch: error: ").strip()
        raise UserError(f"sbatch would refuse stage {stage}: {reason}; nothing was submitted")
