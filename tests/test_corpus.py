"""The torchvision corpus: models made the way users make them, compiled, run and validated.

tests/models/tv_*.onnx (made by tests/models/make_corpus.py, described in models/README.md)
are width-reduced torchvision architectures exported by torch.onnx.export with its defaults:
a fixed batch of 1, exporter-chosen names, TorchScript and dynamo exporters, opsets 20 and 11.
onnxruntime on the original file is the judge. No torch.

The whole chain (compile with no recipe and no calibration file, `eiec run`, `eiec
validate`) runs on every model in the fast suite: what a user who brings one of these
models types first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from eiec.container import read_eie
from helpers import ZOO, run_cli, save_inputs

CORPUS = {  # file stem -> opset the exporter wrote
    "tv_mobilenet_v3_small": 20,
    "tv_resnet18": 20,
    "tv_squeezenet1_1": 20,
    "tv_efficientnet_b0": 20,
    "tv_efficientnet_b0_dynamo": 20,
    "tv_mobilenet_v3_small_opset11": 11,
}
SHAPE = [1, 3, 64, 64]


def _path(stem: str) -> Path:
    return ZOO / f"{stem}.onnx"


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_corpus_holds_every_documented_model_within_its_size_budget():
    assert sorted(p.stem for p in ZOO.glob("tv_*.onnx")) == sorted(CORPUS)
    sizes = {stem: _path(stem).stat().st_size for stem in CORPUS}
    assert all(s < 1 << 20 for s in sizes.values()), sizes
    assert sum(sizes.values()) < 5 << 20


@pytest.mark.parametrize("stem", CORPUS)
def test_corpus_model_has_a_fixed_batch_of_one_and_runs_in_onnxruntime(stem):
    model = onnx.load(_path(stem))
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == CORPUS[stem]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert _dims(inp) == SHAPE and _dims(out) == [1, 10]
    sess = ort.InferenceSession(str(_path(stem)), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ys = [sess.run(None, {inp.name: rng.standard_normal(SHAPE).astype(np.float32)})[0] for _ in range(3)]
    assert all(np.isfinite(y).all() for y in ys)
    # random weights must still give an output that depends on the input (not a dead network)
    assert np.abs(ys[0] - ys[1]).max() > 1e-3 * np.abs(ys[0]).max()


def test_corpus_exporter_patterns_are_the_documented_ones():
    ops = {stem: {n.op_type for n in onnx.load(_path(stem)).graph.node} for stem in CORPUS}
    assert "HardSwish" in ops["tv_mobilenet_v3_small"]
    # opset 11 has no HardSwish: the exporter writes x * HardSigmoid(x)
    assert "HardSwish" not in ops["tv_mobilenet_v3_small_opset11"]
    assert {"HardSigmoid", "Mul"} <= ops["tv_mobilenet_v3_small_opset11"]
    # the dynamo exporter pools with ReduceMean and flattens with a Reshape to a constant [1, C]
    dynamo = onnx.load(_path("tv_efficientnet_b0_dynamo"))
    assert {"ReduceMean", "Reshape"} <= ops["tv_efficientnet_b0_dynamo"] and "Flatten" not in ops["tv_efficientnet_b0_dynamo"]
    inits = {i.name: numpy_helper.to_array(i) for i in dynamo.graph.initializer}
    (reshape,) = [n for n in dynamo.graph.node if n.op_type == "Reshape"]
    assert inits[reshape.input[1]].tolist()[0] == 1
    # both exporters fold BatchNorm into the convs by default
    assert not any("BatchNormalization" in o for o in ops.values())
    convs = [n for n in onnx.load(_path("tv_mobilenet_v3_small")).graph.node if n.op_type == "Conv"]
    assert any(a.name == "group" and a.i > 1 for c in convs for a in c.attribute)  # depthwise


def _compile_run_validate(stem: str, folder: Path) -> dict:
    """`eiec MODEL -o OUT.eie` (a file smaller than the model), `eiec run` on 2 rows,
    `eiec validate`; the manifest."""
    model, eie = _path(stem), folder / f"{stem}.eie"
    code, _, err = run_cli(model, "-o", eie)
    assert code == 0, err
    assert eie.stat().st_size < model.stat().st_size  # the compiled file never outgrows the model
    name = onnx.load(model).graph.input[0].name
    x = np.random.default_rng(1).standard_normal((2, *SHAPE[1:])).astype(np.float32)
    outputs = folder / "out.npz"
    code, out, err = run_cli("run", eie, "--input", save_inputs(folder / "in.npz", **{name: x}), "-o", outputs)
    assert code == 0, err
    with np.load(outputs) as f:
        (y,) = f.values()
    assert y.shape == (2, 10) and np.isfinite(y).all()
    code, out, err = run_cli("validate", model, eie, "--random", "2")
    assert code == 0, out + err
    assert "EXACT within the fixed-point bound" in out
    return read_eie(eie).manifest


def _every_layer_on_the_accelerator(stem: str, manifest: dict) -> None:
    """Each Conv and Gemm of the original (BN is folded by the exporters) is a lowered layer."""
    layers = [n for n in onnx.load(_path(stem)).graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(manifest["layers"]) == len(layers)
    assert not any(l.get("on_host") for l in manifest["layers"])
    in_segments = {l["name"] for s in manifest["segments"] for l in s["layers"]}
    assert in_segments == {l["name"] for l in manifest["layers"]}


@pytest.mark.parametrize("stem", CORPUS)
def test_corpus_model_compiles_with_no_recipe_runs_and_validates(stem, tmp_path):
    manifest = _compile_run_validate(stem, tmp_path)
    _every_layer_on_the_accelerator(stem, manifest)
    assert manifest["auto"]["calibration"] == "random"
