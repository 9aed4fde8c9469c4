"""Models in other exporters' styles (tests/exporter_styles.py) compile, run and validate.

Each is compiled at `density: keep, bits: 4` on lossless weights, so besides `eiec validate`
exiting 0 (every segment exact against onnxruntime) the compiled model must match the
original to fixed-point precision: a wrong fold of a computed Reshape, a lost Transpose or
a Clip fused as a plain ReLU would show as an O(1) error. What stays on the host is listed
by `eiec inspect`.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from eiec.importer import canonicalize
from exporter_styles import STYLES
from helpers import FIXED_POINT_REL_L2, compile_and_validate, run_cli, run_ort

LOSSLESS = "target: {pes: 8}\ndefaults: {density: keep, bits: 4, refit: false, bias_correction: false}\n"

# (style, opset, batch): the opsets these exporters write, 11 to 21; a free batch, and the
# fixed batch of 1 exporters write by default (a fixed batch also folds the flatten to [1, -1])
CASES = [("paddle", 11, "N"), ("tf2onnx", 13, "N"), ("paddle", 17, "N"), ("dynamo", 18, "N"), ("dynamo", 21, "N"),
         ("paddle", 13, 1), ("tf2onnx", 11, 1), ("dynamo", 21, 1)]
# ops each style leaves to onnxruntime (the accelerator has ReLU at write-back, nothing else)
HOST_OPS = {
    "paddle": {"Clip", "GlobalAveragePool", "HardSigmoid", "Mul", "Softmax"},  # + HardSwish at opset >= 14
    "tf2onnx": {"Transpose", "Clip", "Relu", "Reshape"},
    "dynamo": {"ConvTranspose", "Resize", "Clip", "Reshape"},
}


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-opset{o}-batch{b}" for s, o, b in CASES])
def compiled(request, tmp_path_factory):
    style, opset, batch = request.param
    folder = tmp_path_factory.mktemp(f"{style}{opset}")
    path = folder / f"{style}_opset{opset}.onnx"
    onnx.save(STYLES[style](opset, batch), path)
    return style, opset, compile_and_validate(path, folder, LOSSLESS, random_n=3)


def test_exporter_style_model_validate_exits_0(compiled):
    _, _, c = compiled
    code, out, _ = run_cli("validate", c.model, c.eie, "--random", "3")
    assert code == 0, out
    assert "EXACT within the fixed-point bound" in out


def test_exporter_style_model_matches_the_original_to_fixed_point_precision(compiled):
    _, _, c = compiled
    for name, o in c.result["fidelity"]["outputs"].items():
        assert o["rel_l2_error"] < FIXED_POINT_REL_L2, (name, o)


def test_exporter_style_layers_are_lowered_and_the_rest_is_listed_by_inspect(compiled, tmp_path):
    style, opset, c = compiled
    m = c.manifest
    # every conv/FC with constant weights runs on the accelerator; ConvTranspose is the one weighted host op
    assert not any(l.get("on_host") for l in m["layers"])
    assert [h["op"] for h in m["host_ops"]] == (["ConvTranspose"] if style == "dynamo" else [])
    code, out, _ = run_cli("inspect", c.eie, "--json")
    assert code == 0
    listed = set(json.loads(out)["host_op_counts"])
    # below opset 13 onnx's converter wraps Softmax in Shape/Flatten/Reshape, also on the host
    extra = {"HardSwish"} if style == "paddle" and opset >= 14 else {"Shape", "Flatten", "Reshape"}
    assert HOST_OPS[style] <= listed and listed - HOST_OPS[style] <= extra
    code, out, _ = run_cli("inspect", c.eie)
    assert "ops run by the host (onnxruntime): " in out


def test_paddle_flatten_from_shape_joins_the_conv_and_fc_in_one_segment(compiled):
    """Shape -> Slice -> Concat -> Reshape folds to Reshape(0, -1), which only relabels."""
    style, _, c = compiled
    if style != "paddle":
        pytest.skip("paddle's computed flatten")
    last = c.manifest["segments"][-1]
    assert [l["kind"] for l in last["layers"]] == ["conv", "fc"]


@pytest.mark.parametrize("batch", ["N", 1])
@pytest.mark.parametrize("style,opset", [(s, o) for s in sorted(STYLES) for o in range(11, 22)
                                         if not (s == "dynamo" and o < 13)])  # Resize-11 needs a roi
def test_exporter_style_import_computes_what_the_original_computes(style, opset, batch):
    """Every opset 11-21: onnxruntime on IR0 equals onnxruntime on the original, and no Shape
    arithmetic is left for a fixed batch."""
    model = STYLES[style](opset, batch)
    canon = canonicalize(model, f"{style}.onnx")
    x = np.random.default_rng(opset).standard_normal(
        [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    feeds = {model.graph.input[0].name: x}
    (want,), (got,) = run_ort(model, feeds), run_ort(canon, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if batch == 1:
        assert "Shape" not in [n.op_type for n in canon.graph.node]
