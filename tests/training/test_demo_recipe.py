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
