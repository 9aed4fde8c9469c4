"""The canonical IR every pass sees, and how to find its compressible layers.

All IRs are plain ONNX models (IR3/IR4 add eiec custom ops in `EIE_DOMAIN`).
After import (IR0) every compressible layer is one of:

* FC:   ``Gemm(X, W, B)`` with alpha=1, beta=1, transA=0, transB=1; W is
  [out, in], B is [out] (always present, zeros when the model had none).
* Conv: ``Conv(X, W, B)``, 2-D, explicit ``pads``/``strides``/``dilations``/
  ``group``/``kernel_shape``; W is [out, in/group, kh, kw], B is [out].
* Recurrent: an ``LSTM``/``GRU``/``RNN`` node whose R and B are assembled from
  [gate rows, hidden] matrices and their biases (`eiec.recurrent`); each is a layer.

The layer's name is its node's name (unique after import). W is produced by:

* IR0/IR1: an initializer named ``<weight>``.
* IR2:     ``Gather(<weight>.codebook, Cast(<weight>.indices))`` — float codebook
  [2^bits] with entry 0 = 0.0, uint8 indices shaped like W.
* IR3:     ``EIEDecode`` (domain ai.onnx.contrib) fed by the packed per-PE streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .recurrent import GATES, assembled_from, directions, layer_name, roles

EIE_DOMAIN = "ai.onnx.contrib"
OPSET = 17  # the canonical IR uses max(model opset, 17): older models are converted up to 17


@dataclass
class Layer:
    """One compressible layer of a canonical model."""

    name: str  # the Gemm/Conv node's name
    kind: str  # "fc", "conv" or "recurrent" (a recurrent node's R matrix: eiec.recurrent)
    node: onnx.NodeProto
    weight: str  # name of W (initializer in IR0/1, a node output later)
    bias: str  # name of the bias initializer [out]
    shape: tuple[int, ...]  # shape of W

    @property
    def input(self) -> str:
        """The tensor holding what the layer multiplies: its activation, or for a recurrent
        layer its node's hidden states Y (each step's input h(t-1) is the step before's)."""
        return self.node.output[0] if self.kind == "recurrent" else self.node.input[0]

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: passes that must leave their input model untouched start from one."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """The compressible layers of a canonical model, in graph order (a recurrent node's
    layers in the order of its R input, `eiec.recurrent`)."""
    inits = initializer_map(model)
    prod = producers(model)

    def shape_of(w: str) -> tuple[int, ...] | None:
        src = prod.get(w)
        if w in inits:
            return tuple(int(d) for d in inits[w].dims)
        if src is not None and src.op_type == "Gather" and src.input[1] in prod:
            return tuple(int(d) for d in inits[prod[src.input[1]].input[0]].dims)  # Cast(indices)
        if src is not None and src.op_type == "EIEDecode":
            return tuple(int(d) for d in next(a.ints for a in src.attribute if a.name == "shape"))
        return None

    layers = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in GATES and len(node.input) > 3 and node.input[3]:
            ws, bs = assembled_from(prod, node.input[2]), assembled_from(prod, node.input[3])
            shapes = [shape_of(w) for w in ws]
            if len(ws) != len(bs) or any(s is None or len(s) != 2 for s in shapes):
                continue  # not assembled by import: a host op
            hidden = shapes[0][1]
            parts = [(d, r) for d in range(len(directions(node))) for r in roles(node.op_type, hidden)]
            if len(parts) != len(ws):
                continue
            layers += [Layer(layer_name(node.name, r[0], d), "recurrent", node, w, b, s)
                       for (d, r), w, b, s in zip(parts, ws, bs, shapes)]
            continue
        if node.op_type not in ("Gemm", "Conv") or len(node.input) < 3:
            continue
        shape = shape_of(node.input[1])
        if shape is None or len(shape) != (2 if node.op_type == "Gemm" else 4):
            continue  # 3-D convs are not canonical layers: they stay host ops
        kind = "fc" if node.op_type == "Gemm" else "conv"
        layers.append(Layer(node.name, kind, node, node.input[1], node.input[2], shape))
    return layers


def get_initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace (or add) initializer `name` with `value`, keeping its position."""
    new = numpy_helper.from_array(np.ascontiguousarray(value), name)
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(new)
            return
    model.graph.initializer.append(new)


def remove_initializer(model: onnx.ModelProto, name: str) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            del model.graph.initializer[i]
            return


def matrix_view(w: np.ndarray) -> np.ndarray:
    """The 2-D matrix EIE stores for a weight: [out, in] for FC, [out, in/g*kh*kw] for conv."""
    return w.reshape(w.shape[0], -1)


# why a MatMul/Gemm whose second operand is computed at run time stays on the host
ACTIVATION_PRODUCT = ("it multiplies two activations (as attention's QK^T and PV do): there is no constant "
                      "weight for the accelerator to hold, so the host runs it")

MAC_OPS = ("MatMul", "Gemm", "Conv")  # host ops whose multiply-accumulates eiec counts


def host_ops(model: onnx.ModelProto) -> list[dict]:
    """The host graph's ops by type (EIE custom ops excluded), first seen first: op, count,
    and for MatMul/Gemm/Conv the multiply-accumulates one input row costs (None when a
    shape is not known). The leading dim of every activation is the batch."""
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                        for d in vi.type.tensor_type.shape.dim]
              for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output)
              if vi.type.tensor_type.HasField("shape")}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    out: dict[str, dict] = {}
    for node in model.graph.node:
        if node.domain == EIE_DOMAIN:
            continue
        entry = out.setdefault(node.op_type, {"op": node.op_type, "count": 0})
        entry["count"] += 1
        if node.op_type in MAC_OPS:
            macs = _macs_per_input(node, shapes)
            entry["macs_per_input"] = None if macs is None or entry.get("macs_per_input", 0) is None \
                else entry.get("macs_per_input", 0) + macs
    return list(out.values())


def _macs_per_input(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int | None:
    y, a = shapes.get(node.output[0]), shapes.get(node.input[0])
    w = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if not y or not a or w is None:
        return None
    if node.op_type == "Conv":
        reduced = w[1:]  # in/group * kh * kw per output value
    elif node.op_type == "Gemm":
        reduced = [a[0] if any(x.name == "transA" and x.i for x in node.attribute) else a[-1]]
    else:  # MatMul
        reduced = [a[-1]]
    dims = [*y[1:], *reduced]
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))
