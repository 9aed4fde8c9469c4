"""Calibration: im2col, layer-input capture, .npz loading and the auto recipe, against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from eiec.errors import InputError, ModelError
from eiec.conv import im2col
from eiec.inputs import load_calibration, random_inputs
from eiec.ir import OPSET, find_layers, matrix_view
from eiec.measure import CONFIDENCE, Score, class_scores, expected_drop, label_margins, upper_bound
from eiec.passes.auto import DEFAULT_DENSITY, StorageModel, auto_recipe, default_recipe, recipe_path
from eiec.passes.capture import Stream, Subgraphs, capture_layer_inputs
from eiec.passes.compress import plain_compress
from eiec.passes.evaluate import LayerSensitivity
from eiec.passes.holdout import confirmation_split, split_calibration
from eiec.passes.sequential import Sequential
from eiec.target import Target


def make_model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def conv_model(c_in, c_out, kernel, pads, strides, dilations, group, rng):
    w = rng.standard_normal((c_out, c_in // group, *kernel)).astype(np.float32)
    b = np.zeros(c_out, np.float32)
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=list(kernel), pads=list(pads),
        strides=list(strides), dilations=list(dilations), group=group,
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, None, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, None, None])
    return make_model([node], [x], [y], {"w": w, "b": b}), w


CONV_CASES = [
    # c_in, c_out, kernel, pads (t, l, b, r), strides, dilations, group
    (3, 4, (3, 3), (0, 0, 0, 0), (1, 1), (1, 1), 1),
    (3, 5, (3, 2), (1, 2, 0, 1), (2, 1), (1, 1), 1),
    (4, 6, (3, 3), (2, 2, 2, 2), (1, 2), (2, 2), 2),
    (6, 6, (3, 3), (1, 1, 1, 1), (2, 2), (1, 3), 6),  # depthwise, dilated
    (4, 8, (1, 1), (0, 0, 0, 0), (3, 3), (1, 1), 4),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_times_weights_equals_onnxruntime_conv(case):
    c_in, c_out, kernel, pads, strides, dilations, group = case
    rng = np.random.default_rng(0)
    model, w = conv_model(c_in, c_out, kernel, pads, strides, dilations, group, rng)
    x = rng.standard_normal((2, c_in, 9, 11)).astype(np.float32)
    (y,) = run(model, {"x": x})
    cols = im2col(x.astype(np.float64), kernel, pads, strides, dilations, group)
    W = matrix_view(w).astype(np.float64).reshape(group, c_out // group, -1)
    out = np.einsum("gpi,goi->pgo", cols, W).reshape(2, y.shape[2], y.shape[3], c_out).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)


def test_im2col_rows_picks_those_rows_of_the_full_patch_matrix():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 7, 6))
    args = ((2, 3), (1, 0, 1, 2), (2, 1), (1, 2), 2)
    full = im2col(x, *args)
    rows = np.array([0, 5, 17, full.shape[1] - 1])
    np.testing.assert_array_equal(im2col(x, *args, rows=rows), full[:, rows])


def small_net(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> Relu -> grouped Conv -> Relu -> Flatten -> Gemm -> Relu -> Gemm."""
    inits = {
        "w1": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "b1": rng.standard_normal(4).astype(np.float32),
        "w2": rng.standard_normal((6, 2, 3, 3)).astype(np.float32) * 0.3,
        "b2": rng.standard_normal(6).astype(np.float32),
        "w3": rng.standard_normal((16, 6 * 3 * 3)).astype(np.float32) * 0.2,
        "b3": rng.standard_normal(16).astype(np.float32),
        "w4": rng.standard_normal((5, 16)).astype(np.float32) * 0.3,
        "b4": np.zeros(5, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[0, 0, 0, 0], strides=[2, 2], dilations=[1, 1], group=2),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g3"], name="fc3", transB=1),
        helper.make_node("Relu", ["g3"], ["r3"]),
        helper.make_node("Gemm", ["r3", "w4", "b4"], ["y"], name="fc4", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 7, 7])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    return make_model(nodes, [x], [y], inits)


def intermediate(model: onnx.ModelProto, name: str, feeds) -> np.ndarray:
    """The oracle: a copy of the model whose only output is `name`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return run(m, feeds)[0]


def test_capture_layer_inputs_are_the_intermediate_tensors():
    rng = np.random.default_rng(2)
    model = small_net(rng)
    layers = find_layers(model)
    assert [l.name for l in layers] == ["conv1", "conv2", "fc3", "fc4"]
    feeds = {"x": rng.standard_normal((3, 2, 7, 7)).astype(np.float32)}
    X = capture_layer_inputs(model, layers, feeds)
    np.testing.assert_array_equal(X["conv1"], im2col(feeds["x"], (3, 3), (1, 1, 1, 1), (1, 1), (1, 1), 1)[0])
    assert X["conv1"].shape == (3 * 7 * 7, 2 * 9)
    r1 = intermediate(model, "r1", feeds)
    np.testing.assert_allclose(X["conv2"], im2col(r1, (3, 3), (0, 0, 0, 0), (2, 2), (1, 1), 2), rtol=1e-6)
    assert X["conv2"].shape == (2, 3 * 3 * 3, 2 * 9)
    np.testing.assert_allclose(X["fc3"], intermediate(model, "f", feeds), rtol=1e-6)
    np.testing.assert_allclose(X["fc4"], intermediate(model, "r3", feeds), rtol=1e-6)
    # The layer inputs times the weights are the layer outputs: the Hessian sees what the layer sees.
    w3 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w3"))
    b3 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b3"))
    np.testing.assert_allclose(X["fc3"] @ w3.T + b3, intermediate(model, "g3", feeds), rtol=1e-4, atol=1e-5)


def test_capture_layer_inputs_subsamples_rows_deterministically():
    rng = np.random.default_rng(3)
    model = small_net(rng)
    layers = find_layers(model)
    feeds = {"x": rng.standard_normal((4, 2, 7, 7)).astype(np.float32)}
    full = capture_layer_inputs(model, layers, feeds)
    a = capture_layer_inputs(model, layers, feeds, max_rows=10, seed=5)
    b = capture_layer_inputs(model, layers, feeds, max_rows=10, seed=5)
    for name in full:
        np.testing.assert_array_equal(a[name], b[name])
        assert a[name].shape[-2] == min(10, full[name].shape[-2])
        # every sampled row is one of the full rows (same rows across groups)
        f = full[name].reshape(-1, full[name].shape[-1]) if full[name].ndim == 2 else full[name][0]
        s = a[name] if a[name].ndim == 2 else a[name][0]
        assert all((f == row).all(axis=1).any() for row in s)


def residual_net(rng: np.random.Generator) -> onnx.ModelProto:
    """As torch.onnx.export writes a small ResNet block at batch 1: Conv -> Relu -> (Conv -> Relu -> Conv)
    + shortcut -> Relu -> Reshape to the constant [1, -1] -> Gemm, input fixed at [1, 2, 6, 6]."""
    inits = {
        "w1": rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "b1": rng.standard_normal(4).astype(np.float32),
        "w2": rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "b2": rng.standard_normal(4).astype(np.float32),
        "w3": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3, "b3": np.zeros(4, np.float32),
        "w4": rng.standard_normal((3, 4 * 36)).astype(np.float32) * 0.1, "b4": np.zeros(3, np.float32),
        "flat_shape": np.array([1, -1], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a"], name="stem_relu"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["c2"], name="branch1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c2"], ["r"], name="branch1_relu"),
        helper.make_node("Conv", ["r", "w3", "b3"], ["c3"], name="branch2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "a"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["out"], name="out_relu"),
        helper.make_node("Reshape", ["out", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w4", "b4"], ["y"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    return make_model(nodes, [x], [y], inits)


def per_row(model: onnx.ModelProto, name: str, feeds) -> np.ndarray:
    """The oracle for a batch-1 model: tensor `name` of the whole model run by onnxruntime, one row at a time."""
    return np.concatenate([intermediate(model, name, {"x": feeds["x"][i:i + 1]}) for i in range(len(feeds["x"]))])


def test_stream_gives_each_layer_input_of_the_whole_model_run_holding_only_the_frontier():
    rng = np.random.default_rng(11)
    model = residual_net(rng)
    feeds = {"x": rng.standard_normal((5, 2, 6, 6)).astype(np.float32)}
    layers = find_layers(model)
    assert [l.input for l in layers] == ["x", "a", "r", "flat"]
    stream = Stream(Subgraphs(model, feeds, {}), feeds)
    # after each layer's input: what computing the later ones reads (the shortcut `a` until the Add has run)
    frontier = [{"x"}, {"a"}, {"a", "r"}, set()]
    for i, layer in enumerate(layers):
        x = stream.advance(layer.input, [l.input for l in layers[i + 1:]], {})
        # equal up to float rounding: onnxruntime fuses the Add into the conv differently in a sub-model
        np.testing.assert_allclose(x, feeds["x"] if layer.input == "x" else per_row(model, layer.input, feeds),
                                   rtol=1e-5, atol=1e-5)
        assert set(stream.held) == frontier[i]
    X = capture_layer_inputs(model, layers, feeds)
    np.testing.assert_allclose(X["fc"], per_row(model, "flat", feeds), rtol=1e-5, atol=1e-5)
    # two layers reading one tensor (the second Gemm of an addmm): both get it
    stream = Stream(Subgraphs(model, feeds, {}), feeds)
    for i in range(2):
        np.testing.assert_array_equal(stream.advance("x", ["x"] * (1 - i), {}), feeds["x"])


def test_sequential_on_a_batch_1_residual_net_sees_the_compressed_predecessors_outputs():
    rng = np.random.default_rng(12)
    model = residual_net(rng)
    layers = find_layers(model)
    feeds = {"x": rng.standard_normal((3, 2, 6, 6)).astype(np.float32)}
    seq = Sequential(model, layers, feeds)
    results = seq.compress({l.name: (0.5, 2) for l in layers})
    done: dict[str, np.ndarray] = {}
    for layer in layers:
        if done:  # the layer's dense output error on the inputs the compressed predecessors give (the oracle's)
            x, x_ref = per_row(with_initializers(model, done), layer.input, feeds), per_row(model, layer.input, feeds)
            cols = (lambda t: t.reshape(len(t), -1)) if layer.kind == "fc" else (
                lambda t: im2col(t, layer.shape[2:], tuple(layer.attr("pads", [0] * 4)))[0])
            W = matrix_view(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.weight)))
            rows = seq.rows[layer.name]
            y, y_ref = cols(x)[rows] @ W.T.astype(np.float64), cols(x_ref)[rows] @ W.T.astype(np.float64)
            want = np.sum((y - y_ref) ** 2) / np.sum(y_ref**2)
            assert want > 1e-3  # the predecessors really changed the input
            np.testing.assert_allclose(results[layer.name].prune_stats["layer_error_dense"], want, rtol=1e-4)
        done[layer.weight], done[layer.bias] = results[layer.name].weight, results[layer.name].bias


@pytest.mark.parametrize("net", ["residual_batch_1", "free_batch"])
def test_sequential_observes_the_compressed_models_tensors_as_one_run_of_it_would(net):
    """Every watched tensor's shape and largest magnitude, observed while the layers are compressed,
    are those of onnxruntime running the finished compressed model; the run's fingerprint is that of
    the compressed model (not the dense one) on these rows."""
    from eiec.passes.capture import run_fingerprint

    rng = np.random.default_rng(21)
    model = residual_net(rng) if net == "residual_batch_1" else small_net(rng)
    shape = (4, 2, 6, 6) if net == "residual_batch_1" else (5, 2, 7, 7)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    layers = find_layers(model)
    watch = ["x"] + [o for n in model.graph.node for o in n.output]
    seq = Sequential(model, layers, feeds)
    results = seq.compress({l.name: (0.5, 2) for l in layers}, observe=watch)
    done = {n: a for l in layers for n, a in ((l.weight, results[l.name].weight), (l.bias, results[l.name].bias))}
    compressed = with_initializers(model, done)
    assert set(seq.observed.ranges) == set(watch)
    for name in watch:
        want = feeds["x"] if name == "x" else per_row(compressed, name, feeds) if net == "residual_batch_1" else \
            intermediate(compressed, name, feeds)
        got = seq.observed.ranges[name]
        assert got.shape == want.shape
        assert got.max_abs == pytest.approx(float(np.abs(want).max()), rel=1e-5), name
    values = {t.name: done.get(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer}
    assert seq.observed.fingerprint == run_fingerprint(model.graph.node, [], values, feeds)
    dense = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert seq.observed.fingerprint != run_fingerprint(model.graph.node, [], dense, feeds)
    assert seq.observed.fingerprint != run_fingerprint(model.graph.node, [], values, {"x": feeds["x"][:-1]})
    # a call whose layers all come from the cache runs nothing: it observes nothing
    seq.compress({l.name: (0.5, 2) for l in layers}, observe=watch)
    assert seq.observed is None


def with_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name in values:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return m


def test_sequential_captures_each_layer_on_the_compressed_predecessors_outputs():
    rng = np.random.default_rng(4)
    model = small_net(rng)
    layers = find_layers(model)
    feeds = {"x": rng.standard_normal((5, 2, 7, 7)).astype(np.float32)}
    seq = Sequential(model, layers, feeds)
    choices = {"conv1": (0.5, 3), "conv2": (0.4, 2), "fc3": (0.3, 3), "fc4": (0.5, 2)}
    results = seq.compress(choices)
    tensors = {"conv2": ("r1", (3, 3), (0, 0, 0, 0), (2, 2), (1, 1), 2), "fc3": "f", "fc4": "r3"}
    done: dict[str, np.ndarray] = {}
    for layer in layers:
        if layer.name in tensors:
            # the oracle: onnxruntime on a model whose earlier layers hold the compressed weights
            spec = tensors[layer.name]
            name = spec if isinstance(spec, str) else spec[0]
            x = intermediate(with_initializers(model, done), name, feeds)
            want = x.reshape(x.shape[0], -1) if isinstance(spec, str) else im2col(x, *spec[1:])
            got = seq.layer_inputs(layer, {k: v for k, v in done.items()})
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            dense = intermediate(model, name, feeds)
            assert not np.allclose(x, dense, rtol=1e-3, atol=1e-4)  # the predecessors really changed it
            assert results[layer.name].prune_stats["reference"] == "sequential"
        else:
            assert results[layer.name].prune_stats["reference"] == "dense"
        res = results[layer.name]
        done[layer.weight], done[layer.bias] = res.weight, res.bias
    # overrides are exactly the compressed layers, and a cached call gives the same arrays
    again = seq.overrides(choices)
    assert set(again) == {n for l in layers for n in (l.weight, l.bias)}
    for layer in layers:
        assert again[layer.weight] is results[layer.name].weight


def mlp(rng: np.random.Generator, sizes=(12, 32, 24, 6), batch="N") -> onnx.ModelProto:
    nodes, inits = [], {}
    prev = "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits[f"w{i}"] = (rng.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32)
        inits[f"b{i}"] = (0.1 * rng.standard_normal(b)).astype(np.float32)
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out if out == "y" else f"g{i}"], name=f"fc{i}", transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, sizes[-1]])
    return make_model(nodes, [x], [y], inits)


def test_random_inputs_fill_the_batch_and_refuse_other_dynamic_dims():
    rng = np.random.default_rng(4)
    data = random_inputs(mlp(rng), 7, seed=1)
    assert data["x"].shape == (7, 12) and data["x"].dtype == np.float32
    np.testing.assert_array_equal(data["x"], random_inputs(mlp(rng), 7, seed=1)["x"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L"])], {})
    with pytest.raises(ModelError, match="'x'"):
        random_inputs(m, 3)


def test_load_calibration_accepts_castable_inputs_and_labels(tmp_path):
    model = mlp(np.random.default_rng(5))
    path = tmp_path / "cal.npz"
    x = np.random.default_rng(0).standard_normal((9, 12))  # float64: casts to the model's float32
    np.savez(path, x=x, labels=np.arange(9) % 6)
    inputs, labels = load_calibration(path, model)
    assert inputs["x"].dtype == np.float32 and inputs["x"].shape == (9, 12)
    np.testing.assert_array_equal(labels, np.arange(9) % 6)
    np.savez(path, x=x)
    assert load_calibration(path, model)[1] is None


BAD_CALIBRATION = {
    "object array": ({"x": np.array([None] * 12, dtype=object)}, "x"),
    "missing input": ({"z": np.zeros((3, 12), np.float32)}, "z"),
    "unknown key": ({"x": np.zeros((3, 12), np.float32), "extra": np.zeros(3)}, "extra"),
    "wrong width": ({"x": np.zeros((3, 11), np.float32)}, "x"),
    "wrong rank": ({"x": np.zeros((3, 12, 1), np.float32)}, "x"),
    "nan": ({"x": np.full((3, 12), np.nan, np.float32)}, "x"),
    "inf": ({"x": np.array([[np.inf] * 12], np.float64)}, "x"),
    "complex": ({"x": np.zeros((3, 12), np.complex64)}, "x"),
    "no rows": ({"x": np.zeros((0, 12), np.float32)}, "x"),
    "float labels": ({"x": np.zeros((3, 12), np.float32), "labels": np.zeros(3)}, "labels"),
    "short labels": ({"x": np.zeros((3, 12), np.float32), "labels": np.zeros(2, np.int64)}, "labels"),
    "2-D labels": ({"x": np.zeros((3, 12), np.float32), "labels": np.zeros((3, 1), np.int64)}, "labels"),
    "int held_out": ({"x": np.zeros((3, 12), np.float32), "held_out": np.array([0, 1, 0])}, "held_out"),
    "short held_out": ({"x": np.zeros((3, 12), np.float32), "held_out": np.array([True, False])}, "held_out"),
    "all held_out": ({"x": np.zeros((3, 12), np.float32), "held_out": np.ones(3, bool)}, "held_out"),
}


@pytest.mark.parametrize("case", BAD_CALIBRATION, ids=list(BAD_CALIBRATION))
def test_load_calibration_rejects_bad_data_naming_file_and_key(tmp_path, case):
    arrays, key = BAD_CALIBRATION[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError) as e:
        load_calibration(path, mlp(np.random.default_rng(6)))
    assert str(path) in str(e.value) and key in e.value.reason


def test_split_calibration_holds_out_exactly_the_marked_rows(tmp_path):
    from eiec.inputs import load_held_out

    x = np.arange(36, dtype=np.float32).reshape(3, 12)
    marked = np.array([True, False, True])
    path = tmp_path / "cal.npz"
    np.savez(path, x=x, held_out=marked)
    inputs, _ = load_calibration(path, mlp(np.random.default_rng(6)))
    split = split_calibration(inputs, marked=load_held_out(path))
    assert split.held_out_rows.tolist() == [0, 2] and split.reconstruction_rows.tolist() == [1]
    np.testing.assert_array_equal(split.held_out["x"], x[[0, 2]])


def test_load_calibration_rejects_a_file_that_is_not_an_npz(tmp_path):
    path = tmp_path / "cal.npz"
    path.write_text("not numpy")
    with pytest.raises(InputError, match="cal.npz"):
        load_calibration(path, mlp(np.random.default_rng(7)))


def test_storage_model_predicts_the_huffman_bytes_the_compiled_file_stores(tmp_path):
    """Oracle: the .eie manifest's per-layer Huffman record sizes, compiled without reconstruction
    (magnitude pruning and k-means, exactly what the prediction assumes)."""
    from eiec.driver import compile_model
    from eiec.importer import load_model

    rng = np.random.default_rng(8)
    model = mlp(rng, (40, 64, 48, 6))
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    choice = {"fc0": (0.07, 2), "fc1": (0.3, 3), "fc2": (1.0, 4)}
    layers = {n: {"density": d, "bits": b, "obs": False, "refit": False, "bias_correction": False, "gptq": False}
              for n, (d, b) in choice.items()}
    import yaml
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"layers": layers}))
    res = compile_model(path, str(tmp_path / "m.eie"), str(tmp_path / "r.yaml"))
    imported = load_model(path)
    ls = find_layers(imported)
    from eiec.ir import get_initializer
    size = StorageModel(ls, {l.weight: get_initializer(imported, l.weight) for l in ls})
    stored = {l["name"]: l["bytes_huffman"] for l in res.manifest["layers"]}
    for name, (d, b) in choice.items():
        assert size(name, d, b) == stored[name]
    assert size.total(choice) == sum(stored.values())


def fake_sensitivity(rng) -> dict[str, LayerSensitivity]:
    sens = {}
    for i, n in enumerate((1000, 5000, 200)):
        s = LayerSensitivity(f"l{i}", n)
        for d in (0.1, 0.3, 1.0):
            s.density[d] = Score(0.0 if d == 1 else float(rng.uniform(0, 0.2) / d))
        for b in (2, 4):
            s.bits[b] = Score(float(rng.uniform(0, 0.05) / b))
        sens[s.name] = s
    return sens


def fake_size(sens):
    """Bytes growing with kept weights and bits (the shape of what StorageModel measures)."""
    return lambda name, d, b: sens[name].weights * d * (b + 4) / 8 + 4 * 2**b


def test_recipe_path_only_ever_shrinks_the_stored_bytes():
    sens = fake_sensitivity(np.random.default_rng(9))
    size = fake_size(sens)
    path = recipe_path(sens, size)
    sizes = [sum(size(n, d, b) for n, (d, b) in c.items()) for c in path]
    assert path[0] == {n: (1.0, 4) for n in sens}
    assert path[-1] == {n: (0.1, 2) for n in sens}
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    fixed = recipe_path(sens, size, fixed={"l1": (0.3, None)})
    assert all(c["l1"][0] == 0.3 for c in fixed)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 30), st.integers(0, 10_000))
def test_expected_drop_averages_every_margin_shift_pair(n, seed):
    """Oracle: the n^2 pairs counted one by one."""
    rng = np.random.default_rng(seed)
    margins = np.round(rng.normal(1.0, 1.0, n), 1)  # rounded: ties between -margin and a shift happen
    shifts = np.round(rng.normal(-0.2, 0.5, n), 1)
    right = sum(1 for m in margins for s in shifts if m + s > 0) / n**2
    assert expected_drop(margins, shifts) == pytest.approx(100 * (np.mean(margins > 0) - right))
    assert expected_drop(margins, np.zeros(n)) == pytest.approx(0.0)  # no shift, no loss


def test_upper_bound_is_the_bootstrap_quantile_and_lies_above_the_mean():
    x = np.random.default_rng(3).standard_normal(400)
    stat = lambda rows: float(np.mean(x[rows]))  # noqa: E731
    bound = upper_bound(stat, x.size)
    se = x.std() / np.sqrt(x.size)  # the normal approximation of the same quantile
    from statistics import NormalDist
    assert bound == pytest.approx(x.mean() + NormalDist().inv_cdf(CONFIDENCE) * se, abs=0.5 * se)
    assert upper_bound(stat, x.size) == bound  # seeded


def test_class_scores_take_logs_of_probabilities_and_skip_label_outputs():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.array([[0], [2]], np.int64)
    scores = class_scores([labels, p])
    np.testing.assert_allclose(scores, np.log(p.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(label_margins(scores, np.array([0, 1])), [np.log(0.7 / 0.2), np.log(0.1 / 0.8)], rtol=1e-6)
    logits = np.array([[2.0, -1.0], [0.5, 3.0]], np.float32)
    np.testing.assert_array_equal(class_scores([logits]), logits)
    assert class_scores([labels]) is None


def independent_score(model, choice, feeds, labels=None, compress=plain_compress):
    """Recompute a recipe's error from scratch: compressed initializers, a fresh session, numpy."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    planned = compress.compress(choice) if isinstance(compress, Sequential) else None
    for layer in find_layers(model):
        if layer.name in choice:
            w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == layer.weight))
            b = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == layer.bias))
            if planned is None:
                w2, b2 = compress(layer, w, b, *choice[layer.name])
            else:
                w2, b2 = planned[layer.name].weight, planned[layer.name].bias
            for i, t in enumerate(m.graph.initializer):
                if t.name == layer.weight:
                    m.graph.initializer[i].CopyFrom(numpy_helper.from_array(w2, layer.weight))
                if t.name == layer.bias:
                    m.graph.initializer[i].CopyFrom(numpy_helper.from_array(b2, layer.bias))
    (y_ref,) = run(model, feeds)
    (y,) = run(m, feeds)
    error = np.linalg.norm(y.astype(np.float64) - y_ref) / np.linalg.norm(y_ref.astype(np.float64))
    drop = None if labels is None else 100 * (np.mean(y_ref.argmax(1) == labels) - np.mean(y.argmax(1) == labels))
    return error, drop


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_auto_recipe_respects_the_output_error_budget_and_beats_every_start(budget):
    rng = np.random.default_rng(11)
    model = mlp(rng)
    feeds = {"x": rng.standard_normal((200, 12)).astype(np.float32)}
    messages, report = [], {}
    choice = auto_recipe(model, find_layers(model), feeds, None, budget, progress=messages.append, report=report)
    assert set(choice) == {"fc0", "fc1", "fc2"} and report["host"] == []
    error, _ = independent_score(model, choice, feeds)
    chosen = report["probes"][report["chosen"]]
    assert error == pytest.approx(chosen["error"], rel=1e-5) and error <= chosen["bound"] <= budget
    # never worse than the best starting point, and it did compress beyond the mildest recipe
    assert chosen["bytes"] == min(b for b in report["starts"].values() if b is not None) or \
        chosen["family"] == "refine"
    assert chosen["bytes"] <= min(b for b in report["starts"].values() if b is not None)
    assert chosen["bytes"] < report["probes"][0]["bytes"] and report["probes"][0]["family"] == "mildest"
    assert any(m.startswith("sensitivity") for m in messages) and any(m.startswith("auto") for m in messages)


def test_auto_recipe_with_reconstruction_respects_the_budget_on_the_held_out_rows():
    rng = np.random.default_rng(14)
    model = mlp(rng)
    feeds = {"x": rng.standard_normal((200, 12)).astype(np.float32)}
    layers = find_layers(model)
    split = split_calibration(feeds)
    compress = Sequential(model, layers, split.reconstruction)
    choice = auto_recipe(model, layers, split.held_out, None, 0.3, compress=compress, max_probes=8)
    error, _ = independent_score(model, choice, split.held_out, compress=compress)
    assert error <= 0.3


def test_auto_recipe_accuracy_budget_bounds_the_expected_drop_from_margins():
    """Oracle: the label margins recomputed from onnxruntime outputs and the n^2 pairs counted here."""
    rng = np.random.default_rng(15)
    model = mlp(rng)
    feeds = {"x": rng.standard_normal((300, 12)).astype(np.float32)}
    (y,) = run(model, feeds)
    labels = np.where(rng.random(300) < 0.9, y.argmax(1), rng.integers(0, 6, 300))  # ~90 % right
    report: dict = {}
    choice = auto_recipe(model, find_layers(model), feeds, labels, 20.0, report=report, max_probes=10)
    chosen = report["probes"][report["chosen"]]
    assert chosen["bound"] <= 20.0 and chosen["estimate"] <= chosen["bound"]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        for layer in find_layers(model):
            if t.name in (layer.weight, layer.bias) and layer.name in choice:
                w, b = plain_compress(layer, numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == layer.weight)),
                                      numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == layer.bias)),
                                      *choice[layer.name])
                t.CopyFrom(numpy_helper.from_array(w if t.name == layer.weight else b, t.name))
    (y_new,) = run(m, feeds)
    pick = lambda z: z[np.arange(300), labels] - np.max(np.where(np.eye(6)[labels] > 0, -np.inf, z), axis=1)  # noqa: E731
    a, shift = pick(y.astype(np.float64)), pick(y_new.astype(np.float64)) - pick(y.astype(np.float64))
    right = np.mean([np.mean(a[i] + shift > 0) for i in range(300)])
    assert chosen["estimate"] == pytest.approx(100 * (np.mean(a > 0) - right), abs=1e-6)


def assert_ordered_partition(a: np.ndarray, b: np.ndarray, n: int) -> None:
    """Row numbers a and b split 0..n-1 between them, each part in increasing order."""
    assert np.array_equal(np.sort(np.concatenate([a, b])), np.arange(n))  # a partition
    assert np.all(np.diff(a) > 0) and np.all(np.diff(b) > 0)  # each part keeps the order


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(0, 3))
def test_split_calibration_partitions_the_rows(n, seed):
    feeds = {"x": np.arange(3 * n, dtype=np.float32).reshape(n, 3)}
    labels = np.arange(n) * 7
    split = split_calibration(feeds, labels, seed)
    if n < 2:
        assert split is None
        return
    rec, out = split.reconstruction_rows, split.held_out_rows
    assert_ordered_partition(rec, out, n)
    assert len(out) == min(n - 1, max(1, round(n / 2)))
    np.testing.assert_array_equal(split.reconstruction["x"], feeds["x"][rec])
    np.testing.assert_array_equal(split.held_out["x"], feeds["x"][out])
    np.testing.assert_array_equal(split.held_out_labels, labels[out])
    again = split_calibration(feeds, labels, seed)
    np.testing.assert_array_equal(again.held_out_rows, out)  # deterministic


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(0, 3))
def test_confirmation_split_partitions_the_scored_rows(n, seed):
    feeds = {"x": np.arange(2 * n, dtype=np.float32).reshape(n, 2)}
    labels = np.arange(n) * 7
    split = confirmation_split(feeds, labels, seed)
    if n < 3:
        assert split is None
        return
    sel, conf = split.selection["x"][:, 0] / 2, split.confirmation["x"][:, 0] / 2  # the row numbers
    assert_ordered_partition(sel, conf, n)
    assert len(conf) == min(n - 2, max(1, round(n / 3)))
    np.testing.assert_array_equal(split.confirmation_labels, labels[conf.astype(int)])
    np.testing.assert_array_equal(split.selection_labels, labels[sel.astype(int)])
    assert np.array_equal(confirmation_split(feeds, labels, seed).confirmation["x"], split.confirmation["x"])


def test_auto_recipe_keeps_the_most_sensitive_layers_on_the_host_when_nothing_fits():
    rng = np.random.default_rng(13)
    model = mlp(rng)
    feeds = {"x": rng.standard_normal((50, 12)).astype(np.float32)}
    layers = find_layers(model)
    report: dict = {}
    choice = auto_recipe(model, layers, feeds, None, 1e-9, report=report, max_probes=6)
    host = report["host"]
    assert host and "over_budget" not in report  # with enough layers dense, it fits
    assert set(choice) == {l.name for l in layers} - set(host)
    assert all(c == (1.0, 4) for c in choice.values())  # the rest at the mildest recipe
    chosen = report["probes"][report["chosen"]]
    assert chosen["fits"] and chosen["family"] == "host"
    # the most sensitive first: the first layer moved lost the most error at 4 bits alone
    bits_error = {n: s.bits[4].error for n, s in report["sensitivity"].items()}
    assert bits_error[host[0]] == max(bits_error.values())


def test_auto_recipe_is_over_budget_only_when_the_pinned_layers_alone_exceed_it():
    rng = np.random.default_rng(13)
    model = mlp(rng)
    feeds = {"x": rng.standard_normal((50, 12)).astype(np.float32)}
    report: dict = {}
    pinned = {"fc0": (0.05, 2)}  # fixed by the recipe: cannot move to the host
    choice = auto_recipe(model, find_layers(model), feeds, None, 1e-9, fixed=pinned, report=report, max_probes=6)
    assert report["over_budget"]["bound"] > 1e-9
    assert choice == {"fc0": (0.05, 2)} and set(report["host"]) == {"fc1", "fc2"}


def test_default_recipe_follows_the_layer_roles():
    rng = np.random.default_rng(2)
    model = mlp(rng, (12, 20, 16, 8, 4))
    layers = find_layers(model)
    assert default_recipe(layers) == {"fc0": (DEFAULT_DENSITY["fc"], 4), "fc1": (DEFAULT_DENSITY["fc"], 4),
                                      "fc2": (DEFAULT_DENSITY["fc"], 4), "fc3": (DEFAULT_DENSITY["last"], 4)}
    assert default_recipe(layers, {"fc1": (None, 2)})["fc1"] == (DEFAULT_DENSITY["fc"], 2)
