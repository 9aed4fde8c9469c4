"""Magnitude pruning: the mask against a sorted slow oracle, the pass against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from eiec.errors import RecipeError
from eiec.ir import copy_model, find_layers, get_initializer, set_initializer
from eiec.passes.compress import magnitude_mask
from eiec.passes.plan import Reconstruct
from eiec.passes.prune import Prune
from helpers import canonical_convnet, run_ort
from eiec.passmanager import Context
from eiec.recipe import parse_recipe


def canonical_model(seed: int = 0) -> onnx.ModelProto:
    return canonical_convnet(seed, hw=8, stride=1)


def slow_mask(w: np.ndarray, density: float) -> np.ndarray:
    """The obvious version: sort flat indices by (-|w|, index) and keep the first k."""
    flat = w.ravel().tolist()
    k = max(1, round(density * len(flat)))
    keep = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))[:k]
    mask = np.zeros(len(flat), dtype=bool)
    mask[keep] = True
    return mask.reshape(w.shape)


# small integer-valued weights so that ties at the threshold are common
tied_weights = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)),
                      elements=st.integers(-4, 4).map(float))
real_weights = arrays(np.float32, st.integers(1, 200),
                      elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False))


@settings(max_examples=150, deadline=None)
@given(w=st.one_of(tied_weights, real_weights), density=st.floats(1e-3, 1.0))
def test_magnitude_mask_keeps_exactly_k_largest_with_index_tie_break(w, density):
    mask = magnitude_mask(w, density)
    assert mask.shape == w.shape and mask.dtype == bool
    assert mask.sum() == max(1, round(density * w.size))
    np.testing.assert_array_equal(mask, slow_mask(w, density))


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_magnitude_mask_rejects_density_outside_0_1(density):
    with pytest.raises(ValueError):
        magnitude_mask(np.ones(4, np.float32), density)


def test_prune_pass_reaches_target_density_per_layer_and_keeps_biases():
    model = canonical_model()
    before = copy_model(model)
    recipe = parse_recipe({"defaults": {"density": 0.25, "bits": 4},
                           "layers": {"fc1": {"density": 0.1}, "fc2": {"density": 0.5}}})
    seen: list[str] = []
    result = Prune().run(model, Context(recipe=recipe, progress=seen.append))
    want = {"conv1": 0.25, "fc1": 0.1, "fc2": 0.5}
    stats = {s["name"]: s for s in result.stats["layers"]}
    for layer in find_layers(result.model):
        w0 = get_initializer(before, layer.weight)
        w1 = get_initializer(result.model, layer.weight)
        k = max(1, round(want[layer.name] * w0.size))
        assert np.count_nonzero(w1) == k == stats[layer.name]["kept"]
        assert stats[layer.name]["density_after"] == pytest.approx(k / w0.size)
        # the survivors are the original values at the oracle's positions
        np.testing.assert_array_equal(w1, np.where(slow_mask(w0, want[layer.name]), w0, 0))
        np.testing.assert_array_equal(get_initializer(result.model, layer.bias), get_initializer(before, layer.bias))
    assert seen == ["prune conv1", "prune fc1", "prune fc2"]

    # onnxruntime on the pruned model equals onnxruntime on the original with masked weights
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    oracle = copy_model(before)
    for layer in find_layers(oracle):
        w0 = get_initializer(before, layer.weight)
        set_initializer(oracle, layer.weight, np.where(slow_mask(w0, want[layer.name]), w0, 0))
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], run_ort(oracle, {"x": x})[0])


def test_keep_and_skip_layers_are_left_untouched():
    model = canonical_model()
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    recipe = parse_recipe({"defaults": {"density": 0.2, "bits": 4},
                           "layers": {"conv1": {"density": "keep"}, "fc2": {"skip": True}}})
    result = Prune().run(model, Context(recipe=recipe))
    after = {t.name: t.SerializeToString() for t in result.model.graph.initializer}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"fc1.w"}
    actions = {s["name"]: s["action"] for s in result.stats["layers"]}
    assert actions == {"conv1": "keep", "fc1": "prune", "fc2": "skip"}


def test_unresolved_auto_density_is_a_recipe_error():
    recipe = parse_recipe({"defaults": {"density": "auto", "bits": 4}})
    with pytest.raises(RecipeError, match="auto"):
        Prune().run(canonical_model(), Context(recipe=recipe))


def test_sequential_reconstruction_needs_resolved_bits_but_magnitude_pruning_does_not():
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    recipe = parse_recipe({"defaults": {"density": 0.3, "bits": "auto"}})
    with pytest.raises(RecipeError, match="bits 'auto'"):
        Reconstruct().run(canonical_model(), Context(recipe=recipe, calibration=feeds))
    plain = parse_recipe({"defaults": {"density": 0.3, "bits": "auto", "obs": False, "refit": False,
                                       "bias_correction": False, "gptq": False}})
    ctx = Context(recipe=plain, calibration=feeds)
    assert Reconstruct().run(canonical_model(), ctx).stats["reconstruction"] == "none"
    result = Prune().run(canonical_model(), ctx)
    assert result.stats["reconstruction"] == "none"
