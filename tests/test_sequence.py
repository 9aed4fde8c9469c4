"""Transformer blocks, recurrent layers and 1-D convs on the accelerator (issue 13).

Every model is built with onnx.helper on lossless weights (`sequence_models`), compiled at
`density: keep, bits: 4`, and must validate (exit 0) and match onnxruntime on the original
to fixed-point precision, with every constant weight matrix in a segment.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import FIXED_POINT_REL_L2, compile_and_validate, lossless_weights, make_model, run_cli, tensor
from sequence_models import transformer_block

LOSSLESS = "target: {pes: 8}\ndefaults: {density: keep, bits: 4}\n"


def _accelerated(c) -> list[list[str]]:
    return [[l["name"] for l in s["layers"]] for s in c.manifest["segments"]]


def _check_exact(c) -> None:
    assert c.result["exact"]["ok"]
    for fid in c.result["fidelity"]["outputs"].values():
        assert fid["rel_l2_error"] < FIXED_POINT_REL_L2


@pytest.mark.parametrize("decoder,opset,batch,fused", [
    (False, 17, 1, False), (True, 21, "N", True), (False, 11, 1, True), (True, 13, 1, False)])
def test_transformer_block_linear_layers_run_one_matvec_per_token(tmp_path, decoder, opset, batch, fused):
    onnx.save(transformer_block(decoder=decoder, opset=opset, batch=batch, fused_qkv=fused), tmp_path / "b.onnx")
    c = compile_and_validate(tmp_path / "b.onnx", tmp_path, LOSSLESS, random_n=3)
    _check_exact(c)
    qkv = [["in_proj"]] if fused else [["q_proj"], ["k_proj"], ["v_proj"]]
    # Linear -> ReLU -> Linear is one segment; LayerNorm and the residual Adds split the rest
    assert _accelerated(c) == qkv + [["out_proj"], ["linear1", "linear2"]]
    seg = c.manifest["segments"][-1]
    assert seg["layers"][0]["in_shape"] == [16]  # one token's vector per matrix-vector product
    code, out, _ = run_cli("inspect", c.eie, "--json")
    host = json.loads(out)["host_ops"]
    assert code == 0 and [(h["name"], h["op"]) for h in host] == [("qk", "MatMul"), ("pv", "MatMul")]
    assert all("multiplies two activations" in h["why"] for h in host)
    assert "qk: it multiplies two activations" in run_cli("inspect", c.eie)[1]
    assert run_cli("validate", c.model, c.eie, "--random", "2")[0] == 0


def test_linear_on_a_4d_activation_with_a_bias_add_first(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="proj"),
             helper.make_node("Add", ["b", "m"], ["y"], name="bias")]
    inits = {"w": lossless_weights(rng, (6, 10)), "b": np.arange(10, dtype=np.float32) / 4}
    onnx.save(make_model(nodes, [tensor("x", ["N", 2, 3, 6])], [tensor("y", ["N", 2, 3, 10])], inits),
              tmp_path / "m.onnx")
    c = compile_and_validate(tmp_path / "m.onnx", tmp_path, LOSSLESS, random_n=4)
    _check_exact(c)
    assert _accelerated(c) == [["proj"]] and c.manifest["host_ops"] == []


def test_1d_convs_lower_like_2d_convs_and_chain_through_relu(tmp_path):
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3], pads=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", auto_pad="SAME_UPPER", strides=[2],
                              dilations=[1]),
             helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    inits = {"w1": lossless_weights(rng, (6, 4, 3)), "b1": np.full(6, 0.5, np.float32),
             "w2": lossless_weights(rng, (5, 6, 3))}
    onnx.save(make_model(nodes, [tensor("x", [1, 4, 12])], [tensor("y", [1, 5, 6])], inits, opset=11),
              tmp_path / "c.onnx")
    c = compile_and_validate(tmp_path / "c.onnx", tmp_path, LOSSLESS, random_n=3)
    _check_exact(c)
    assert _accelerated(c) == [["conv1", "conv2"]] and c.manifest["host_ops"] == []
