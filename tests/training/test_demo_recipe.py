"""The committed demo bundle is what `make demo-bundle` builds: the recipe
stored in it is the default recipe, so a recipe change without a rebuild
(or a rebuild with another recipe) fails here."""

import dataclasses
import json
from pathlib import Path

from training.demo_bundle import DemoRecipe

BUNDLE = Path(__file__).resolve().parents[2] / "report2ct" / "bundles" / "demo"


def test_committed_demo_bundle_was_built_by_the_default_recipe():
    stored = json.loads((BUNDLE / "training" / "recipe.json").read_text())
    default = json.loads(json.dumps(dataclasses.asdict(DemoRecipe())))
    changed = {k: (stored.get(k), v) for k, v in default.items() if stored.get(k) != v}
    assert not changed, f"bundle recipe differs from DemoRecipe() (stored, default): {changed}"


def test_demo_bundle_help_names_the_recipe_defaults():
    # The CLI states the defaults in its help without importing the recipe
    # (torch-free start-up); this keeps the two in step.
    from typer.testing import CliRunner

    from jobs.cli import app

    recipe = DemoRecipe()
    result = CliRunner().invoke(app, ["train", "demo-bundle", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for said in (
        f"the recipe's, {recipe.phantoms})",
        f"the recipe's, {recipe.vae.steps})",
        f"the recipe's, {recipe.ldm.steps} of 8)",
        f"the recipe's, {recipe.labels.steps};",
        f"the recipe's, {recipe.control.steps};",
    ):
        assert said in " ".join(result.output.split()), said
