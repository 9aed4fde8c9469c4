"""Import: canonical IR0 computes what the original model computes (onnxruntime is the
oracle), layers come out in the canonical form, and bad files raise ModelError naming the file."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from eiec.errors import ModelError
from eiec.importer import canonicalize, load_model
from eiec.ir import OPSET, find_layers, get_initializer

RNG = np.random.default_rng(1234)


# ---------------------------------------------------------------- helpers

def f32(*shape: int, rng: np.random.Generator = RNG) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def make_model(nodes, inputs, outputs, inits=(), opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """inputs/outputs: {name: shape}; float32 throughout."""
    graph = h.make_graph(
        nodes, "g",
        [h.make_tensor_value_info(n, T.FLOAT, s) for n, s in inputs.items()],
        [h.make_tensor_value_info(n, T.FLOAT, s) for n, s in outputs.items()],
        [nh.from_array(v, n) for n, v in dict(inits).items()])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=ir_version)


def save(tmp_path, model: onnx.ModelProto, name: str = "m.onnx") -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: onnx.ModelProto, batch: int = 3) -> dict[str, np.ndarray]:
    feeds = {}
    for v in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = f32(*shape)
    return feeds


def assert_same_outputs(orig: onnx.ModelProto, canon: onnx.ModelProto, batches=(3,), rtol=1e-5, atol=1e-5):
    for batch in batches:
        feeds = random_feeds(orig, batch)
        for want, got in zip(run(orig, feeds), run(canon, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def imported(tmp_path, model: onnx.ModelProto) -> onnx.ModelProto:
    return load_model(save(tmp_path, model))


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_canonical_fc(layer, out: int, inp: int, model: onnx.ModelProto):
    assert layer.kind == "fc" and layer.shape == (out, inp)
    assert (layer.attr("alpha"), layer.attr("beta"), layer.attr("transA"), layer.attr("transB")) == (1.0, 1.0, 0, 1)
    assert get_initializer(model, layer.bias).shape == (out,)


def gemm_model(trans_a: int, trans_b: int, c_shape, alpha: float, beta: float,
               m: int = 4, k: int = 6, n: int = 5, rng=RNG) -> onnx.ModelProto:
    b = f32(n, k, rng=rng) if trans_b else f32(k, n, rng=rng)
    inits = {"B": b}
    inputs = ["x", "B"]
    if c_shape is not None:
        inits["C"] = f32(*c_shape, rng=rng)
        inputs.append("C")
    node = h.make_node("Gemm", inputs, ["y"], alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    return make_model([node], {"x": [k, m] if trans_a else [m, k]}, {"y": [m, n]}, inits)


# ---------------------------------------------------------------- FC layers

C_SHAPES = {"absent": None, "scalar": (), "out": (5,), "1xout": (1, 5)}


@pytest.mark.parametrize("c_kind", C_SHAPES)
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_with_any_trans_alpha_beta_and_bias_shape_becomes_canonical_fc(trans_a, trans_b, c_kind):
    orig = gemm_model(trans_a, trans_b, C_SHAPES[c_kind], alpha=0.7, beta=-1.3)
    canon = canonicalize(orig, "gemm.onnx")
    (layer,) = find_layers(canon)
    assert_canonical_fc(layer, 5, 6, canon)
    assert ops(canon).count("Transpose") == trans_a
    assert "Add" not in ops(canon)  # a broadcast C is the bias, not a separate op
    assert_same_outputs(orig, canon)


def test_gemm_with_per_row_c_keeps_it_as_an_add_after_the_canonical_fc():
    orig = gemm_model(0, 1, (4, 5), alpha=1.0, beta=0.5)
    canon = canonicalize(orig, "gemm.onnx")
    (layer,) = find_layers(canon)
    assert_canonical_fc(layer, 5, 6, canon)
    assert not get_initializer(canon, layer.bias).any()
    assert_same_outputs(orig, canon)


@settings(max_examples=20, deadline=None)
@given(trans_a=st.integers(0, 1), trans_b=st.integers(0, 1), c_kind=st.sampled_from(sorted(C_SHAPES)),
       alpha=st.floats(-4, 4).filter(lambda v: abs(v) > 1e-2), beta=st.floats(-4, 4),
       m=st.integers(1, 6), k=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_gemm_canonical_form_matches_onnxruntime_for_random_shapes(trans_a, trans_b, c_kind, alpha, beta,
                                                                   m, k, n, seed):
    c_shape = {"absent": None, "scalar": (), "out": (n,), "1xout": (1, n)}[c_kind]
    orig = gemm_model(trans_a, trans_b, c_shape, alpha, beta, m, k, n, rng=np.random.default_rng(seed))
    canon = canonicalize(orig, "gemm.onnx")
    (layer,) = find_layers(canon)
    assert_canonical_fc(layer, n, k, canon)
    assert_same_outputs(orig, canon)


def test_gemm_with_runtime_b_stays_a_host_op():
    node = h.make_node("Gemm", ["x", "b"], ["y"], alpha=2.0, transB=1)
    orig = make_model([node], {"x": [2, 3], "b": [4, 3]}, {"y": [2, 4]})
    canon = canonicalize(orig, "m.onnx")
    assert find_layers(canon) == [] and ops(canon) == ["Gemm"]
    assert_same_outputs(orig, canon)


@pytest.mark.parametrize("bias_shape,bias_first", [((5,), False), ((1, 5), False), ((5,), True)])
def test_matmul_then_add_of_constant_becomes_one_gemm(tmp_path, bias_shape, bias_first):
    add_inputs = ["bias", "h"] if bias_first else ["h", "bias"]
    nodes = [h.make_node("MatMul", ["x", "W"], ["h"], name="fc1"),
             h.make_node("Add", add_inputs, ["y"]), h.make_node("Relu", ["y"], ["z"])]
    orig = make_model(nodes, {"x": ["N", 6]}, {"z": ["N", 5]}, {"W": f32(6, 5), "bias": f32(*bias_shape)})
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Gemm", "Relu"]
    (layer,) = find_layers(canon)
    assert layer.name == "fc1"
    assert_canonical_fc(layer, 5, 6, canon)
    assert layer.weight == "W"  # the model's own names survive, so recipes can use them
    assert layer.bias == ("bias" if bias_shape == (5,) else "fc1.bias")
    assert_same_outputs(orig, canon, batches=(1, 4))


def test_matmul_alone_becomes_gemm_with_zero_bias(tmp_path):
    orig = make_model([h.make_node("MatMul", ["x", "W"], ["y"])], {"x": [3, 6]}, {"y": [3, 5]}, {"W": f32(6, 5)})
    canon = imported(tmp_path, orig)
    (layer,) = find_layers(canon)
    assert_canonical_fc(layer, 5, 6, canon)
    assert not get_initializer(canon, layer.bias).any()
    assert_same_outputs(orig, canon)


def test_matmul_with_rank3_activations_becomes_a_gemm_on_the_tokens(tmp_path):
    nodes = [h.make_node("MatMul", ["x", "W"], ["h"]), h.make_node("Add", ["h", "b"], ["y"])]
    orig = make_model(nodes, {"x": [2, 3, 6]}, {"y": [2, 3, 5]}, {"W": f32(6, 5), "b": f32(5)})
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Reshape", "Gemm", "Reshape"]
    (layer,) = find_layers(canon)
    assert_canonical_fc(layer, 5, 6, canon)
    assert get_initializer(canon, layer.bias).any()  # the Add is the layer's bias
    assert_same_outputs(orig, canon)


def test_matmul_of_two_activations_stays_a_host_op(tmp_path):
    orig = make_model([h.make_node("MatMul", ["x", "x"], ["y"])], {"x": [2, 3, 3]}, {"y": [2, 3, 3]})
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["MatMul"] and find_layers(canon) == []


def test_matmul_add_not_fused_when_matmul_output_is_also_used_elsewhere(tmp_path):
    nodes = [h.make_node("MatMul", ["x", "W"], ["h"]), h.make_node("Add", ["h", "b"], ["y"]),
             h.make_node("Relu", ["h"], ["r"])]
    orig = make_model(nodes, {"x": [3, 6]}, {"y": [3, 5], "r": [3, 5]}, {"W": f32(6, 5), "b": f32(5)})
    canon = imported(tmp_path, orig)
    assert sorted(ops(canon)) == ["Add", "Gemm", "Relu"]
    assert_same_outputs(orig, canon)


def test_shared_weight_gives_each_layer_its_own_initializer(tmp_path):
    nodes = [h.make_node("MatMul", ["x", "W"], ["a"]), h.make_node("MatMul", ["a", "W"], ["y"])]
    orig = make_model(nodes, {"x": [2, 4]}, {"y": [2, 4]}, {"W": f32(4, 4)})
    canon = imported(tmp_path, orig)
    layers = find_layers(canon)
    assert len(layers) == 2 and len({layer.weight for layer in layers}) == 2
    assert len({layer.bias for layer in layers}) == 2
    assert_same_outputs(orig, canon)


def test_sklearn_mlp_with_onnx_ml_ops_keeps_its_non_tensor_outputs():
    import warnings

    from sklearn.neural_network import MLPClassifier
    from skl2onnx import to_onnx

    x = f32(40, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 5-iteration fit does not converge, on purpose
        clf = MLPClassifier((7,), max_iter=5, random_state=0).fit(x, (x[:, 0] > 0).astype(np.int64))
    orig = to_onnx(clf, x[:1], target_opset={"": 17, "ai.onnx.ml": 1})  # with ZipMap: a list of maps
    canon = canonicalize(orig, "mlp.onnx")
    assert [(layer.kind, layer.shape) for layer in find_layers(canon)] == [("fc", (7, 6)), ("fc", (1, 7))]
    assert canon.graph.output[1].type.WhichOneof("value") == "sequence_type"
    want, got = run(orig, {"X": x}), run(canon, {"X": x})
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(maps_to_array(got[1]), maps_to_array(want[1]), rtol=1e-5)


def maps_to_array(maps: list[dict]) -> np.ndarray:
    return np.array([[m[k] for k in sorted(m)] for m in maps])


# ---------------------------------------------------------------- constants

def test_constant_node_weights_become_initializers(tmp_path):
    nodes = [h.make_node("Constant", [], ["W"], value=nh.from_array(f32(5, 6))),
             h.make_node("Constant", [], ["b"], value_floats=[0.5, -1.0, 2.0, 0.0, 1.0]),
             h.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)]
    orig = make_model(nodes, {"x": [2, 6]}, {"y": [2, 5]})
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Gemm"]
    (layer,) = find_layers(canon)
    assert_canonical_fc(layer, 5, 6, canon)
    assert_same_outputs(orig, canon)


def test_weights_built_by_constant_subgraphs_are_folded(tmp_path):
    nodes = [
        h.make_node("Reshape", ["flat", "shape"], ["Wt"]),  # Reshape of a constant ...
        h.make_node("Transpose", ["Wt"], ["Wtt"], perm=[1, 0]),  # ... then Transpose
        h.make_node("Mul", ["Wtt", "two"], ["W"]),
        h.make_node("Constant", [], ["n"], value=nh.from_array(np.array([5], np.int64))),
        h.make_node("ConstantOfShape", ["n"], ["b"], value=nh.from_array(np.array([0.25], np.float32))),
        h.make_node("Identity", ["b"], ["b2"]),
        h.make_node("MatMul", ["x", "W"], ["h"]), h.make_node("Add", ["h", "b2"], ["y"])]
    inits = {"flat": f32(30), "shape": np.array([5, 6], np.int64), "two": np.float32(2.0)}
    orig = make_model(nodes, {"x": ["N", 6]}, {"y": ["N", 5]}, inits)
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Gemm"]
    (layer,) = find_layers(canon)
    assert_canonical_fc(layer, 5, 6, canon)
    np.testing.assert_allclose(get_initializer(canon, layer.bias), np.full(5, 0.25, np.float32))
    assert_same_outputs(orig, canon, batches=(1, 5))


def test_folding_refuses_to_materialise_a_huge_constant(tmp_path):
    nodes = [h.make_node("ConstantOfShape", ["shape"], ["big"], value=nh.from_array(np.array([1.0], np.float32))),
             h.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             h.make_node("Add", ["x", "s"], ["y"])]
    orig = make_model(nodes, {"x": [2]}, {"y": [2]}, {"shape": np.array([2**14, 2**12], np.int64)})
    canon = imported(tmp_path, orig)
    assert "ConstantOfShape" in ops(canon)  # 2**26 elements is over the folding bound


def _view_flatten_model(batch, opset: int, data_of_shape: str = "r") -> onnx.ModelProto:
    """torch's `x.view(x.size(0), -1)` before an FC: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    unsq = (h.make_node("Unsqueeze", ["b", "ax"], ["bu"]) if opset >= 13
            else h.make_node("Unsqueeze", ["b"], ["bu"], axes=[0]))
    nodes = [h.make_node("Conv", ["x", "cw"], ["c"], kernel_shape=[3, 3]), h.make_node("Relu", ["c"], ["r"]),
             h.make_node("Shape", [data_of_shape], ["s"]), h.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             unsq, h.make_node("Concat", ["bu", "m1"], ["tgt"], axis=0),
             h.make_node("Reshape", ["r", "tgt"], ["f"]), h.make_node("MatMul", ["f", "fw"], ["y"])]
    inits = {"cw": f32(4, 3, 3, 3), "fw": f32(4 * 4 * 4, 5), "i0": np.array(0, np.int64),
             "ax": np.array([0], np.int64), "m1": np.array([-1], np.int64)}
    return make_model(nodes, {"x": [batch, 3, 6, 6], "x2": [batch, 7]}, {"y": [batch, 5]}, inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_reshape_target_computed_from_a_fixed_shape_folds_to_a_constant(tmp_path, opset):
    orig = _view_flatten_model(1, opset)
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Conv", "Relu", "Reshape", "Gemm"]  # the Shape arithmetic is gone
    assert get_initializer(canon, canon.graph.node[2].input[1]).tolist() == [1, -1]
    assert_same_outputs(orig, canon, batches=(1,))


@pytest.mark.parametrize("opset", [11, 17])
def test_reshape_target_reading_its_own_free_batch_becomes_copy_dim(tmp_path, opset):
    orig = _view_flatten_model("N", opset)
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Conv", "Relu", "Reshape", "Gemm"]
    assert get_initializer(canon, canon.graph.node[2].input[1]).tolist() == [0, -1]
    assert_same_outputs(orig, canon, batches=(1, 4))


def test_reshape_target_reading_another_tensors_free_dim_is_kept(tmp_path):
    """Another input's batch need not equal this tensor's: no rewrite, the graph stays as it was."""
    orig = _view_flatten_model("N", 17, data_of_shape="x2")
    canon = imported(tmp_path, orig)
    assert "Shape" in ops(canon)
    assert_same_outputs(orig, canon, batches=(2,))


def test_shape_slices_of_known_dims_fold_even_with_a_free_batch(tmp_path):
    """Paddle-style Shape -> Slice[1:] -> ReduceProd -> Concat: only the batch stays symbolic."""
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Slice", ["s", "one", "big"], ["tail"]),
             h.make_node("ReduceProd", ["tail"], ["feat"], keepdims=1),
             h.make_node("Slice", ["s", "zero", "one"], ["n"]),
             h.make_node("Concat", ["n", "feat"], ["tgt"], axis=0),
             h.make_node("Reshape", ["x", "tgt"], ["f"]), h.make_node("MatMul", ["f", "w"], ["y"])]
    inits = {"one": np.array([1], np.int64), "zero": np.array([0], np.int64),
             "big": np.array([2**62], np.int64), "w": f32(24, 3)}
    orig = make_model(nodes, {"x": ["N", 2, 3, 4]}, {"y": ["N", 3]}, inits)
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Reshape", "Gemm"]
    assert get_initializer(canon, canon.graph.node[0].input[1]).tolist() == [0, 24]
    assert_same_outputs(orig, canon, batches=(1, 3))


def test_stale_value_info_is_ignored(tmp_path):
    """Exporters leave shapes from before a rewrite; onnxruntime runs such a model, so must eiec."""
    orig = _view_flatten_model(1, 17)
    orig.graph.value_info.extend([h.make_tensor_value_info("c", T.FLOAT, [1, 7, 3, 3]),
                                  h.make_tensor_value_info("r", T.FLOAT, [2, 4])])
    canon = imported(tmp_path, orig)
    assert [l.shape for l in find_layers(canon)] == [(4, 3, 3, 3), (5, 64)]
    assert_same_outputs(orig, canon, batches=(1,))


# ---------------------------------------------------------------- opsets and shapes

def test_opset9_flatten_gemm_softmax_is_converted_to_opset17(tmp_path):
    nodes = [h.make_node("Flatten", ["x"], ["f"], axis=1),
             h.make_node("Gemm", ["f", "W", "C"], ["g"], transB=1, alpha=0.5),
             h.make_node("Softmax", ["g"], ["y"], axis=1)]
    orig = make_model(nodes, {"x": [3, 2, 3, 4]}, {"y": [3, 7]}, {"W": f32(7, 24), "C": f32(7)},
                      opset=9, ir_version=4)
    canon = imported(tmp_path, orig)
    assert [o.version for o in canon.opset_import if o.domain == ""] == [OPSET]
    assert ops(canon) == ["Flatten", "Gemm", "Softmax"]
    assert_canonical_fc(find_layers(canon)[0], 7, 24, canon)
    assert_same_outputs(orig, canon)


def test_newer_opset_is_kept(tmp_path):
    nodes = [h.make_node("MatMul", ["x", "W"], ["h"]),
             h.make_node("ReduceSum", ["h", "axes"], ["y"], keepdims=1)]
    orig = make_model(nodes, {"x": [3, 4]}, {"y": [3, 1]}, {"W": f32(4, 5), "axes": np.array([1], np.int64)},
                      opset=18)
    canon = imported(tmp_path, orig)
    assert [o.version for o in canon.opset_import if o.domain == ""] == [18]
    assert_same_outputs(orig, canon)


def test_dynamic_batch_stays_dynamic_and_input_output_names_are_kept(tmp_path):
    nodes = [h.make_node("Gemm", ["input.1", "W", "b"], ["hidden"], transB=1),
             h.make_node("Relu", ["hidden"], ["r"]),
             h.make_node("MatMul", ["r", "W2"], ["logits:0"])]
    orig = make_model(nodes, {"input.1": ["batch", 8]}, {"logits:0": ["batch", 3]},
                      {"W": f32(6, 8), "b": f32(6), "W2": f32(6, 3)})
    canon = imported(tmp_path, orig)
    assert [v.name for v in canon.graph.input] == ["input.1"]
    assert [v.name for v in canon.graph.output] == ["logits:0"]
    assert canon.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [layer.shape for layer in find_layers(canon)] == [(6, 8), (3, 6)]
    assert_same_outputs(orig, canon, batches=(1, 5))


def test_initializers_listed_as_graph_inputs_are_treated_as_weights(tmp_path):
    orig = make_model([h.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], {"x": [2, 3]}, {"y": [2, 4]},
                      {"W": f32(4, 3), "b": f32(4)}, opset=9, ir_version=3)
    orig.graph.input.extend([h.make_tensor_value_info("W", T.FLOAT, [4, 3]),
                             h.make_tensor_value_info("b", T.FLOAT, [4])])
    canon = imported(tmp_path, orig)
    assert [v.name for v in canon.graph.input] == ["x"] and len(find_layers(canon)) == 1
    feeds = random_feeds(canon)
    np.testing.assert_allclose(run(canon, feeds)[0], run(orig, feeds)[0], rtol=1e-5, atol=1e-5)


def test_model_local_functions_are_inlined_so_their_layers_are_found(tmp_path):
    dense = h.make_function("my.lib", "Dense", ["x", "w"], ["y"], [h.make_node("MatMul", ["x", "w"], ["y"])],
                            [h.make_opsetid("", 17)])
    orig = make_model([h.make_node("Dense", ["x", "W"], ["y"], domain="my.lib")], {"x": ["N", 3]}, {"y": ["N", 4]},
                      {"W": f32(3, 4)})
    orig.opset_import.append(h.make_opsetid("my.lib", 1))
    orig.functions.append(dense)
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Gemm"] and [o.domain for o in canon.opset_import] == [""]
    assert_same_outputs(orig, canon)


def test_unsorted_nodes_are_put_in_topological_order(tmp_path):
    nodes = [h.make_node("Relu", ["h"], ["y"]), h.make_node("MatMul", ["x", "W"], ["h"])]
    orig = make_model(nodes, {"x": [2, 3]}, {"y": [2, 4]}, {"W": f32(3, 4)})
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Gemm", "Relu"]


# ---------------------------------------------------------------- conv

CONV_CASES = {
    "pads_strides": dict(pads=[1, 2, 0, 1], strides=[2, 1]),
    "dilations": dict(dilations=[2, 3], pads=[2, 2, 2, 2]),
    "groups": dict(group=2),
    "depthwise": dict(group=4),
    "same_upper_stride2": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower": dict(auto_pad="SAME_LOWER", strides=[2, 1]),  # ORT has no SAME + dilation
    "valid": dict(auto_pad="VALID", strides=[1, 2]),
}


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_gets_explicit_attributes_and_a_bias(case, with_bias):
    attrs = CONV_CASES[case]
    group = attrs.get("group", 1)
    out_ch = 4 if group == 4 else 6
    w = f32(out_ch, 4 // group, 3, 2)
    inits = {"W": w, "B": f32(out_ch)} if with_bias else {"W": w}
    node = h.make_node("Conv", ["x", "W", "B"] if with_bias else ["x", "W"], ["y"], **attrs)
    orig = make_model([node], {"x": ["N", 4, 9, 8]}, {"y": ["N", out_ch, "h", "w"]}, inits)
    canon = canonicalize(orig, "conv.onnx")
    (layer,) = find_layers(canon)
    assert layer.kind == "conv" and layer.shape == w.shape
    attr_names = sorted(a.name for a in layer.node.attribute)
    assert attr_names == ["dilations", "group", "kernel_shape", "pads", "strides"]
    assert layer.attr("kernel_shape") == [3, 2] and layer.attr("group") == group
    assert get_initializer(canon, layer.bias).shape == (out_ch,)
    assert_same_outputs(orig, canon, batches=(1, 2))


def test_conv1d_becomes_a_2d_conv_of_height_1():
    node = h.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER")
    orig = make_model([node], {"x": [1, 2, 7]}, {"y": [1, 3, 7]}, {"W": f32(3, 2, 3)})
    canon = canonicalize(orig, "conv1d.onnx")
    assert ops(canon) == ["Unsqueeze", "Conv", "Squeeze"]
    (layer,) = find_layers(canon)
    assert layer.shape == (3, 2, 1, 3) and layer.attr("pads") == [0, 1, 0, 1]
    assert_same_outputs(orig, canon, batches=(1, 2))


def bn_inits(c: int, rng=RNG) -> dict[str, np.ndarray]:
    return {"gamma": f32(c, rng=rng), "beta": f32(c, rng=rng), "mean": f32(c, rng=rng),
            "var": rng.uniform(0.5, 2.0, c).astype(np.float32)}


def test_conv_batchnorm_is_folded_into_the_conv(tmp_path):
    nodes = [h.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
             h.make_node("Relu", ["bn"], ["y"])]
    orig = make_model(nodes, {"x": ["N", 3, 6, 6]}, {"y": ["N", 5, 6, 6]}, {"W": f32(5, 3, 3, 3), **bn_inits(5)})
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Conv", "Relu"]
    assert_same_outputs(orig, canon, batches=(1, 2))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), eps=st.floats(1e-5, 1e-1), out=st.integers(1, 8))
def test_gemm_batchnorm_is_folded_into_the_fc(seed, eps, out):
    rng = np.random.default_rng(seed)
    nodes = [h.make_node("Gemm", ["x", "W", "b"], ["g"], alpha=1.5),
             h.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"], epsilon=eps)]
    orig = make_model(nodes, {"x": ["N", 4]}, {"y": ["N", out]},
                      {"W": f32(4, out, rng=rng), "b": f32(out, rng=rng), **bn_inits(out, rng)})
    canon = canonicalize(orig, "gemm_bn.onnx")
    assert ops(canon) == ["Gemm"]
    assert_same_outputs(orig, canon, batches=(3,))


def test_batchnorm_is_kept_when_the_layer_output_has_another_consumer(tmp_path):
    nodes = [h.make_node("Conv", ["x", "W"], ["c"]),
             h.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"]),
             h.make_node("Add", ["bn", "c"], ["y"])]
    orig = make_model(nodes, {"x": [1, 2, 4, 4]}, {"y": [1, 3, 2, 2]}, {"W": f32(3, 2, 3, 3), **bn_inits(3)})
    canon = imported(tmp_path, orig)
    assert ops(canon) == ["Conv", "BatchNormalization", "Add"]
    assert_same_outputs(orig, canon)


# ---------------------------------------------------------------- files, names, determinism

def small_mlp() -> onnx.ModelProto:
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h"]), h.make_node("Add", ["h", "b1"], ["a"]),
             h.make_node("Relu", ["a"], ["r"]), h.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1)]
    return make_model(nodes, {"x": ["N", 8]}, {"y": ["N", 4]},
                      {"W1": f32(8, 16), "b1": f32(16), "W2": f32(4, 16), "b2": f32(4)})


def test_external_data_model_loads(tmp_path):
    orig = small_mlp()
    path = str(tmp_path / "ext.onnx")
    onnx.save(onnx.ModelProto.FromString(orig.SerializeToString()), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.weights", size_threshold=0)
    assert os.path.getsize(path) < 1000  # the weights really are outside
    canon = load_model(path)
    assert len(find_layers(canon)) == 2
    assert_same_outputs(orig, canon)


def test_the_same_file_gives_byte_identical_canonical_models(tmp_path):
    path = save(tmp_path, small_mlp())
    assert load_model(path).SerializeToString() == load_model(path).SerializeToString()


def test_missing_and_duplicate_node_names_are_made_unique(tmp_path):
    nodes = [h.make_node("Relu", ["x"], ["a"], name="act"), h.make_node("Relu", ["a"], ["b"], name="act"),
             h.make_node("Relu", ["b"], ["c"]), h.make_node("MatMul", ["c", "W"], ["y"])]
    canon = imported(tmp_path, make_model(nodes, {"x": [2, 3]}, {"y": [2, 2]}, {"W": f32(3, 2)}))
    names = [n.name for n in canon.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names[0] == "act"


# ---------------------------------------------------------------- bad inputs

def assert_model_error(path: str, *words: str) -> ModelError:
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert path in message
    for word in words:
        assert word.lower() in message.lower()
    return info.value


def with_external_weight(tmp_path, location: str, dims=(4, 3), offset=None, length=None,
                         write: bytes | None = b"\0" * 48) -> str:
    """A one-Gemm model whose weight W points at external data `location`."""
    orig = make_model([h.make_node("Gemm", ["x", "W"], ["y"], transB=1)], {"x": [2, 3]}, {"y": [2, 4]},
                      {"W": f32(4, 3)})
    w = orig.graph.initializer[0]
    w.ClearField("raw_data")
    del w.dims[:]
    w.dims.extend(dims)
    w.data_location = T.EXTERNAL
    entries = {"location": location, "offset": offset, "length": length}
    for key, value in entries.items():
        if value is not None:
            w.external_data.add(key=key, value=str(value))
    if write is not None:
        (tmp_path / "w.bin").write_bytes(write)
    return save(tmp_path, orig)


def test_missing_file_is_a_model_error(tmp_path):
    assert_model_error(str(tmp_path / "nope.onnx"), "no such file")


def test_random_bytes_are_a_model_error(tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(7).bytes(4096))
    assert_model_error(str(path))


def test_truncated_model_is_a_model_error(tmp_path):
    data = small_mlp().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    assert_model_error(str(path), "truncated")


@pytest.mark.parametrize("what", ["no nodes", "no outputs"])
def test_empty_graph_is_a_model_error(tmp_path, what):
    if what == "no nodes":
        model = make_model([], {"x": [2]}, {})
    else:
        model = make_model([h.make_node("Relu", ["x"], ["y"])], {"x": [2]}, {})
    assert_model_error(save(tmp_path, model), "empty graph", what)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_a_model_error(tmp_path, bad):
    w = f32(4, 3)
    w[2, 1] = bad
    model = make_model([h.make_node("Gemm", ["x", "W"], ["y"], transB=1)], {"x": [2, 3]}, {"y": [2, 4]}, {"W": w})
    assert_model_error(save(tmp_path, model), "'W'", "nan" if np.isnan(bad) else "inf")


def test_non_finite_constant_node_is_a_model_error(tmp_path):
    nodes = [h.make_node("Constant", [], ["c"], value_floats=[1.0, float("nan")]),
             h.make_node("Add", ["x", "c"], ["y"])]
    assert_model_error(save(tmp_path, make_model(nodes, {"x": [2]}, {"y": [2]})), "nan")


def test_external_data_outside_the_folder_is_a_model_error(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 48)
    inner = tmp_path / "inner"
    inner.mkdir()
    assert_model_error(with_external_weight(inner, "../outside.bin", write=None), "../outside.bin", "outside")


def test_external_data_with_absolute_path_is_a_model_error(tmp_path):
    target = str(tmp_path / "w.bin")
    assert_model_error(with_external_weight(tmp_path, target), target, "absolute")


def test_external_data_through_an_escaping_symlink_is_a_model_error(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 48)
    inner = tmp_path / "inner"
    inner.mkdir()
    os.symlink(tmp_path / "outside.bin", inner / "link.bin")
    assert_model_error(with_external_weight(inner, "link.bin", write=None), "link.bin", "outside")


def test_missing_external_file_is_a_model_error(tmp_path):
    assert_model_error(with_external_weight(tmp_path, "gone.bin"), "gone.bin", "missing")


def test_external_data_past_the_end_of_its_file_is_a_model_error(tmp_path):
    assert_model_error(with_external_weight(tmp_path, "w.bin", offset=40, length=48), "w.bin", "past the end")


def test_huge_declared_dims_are_rejected_before_allocation(tmp_path):
    path = with_external_weight(tmp_path, "w.bin", dims=(2**20, 2**20), write=b"\0" * 16)
    assert_model_error(path, "'W'", str(2**40))


def test_raw_data_of_wrong_size_is_a_model_error(tmp_path):
    model = make_model([h.make_node("Gemm", ["x", "W"], ["y"], transB=1)], {"x": [2, 3]}, {"y": [2, 4]},
                       {"W": f32(4, 3)})
    del model.graph.initializer[0].dims[:]
    model.graph.initializer[0].dims.extend([4096, 4096])
    assert_model_error(save(tmp_path, model), "'W'", "48 bytes")


def test_duplicate_output_names_are_a_model_error(tmp_path):
    nodes = [h.make_node("Relu", ["x"], ["a"], name="r1"), h.make_node("Neg", ["x"], ["a"], name="r2"),
             h.make_node("Relu", ["a"], ["y"])]
    assert_model_error(save(tmp_path, make_model(nodes, {"x": [2]}, {"y": [2]})), "'a'", "twice")


def test_graph_with_a_cycle_is_a_model_error(tmp_path):
    nodes = [h.make_node("Add", ["x", "c"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
             h.make_node("Neg", ["b"], ["c"]), h.make_node("Relu", ["a"], ["y"])]
    assert_model_error(save(tmp_path, make_model(nodes, {"x": [2]}, {"y": [2]})), "cycle")


def test_unknown_operator_domain_is_a_model_error(tmp_path):
    model = make_model([h.make_node("Foo", ["x"], ["y"], domain="com.example")], {"x": [2]}, {"y": [2]})
    model.opset_import.append(h.make_opsetid("com.example", 1))
    assert_model_error(save(tmp_path, model), "com.example")


def test_unknown_operator_in_default_domain_is_a_model_error(tmp_path):
    model = make_model([h.make_node("NoSuchOp", ["x"], ["y"])], {"x": [2]}, {"y": [2]})
    assert_model_error(save(tmp_path, model), "NoSuchOp")
