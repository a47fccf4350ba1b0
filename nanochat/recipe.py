"""Loading recipes: YAML → typed, validated `Recipe` (sections in `nanochat/config.py`).

    base: tiny.yaml          # optional: inherit another recipe (path relative to this file),
                             # or a list merged in order, later files winning: [d20.yaml, site.yaml]
    name: my-run
    model: {depth: 4}
    train: {total_batch_size: 16384, device_batch_size: 8}

Layering: dataclass defaults ← base recipe(s) ← this file ← `section.key=value` overrides from
the command line. Strict: an unknown key, a wrong type or an impossible value is one `UserError`
line naming the file, line, key and the closest valid key. Also: saving the resolved recipe, the
shared command-line parser, and the generated recipe reference (`python -m nanochat.recipe`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path

import yaml

from nanochat.common import UserError, atomic_write_text, git_commit, now_iso
from nanochat.optim_config import ADAMW_ROLE_DEFAULTS, RENAMED_KEYS, REPLACED_KEYS
from nanochat.config import (ClusterArgs, DataArgs, DiscoveryArgs, EvalArgs, ModelArgs, OptimArgs,
                             Recipe, ReportArgs, SFTArgs, KVBenchArgs, TokenizerArgs, TrainArgs, Invalid, check,
                             STAGE_ALIASES, derive_paths, validate)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: PyYAML reads `time: 2:00:00` as the integer 7200 (and
    1:30 as 90); a recipe means SLURM's 2 hours. Everything else resolves as safe_load does."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def yaml_load(text: str):
    """Recipe YAML (files and `key=value` overrides) as safe_load reads it, minus base-60 numbers."""
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------------------------
# Loading: YAML (with `base:`) → nested dict with a provenance per dotted key → typed Recipe.

def _key_lines(path: Path, text: str) -> dict[str, int]:
    """Map each dotted key in a YAML file to its 1-based line, for error messages."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")
    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass  # reported by the real load below
    return lines


# A site file holds only what one cluster needs (configs/site.example.yaml): listed last in
# `base:` it wins over the recipe it is combined with. A file that overrides one of its keys
# (a recipe listed after it, or the recipe's own values) gets one line saying so, because a site
# setting silently lost (8 GPUs asked of a 1-GPU node) is found only when sbatch refuses.
SITE_KEYS = ("cluster", "cache_dir")


def _is_site_file(data: dict) -> bool:
    return bool(data) and set(data) <= set(SITE_KEYS)


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _site_overridden(site: dict, layer: dict, who: str, later_base: bool, notes: list | None) -> dict:
    """Note (one line) the keys `layer` (from file `who`) changes that a site file set; returns
    the site keys still holding the site's value after it."""
    leaves = _leaves(layer)
    changed = [(k, leaves[k], site[k]) for k in site if k in leaves and leaves[k] != site[k][0]]
    if changed and notes is not None:
        files = sorted({where.rsplit(":", 1)[0] for _, _, (_, where) in changed})
        what = ", ".join(f"{k}={v!r} (site: {old!r})" for k, v, (old, _) in changed)
        hint = ("; later files in `base:` win: list the site file last to keep its values"
                if later_base else "")
        notes.append(f"note: {who} overrides what the site file {', '.join(files)} set: {what}{hint}")
    return {k: v for k, v in site.items() if k not in leaves}


def _read_yaml(path: Path, chain: tuple = (), notes: list | None = None) -> tuple[dict, dict[str, str], dict]:
    """Load a recipe file and its `base:` chain; returns (merged dict, {dotted key: 'file:line'},
    {dotted key: (value, 'file:line')} of the values that came from a site file). Lines about
    site values a later file overrode are appended to `notes`."""
    path = Path(path)
    if path.resolve() in chain:
        raise UserError(f"{path}: `base:` inheritance loops back to itself ({' → '.join(map(str, chain))})")
    try:
        text = path.read_text()
    except FileNotFoundError:
        where = f" (from `base:` in {chain[-1]})" if chain else ""
        raise UserError(f"recipe {path} not found{where}; pass the path of a YAML recipe, e.g. configs/tiny.yaml")
    except OSError as e:
        raise UserError(f"recipe {path} cannot be read: {e.strerror}")
    try:
        data = yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{loc}: not valid YAML ({getattr(e, 'problem', None) or e}); fix the syntax")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections (model:, train:, ...), "
                        f"got {type(data).__name__}")
    lines = _key_lines(path, text)
    prov = {k: f"{path}:{ln}" for k, ln in lines.items()}
    data = _renamed(data, prov, notes)  # per file, so a later file's old name still wins over a base's new one
    base = data.pop("base", None)
    own_site = {k: (v, prov.get(k, str(path))) for k, v in _leaves(data).items()} if _is_site_file(data) else {}
    if base is None:
        return data, prov, own_site
    bases = base if isinstance(base, list) else [base]
    if not bases or not all(isinstance(b, str) and b for b in bases):
        raise UserError(f"{prov.get('base', path)}: `base` must be a file name or a list of them "
                        f"(e.g. [d20.yaml, site.yaml]), got {base!r}")
    merged, merged_prov, site = {}, {}, {}
    for b in bases:  # later files win, this file over all of them
        base_data, base_prov, base_site = _read_yaml(path.parent / b, chain + (path.resolve(),), notes)
        site = {**_site_overridden(site, base_data, str(path.parent / b), True, notes), **base_site}
        merged, merged_prov = _merge(merged, base_data), {**merged_prov, **base_prov}
    site = {**_site_overridden(site, data, str(path), False, notes), **own_site}
    return _merge(merged, data), {**merged_prov, **prov}, site


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str], notes: list | None = None,
                    source: str = "command line") -> tuple[dict, dict[str, str]]:
    """`section.key=value` strings → nested dict (a dotted key nests: optim.adamw_roles.x0.betas=
    [0.9,0.99] sets one setting of one role). Values are parsed as YAML scalars/lists (`8`,
    `true`, `null`, `[1,2]`), never by a shell. Errors name them as `source (item)`."""
    data: dict = {}
    prov: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r} is not of the form section.key=value "
                            "(e.g. train.num_iterations=100)")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
        prov[key] = f"{source} ({item})"
    return _renamed(data, prov, notes), prov


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; returns the value (ints accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except Invalid as e:
                errors.append(str(e))
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
        raise Invalid(key, f"must be {names}, got {value!r}")
    if tp is type(None):
        check(value is None, key, f"must be null, got {value!r}")
        return None
    if origin is list:
        check(isinstance(value, list), key, f"must be a list, got {value!r}")
        (arm,) = typing.get_args(tp)
        return [_coerce(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        _, arm = typing.get_args(tp)
        return {str(k): _coerce(v, arm, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key,
              f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-10 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
              f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # name: 2024
        check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")  # programmer error


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names and prefix == "optim." and k in REPLACED_KEYS:
            roles = ", ".join(ADAMW_ROLE_DEFAULTS)
            raise Invalid(key, f"'{key}' was replaced by one AdamW setting per parameter role "
                               f"(optim.adamw_roles.<role>.betas, .weight_decay, .eps; roles: {roles}); "
                               f"remove it and set the roles' keys")
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else \
                f"valid keys: {', '.join(names)}"
            raise Invalid(key, f"unknown key '{key}'; {hint}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            v = {} if v is None else v  # an empty section (`model:` with nothing under it)
            check(isinstance(v, dict), key, f"must be a mapping of {tp.__name__} fields, got {v!r}")
            kwargs[k] = _build(tp, v, key + ".")
        else:
            kwargs[k] = _coerce(v, tp, key)
    return cls(**kwargs)


def _where(key: str, prov: dict[str, str]) -> str:
    """The most specific provenance for a dotted key (list items inherit their list's line)."""
    k = key.split("[")[0]
    children = [v for p, v in prov.items() if p.startswith(k + ".")]
    while k:
        if k in prov:
            return prov[k]
        k = k.rpartition(".")[0]
    return children[0] if children else "recipe"  # e.g. a misspelt section given as modle.depth=3


def _renamed(data: dict, prov: dict[str, str], notes: list | None = None) -> dict:
    """Keys that were renamed, read under their new name: cluster.time_min (minutes) is
    cluster.time, the KV-cache benchmark's stage and section `sweep` are `kv_bench` (the word
    sweep is the grid's), optim.<role>_betas / _weight_decay / _eps are optim.adamw_roles.<role>.*
    (RENAMED_KEYS; one line in `notes` says so). Resolved recipes of earlier runs and checkpoints
    still hold the old names. Applied to each file and to the overrides before they are merged;
    one key under both names in one of them is an error."""
    data = _renamed_adamw(dict(data), prov, notes)
    for old, new in STAGE_ALIASES.items():
        if old in data:
            both = data.get(new)
            if both is not None and not (isinstance(both, dict) and isinstance(data[old], dict)
                                         and not set(both) & set(data[old])):
                raise UserError(f"{_where(old, prov)}: `{old}:` is the old name of `{new}:`; give only {new}")
            data[new] = {**data.pop(old), **both} if isinstance(both, dict) else data.pop(old)
            for k in [k for k in prov if k == old or k.startswith(old + ".")]:
                prov[new + k[len(old):]] = prov[k]
        if isinstance(data.get("stages"), list):
            data["stages"] = [STAGE_ALIASES.get(s, s) if isinstance(s, str) else s for s in data["stages"]]
        if isinstance(data.get("grid"), dict):
            data["grid"] = {new + k[len(old):] if isinstance(k, str) and k.startswith(old + ".") else k: v
                            for k, v in data["grid"].items()}
    cluster = data.get("cluster")
    if isinstance(cluster, dict) and "time_min" in cluster:
        if "time" in cluster:
            raise UserError(f"{_where('cluster.time_min', prov)}: cluster.time_min is the old name of "
                            "cluster.time; give only cluster.time")
        cluster = dict(cluster)
        cluster["time"] = cluster.pop("time_min")
        data["cluster"] = cluster
        prov.setdefault("cluster.time", prov.get("cluster.time_min", "recipe"))
    return data


def _adamw_key(key):
    """optim.<role>_betas (an old flat key) → optim.adamw_roles.<role>.betas; any other key as is."""
    if isinstance(key, str) and key.startswith("optim.") and key[6:] in RENAMED_KEYS:
        return "optim.adamw_roles.{}.{}".format(*RENAMED_KEYS[key[6:]])
    return key


def _renamed_adamw(data: dict, prov: dict[str, str], notes: list | None) -> dict:
    """The flat per-role AdamW keys (and grid axes, report.compare axes of them) → adamw_roles."""
    optim = data.get("optim")
    old = [k for k in optim if k in RENAMED_KEYS] if isinstance(optim, dict) else []
    roles = optim.get("adamw_roles") if old else None
    if old and isinstance(roles, (dict, type(None))):
        optim, roles = dict(optim), copy.deepcopy(roles or {})
        for k in old:
            role, setting = RENAMED_KEYS[k]
            new = f"optim.adamw_roles.{role}.{setting}"
            if not isinstance(roles.setdefault(role, {}), dict) or setting in roles[role]:
                raise UserError(f"{_where('optim.' + k, prov)}: optim.{k} is the old name of {new}; give only {new}")
            roles[role][setting] = optim.pop(k)
            prov.setdefault(new, prov.get(f"optim.{k}", "recipe"))
        optim["adamw_roles"] = roles
        data["optim"] = optim
    else:
        old = []
    axes = {}
    for section in ("grid", "report"):
        table = data.get(section)
        table = table.get("compare") if section == "report" and isinstance(table, dict) else table
        if isinstance(table, dict) and any(_adamw_key(k) != k for k in table):
            axes.update({k: _adamw_key(k) for k in table if _adamw_key(k) != k})
            renamed = {_adamw_key(k): v for k, v in table.items()}
            data[section] = renamed if section == "grid" else {**data["report"], "compare": renamed}
    if (old or axes) and notes is not None:
        first = f"optim.{old[0]}" if old else f"grid.{next(iter(axes))}"
        pairs = [f"optim.{k} → optim.adamw_roles.{RENAMED_KEYS[k][0]}.{RENAMED_KEYS[k][1]}" for k in old]
        pairs += [f"grid axis {k} → {v}" for k, v in axes.items()]
        notes.append(f"note: {_where(first, prov)}: old optim keys read under their new names "
                     f"({', '.join(pairs)}); write optim.adamw_roles.<role>.<betas|weight_decay|eps>")
    return data


def recipe_from_dict(data: dict, prov: dict[str, str] | None = None) -> Recipe:
    prov = prov or {}
    try:
        r = _build(Recipe, _renamed(data, prov), "")
        derive_paths(r)
        validate(r)
        return r
    except Invalid as e:
        msg = str(e)
        if not msg.startswith("unknown key"):
            msg = f"{e.key} {msg}"
        raise UserError(f"{_where(e.key, prov)}: {msg}") from None


def override_recipe(base: dict, overrides: list[str], source: str = "command line") -> Recipe:
    """A recipe from a resolved recipe dict (e.g. a checkpoint's) with `section.key=value`
    overrides on top, validated like a recipe file."""
    data, prov = parse_overrides(list(overrides), source=source)
    return recipe_from_dict(_merge(_renamed(base, {}), data), prov)  # base's old names first: the overrides win


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                notes: list[str] | None = None) -> Recipe:
    """Load, merge, override, type-check and validate a recipe. Raises UserError (one line).
    `notes` collects one line per file that overrides a site file's values and per file that uses
    old key names (the launcher and `python -m nanochat.recipe` print them where they choose);
    without a list, the notes go to stderr once the recipe is valid, so every command says them —
    each once per process (the launcher loads a recipe once per task)."""
    found: list[str] = []
    data, prov, _ = _read_yaml(Path(path), notes=found)
    if overrides:
        odata, oprov = parse_overrides(overrides, found)
        data = _merge(data, odata)
        prov = {**prov, **oprov}
    recipe = recipe_from_dict(data, prov)
    if notes is None and Path(path).read_text().startswith(RESOLVED_HEADER):
        found = []  # a run's recipe.yaml, which the kit wrote: its old key names are no one's to rewrite
    for line in found:
        if notes is not None:
            notes.append(line)
        elif line not in _NOTES_SAID:
            print(line, file=sys.stderr, flush=True)
        _NOTES_SAID.add(line)
    return recipe


_NOTES_SAID: set[str] = set()  # notes this process has said (or handed to a caller to say)
RESOLVED_HEADER = "# resolved recipe, written"  # save_resolved_recipe's first line


def recipe_to_dict(r: Recipe) -> dict:
    return dataclasses.asdict(r)


def dump_recipe(r: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(r), sort_keys=False, default_flow_style=None)


def save_resolved_recipe(r: Recipe, path: str | Path, extra: dict | None = None) -> None:
    """Write the fully resolved recipe (loadable with load_recipe) with the git commit and date
    in its header, atomically."""
    header = [f"{RESOLVED_HEADER} {now_iso()}", f"# git_commit: {git_commit() or 'unknown'}"]
    for k, v in (extra or {}).items():
        header.append(f"# {k}: {v}")
    atomic_write_text(path, "\n".join(header) + "\n" + dump_recipe(r))


# Every recipe field that holds a filesystem path (a list of paths for sft.conversation_files).
# Relative ones mean "relative to the working directory", which under the launcher is the code
# snapshot, not where the user launched from: jobs/launch.py makes them absolute first. A new path
# field must be listed here (tests/test_snapshot.py fails on an unlisted *_dir-like name).
PATH_FIELDS = ("run_dir", "cache_dir", "data.data_dir", "data.offline_cache", "sft.base_checkpoint",
               "sft.conversation_files", "eval.core_bundle", "discovery.cache_dir", "kv_bench.checkpoint")


def _absolute(value, base: Path):
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if not isinstance(value, str) or not value:
        return value  # None (a default chosen later) or a value validation will reject
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def absolute_paths(recipe: Recipe, base: str | Path) -> Recipe:
    """A copy of `recipe` whose relative PATH_FIELDS (and grid values of those keys) are joined
    to `base` (made absolute without resolving symlinks: `data_dir: shards` → BASE/shards);
    absolute paths and None are left alone, `~` is expanded. `recipe` itself is not changed."""
    base = Path(base).expanduser().absolute()
    out = copy.deepcopy(recipe)
    for key in PATH_FIELDS:
        *sections, name = key.split(".")
        owner = getattr(out, sections[0]) if sections else out
        setattr(owner, name, _absolute(getattr(owner, name), base))
    out.grid = {k: _absolute(v, base) if k in PATH_FIELDS else v for k, v in out.grid.items()}
    return out


def recipe_argparser(prog: str, description: str = "") -> argparse.ArgumentParser:
    """`prog RECIPE [section.key=value ...] [--flags]`; callers add flags, then call
    `parse_intermixed_args` so overrides and flags may come in any order."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("recipe", help="YAML recipe, e.g. configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="recipe overrides, e.g. train.num_iterations=100")
    return ap


# --------------------------------------------------------------------------------------------
# The recipe reference (docs/recipes.md) is generated from the field comments above, so it cannot drift.

SECTIONS = {"": Recipe, "model": ModelArgs, "tokenizer": TokenizerArgs, "data": DataArgs,
            "optim": OptimArgs, "train": TrainArgs, "sft": SFTArgs, "eval": EvalArgs,
            "discovery": DiscoveryArgs, "kv_bench": KVBenchArgs, "cluster": ClusterArgs, "report": ReportArgs}


def _field_comments(cls) -> dict[str, str]:
    import inspect
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*?(?:#\s*(.*))?$", line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            comments[m.group(1)] = (m.group(2) or "").strip()
    return comments


def recipe_reference() -> str:
    """Markdown tables: every key, its default and what it means."""
    out = []
    for section, cls in SECTIONS.items():
        comments = _field_comments(cls)
        out.append(f"**{section or 'top level'}**" + ("  (plus `base: other.yaml`)" if not section else ""))
        out.append("")
        out.append("| key | default | meaning |")
        out.append("|---|---|---|")
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name in SECTIONS:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            key = f"{section}.{f.name}" if section else f.name
            shown = "per role, below" if key == "optim.adamw_roles" else f"`{shown}`"
            out.append(f"| `{key}` | {shown} | {comments.get(f.name, '').replace('|', '/')} |")
            if key == "optim.adamw_roles":  # one row per role: its defaults and what it trains
                for role, settings in default.items():
                    shown = yaml.safe_dump(settings, default_flow_style=True, sort_keys=False).strip()
                    out.append(f"| `{key}.{role}` | `{shown}` | AdamW of {ADAMW_ROLE_DEFAULTS[role][3]} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanochat.recipe",
                                 description="Print a resolved recipe, or the recipe reference.")
    ap.add_argument("recipe", nargs="?", help="YAML recipe to resolve and print")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    ap.add_argument("--reference", action="store_true", help="print the recipe reference (markdown)")
    ap.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)  # moved: one line says where
    args = ap.parse_intermixed_args(argv)
    if args.setup:
        raise UserError("--setup moved to the launcher: python jobs/launch.py RECIPE --setup prints the "
                        "recipe's cluster.setup as the shell text its jobs run")
    if args.reference:
        print(recipe_reference(), end="")
    elif args.recipe:
        notes: list[str] = []
        print(dump_recipe(load_recipe(args.recipe, args.overrides, notes)), end="")
        for line in notes:
            print(line, file=sys.stderr)
    else:
        ap.error("give a recipe or --reference")
    return 0


if __name__ == "__main__":
    from nanochat.common import cli_main
    raise SystemExit(cli_main(main))
