"""A layer's calibration inputs as its weight matrix sees them: the rows it multiplies
(FC: the batch; conv: im2col patches; recurrent: the hidden states), captured from
onnxruntime runs with the layers' input tensors added as graph outputs."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx

from eiec.conv import conv_output_hw, im2col
from eiec.ir import Layer, copy_model
from eiec.ortrun import run_rows, session

# Rows per layer the passes and the auto search reconstruct from, and their memory cap.
CAPTURE_ROWS = 8192
CAPTURE_BYTES = 256 << 20


def conv_params(layer: Layer) -> dict:
    """The im2col parameters of a canonical Conv layer (explicit pads, see eiec.ir)."""
    kh, kw = layer.shape[2], layer.shape[3]
    return {
        "kernel": tuple(layer.attr("kernel_shape", [kh, kw])),
        "pads": tuple(layer.attr("pads", [0, 0, 0, 0])),
        "strides": tuple(layer.attr("strides", [1, 1])),
        "dilations": tuple(layer.attr("dilations", [1, 1])),
        "group": int(layer.attr("group", 1)),
    }


def layer_rows(layer: Layer, x: np.ndarray) -> int:
    """How many rows the layer's weight matrix multiplies for input tensor x (FC: batch; conv: positions)."""
    if layer.kind == "fc":
        return x.shape[0]
    if layer.kind == "recurrent":
        return _hidden_states(layer, x).shape[0]
    p = conv_params(layer)
    Ho, Wo = conv_output_hw(x.shape[2:], p["kernel"], p["pads"], p["strides"], p["dilations"])
    return x.shape[0] * Ho * Wo


def layer_matrix(layer: Layer, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The chosen rows of the layer's input as its weight matrix sees them ([n, in] or [g, n, in_g])."""
    if layer.kind == "fc":
        return x.reshape(x.shape[0], -1)[rows]
    if layer.kind == "recurrent":
        return _hidden_states(layer, x)[rows]
    p = conv_params(layer)
    patches = im2col(x, rows=rows, **p)
    return patches[0] if p["group"] == 1 else patches


def _hidden_states(layer: Layer, y: np.ndarray) -> np.ndarray:
    """A recurrent layer's rows: its direction's hidden states in the node's output Y
    [T, dirs, B, H], which are the inputs h(t-1) of the next steps. (A GRU's hidden gate
    multiplies r * h(t-1); h stands in for it.)"""
    return y[:, int(layer.name.endswith("_reverse"))].reshape(-1, y.shape[-1])


def row_cap(layer: Layer, max_rows: int, max_bytes: int | None) -> int:
    cols = int(np.prod(layer.shape[1:])) * (int(layer.attr("group", 1)) if layer.kind == "conv" else 1)
    return max_rows if max_bytes is None else min(max_rows, max(1, max_bytes // (4 * max(cols, 1))))


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model with the tensors `names` (not graph inputs) added as graph outputs."""
    m = copy_model(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
            have.add(t)
    return m


def capture_layer_inputs(
    model: onnx.ModelProto,
    layers: list[Layer],
    inputs: dict[str, np.ndarray],
    max_rows: int = 20000,
    seed: int = 0,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Each layer's inputs on the calibration data, as the rows its weight matrix multiplies.

    One onnxruntime run with every layer's input tensor (`Layer.input`) added as a
    graph output. FC: X [n, in]. Conv: im2col patches, [n, in/g*kh*kw] when g = 1,
    else [g, n, in/g*kh*kw] (the per-group form every `reconstruct` function takes).
    At most max_rows rows (and, with max_bytes, at most max_bytes of float32 rows per
    layer), picked uniformly without replacement (seeded) and kept in order.
    Memory: all layers' rows at once (float32).
    """
    wanted = list(dict.fromkeys(l.input for l in layers if l.input not in inputs))
    m = with_outputs(model, wanted)
    values = dict(zip(wanted, run_rows(session(m), wanted, inputs))) if wanted else {}
    values.update(inputs)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer in layers:
        x = np.asarray(values[layer.input])
        out[layer.name] = layer_matrix(layer, x, pick_rows(layer_rows(layer, x), row_cap(layer, max_rows, max_bytes), rng))
    return out


def pick_rows(n: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    if n <= max_rows:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_rows, replace=False))
