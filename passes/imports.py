"""The import pass: a user's ONNX model as read (`eiec.importer.read_model`) -> the canonical IR0."""

from __future__ import annotations

import onnx

from eiec.importer import InputShapes, canonicalize
from eiec.ir import find_layers
from eiec.passmanager import Context, PassResult


class Import:
    """Canonicalise the model (`eiec.importer.canonicalize`) with the input shapes the user
    and the calibration data fixed. Stats: the compressible layers found."""

    name = "import"
    mutates = False  # canonicalize builds a new model

    def __init__(self, path: str, input_shapes: InputShapes | None = None):
        self.path = path
        self.input_shapes = dict(input_shapes or {})

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        ir0 = canonicalize(model, self.path, self.input_shapes)
        layers = [{"name": l.name, "kind": l.kind, "shape": list(l.shape)} for l in find_layers(ir0)]
        return PassResult(ir0, {"layers": layers})
