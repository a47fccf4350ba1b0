"""The README stays true: its recipe reference is the generated one, and CI runs its test command."""
import re
from pathlib import Path

from nanochat.recipe import recipe_reference

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_recipe_reference_is_generated_from_the_code():
    assert recipe_reference() in README, \
        "README is stale: paste `python -m nanochat.recipe --reference` into its Recipe reference"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_every_recipe_in_configs_is_documented():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert f"`configs/{path.name}`" in README, f"{path.name} missing from the README's recipe table"
