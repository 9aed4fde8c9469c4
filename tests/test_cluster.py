"""k-means weight sharing: the k-means core (`compress._lloyd_sorted`) against a slow Lloyd loop, IR2 against onnxruntime."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from eiec.errors import RecipeError
from eiec.ir import copy_model, find_layers, get_initializer, set_initializer
from eiec.passes.cluster import Cluster
from eiec.passes.compress import MAX_ITER, _cluster_starts, _lloyd_sorted, quantize_weights
from eiec.passes.prune import Prune
from helpers import canonical_convnet, run_ort
from eiec.passmanager import Context
from eiec.recipe import parse_recipe

MODELS = os.path.join(os.path.dirname(__file__), "models")


def kmeans_1d(values: np.ndarray, k: int, max_iter: int = MAX_ITER) -> tuple[np.ndarray, int]:
    """1-D k-means: k centroids linearly initialised over [min, max], then Lloyd iterations
    until assignments stop changing (or max_iter). Returns (float64 centroids, iterations).
    A value equidistant from two centroids goes to the lower one; empty clusters keep theirs.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = np.asarray(values).ravel()
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    result = _lloyd_sorted(np.sort(values), k, max_iter)
    return result.centroids, result.iterations


def slow_nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.abs(x[:, None] - c[None, :]).argmin(axis=1)  # ties -> lower index


def slow_kmeans(values: np.ndarray, k: int, max_iter: int = 300) -> tuple[np.ndarray, int]:
    """Textbook Lloyd: linear init, assign by argmin |x - c|, recompute means, stop when stable."""
    x = np.asarray(values, dtype=np.float64)
    c = np.linspace(x.min(), x.max(), k)
    a = slow_nearest(x, c)
    it = 0
    while it < max_iter:
        for j in range(k):
            if (a == j).any():
                c[j] = x[a == j].mean()
        it += 1
        a_new = slow_nearest(x, c)
        if (a_new == a).all():
            break
        a = a_new
    return c, it


def sse(x: np.ndarray, c: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(((x - c[slow_nearest(x, c)]) ** 2).sum())


# multiples of 1/8: prefix sums are exact, so fast and slow Lloyd must agree bit for bit,
# and duplicates / exact midpoint ties are frequent
grid_values = arrays(np.float32, st.integers(1, 40), elements=st.integers(-64, 64).map(lambda i: i / 8))


@settings(max_examples=200, deadline=None)
@given(values=grid_values, k=st.integers(1, 9))
def test_kmeans_1d_matches_slow_lloyd_exactly_on_grid_values(values, k):
    c, it = kmeans_1d(values, k)
    c_ref, it_ref = slow_kmeans(values, k)
    np.testing.assert_array_equal(c, c_ref)
    assert it == it_ref


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_1d_matches_slow_lloyd_on_normal_weights(seed):
    values = np.random.default_rng(seed).standard_normal(2000).astype(np.float32)
    c, it = kmeans_1d(values, 15)
    c_ref, it_ref = slow_kmeans(values, 15)
    np.testing.assert_allclose(c, c_ref, rtol=1e-12, atol=1e-12)
    assert it == it_ref


ratios = st.builds(lambda p, q: p / q, st.integers(-60, 60), st.integers(1, 14))


@settings(max_examples=300, deadline=None)
@given(c=st.lists(ratios, min_size=1, max_size=8), extra=st.lists(ratios, max_size=20))
def test_cluster_boundaries_match_argmin_at_rounded_midpoints(c, extra):
    # centroids like cluster means (p/q) and values at their float midpoints, where
    # "x > (a + b) / 2" and argmin |x - c| disagree by an ulp; the boundaries must follow argmin
    c = np.sort(np.array(c))
    mids = c[:-1] + (c[1:] - c[:-1]) / 2
    v = np.sort(np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), extra, c]))
    starts = _cluster_starts(v, c)
    labels = np.repeat(np.arange(c.size), np.diff(starts))
    np.testing.assert_array_equal(labels, slow_nearest(v, c))


def test_midpoint_tie_goes_to_the_lower_centroid():
    # linear start [0, 2]: 1 is equidistant and joins 0's cluster, whose mean becomes 0.5
    c, it = kmeans_1d(np.array([0, 0, 1, 1, 2, 2], np.float32), 2)
    np.testing.assert_array_equal(c, [0.5, 2.0])
    assert it == 1


@settings(max_examples=150, deadline=None)
@given(values=arrays(np.float32, st.integers(1, 60), elements=st.floats(-1e3, 1e3, width=32)),
       k=st.integers(1, 15))
def test_kmeans_1d_never_increases_error_of_linear_start(values, k):
    c, _ = kmeans_1d(values, k)
    c0 = np.linspace(float(values.min()), float(values.max()), k)
    assert np.all(np.diff(c) >= 0)
    assert sse(values, c) <= sse(values, c0) * (1 + 1e-9) + 1e-9


sparse_weights = arrays(np.float32, st.tuples(st.integers(1, 10), st.integers(1, 30)),
                        elements=st.one_of(st.just(0.0), st.floats(-10, 10, width=32)))


@settings(max_examples=150, deadline=None)
@given(w=sparse_weights, bits=st.integers(1, 8))
def test_quantize_weights_index_zero_is_exactly_the_zeros(w, bits):
    codebook, indices = quantize_weights(w, bits)
    assert codebook.dtype == np.float32 and codebook.shape == (2**bits,) and codebook[0] == 0.0
    assert indices.dtype == np.uint8 and indices.shape == w.shape
    assert np.all((indices == 0) == (w == 0))
    nonzero = w[w != 0]
    if nonzero.size:
        # codebook[1:] is k-means of the nonzeros, and each nonzero gets its nearest centroid
        c, _ = kmeans_1d(nonzero, 2**bits - 1)
        np.testing.assert_array_equal(codebook[1:], c.astype(np.float32))
        np.testing.assert_array_equal(indices[w != 0], slow_nearest(nonzero, c) + 1)
        # prefix sums round at about eps64 x the running sum, so compare to the slow loop
        # with a tolerance on that scale (the grid test above checks bit-exactness)
        c_ref, _ = slow_kmeans(nonzero, 2**bits - 1)
        np.testing.assert_allclose(c, c_ref, rtol=0, atol=1e-12 * np.abs(nonzero).sum())


def test_fewer_distinct_values_than_centroids_is_exact():
    w = np.array([[0, 0.5, -1.25, 0], [0.5, 3.0, 0, -1.25]], np.float32)
    codebook, indices = quantize_weights(w, 4)
    np.testing.assert_array_equal(codebook[indices], w)


def test_all_zero_weight_gets_all_zero_indices():
    codebook, indices = quantize_weights(np.zeros((3, 4), np.float32), 2)
    assert not indices.any() and not codebook.any()


# ---------------------------------------------------------------- the pass on ONNX models


def canonical_model(seed: int = 0) -> onnx.ModelProto:
    return canonical_convnet(seed, hw=16, stride=2)


def decoded_oracle(ir1: onnx.ModelProto, quantized: dict[str, tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """IR1 with each W replaced by codebook[indices], computed in numpy."""
    oracle = copy_model(ir1)
    for w_name, (codebook, indices) in quantized.items():
        set_initializer(oracle, w_name, codebook[indices])
    return oracle


def test_cluster_pass_ir2_runs_in_ort_and_equals_decoded_weights():
    recipe = parse_recipe({"defaults": {"density": 0.3, "bits": 4}, "layers": {"fc2": {"bits": 2}}})
    ir1 = Prune().run(canonical_model(), Context(recipe=recipe)).model
    before = copy_model(ir1)
    seen: list[str] = []
    ir2 = Cluster().run(ir1, Context(recipe=recipe, progress=seen.append)).model
    onnx.checker.check_model(ir2)  # includes topological order
    assert seen == ["cluster conv1", "cluster fc1", "cluster fc2"]

    inits = {t.name for t in ir2.graph.initializer}
    nodes = {n.name: n for n in ir2.graph.node}
    quantized = {}
    for layer in find_layers(ir2):
        w = layer.weight
        assert w not in inits
        codebook = get_initializer(ir2, w + ".codebook")
        indices = get_initializer(ir2, w + ".indices")
        bits = 2 if layer.name == "fc2" else 4
        assert codebook.dtype == np.float32 and codebook.shape == (2**bits,) and codebook[0] == 0
        assert indices.dtype == np.uint8 and indices.shape == layer.shape
        w1 = get_initializer(before, w)
        assert np.all((indices == 0) == (w1 == 0))
        assert nodes[f"{layer.name}/indices_cast"].op_type == "Cast"
        decode = nodes[f"{layer.name}/decode"]
        assert decode.op_type == "Gather" and list(decode.output) == [w]
        quantized[w] = (codebook, indices)
    assert [l.name for l in find_layers(ir2)] == ["conv1", "fc1", "fc2"]

    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    got = run_ort(ir2, {"x": x})[0]
    want = run_ort(decoded_oracle(before, quantized), {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_cluster_stats_report_lloyd_improving_on_linear_start():
    recipe = parse_recipe({"defaults": {"density": 0.5, "bits": 3}})
    ir1 = Prune().run(canonical_model(1), Context(recipe=recipe)).model
    w1 = get_initializer(ir1, "fc1.w")
    stats = {s["name"]: s for s in Cluster().run(ir1, Context(recipe=recipe)).stats["layers"]}
    s = stats["fc1"]
    nonzero = w1[w1 != 0]
    c, it = slow_kmeans(nonzero, 7)
    assert s["iterations"] == it and s["converged"] and s["nonzero"] == nonzero.size
    np.testing.assert_allclose(s["codebook"][1:], c.astype(np.float32))
    assert s["sse_final"] == pytest.approx(sse(nonzero, c), rel=1e-9)
    c0 = np.linspace(float(nonzero.min()), float(nonzero.max()), 7)
    assert s["sse_linear_init"] == pytest.approx(sse(nonzero, c0), rel=1e-9)


def test_skip_layer_keeps_dense_weight_and_auto_bits_is_a_recipe_error():
    recipe = parse_recipe({"defaults": {"density": "keep", "bits": 4}, "layers": {"fc1": {"skip": True}}})
    model = canonical_model()
    fc1 = get_initializer(model, "fc1.w")
    result = Cluster().run(model, Context(recipe=recipe))
    np.testing.assert_array_equal(get_initializer(result.model, "fc1.w"), fc1)
    assert not any(n.name.startswith("fc1/") for n in result.model.graph.node)
    assert {s["name"]: s["action"] for s in result.stats["layers"]}["fc1"] == "skip"

    auto = parse_recipe({"defaults": {"density": 0.5, "bits": "auto"}})
    with pytest.raises(RecipeError, match="auto"):
        Cluster().run(canonical_model(), Context(recipe=auto))


@pytest.mark.skipif(not os.path.exists(os.path.join(MODELS, "torch_convnet.onnx")), reason="no shipped model")
def test_imported_torch_convnet_ir2_equals_decoded_weights():
    from eiec.importer import load_model

    ir0 = load_model(os.path.join(MODELS, "torch_convnet.onnx"))
    recipe = parse_recipe({"defaults": {"density": 0.4, "bits": 4}})
    ir1 = Prune().run(ir0, Context(recipe=recipe)).model
    before = copy_model(ir1)
    ir2 = Cluster().run(ir1, Context(recipe=recipe)).model
    quantized = {l.weight: (get_initializer(ir2, l.weight + ".codebook"), get_initializer(ir2, l.weight + ".indices"))
                 for l in find_layers(ir2)}
    assert len(quantized) == len(find_layers(before)) > 0
    rng = np.random.default_rng(3)
    feeds = {}
    for vi in ir2.graph.input:
        shape = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    got = run_ort(ir2, feeds)
    want = run_ort(decoded_oracle(before, quantized), feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
