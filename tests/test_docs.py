"""The docs stay true: the recipe reference is the generated one, CI runs the README's test
command, every recipe is in the README's table, the README stays one screen per task, and every
document it links to exists."""
import re
from pathlib import Path

from nanochat.recipe import recipe_reference

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_recipe_reference_is_generated_from_the_code():
    assert recipe_reference() in (ROOT / "docs" / "recipes.md").read_text(), \
        "docs/recipes.md is stale: paste `python -m nanochat.recipe --reference` into its Recipe reference"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_every_recipe_in_configs_is_in_the_readme_table():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert f"`configs/{path.name}`" in README, f"{path.name} missing from the README's recipe table"


def test_the_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 300, "README.md is for users: move reference material to docs/"
    links = re.findall(r"\]\(([^)#:]+)\)", README)
    assert {"docs/cluster.md", "docs/troubleshooting.md", "docs/recipes.md", "LICENSE"} <= set(links)
    for doc in (ROOT / "docs").glob("*.md"):
        links += [str((doc.parent / link).relative_to(ROOT)) for link in re.findall(r"\]\(([^)#:]+)\)", doc.read_text())]
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"links to files that do not exist: {missing}"


def test_the_readme_says_what_has_not_run():
    status = README.split("> **Status**")[1].split("\n\n")[0]
    assert "Linux only" in status and "GPU: not yet run" in status
    assert "not interchangeable" in README and "karpathy/nanochat" in README
