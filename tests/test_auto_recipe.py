"""Reconstruction through the passes and `auto` through the real compile, against independent oracles.

Oracles: layer outputs computed here with numpy from intermediate tensors that onnxruntime
produces (dense inputs from the original model, sequential inputs from the compressed IR2
model), and the compiled model's IR2 dump run in onnxruntime on the held-out calibration rows.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from eiec.container import read_eie
from eiec.driver import compile_model
from eiec.ir import OPSET, find_layers, get_initializer, matrix_view, set_initializer
from eiec.passes.auto import DEFAULT_DENSITY, _notes
from eiec.passes.cluster import Cluster
from eiec.passes.compress import magnitude_mask, quantize_weights
from eiec.passes.holdout import confirmation_split, split_calibration
from eiec.passes.prune import Prune
from eiec.passes.sequential import Sequential, Steps
from eiec.passes.plan import Reconstruct
from eiec.passmanager import Context, PassManager
from eiec.recipe import parse_recipe
from eiec.report import sensitivity_table


def mlp(seed: int, sizes=(24, 40, 32, 6)) -> onnx.ModelProto:
    """Gemm+Relu stack, canonical IR0, dynamic batch."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits += [numpy_helper.from_array((rng.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(b)).astype(np.float32), f"b{i}")]
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], ["y" if last else f"g{i}"],
                                      name=f"fc{i}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [f"h{i}"], name=f"relu{i}"))
            prev = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def correlated_inputs(seed: int, n: int, dim: int = 24) -> np.ndarray:
    """Inputs with a nonzero mean and strongly correlated features, where OBS has something to use."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim)) * (rng.random(dim) < 0.3)
    return (rng.standard_normal((n, dim)) @ (np.eye(dim) + mix) + 0.5).astype(np.float32)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in names or []:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ir2_weights(model: onnx.ModelProto, layer) -> np.ndarray:
    """W of an IR2 layer, decoded here: codebook[indices]."""
    return get_initializer(model, layer.weight + ".codebook")[get_initializer(model, layer.weight + ".indices")]


def layer_output_error(X: np.ndarray, X_ref: np.ndarray, w_ref, b_ref, w_new, b_new) -> float:
    """Oracle for the sequential layer_error stats: |X W_new^T + b_new - (X_ref W^T + b)|^2 / |X_ref W^T|^2."""
    X, X_ref = X.astype(np.float64), X_ref.astype(np.float64)
    y_ref = X_ref @ matrix_view(w_ref).T.astype(np.float64)
    y_new = X @ matrix_view(w_new).T.astype(np.float64) + b_new - b_ref
    return float(np.sum((y_new - y_ref) ** 2) / np.sum(y_ref**2))


def layer_inputs(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    """Every layer's input in `model`, by onnxruntime (the IR2 dump: the compressed predecessors)."""
    hidden = run(model, feeds, ["h0", "h1"])
    return {"fc0": feeds["x"], "fc1": hidden[1], "fc2": hidden[2]}


def compress_passes(model: onnx.ModelProto, feeds, density: float, bits: int,
                    **steps) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """(IR1, IR2, stats) from the reconstruct, prune and cluster passes with calibration inputs `feeds`."""
    ctx = Context(recipe=parse_recipe({"defaults": {"density": density, "bits": bits, **steps}}),
                  calibration=feeds, calibration_is_random=False)
    first, second = PassManager([Reconstruct(), Prune()]), PassManager([Cluster()])
    ir1 = first.run(model, ctx)
    ir2 = second.run(ir1, ctx)
    stats = {r.name: r.stats for r in first.records + second.records}
    return ir1, ir2, {"prune": {l["name"]: l for l in stats["prune"]["layers"]},
                      "cluster": {l["name"]: l for l in stats["cluster"]["layers"]}}


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([0.1, 0.3, 0.6, 1.0]), st.sampled_from([2, 3, 4]), st.booleans())
def test_refit_never_increases_the_sequential_target_error(seed, density, bits, obs):
    model = mlp(seed)
    feeds = {"x": correlated_inputs(seed, 150)}
    X_ref = layer_inputs(model, feeds)
    ir1, ir2, stats = compress_passes(model, feeds, density, bits, obs=obs, refit=True, bias_correction=False,
                                      gptq=False)
    X = layer_inputs(ir2, feeds)  # what each layer sees once its predecessors are compressed
    for layer in find_layers(model):
        s = stats["cluster"][layer.name]
        assert s["reconstruction"] == "sequential"
        assert s["layer_error_refit"] <= s["layer_error_kmeans"] * (1 + 1e-9) + 1e-15
        w0, b0 = get_initializer(model, layer.weight), get_initializer(model, layer.bias)
        # k-means alone, recomputed here from the IR1 weight, and the refit codebook from IR2
        codebook, indices = quantize_weights(get_initializer(ir1, layer.weight), bits)
        w_km, w_refit = codebook[indices], ir2_weights(ir2, layer)
        e_km = layer_output_error(X[layer.name], X_ref[layer.name], w0, b0, w_km, b0)
        e_refit = layer_output_error(X[layer.name], X_ref[layer.name], w0, b0, w_refit, b0)
        assert e_refit <= e_km * (1 + 1e-6) + 1e-12  # measured independently, through the outputs
        assert s["layer_error_refit"] == pytest.approx(e_refit, rel=1e-4, abs=1e-9)
        assert s["layer_error_kmeans"] == pytest.approx(e_km, rel=1e-4, abs=1e-9)
        np.testing.assert_array_equal(get_initializer(ir2, layer.weight + ".indices"), indices)
        assert get_initializer(ir2, layer.weight + ".codebook")[0] == 0.0
        np.testing.assert_array_equal(get_initializer(ir2, layer.bias), b0)  # bias correction off


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_pass_obs_beats_magnitude_layer_error_at_the_same_density(seed):
    model = mlp(seed)
    feeds = {"x": correlated_inputs(seed, 200)}
    X_ref = layer_inputs(model, feeds)
    for obs in (True, False):
        ir1, ir2, stats = compress_passes(model, feeds, 0.3, 4, obs=obs)
        X = layer_inputs(ir2, feeds)
        for layer in find_layers(model):
            s = stats["prune"][layer.name]
            w0, b0 = get_initializer(model, layer.weight), get_initializer(model, layer.bias)
            w1 = get_initializer(ir1, layer.weight)
            assert np.count_nonzero(w1) == round(0.3 * w1.size)
            measured = layer_output_error(X[layer.name], X_ref[layer.name], w0, b0, w1, b0)
            assert s["layer_error"] == pytest.approx(measured, rel=1e-4)
            magnitude = np.where(magnitude_mask(w0, 0.3), w0, 0)
            e_mag = layer_output_error(X[layer.name], X_ref[layer.name], w0, b0, magnitude, b0)
            assert s["layer_error_magnitude"] == pytest.approx(e_mag, rel=1e-4)
            if obs:  # OBS, or the greedy mask where its finished layer came out closer
                assert s["method"] in ("obs", "greedy")
                assert s["layer_error_obs"] < 0.8 * s["layer_error_magnitude"]
            else:
                assert s["method"] == "magnitude" and "layer_error_obs" not in s
                np.testing.assert_array_equal(w1, magnitude)


def test_bias_correction_restores_every_layers_mean_dense_output_and_lowers_the_error():
    model = mlp(5)
    feeds = {"x": correlated_inputs(5, 300)}
    X_ref = layer_inputs(model, feeds)
    _, out, stats = compress_passes(model, feeds, 0.2, 3)
    X = layer_inputs(out, feeds)
    for layer in find_layers(model):
        s = stats["cluster"][layer.name]
        w0, b0 = get_initializer(model, layer.weight), get_initializer(model, layer.bias)
        w2, b2 = ir2_weights(out, layer), get_initializer(out, layer.bias)
        x, x_ref = X[layer.name].astype(np.float64), X_ref[layer.name].astype(np.float64)
        np.testing.assert_allclose((x @ w2.T + b2).mean(axis=0), (x_ref @ w0.T + b0).mean(axis=0), atol=1e-5)
        assert s["layer_error_bias_correction"] < s["layer_error_refit"] <= s["layer_error_kmeans"]
        measured = layer_output_error(x, x_ref, w0, b0, w2, b2)
        assert s["layer_error_bias_correction"] == pytest.approx(measured, rel=1e-4)


def test_sequential_reconstruction_lowers_the_model_output_error():
    """Reconstructing on the compressed predecessors' outputs beats reconstructing on the dense inputs."""
    model = mlp(6)
    feeds = {"x": correlated_inputs(6, 300)}
    (y_ref,) = run(model, feeds)
    _, ir2, _ = compress_passes(model, feeds, 0.25, 3)
    # the non-sequential oracle: every layer compressed alone on its dense inputs, then combined
    seq = Sequential(model, find_layers(model), feeds)
    alone = {}
    for layer in find_layers(model):
        res = seq.compress({layer.name: (0.25, 3)})[layer.name]
        alone[layer.weight], alone[layer.bias] = res.weight, res.bias
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name, value in alone.items():
        set_initializer(m, name, value)
    error = lambda y: float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))
    assert error(run(ir2, feeds)[0]) < error(run(m, feeds)[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_assignment_keeps_the_mask_and_beats_nearest_centroid_through_the_passes(seed):
    model = mlp(seed)
    feeds = {"x": correlated_inputs(seed, 200)}
    X_ref = layer_inputs(model, feeds)
    stats = {}
    for gptq in (True, False):
        ir1, ir2, stats[gptq] = compress_passes(model, feeds, 0.4, 3, gptq=gptq, refit=False, bias_correction=False)
        X = layer_inputs(ir2, feeds)
        for layer in find_layers(model):
            s = stats[gptq]["cluster"][layer.name]
            idx = get_initializer(ir2, layer.weight + ".indices")
            w1 = get_initializer(ir1, layer.weight)
            assert np.array_equal(idx == 0, w1 == 0)  # pruned: entry 0; kept: never entry 0
            w0, b0 = get_initializer(model, layer.weight), get_initializer(model, layer.bias)
            measured = layer_output_error(X[layer.name], X_ref[layer.name], w0, b0, ir2_weights(ir2, layer), b0)
            if gptq:
                assert s["assignment"] in ("gptq", "nearest")
                kept = s["layer_error_gptq"] if s["assignment"] == "gptq" else s["layer_error_kmeans"]
                assert kept == pytest.approx(measured, rel=1e-4, abs=1e-12)
                assert kept <= s["layer_error_kmeans"]
            else:
                assert s["assignment"] == "nearest" and "layer_error_gptq" not in s
                codebook, indices = quantize_weights(w1, 3)  # k-means' own nearest assignment
                np.testing.assert_array_equal(idx, indices)
    # on these correlated inputs the first layer (same inputs either way) gains (the pruning error dominates)
    first = stats[True]["cluster"]["fc0"]
    assert first["assignment"] == "gptq" and first["layer_error_gptq"] < first["layer_error_kmeans"]


def test_passes_compile_exactly_what_the_sequential_compressor_measures():
    """The auto budget holds for the compiled model only if the passes equal the search's compressor."""
    model = mlp(7)
    feeds = {"x": correlated_inputs(7, 120)}
    layers = find_layers(model)
    recipe = {"defaults": {"density": 0.25, "bits": 3},
              "layers": {"fc1": {"obs": False}, "fc2": {"refit": False, "gptq": False}}}
    ctx = Context(recipe=parse_recipe(recipe), calibration=feeds, calibration_is_random=False)
    out = PassManager([Reconstruct(), Prune(), Cluster()]).run(model, ctx)
    steps = {"fc0": Steps(), "fc1": Steps(obs=False), "fc2": Steps(refit=False, gptq=False)}
    planned = Sequential(model, layers, feeds, steps).compress({l.name: (0.25, 3) for l in layers})
    for layer in layers:
        np.testing.assert_array_equal(ir2_weights(out, layer), planned[layer.name].weight)
        np.testing.assert_array_equal(get_initializer(out, layer.bias), planned[layer.name].bias)


def _write_model_and_data(tmp_path, seed: int, n: int, labels: bool) -> tuple[str, str, onnx.ModelProto, dict]:
    model = mlp(seed)
    path = str(tmp_path / "mlp.onnx")
    onnx.save(model, path)
    feeds = {"x": correlated_inputs(seed, n)}
    data = dict(feeds)
    if labels:
        data["labels"] = run(model, feeds)[0].argmax(axis=1).astype(np.int64)  # dense model: 100 %
    calib = str(tmp_path / "calib.npz")
    np.savez(calib, **data)
    return path, calib, model, data


def held_out_expected_drop(ir2: onnx.ModelProto, model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray) -> float:
    """Points expected lost: the original's label margins, each paired with every row's margin
    shift in the compiled model (its IR2 dump, in onnxruntime), counted pair by pair."""
    (y,) = run(ir2, {"x": x})
    (y_ref,) = run(model, {"x": x})
    def margins(z):
        z = z.astype(np.float64)
        other = np.where(np.eye(z.shape[1])[labels] > 0, -np.inf, z)
        return z[np.arange(len(z)), labels] - other.max(axis=1)
    a = margins(y_ref)
    shift = margins(y) - a
    right = np.mean([np.mean(ai + shift > 0) for ai in a])
    return 100 * (np.mean(a > 0) - right)


def test_auto_compile_respects_the_accuracy_budget_on_the_held_out_calibration_rows(tmp_path):
    path, calib, model, data = _write_model_and_data(tmp_path, 3, 400, labels=True)
    out, dump = str(tmp_path / "m.eie"), str(tmp_path / "ir")
    res = compile_model(path, out, calibration_path=calib, dump_dir=dump, budget={"max_accuracy_drop": 25.0})
    split = split_calibration({"x": data["x"]}, data["labels"], seed=0)
    auto = res.manifest["auto"]
    assert (auto["reconstruction_rows"], auto["held_out_rows"]) == (200, 200)
    assert (auto["scored_rows"], auto["confirmation_rows"]) == (133, 67)  # a third kept from the search
    assert auto["searched"]["estimate"] <= auto["searched"]["bound"] <= 25.0  # what the search chose on
    assert auto["estimate"] <= auto["bound"] and auto["confirmed"] == (auto["bound"] <= 25.0)
    ir2 = onnx.load(os.path.join(dump, "2_cluster.onnx"))
    # measured independently: the IR2 dump (what the later passes only re-encode) in onnxruntime,
    # its expected drop over every (margin, shift) pair of the held-out rows kept from the search
    kept = confirmation_split(split.held_out, split.held_out_labels, seed=0)
    x_out, y_out = kept.confirmation["x"], kept.confirmation_labels
    assert held_out_expected_drop(ir2, model, x_out, y_out) == pytest.approx(auto["estimate"], rel=1e-3, abs=1e-3)
    assert any("points of top-1 accuracy expected lost" in n and "the choice never saw" in n for n in res.notes)
    assert not any("more than the budget" in n for n in res.notes)  # one of 67 rows is 1.5 points < 25
    chosen = {l["name"]: l for l in res.manifest["layers"]}
    assert any(l["density"] < 1 or l["bits"] < 4 for l in chosen.values())  # it did compress
    assert auto["metric"] == "accuracy"
    # what was scored is what is compiled: the layers reconstructed on the reconstruction rows only
    layers = find_layers(model)
    planned = Sequential(model, layers, {"x": data["x"][split.reconstruction_rows]}).compress(
        {n: (c["density"], c["bits"]) for n, c in auto["chosen"].items()})
    for layer in layers:
        np.testing.assert_array_equal(ir2_weights(ir2, layer), planned[layer.name].weight)
        np.testing.assert_array_equal(get_initializer(ir2, layer.bias), planned[layer.name].bias)
    # the scan is in the manifest (for `eiec inspect --sensitivity`) and in the dump stats
    sens = res.manifest["sensitivity"]
    assert set(sens) == {"fc0", "fc1", "fc2"} and set(sens["fc0"]) >= {"density", "bits", "density_accuracy_lost"}
    assert json.load(open(os.path.join(dump, "0_import.json")))["stats"]["sensitivity"] == json.loads(json.dumps(sens))
    assert "accuracy lost" in sensitivity_table(res.manifest)


@pytest.mark.parametrize("rows, budget, warned", [(50, 0.5, True), (200, 0.5, False), (50, 2.0, False)])
def test_auto_says_when_one_kept_back_row_weighs_more_than_the_accuracy_budget(rows, budget, warned):
    notes = _notes({"host": []}, "accuracy", budget, (0.0, 0.0), (0.0, 0.0), True, f"{rows} rows", rows)
    assert any(f"one of {rows} rows is" in n and "more than the budget" in n for n in notes) == warned
    assert not any("more than the budget" in n for n in _notes({"host": []}, "error", 0.01, (0.0, 0.0), (0.0, 0.0),
                                                              True, "50 rows", 50))


def test_auto_compile_respects_the_output_error_budget_and_replays_to_the_same_recipe(tmp_path):
    path, calib, model, data = _write_model_and_data(tmp_path, 4, 200, labels=False)
    out, dump = str(tmp_path / "m.eie"), str(tmp_path / "ir")
    res = compile_model(path, out, calibration_path=calib, dump_dir=dump, budget={"max_output_error": 0.35})
    x_out = confirmation_split(split_calibration({"x": data["x"]}).held_out).confirmation["x"]
    (y_ref,) = run(model, {"x": x_out})
    (y,) = run(onnx.load(os.path.join(dump, "2_cluster.onnx")), {"x": x_out})
    error = np.linalg.norm(y.astype(np.float64) - y_ref) / np.linalg.norm(y_ref.astype(np.float64))
    auto = res.manifest["auto"]
    assert error == pytest.approx(auto["estimate"], rel=1e-3)  # measured on the rows the search never saw
    assert auto["searched"]["bound"] <= 0.35
    assert res.recipe_path is not None and res.manifest["auto"]["metric"] == "error"
    # replaying the written recipe compiles the same choices; it reconstructs on all calibration
    # rows (nothing is scored, so nothing is held out), so the weights may differ
    again = str(tmp_path / "again.eie")
    compile_model(path, again, recipe_path=res.recipe_path, calibration_path=calib)
    a, b = read_eie(out), read_eie(again)
    assert set(a.members) == set(b.members)
    strip = lambda m: [{k: l[k] for k in ("name", "shape", "density", "bits", "recipe")} for l in m["layers"]]
    assert strip(a.manifest) == strip(b.manifest)
    assert "auto" not in b.manifest


def test_compile_without_calibration_data_uses_the_per_layer_defaults_and_says_so(tmp_path):
    model = mlp(5)
    path = str(tmp_path / "mlp.onnx")
    onnx.save(model, path)
    res = compile_model(path, str(tmp_path / "m.eie"))
    auto = res.manifest["auto"]
    assert auto["calibration"] == "random" and auto["data_free"] == "defaults"
    want = {"fc0": DEFAULT_DENSITY["fc"], "fc1": DEFAULT_DENSITY["fc"], "fc2": DEFAULT_DENSITY["last"]}
    for layer in res.manifest["layers"]:  # the densities compiled: counted in the .eie's layers
        w = int(np.prod(layer["shape"]))
        assert layer["density"] == pytest.approx(round(want[layer["name"]] * w) / w, abs=1e-6)
        assert layer["bits"] == 4
    assert any(n.startswith("auto: no calibration data, so nothing measured: per-layer default densities")
               for n in res.notes)
    import yaml
    written = yaml.safe_load(open(res.recipe_path))["layers"]  # nothing fitted to random inputs
    assert not any(written[n][k] for n in want for k in ("obs", "refit", "bias_correction", "gptq"))


def test_auto_compile_keeps_layers_on_the_host_when_no_recipe_meets_the_budget(tmp_path):
    path, calib, model, data = _write_model_and_data(tmp_path, 6, 60, labels=False)
    out = str(tmp_path / "m.eie")
    res = compile_model(path, out, calibration_path=calib, budget={"max_output_error": 1e-7})
    auto = res.manifest["auto"]
    assert auto["host"] and not auto["over_budget"] and auto["bound"] <= 1e-7
    on_host = {l["name"] for l in res.manifest["layers"] if l.get("on_host")}
    assert on_host == set(auto["host"])
    assert any(n.startswith("auto: no recipe on the accelerator met the budget") and auto["host"][0] in n
               for n in res.notes)
    import yaml
    written = yaml.safe_load(open(res.recipe_path))["layers"]
    assert all(written[n]["skip"] for n in auto["host"])
