"""Every shipped recipe resolves to the values it resolved to when the package was restructured
(tests/data/recipes_resolved.json: each recipe's resolved keys, flattened, dumped with load_recipe
before the move). Keys added since then are new; a changed value of an old key fails here and must
be a decision, with the file updated in the same commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fgvc.config import flatten, load_recipe

RESOLVED = json.loads((Path(__file__).parent / "data" / "recipes_resolved.json").read_text())


@pytest.mark.parametrize("recipe", sorted(RESOLVED))
def test_recipe_resolves_as_before(recipe):
    now = flatten(OmegaConf.to_container(load_recipe([f"recipe={recipe}"]), resolve=True))
    changed = {k: (v, now.get(k, "<missing>")) for k, v in RESOLVED[recipe].items() if now.get(k, "<missing>") != v}
    assert not changed, f"{recipe}: (before, now) {changed}"
