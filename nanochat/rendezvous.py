"""Joining the ranks of a distributed run, and waiting for each other without a collective.

A collective (NCCL or gloo) gives up after the process group's timeout — the recipe's
`cluster.collective_timeout_min` — and NCCL's watchdog then kills the job; the group's creation
(ranks arriving, connections and communicators forming, a first barrier) has its own
`cluster.init_timeout_min`. Some waits are legitimately longer than any sensible collective
timeout: local rank 0 downloading shards and training the tokenizer on a cold cache
(`nanochat/data/shards.py`), rank 0 probing batch sizes (`nanochat/batchsize/search.py`), a rank that
compiles from a cold kernel cache while another finds a warm one (upstream nanochat's issue
#722). Those waits go through the TCP key-value store the
process group was created from (MASTER_ADDR:MASTER_PORT), with their own long timeout:

- it is already connected — a second gloo group would open new connections to the address the
  node's hostname resolves to, which on many clusters is 127.0.x.x (/etc/hosts), and its peers
  then hang for the whole of the group's timeout;
- a rank that dies while hosting the store (rank 0 under srun) breaks the others' waits at once
  (one line naming the rank and host, not hours of silence); under torchrun the agent hosts the
  store and kills the surviving ranks itself.

`join` does the rendezvous (the store, a roll call that checks every rank's world size and
names hosts, then the process group on the same store); `barrier`, `share`, `gather` and
`rank_hosts` use the store of the current run. Without a run (one process) they are no-ops.
This is the one place that creates stores and process groups (the cluster check,
nanochat/check.py, meets its ranks with `gather`).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import socket
import time
from dataclasses import dataclass, field

import torch.distributed as dist

from nanochat.common import UserError

LONG_WAIT_S = 3 * 3600  # preparation, discovery, compile warm-up: how long a rank waits for the others


@dataclass
class _Run:
    store: object               # PrefixStore of this run (a torch.distributed.Store)
    rank: int
    world_size: int
    host: str
    hosts: list[str] = field(default_factory=list)  # rank → host, from the roll call
    seq: int = 0                # waits so far; every rank waits in the same order
    gathered: set[str] = field(default_factory=set)  # names `gather` has used


_RUN: _Run | None = None


def _host() -> str:
    return socket.gethostname()


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def check_master_addr(rank: int, env=None) -> tuple[str, int]:
    """MASTER_ADDR/MASTER_PORT as this rank sees them; an unresolvable address is one line."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr or not port:
        raise UserError(f"rank {rank} on {_host()}: MASTER_ADDR and MASTER_PORT must be set for a "
                        "distributed run; launch with torchrun, or export MASTER_ADDR (the first "
                        "node's address) and MASTER_PORT")
    try:
        port_n = int(port)
        if not 0 < port_n < 2**16:
            raise ValueError(port)
    except ValueError:
        raise UserError(f"rank {rank} on {_host()}: MASTER_PORT={port!r} is not a port number") from None
    try:
        socket.getaddrinfo(addr, port_n)
    except (OSError, UnicodeError) as e:  # gaierror; UnicodeError: a label IDNA rejects
        raise UserError(f"rank {rank} on {_host()}: MASTER_ADDR={addr!r} does not resolve ({e}); "
                        "export the first node's address (slurm/env.sh takes it from scontrol)") from None
    return addr, port_n


def join(rank: int, world_size: int, backend: str, timeout_min: float, device_id=None,
         init_timeout_min: float | None = None) -> None:
    """Rendezvous on MASTER_ADDR:MASTER_PORT, check every rank, create the default process
    group on that store, meet in a first barrier on it, then give the group a `timeout_min`
    collective timeout. Everything up to and including that barrier — ranks arriving, the
    group's connections (gloo) or communicators (NCCL) forming — runs under `init_timeout_min`
    (None: `timeout_min`): the recipe's cluster.init_timeout_min and collective_timeout_min.
    Errors name rank and host."""
    global _RUN
    addr, port = check_master_addr(rank)
    init_min = timeout_min if init_timeout_min is None else init_timeout_min
    timeout = datetime.timedelta(minutes=init_min)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    except RuntimeError as e:  # DistNetworkError/DistStoreError: unreachable, or ranks missing
        raise UserError(f"rank {rank} on {_host()}: rendezvous at {addr}:{port} failed within "
                        f"{init_min:g} min ({_first_line(e)}); check that every rank runs with "
                        f"the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE={world_size}") from None
    # torchrun's agent store outlives a restarted worker group: key each attempt apart.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run = _Run(dist.PrefixStore(f"nanochat/{attempt}", store), rank, world_size, _host())
    run.hosts = _roll_call(run, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world_size, timeout=timeout, device_id=device_id)
    _RUN = run
    _first_barrier(run, device_id, init_min)
    set_collective_timeout(datetime.timedelta(minutes=timeout_min))


def _first_barrier(run: _Run, device_id, init_min: float) -> None:
    """One barrier on the new group, under the init timeout: every rank has created it (an NCCL
    communicator, if lazy, forms here) before any rank's collectives get the shorter timeout —
    torchtitan's `set_pg_timeouts` waits the same way before lowering its timeouts."""
    try:
        if device_id is not None:   # NCCL: on the rank's GPU, and finished there
            dist.barrier(device_ids=[device_id.index])
            import torch
            torch.cuda.synchronize(device_id)
        else:
            dist.barrier()
    except RuntimeError as e:
        raise UserError(f"rank {run.rank} on {run.host}: the first barrier of the process group "
                        f"failed within {init_min:g} min (cluster.init_timeout_min) "
                        f"({_first_line(e)})") from None


def set_collective_timeout(timeout: datetime.timedelta, group=None) -> None:
    """Give a process group (the default one: None) a new collective timeout. torchtitan lowers
    its groups' timeouts after the first step the same way (torch.distributed.set_timeout in
    newer torch; distributed_c10d._set_pg_timeout, which sets each backend's default timeout —
    gloo and NCCL — in torch 2.13)."""
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    setter(timeout, group)


def _roll_call(run: _Run, timeout: datetime.timedelta) -> list[str]:
    """Every rank posts (host, world size) and reads everyone's: a rank started with another
    world size, or one that never comes, is one line naming it."""
    run.store.set(f"roll/{run.rank}", json.dumps({"host": run.host, "world_size": run.world_size}))
    hosts = []
    for r in range(run.world_size):
        try:
            run.store.wait([f"roll/{r}"], timeout)
            rec = json.loads(run.store.get(f"roll/{r}"))
        except RuntimeError:
            raise UserError(f"rank {run.rank} on {run.host}: rank {r} did not join within "
                            f"{timeout.total_seconds() / 60:g} min (world size {run.world_size}); "
                            "did every rank get the same WORLD_SIZE / --ntasks?") from None
        if rec["world_size"] != run.world_size:
            # Rank 0 holds the store: it waits (≤ 10 s) for the rank it names to have read rank 0's
            # record (its first), so that rank's line also names the mismatch, not a lost store.
            with contextlib.suppress(RuntimeError):
                if run.rank == 0:
                    run.store.wait([f"read/{r}"], datetime.timedelta(seconds=10))
                else:
                    run.store.set(f"read/{run.rank}", "1")
            raise UserError(f"rank {r} on {rec['host']} was started with world size "
                            f"{rec['world_size']}, rank {run.rank} on {run.host} with "
                            f"{run.world_size}: launch every rank with the same WORLD_SIZE / --ntasks")
        hosts.append(rec["host"])
    return hosts


def leave() -> None:
    """Forget the current run's store (the process group is destroyed by the caller)."""
    global _RUN
    _RUN = None


def active() -> bool:
    return _RUN is not None


def rank_hosts() -> list[str]:
    """Host of every rank, from the roll call ([this host] in one process)."""
    return list(_RUN.hosts) if _RUN is not None else [_host()]


def _wait(run: _Run, key: str, what: str, timeout_s: float, missing=lambda: "") -> None:
    try:
        run.store.wait([key], datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        timed_out = "timeout" in str(e).lower() or "timed out" in str(e).lower()
        why = (f"not done within {timeout_s / 60:g} min{missing()}" if timed_out else
               f"lost the store ({_first_line(e)}): a rank has died — rank 0 "
               f"({run.hosts[0] if run.hosts else '?'}) hosts it under srun; see its log")
        raise UserError(f"rank {run.rank} on {run.host}: waiting for {what}: {why}") from None


def barrier(what: str, timeout_s: float = LONG_WAIT_S) -> None:
    """Wait until every rank has arrived, for up to `timeout_s` (no collective, no process-group
    timeout). `what` names the wait in errors; a timeout names the ranks that never came."""
    run = _RUN
    if run is None:
        return
    run.seq += 1
    key = f"barrier/{run.seq}"
    run.store.set(f"{key}/rank{run.rank}", "1")
    if run.store.add(key, 1) == run.world_size:
        run.store.set(f"{key}/done", "1")

    def missing() -> str:
        late = [r for r in range(run.world_size) if not run.store.check([f"{key}/rank{r}"])]
        return "; not arrived: " + ", ".join(f"rank {r} ({run.hosts[r]})" for r in late) if late else ""
    _wait(run, f"{key}/done", what, timeout_s, missing)


def share(obj, what: str, src: int = 0, timeout_s: float = LONG_WAIT_S):
    """`obj` of rank `src` on every rank (others pass anything, e.g. None): rank `src` publishes
    it in the store, the others wait up to `timeout_s` for it. Returns it."""
    run = _RUN
    if run is None:
        return obj
    run.seq += 1
    key = f"share/{run.seq}"
    if run.rank == src:
        run.store.set(key, pickle.dumps(obj))
        return obj
    _wait(run, key, what, timeout_s)
    return pickle.loads(run.store.get(key))


def gather(what: str, obj, timeout_s: float) -> dict[int, object]:
    """Every rank's `obj` (not None) under the name `what`, used once per run: this rank posts
    its own, then polls the store up to `timeout_s` for the others' — no collective and no
    order, so a rank that failed or died cannot hang the others, and ranks that part ways
    (one gave up on a gather another finished) never read each other's keys. Returns
    {rank: obj, or None for a rank that had not posted in time}; {0: obj} in one process.
    A lost store (its host died) raises the store's RuntimeError: the caller names it."""
    run = _RUN
    if run is None:
        return {0: obj}
    assert what not in run.gathered, f"gather {what!r} twice in one run"
    run.gathered.add(what)
    keys = {r: f"gather/{what}/{r}" for r in range(run.world_size)}
    run.store.set(keys[run.rank], pickle.dumps(obj))
    got: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for r, key in keys.items():
            if r not in got and run.store.check([key]):
                got[r] = pickle.loads(run.store.get(key))
        if len(got) == len(keys) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return {r: got.get(r) for r in keys}
