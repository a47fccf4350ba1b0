"""The shape of the code, read with `ast` (nothing imported): no import circles, the layers
(nanochat → jobs → bench never the other way), entry points as leaves, one stem per module name,
private names used only where they are defined, jobs/ light on a login node."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("nanochat", "jobs", "bench")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _is_command(path: Path) -> bool:
    return path.name == "__main__.py" or 'if __name__ == "__main__":' in path.read_text()


# `python -m` entry points of the library: nothing may import them (shared code lives in
# libraries). Two modules are a library with a command on top, on purpose:
# - nanochat.recipe: `python -m nanochat.recipe RECIPE` prints what the loader resolved (the
#   plain sbatch scripts read nodes and stages from it); the printer is the loader's own view;
# - nanochat.paths: `python -m nanochat.paths compile-cache` is how slurm/env.sh and torchrun.sh
#   take the node-local compile cache from the one rule the jobs use (no copy of it in shell).
LIBRARY_COMMANDS = {"nanochat.recipe", "nanochat.paths"}
ENTRY_POINTS = {mod for mod, path in MODULES.items()
                if _is_command(path)} - LIBRARY_COMMANDS
# jobs.tasks is what a job runs: it calls the stages' commands in-process (train_base, write_report,
# ...), so it may import them; nothing imports it. Except one reference, not a use: the SLURM
# executor hands submitit `jobs.tasks.run_task`, which submitit pickles BY REFERENCE and calls in
# the job (the local executor starts the same entry point as `python -m jobs.tasks`).
JOB_ENTRY = "jobs.tasks"
SUBMITS_THE_JOB_ENTRY = {("jobs.executors", JOB_ENTRY)}


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for each import in the file — all of them, lazy
    imports inside functions included (a lazy import can hide a circle, it doesn't remove it)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            # `from nanochat.data import problems` imports the module nanochat.data.problems
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            out += [(m, [], node.lineno) for m in subs]
            if len(subs) < len(names):
                out.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES],
                            node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {mod: {m for m, _, _ in _imports(path) if m in MODULES and m != mod}
            for mod, path in MODULES.items()}


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" → ".join(c) for c in cycles)


def test_entry_points_are_leaves():
    assert {"nanochat.train", "nanochat.sft", "nanochat.eval", "nanochat.chat", "nanochat.check",
            "nanochat.prepare", "nanochat.kv_bench", "nanochat.batchsize.__main__"} <= ENTRY_POINTS
    assert {"jobs.launch", "jobs.status", "jobs.report", "jobs.compare", "jobs.ladder", JOB_ENTRY} <= ENTRY_POINTS
    offenders = [f"{mod} imports {m} ({MODULES[mod].relative_to(REPO)}:{line})"
                 for mod, path in MODULES.items() if mod != JOB_ENTRY
                 for m, _, line in _imports(path)
                 if m in ENTRY_POINTS and m != mod and (mod, m) not in SUBMITS_THE_JOB_ENTRY]
    assert not offenders, "entry points used as libraries: " + "; ".join(offenders)


def test_the_job_entry_point_stays_where_queued_jobs_find_it():
    """A job queued before an upgrade unpickles `jobs.tasks.run_task` by name when it starts."""
    tree = ast.parse(MODULES[JOB_ENTRY].read_text())
    assert "run_task" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert _is_command(MODULES[JOB_ENTRY])  # `python -m jobs.tasks RUN_DIR STAGE INDEX`


def _offenders(importers, forbidden) -> list[str]:
    return [f"{mod} imports {m} ({MODULES[mod].relative_to(REPO)}:{line})"
            for mod, path in MODULES.items() if importers(mod)
            for m, _, line in _imports(path) if forbidden(m)]


def test_layers_run_one_way():
    """nanochat/ (the installed library) never imports jobs/ or the checkout's bench/; jobs/ (the
    launcher) never imports bench/. Lazy imports count: they fail just the same when run."""
    top = lambda m: m.split(".")[0]  # noqa: E731
    bad = _offenders(lambda mod: top(mod) == "nanochat", lambda m: top(m) in ("jobs", "bench"))
    bad += _offenders(lambda mod: top(mod) == "jobs", lambda m: top(m) == "bench")
    assert not bad, "; ".join(bad)


# The model: what a GPT is and how it learns. It stands on the recipe's types and the shared
# helpers only, so that it can be read, tested and reused without the stages around it.
MODEL_CORE = {"nanochat.gpt", "nanochat.attention", "nanochat.loss", "nanochat.optim", "nanochat.kv_cache"}
MODEL_CORE_MAY_USE = {"nanochat.config", "nanochat.optim_config", "nanochat.common", "nanochat.paths"}


def test_the_model_core_imports_only_itself_and_the_config():
    bad = _offenders(lambda mod: mod in MODEL_CORE,
                     lambda m: m in MODULES and m not in MODEL_CORE | MODEL_CORE_MAY_USE)
    assert not bad, "; ".join(bad)


def test_data_and_batch_size_discovery_stand_below_the_stages():
    """nanochat/data/ and nanochat/batchsize/ serve the stages: they never import the training
    loop, the inference engine or a command."""
    below = lambda mod: mod.startswith(("nanochat.data.", "nanochat.batchsize.")) and \
        not mod.endswith(".__main__")  # noqa: E731
    above = {"nanochat.trainer", "nanochat.engine"} | ENTRY_POINTS
    bad = _offenders(below, lambda m: m in above)
    assert not bad, "; ".join(bad)


def test_subpackage_init_files_are_empty():
    """Importing nanochat.data or nanochat.batchsize runs nothing: each module is imported by its
    own name (and the torch-free ones stay torch-free)."""
    inits = [p for p in REPO.glob("*/**/__init__.py") if p.parts[len(REPO.parts)] in PACKAGES]
    assert len(inits) >= 5
    full = [str(p.relative_to(REPO)) for p in inits if p.read_text().strip()]
    assert not full, f"non-empty __init__.py: {full}"


def test_one_stem_per_module_name():
    """One concept, one name: no two modules of nanochat/, jobs/ and bench/ share a file name."""
    stems: dict[str, list[str]] = {}
    for path in MODULES.values():
        if path.stem not in ("__init__", "__main__"):
            stems.setdefault(path.stem, []).append(str(path.relative_to(REPO)))
    assert not {s: p for s, p in stems.items() if len(p) > 1}


# What jobs/ imports from the library at module level: the recipe and what it is made of, and
# the torch-free pieces a login node needs — exactly these (the test below keeps the list equal to
# the imports, so it says what jobs/ leans on). Each stays torch-free, with all it imports
# (test_jobs_import_no_torch_at_module_level); anything else is imported inside the function that
# needs it, on a compute node.
JOBS_MAY_IMPORT = {"nanochat.common", "nanochat.config", "nanochat.recipe", "nanochat.logfmt",
                   "nanochat.plots", "nanochat.checkpoint", "nanochat.batchsize.key", "nanochat.tracking",
                   "nanochat.paths", "nanochat.scaling"}


def test_jobs_import_only_the_allowed_library_modules_at_module_level():
    imported = {m: f"{mod} imports {m} ({MODULES[mod].relative_to(REPO)}:{line})"
                for mod, path in MODULES.items() if mod.startswith("jobs")
                for m, _, line in _imports(path, top_level_only=True)
                if m.startswith("nanochat") and m in MODULES}
    bad = [where for m, where in imported.items() if m not in JOBS_MAY_IMPORT]
    assert not bad, "; ".join(bad)
    assert not JOBS_MAY_IMPORT - set(imported), f"listed, not imported by jobs/: {JOBS_MAY_IMPORT - set(imported)}"


def test_private_names_are_used_only_where_defined():
    offenders = [f"{MODULES[mod].relative_to(REPO)}:{line} imports {m}.{n}"
                 for mod, path in MODULES.items() for m, names, line in _imports(path)
                 if m in MODULES for n in names if n.startswith("_")]
    assert not offenders, "; ".join(offenders)


def test_no_import_error_guards():
    """`try: import ... except ImportError` around our own modules hides real import errors."""
    offenders = []
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            ours = any(isinstance(s, (ast.Import, ast.ImportFrom)) and
                       any(m.split(".")[0] in PACKAGES for m in
                           ([a.name for a in s.names] if isinstance(s, ast.Import) else [s.module or ""]))
                       for s in node.body)
            catches = any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                          for h in node.handlers)
            if ours and catches:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, "ImportError guards around project imports: " + ", ".join(offenders)


def test_jobs_import_no_torch_at_module_level():
    """A login node reads recipes and submits jobs without loading torch: jobs/ modules, and
    everything they import at module level, never import torch at module level."""
    seen, todo, chains = set(), [(m, [m]) for m in MODULES if m.startswith("jobs")], []
    while todo:
        mod, chain = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for m, _, _ in _imports(MODULES[mod], top_level_only=True):
            if m.split(".")[0] == "torch":
                chains.append(" → ".join(chain + ["torch"]))
            elif m in MODULES:
                todo.append((m, chain + [m]))
    assert not chains, "torch imported at module level: " + "; ".join(chains)


def test_jobs_never_import_torch_themselves():
    """What torch knows (the device's name, whether it sees a GPU) jobs/ asks nanochat for, inside
    the function that runs in the job: jobs/ stays a launcher that never touches torch itself."""
    bad = _offenders(lambda mod: mod.startswith("jobs"), lambda m: m.split(".")[0] == "torch")
    assert not bad, "; ".join(bad)


def test_modules_stay_small():
    big = {str(p.relative_to(REPO)): n for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > 650}
    assert not big, f"modules past ~600 lines (split them where a seam exists): {big}"
