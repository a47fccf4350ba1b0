"""The shape of the code, read with `ast` (nothing imported): no import circles, entry points
as leaves, private names used only where they are defined, jobs/ light on a login node."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("nanochat", "jobs")
# `python -m` entry points: nothing in nanochat/ may import them (shared code lives in libraries)
ENTRY_POINTS = {"nanochat.train", "nanochat.sft", "nanochat.eval", "nanochat.chat", "nanochat.prepare",
                "nanochat.check"}


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
            # `from nanochat import tasks` imports the module nanochat.tasks
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
    offenders = [f"{mod} imports {m} ({MODULES[mod].relative_to(REPO)}:{line})"
                 for mod, path in MODULES.items() if mod.startswith("nanochat")
                 for m, _, line in _imports(path) if m in ENTRY_POINTS and m != mod]
    assert not offenders, "entry points used as libraries: " + "; ".join(offenders)


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


def test_modules_stay_small():
    big = {str(p.relative_to(REPO)): n for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > 650}
    assert not big, f"modules past ~600 lines (split them where a seam exists): {big}"
