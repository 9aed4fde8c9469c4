"""The command line: the four commands on a shipped model, and bad input -> one line, exit 2."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eiec.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
MLP = os.path.join(MODELS, "lenet_300_100.onnx")
TEST = os.path.join(MODELS, "digits_test.npz")
CALIB = os.path.join(MODELS, "digits_calib.npz")


@pytest.fixture(scope="module")
def mlp_eie(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    recipe = d / "r.yaml"
    recipe.write_text("defaults: {density: 0.3, bits: 4}\nlayers:\n  MatMul2: {density: 0.8}\n")
    assert main([MLP, "-o", str(d / "m.eie"), "--config", str(recipe), "--calibration", CALIB,
                 "--quiet"]) == 0
    return d / "m.eie"


def test_inspect_json_reports_sizes_and_layers(mlp_eie, capsys):
    assert main(["inspect", str(mlp_eie), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("original_bytes", "compressed_bytes", "compression_ratio", "layers"):
        assert key in data
    assert [l["shape"] for l in data["layers"]] == [[300, 784], [100, 300], [10, 100]]
    assert data["layers"][2]["density"] == pytest.approx(0.8, abs=1e-3)
    assert all(l["bits"] == 4 for l in data["layers"])
    # every stored byte counts: the fixed form includes per-PE pointers, codebooks and biases
    l0 = data["layers"][0]
    assert l0["bytes_fixed"] == l0["spmat"] + l0["col_ptr"] + l0["codebook"] + l0["bias"]
    assert data["compression_ratio"] == pytest.approx(data["original_bytes"] / data["compressed_bytes"], rel=1e-3)


def test_inspect_table_and_dis_are_readable(mlp_eie, capsys):
    assert main(["inspect", str(mlp_eie)]) == 0
    table = capsys.readouterr().out
    assert "MatMul1" in table and "whole model" in table
    assert main(["dis", str(mlp_eie)]) == 0
    text = capsys.readouterr().out
    assert "RUN" in text and "MatMul2" in text and text.strip().endswith("END")


def test_run_accuracy_matches_ir2_within_half_a_point(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults: {density: 0.3, bits: 4}\n")
    eie = tmp_path / "m.eie"
    assert main([MLP, "-o", str(eie), "--config", str(recipe), "--calibration", CALIB,
                 "--dump-ir", str(tmp_path / "ir"), "--quiet"]) == 0
    out, report = tmp_path / "out.npz", tmp_path / "report.json"
    assert main(["run", str(eie), "--input", TEST, "-o", str(out), "--report", str(report)]) == 0
    assert "latency us" in capsys.readouterr().out
    with np.load(TEST, allow_pickle=False) as d:
        x, labels = d["input"], d["labels"]
    with np.load(out, allow_pickle=False) as o:
        acc_eie = np.mean(o["probabilities"].argmax(1) == labels)
    import onnxruntime as ort

    ir2 = ort.InferenceSession(str(tmp_path / "ir" / "2_cluster.onnx"), providers=["CPUExecutionProvider"])
    acc_ir2 = np.mean(ir2.run(["probabilities"], {"input": x})[0].argmax(1) == labels)
    assert abs(acc_eie - acc_ir2) <= 0.005
    rep = json.loads(report.read_text())
    for key in ("pes", "clock_mhz", "total_cycles", "latency_us", "layers"):
        assert key in rep
    for layer in rep["layers"]:
        for key in ("name", "cycles", "ideal_cycles", "latency_us", "load_balance", "entries",
                    "padding_entries", "nonzero_activations", "energy_uj"):
            assert key in layer
        assert layer["cycles"] >= layer["ideal_cycles"]
    # batch totals cover the batch; per-layer cycles are per input
    assert rep["total_cycles"] == pytest.approx(sum(l["cycles"] for l in rep["layers"]) * len(labels), rel=1e-9)


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def _tiny(w: np.ndarray) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[0]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(w.shape[0], np.float32), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _bad_models(tmp_path):
    ok = _tiny(np.ones((4, 6), np.float32))
    data = ok.SerializeToString()
    nan = _tiny(np.full((4, 6), np.nan, np.float32))
    empty = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 17)])
    ext = _tiny(np.ones((4, 6), np.float32))
    ext.graph.initializer[0].ClearField("raw_data")
    ext.graph.initializer[0].data_location = TensorProto.EXTERNAL
    ext.graph.initializer[0].ClearField("float_data")
    ext.graph.initializer[0].external_data.add(key="location", value="../outside.bin")
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\x00not an onnx model at all\xff" * 10)
    return {
        "missing": str(tmp_path / "nope.onnx"),
        "not onnx": str(tmp_path / "junk.onnx"),
        "truncated": str(tmp_path / "t.onnx"),
        "empty graph": _save(empty, tmp_path / "empty.onnx"),
        "nan weights": _save(nan, tmp_path / "nan.onnx"),
        "outside external data": _save(ext, tmp_path / "ext.onnx"),
    }


@pytest.mark.parametrize("case", ["missing", "not onnx", "truncated", "empty graph", "nan weights",
                                  "outside external data"])
def test_bad_model_is_one_line_exit_2_and_no_output(case, tmp_path, capsys):
    path = _bad_models(tmp_path)[case]
    out = tmp_path / "out.eie"
    assert main([path, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and os.path.basename(path) in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("text, key", [
    ("defaults: {density: 1.5}\n", "defaults.density"),
    ("defaults: {colour: red}\n", "defaults.colour"),
    ("layers:\n  nothere*: {density: 0.5}\n", "nothere*"),
    ("target: {pes: zero}\n", "target.pes"),
    ("defaults: [1, 2\n", "does not parse"),
])
def test_bad_recipe_names_the_key(text, key, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out.eie"
    assert main([MLP, "-o", str(out), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert key in err and "r.yaml" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_recipe_naming_an_op_eiec_cannot_compress_is_an_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("layers:\n  ArgMax: {density: 0.5}\n")
    assert main([MLP, "-o", str(tmp_path / "o.eie"), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "ArgMax" in err and "cannot compress" in err


def test_recipe_naming_an_activation_product_says_it_has_no_weight(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"], name="qk")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 5])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("layers:\n  qk: {density: 0.5}\n")
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.eie"), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "'qk' is a MatMul" in err and "multiplies two activations" in err and len(err.strip().splitlines()) == 1


def test_tampered_eie_is_rejected(mlp_eie, tmp_path, capsys):
    data = bytearray(mlp_eie.read_bytes())
    data[-100] ^= 0xFF
    bad = tmp_path / "bad.eie"
    bad.write_bytes(bytes(data))
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.eie" in err and "checksum" in err


def test_plain_compile_without_recipe_or_calibration_succeeds_and_says_what_it_chose(tmp_path, capsys):
    out = tmp_path / "m.eie"
    assert main([MLP, "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "random inputs" in err and "automatic recipe written to" in err
    assert out.exists() and (tmp_path / "m.recipe.yaml").exists()
