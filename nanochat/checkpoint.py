"""Checkpoints: one directory per step, committed atomically.

    run_dir/checkpoints/step_000100/
        model.pt            model state dict (rank 0)
        optim.pt            optimizer state (rank 0; identical on every rank, see below)
        meta.json           step, loader states of all ranks, model config, recipe, git commit
        rng_rank0.pt ...    RNG states of each rank

The optimizer state is written once: AdamW steps every parameter on every rank, and Muon, which
shares out its orthogonalization, keeps the momentum (and variance-reduction moments) of every
parameter on every rank and broadcasts each result from its owner (optim.Muon), so all ranks
hold the same state bit for bit. Writing it per rank cost world_size × its size (≈73 GB per
save at d24 on 8 ranks) on shared storage, inside the time limit's warning lead. Checkpoints
written before this (optim_rank0.pt ...) still load.

All files are written into `step_000100.tmp`, flushed to disk (fsync), and the directory is
renamed when complete, so a crash mid-save — or a node losing power after it — leaves no
checkpoint that looks finished. Tensors load with weights_only=True.

This module also says whose a run directory is: a standalone run (`python -m nanochat.train`
writes checkpoints/, run.json, progress.jsonl at its top) or a run of the launcher (jobs/launch.py
writes manifest.json there and its tasks write below it, e.g. base/000/). The two never share a
directory (refuse_launcher_dir, standalone_run). Importing this module loads no torch: the
launcher reads run directories on a login node; torch is imported by the functions that need it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
from pathlib import Path

from nanochat.common import UserError, atomic_write_json

CKPT_DIR = "checkpoints"
# what jobs/launch.py writes at the top of its run directory (jobs/manifest.py imports this name)
LAUNCHER_MANIFEST = "manifest.json"
# what a standalone run writes at the top of its run directory (train.py, trainer.py)
STANDALONE_FILES = ("run.json", "progress.jsonl")
# The kit's training rules, recorded in every checkpoint's meta.json ("rules"; none = 1) so a
# resume never silently continues a run under other rules. 1: windows of W keys, the Oct 2025
# initialisation, one AdamW setting for every role, Muon momentum 0.85 → 0.95. 2: upstream
# nanochat master's (W + 1 keys, "L" windowed past sequence_len, the current initialisation,
# per-role AdamW settings, momentum 0.85 → 0.97 → 0.90; tests/test_upstream_parity.py).
RULES_VERSION = 2
RULES = {1: "windows of W keys, the Oct 2025 initialisation, one AdamW setting for every role, "
            "Muon momentum 0.85→0.95",
         2: "upstream nanochat master's: windows of W+1 keys, its current initialisation, "
            "per-role AdamW settings, Muon momentum 0.85→0.97→0.90"}


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
            and p.name[5:].isdigit() and (p / "meta.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _shown(path: Path) -> str:
    """`path` as the user would type it: relative to the working directory when under it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) if path.is_absolute() else str(path)
    except ValueError:
        return str(path)


def add_refuse_existing_flag(ap, where: str) -> None:
    """`--refuse-existing` of nanochat.train and nanochat.sft (without it a run resumes from its
    newest checkpoint). `--fresh`, its old name, still works and says so: in nanochat.batchsize.search
    --fresh means "probe again", so these commands no longer use the word."""
    ap.add_argument("--refuse-existing", action="store_true",
                    help=f"refuse to start if {where} already holds checkpoints (default: resume from the newest)")
    ap.add_argument("--fresh", action=_DeprecatedFresh, nargs=0, dest="refuse_existing",
                    help="old name of --refuse-existing")


class _DeprecatedFresh(argparse.Action):
    """--fresh: sets refuse_existing, and says that the flag was renamed."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("note: --fresh is now called --refuse-existing", file=sys.stderr)
        setattr(namespace, self.dest, True)


def refuse_launcher_dir(run_dir: Path, command: str, hint: str = "") -> None:
    """One line naming the launcher's commands when `run_dir` holds a run of jobs/launch.py: a
    standalone `command` writing there would put its checkpoints, curves and recipe among the
    launcher's (whose report would then show them). Call it before anything is written. The
    launcher's own tasks never need it: they write into task directories below the manifest's."""
    run_dir = Path(run_dir)
    if not (run_dir / LAUNCHER_MANIFEST).exists():
        return
    shown, full = _shown(run_dir), run_dir.resolve()
    other = _shown(full.with_name(full.name + "-standalone"))
    raise UserError(f"{shown} holds a run of jobs/launch.py ({LAUNCHER_MANIFEST}); a standalone "
                    f"`{command}` must not write into it: pass run_dir={other} "
                    f"(or another directory{hint}), or follow that run with "
                    f"`python jobs/status.py {shown}`")


def standalone_run(run_dir: Path) -> str | None:
    """What a standalone run left at the top of `run_dir` (e.g. "checkpoints/step_000400, run.json,
    progress.jsonl"), or None when it holds none or is a launcher's run (manifest.json). The
    launcher refuses such a directory: its report and status would read another run's files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / LAUNCHER_MANIFEST).exists():
        return None
    found = []
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        found.append(f"{CKPT_DIR}/{latest.name}")
    elif (run_dir / CKPT_DIR).is_dir() and any((run_dir / CKPT_DIR).iterdir()):
        found.append(f"{CKPT_DIR}/")  # only unfinished saves: still a run's directory
    found += [name for name in STANDALONE_FILES if (run_dir / name).exists()]
    return ", ".join(found) or None


def rng_state() -> dict:
    import torch
    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    import ast
    random.setstate(ast.literal_eval(state["python"]))


def save_checkpoint(run_dir: Path, step: int, model: "torch.nn.Module", optimizers: list,
                    meta: dict, rank: int = 0, world_size: int = 1, keep: int = 2) -> Path:
    """Collective when world_size > 1: every rank writes its RNG state, rank 0 the optimizer
    state, the model and meta.json, then rank 0 commits the directory with a rename."""
    from nanochat.runtime import barrier
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(world_size, f"rank 0's checkpoint directory of step {step}")
    if rank == 0:  # the same on every rank (module docstring)
        _save_synced([o.state_dict() for o in optimizers], tmp / OPTIM_FILE)
    _save_synced(rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier(world_size, f"every rank's state of step {step}")
    if rank == 0:
        _save_synced(model.state_dict(), tmp / "model.pt")
        atomic_write_json(tmp / "meta.json", {**meta, "step": step, "world_size": world_size,
                                              "rules": RULES_VERSION})
        _fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final.parent)  # the rename itself
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world_size, f"rank 0's write of checkpoint {final.name}")
    return final


OPTIM_FILE = "optim.pt"


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_synced(obj, path: Path) -> None:
    """torch.save, flushed to disk before it returns."""
    import torch
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load(path: Path, what: str):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path.parent} has no {path.name}: it is incomplete; delete it "
                        "or resume from an earlier one")
    except Exception as e:  # truncated zip, bad pickle, ...: all mean a damaged file
        raise UserError(f"checkpoint file {path} is corrupt or not a torch checkpoint "
                        f"({type(e).__name__}); delete {path.parent} to resume from an earlier "
                        "checkpoint") from None


def read_meta(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint {ckpt} does not exist or is not a directory; pass a "
                        f"run directory or a {CKPT_DIR}/step_NNNNNN directory")
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{ckpt} is not a checkpoint (no meta.json); pass a run directory or a "
                        f"{CKPT_DIR}/step_NNNNNN directory")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"checkpoint {ckpt}/meta.json is corrupt; delete {ckpt} to use an earlier one")


def check_rules(ckpt: Path, meta: dict) -> None:
    """Resuming training needs the rules the checkpoint was trained under (RULES_VERSION); one
    line saying which, instead of continuing the run under other rules. Loading the weights
    (eval, SFT from a base checkpoint, chat) does not call this: old checkpoints keep loading."""
    saved = meta.get("rules", 1)
    if saved != RULES_VERSION:
        raise UserError(f"checkpoint {_shown(ckpt)} was trained under the kit's training rules v{saved} "
                        f"({RULES.get(saved, 'unknown')}); this code trains under v{RULES_VERSION} "
                        f"({RULES[RULES_VERSION]}): resuming would switch rules mid-run; finish the "
                        f"run with the kit version that started it, or start a new run_dir")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (→ its latest checkpoint) or a checkpoint directory."""
    path = Path(path)
    if (path / "meta.json").exists():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise UserError(f"no checkpoint found at {path}; pass a run directory that holds "
                        f"{CKPT_DIR}/step_NNNNNN, or such a directory itself")
    return latest


def run_dir_of(step_dir: Path) -> Path:
    """RUN_DIR for RUN_DIR/checkpoints/step_NNNNNN (where the run's tokenizer/ and logs live)."""
    step_dir = Path(step_dir).resolve()
    return step_dir.parent.parent if step_dir.parent.name == CKPT_DIR else step_dir.parent


def load_model_state(ckpt: Path) -> dict:
    return _load(Path(ckpt) / "model.pt", "model")


def saved_model_config(ckpt: Path, saved: dict | None, current: dict) -> dict | None:
    """The model config a checkpoint was written with, the fields it lacks (it predates them)
    at their defaults, which are off, and the compute-only fields (gpt.COMPUTE_ONLY) at this
    run's values: to compare with this run's `current` on resume. A field
    this run sets away from its default that the checkpoint lacks is an error of its own — the
    run was started without that switch, and resuming must not initialise its weights anew."""
    if saved is None:
        return None
    from nanochat.gpt import COMPUTE_ONLY, GPTConfig  # torch-heavy: imported only here
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)
                if f.default is not dataclasses.MISSING}
    # how the loss is chunked changes no weight: this run's setting, whatever the checkpoint's
    filled = {**saved, **{k: current[k] for k in COMPUTE_ONLY if k in current}}
    for key, value in current.items():
        if key in filled or key not in defaults:
            continue
        if value != defaults[key]:
            raise UserError(f"checkpoint {ckpt}: the run was started without model.{key} (its "
                            f"checkpoint predates it); resume with model.{key}: {defaults[key]!r} "
                            f"or start a new run_dir")
        filled[key] = defaults[key]
    return filled


def load_training_state(ckpt: Path, rank: int) -> tuple[list, dict]:
    """(optimizer state dicts, RNG state) of one rank. The optimizer state is the one file
    every rank shares, or — in a checkpoint written before that — the rank's own."""
    ckpt = Path(ckpt)
    optim = ckpt / OPTIM_FILE
    if not optim.exists() and (ckpt / f"optim_rank{rank}.pt").exists():
        optim = ckpt / f"optim_rank{rank}.pt"
    return _load(optim, "optimizer"), _load(ckpt / f"rng_rank{rank}.pt", "rng")
