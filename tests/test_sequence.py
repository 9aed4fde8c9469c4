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

from helpers import FIXED_POINT_REL_L2, ZOO, compile_and_validate, lossless_weights, make_model, run_cli, tensor
from sequence_models import recurrent, transformer_block

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


RECURRENT = {  # name: (builder arguments, the recurrent node's layers)
    "lstm_torch_style": (dict(op="LSTM", opset=17), ["lstm.R"]),
    "gru_bidirectional": (dict(op="GRU", direction="bidirectional", batch="N", opset=13),
                          ["gru.R_zr", "gru.R_h", "gru.R_zr_reverse", "gru.R_h_reverse"]),
    "lstm_states_lengths_peepholes": (dict(op="LSTM", direction="bidirectional", initial_state=True, seq_lens=True,
                                           peepholes=True, batch=2, opset=21), ["lstm.R", "lstm.R_reverse"]),
    "gru_reverse_linear_before_reset": (dict(op="GRU", direction="reverse", initial_state=True, opset=14,
                                             extra={"linear_before_reset": 1}), ["gru.R_zr", "gru.R_h"]),
    "rnn_relu_clip": (dict(op="RNN", batch="N", opset=11, extra={"activations": ["Relu"], "clip": 1.5}), ["rnn.R"]),
    "lstm_coupled_gates_other_activations": (
        dict(op="LSTM", opset=11, extra={"input_forget": 1, "activations": ["HardSigmoid", "Tanh", "Softsign"],
                                         "activation_alpha": [0.25], "activation_beta": [0.5]}), ["lstm.R"]),
}


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_weights_run_on_the_accelerator_every_time_step(tmp_path, name):
    kwargs, recurrent_layers = RECURRENT[name]
    onnx.save(recurrent(**kwargs), tmp_path / f"{name}.onnx")
    # 4 rows: a whole number of fixed batches of 2, so no padded row meets a per-row sequence length
    c = compile_and_validate(tmp_path / f"{name}.onnx", tmp_path, LOSSLESS, random_n=4)
    _check_exact(c)
    node = kwargs["op"].lower()
    assert _accelerated(c) == [[f"{node}.W"], ["head"]] + [[l] for l in recurrent_layers]
    code, out, _ = run_cli("inspect", c.eie, "--json")
    report = json.loads(out)
    assert code == 0 and report["host_ops"] == []
    assert {l["name"] for l in report["layers"] if not l.get("on_host")} == {f"{node}.W", "head", *recurrent_layers}
    assert run_cli("validate", c.model, c.eie, "--random", "4")[0] == 0
    # the ratio's "original" is the model's own parameters (and import's few int64 shape vectors), not
    # the identity that keeps the recurrence in ONNX: stored, it would add (gates x hidden)^2 floats (4 KB here)
    model = onnx.load(c.model)
    params = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert params <= c.manifest["original_bytes"] < params + 512


def test_run_reports_a_recurrent_layers_cycles_per_time_step(tmp_path):
    onnx.save(recurrent(op="RNN", steps=5, batch=1), tmp_path / "rnn.onnx")
    c = compile_and_validate(tmp_path / "rnn.onnx", tmp_path, LOSSLESS, random_n=2)
    from eiec.runtime import InferenceSession

    sess = InferenceSession(c.eie)
    sess.run(None, {"x": np.random.default_rng(0).standard_normal((1, 5, 6)).astype(np.float32)})
    runs = sess.last_runs["segment2"]
    assert [l.name for l in runs.layers] == ["rnn.R"] and runs.layers[0].cycles.shape == (5,)  # one per step
    report = sess.last_report
    (r,) = [l for l in report["layers"] if l["name"] == "rnn.R"]
    assert r["cycles"] == pytest.approx(float(runs.layers[0].cycles.mean())) and r["rows_per_input"] == 5
    # per input: every layer's rows (steps, tokens) counted, not one row per layer
    assert report["cycles_per_input"] == pytest.approx(report["total_cycles"])
    assert report["cycles_per_input"] == pytest.approx(sum(l["cycles"] * 5 for l in report["layers"]))


def test_a_recipe_names_the_gate_matrices(tmp_path):
    onnx.save(recurrent(op="GRU", hidden=16), tmp_path / "gru.onnx")
    recipe = LOSSLESS + "layers:\n  gru.R_*: {density: 0.2, obs: false}\n  gru.W: {density: 0.5}\n"
    c = compile_and_validate(tmp_path / "gru.onnx", tmp_path, recipe, random_n=4)
    density = {l["name"]: l["density"] for l in c.manifest["layers"]}
    assert density["gru.R_zr"] == pytest.approx(0.2, abs=0.01) and density["gru.R_h"] == pytest.approx(0.2, abs=0.01)
    assert density["gru.W"] <= 0.3  # already 30 % dense: a 0.5 target keeps every weight
    assert c.result["exact"]["ok"]


TORCH = {  # tests/models/<name>.onnx (models/make_sequence_zoo.py): torch.onnx.export's defaults, batch 1
    "sequence_encoder": [["/layer/self_attn/MatMul"], ["/layer/self_attn/Gemm"],
                      ["/layer/linear1/MatMul", "/layer/linear2/MatMul"], ["/head/MatMul"]],
    "sequence_decoder": [["/layer/self_attn/MatMul"], ["/layer/self_attn/Gemm"],
                      ["/layer/linear1/MatMul", "/layer/linear2/MatMul"], ["/head/MatMul"]],
    "sequence_lstm": [["/rnn/LSTM.W"], ["/head/MatMul"], ["/rnn/LSTM.R"]],
    "sequence_gru": [["/rnn/GRU.W"], ["/head/MatMul"], ["/rnn/GRU.R_zr"], ["/rnn/GRU.R_h"], ["/rnn/GRU.R_zr_reverse"],
                  ["/rnn/GRU.R_h_reverse"]],
}


@pytest.mark.parametrize("name", TORCH)
def test_torch_exported_sequence_models_run_their_weights_on_the_accelerator(tmp_path, name):
    c = compile_and_validate(ZOO / f"{name}.onnx", tmp_path, LOSSLESS, random_n=3)
    _check_exact(c)
    assert _accelerated(c) == TORCH[name]  # torch's fused in_proj [16, 48] MatMul; out_proj a Gemm
    host = {h["op"] for h in c.manifest["host_ops"]}
    assert host == ({"MatMul"} if "coder" in name else set())  # QK^T and PV
    assert all("multiplies two activations" in h["why"] for h in c.manifest["host_ops"])


def test_a_skipped_gate_matrix_runs_dense_on_the_host_and_the_rest_on_the_accelerator(tmp_path):
    onnx.save(recurrent(op="GRU", direction="bidirectional"), tmp_path / "gru.onnx")
    recipe = LOSSLESS + "layers:\n  gru.R_h_reverse: {skip: true}\n"
    c = compile_and_validate(tmp_path / "gru.onnx", tmp_path, recipe, random_n=3)
    _check_exact(c)
    assert _accelerated(c) == [["gru.W"], ["head"], ["gru.R_zr"], ["gru.R_h"], ["gru.R_zr_reverse"]]
    host = c.manifest["host_ops"]
    assert len(host) == 4 and all(h["op"] == "Gemm" and ".R_h_reverse.t" in h["name"] for h in host)  # one per step


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_a_recurrent_model_compiles_without_calibration_or_recipe(tmp_path, op):
    """The data-free defaults have a density for the hidden-state matrices too."""
    onnx.save(recurrent(op=op, direction="bidirectional"), tmp_path / "m.onnx")
    code, out, err = run_cli(tmp_path / "m.onnx", "-o", tmp_path / "m.eie")
    assert code == 0, out + err
    assert "recurrent 0.5" in err
    code, out, err = run_cli("validate", tmp_path / "m.onnx", tmp_path / "m.eie", "--random", "3")
    assert code == 0, out + err
