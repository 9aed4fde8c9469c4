"""Recipes: later patterns win, and a dumped recipe replays to the same choices and target."""

from __future__ import annotations

import pytest
import yaml

from eiec.errors import RecipeError
from eiec.recipe import LayerRecipe, dump_recipe, parse_recipe


def test_later_matching_patterns_override_earlier_ones_and_defaults():
    r = parse_recipe({"defaults": {"density": 0.1, "bits": 4},
                      "layers": {"fc*": {"density": 0.5}, "fc2": {"bits": 2}}})
    assert r.for_layer("fc2", "fc2.weight") == LayerRecipe(density=0.5, bits=2)
    assert r.for_layer("conv1", "conv1.weight") == LayerRecipe(density=0.1, bits=4)
    assert r.for_layer("x", "fc9.weight").density == 0.5  # weight names match too


def test_dumped_recipe_replays_to_the_same_target_budget_and_layers():
    r = parse_recipe({"target": {"pes": 16, "queue_depth": 4, "energy": {"dram_byte": 200.0}},
                      "budget": {"max_output_error": 0.1}})
    chosen = {"fc1": LayerRecipe(density=0.1, bits=3, obs=False, q_format={"out_frac": 9}),
              "fc2": LayerRecipe(density="keep", bits=4)}
    replay = parse_recipe(yaml.safe_load(dump_recipe(r, chosen)))
    assert replay.target == r.target
    assert replay.max_output_error == 0.1 and replay.max_accuracy_drop == r.max_accuracy_drop
    assert {n: replay.for_layer(n, n) for n in chosen} == chosen


@pytest.mark.parametrize("doc", [{"budget": {"max_output_error": float("nan")}},
                                 {"target": {"weight_bits": 5}},
                                 {"defaults": {"bits": "none"}}])
def test_values_outside_their_range_are_refused(doc):
    with pytest.raises(RecipeError):
        parse_recipe(doc)
