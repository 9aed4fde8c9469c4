"""Scoring compressed models on calibration rows: one onnxruntime session with the layers'
weights overridable (`Evaluator`), and the one-layer-at-a-time sensitivity scan on it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import onnx

from eiec.errors import ModelError
from eiec.ir import Layer, copy_model, get_initializer
from eiec.measure import Score, measure, top1_correct
from eiec.ortrun import lift_fixed_batch, run_rows, session
from eiec.progress import counted

from .compress import Choice, Compress, plain_compress
from .sequential import Progress, Sequential

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
BITS = (2, 3, 4, 6, 8)  # candidates up to the target's weight_bits, which is always one


class Evaluator:
    """One onnxruntime session over the model with the layers' weights and biases overridable.

    Running "a copy of the model with one initializer changed" is the same as feeding
    that initializer as an input, so a whole sensitivity scan needs one session; each
    `score` costs one forward pass over the calibration set.
    """

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], inputs: dict[str, np.ndarray], labels: np.ndarray | None = None):
        m = copy_model(model)
        m.ir_version = max(m.ir_version, 4)  # initializers that are also inputs are overridable
        inits = {t.name: t for t in m.graph.initializer}
        self.layers = layers
        self.weights = {}
        for layer in layers:
            for name in (layer.weight, layer.bias):
                if name not in inits:
                    raise ModelError(None, f"layer {layer.name}: {name} is not an initializer (compress before clustering)")
                self.weights[name] = get_initializer(model, name)
                t = inits[name]
                m.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        self.inputs = inputs
        self.labels = labels
        lift_fixed_batch(m)  # all rows in one run where the model allows it
        self.session = session(m)
        self.output_names = [o.name for o in m.graph.output]
        self.reference = self.run({})
        self.reference_accuracy = None if labels is None else 100.0 * float(np.mean(top1_correct(self.reference, labels)))

    def run(self, overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_rows(self.session, self.output_names, self.inputs, overrides)

    def score_outputs(self, outputs: list[np.ndarray]) -> Score:
        return measure(self.reference, outputs, self.labels)

    def score(self, choices: dict[str, Choice | tuple[float, int | None]], compress: Compress | Sequential) -> Score:
        """The model with every layer in `choices` compressed to its (density, bits); others dense.

        compress: a `Sequential` (layers compressed in order, as the passes do) or a
        per-layer function such as `plain_compress` (each layer on its own).
        """
        if isinstance(compress, Sequential):
            return self.score_outputs(self.run(compress.overrides(choices)))
        overrides = {}
        for layer in self.layers:
            if layer.name in choices:
                density, bits = choices[layer.name]
                w, b = compress(layer, self.weights[layer.weight], self.weights[layer.bias], density, bits)
                overrides[layer.weight], overrides[layer.bias] = w, b
        return self.score_outputs(self.run(overrides))


@dataclass
class LayerSensitivity:
    """One layer compressed alone (all others untouched): the model's score per setting."""

    name: str
    weights: int  # number of weights in the layer
    density: dict[float, Score] = field(default_factory=dict)  # pruning only
    bits: dict[int, Score] = field(default_factory=dict)  # weight sharing only

    def as_dict(self) -> dict:
        return asdict(self)


def sensitivity(
    model: onnx.ModelProto,
    layers: list[Layer],
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None = None,
    densities: Iterable[float] = DENSITIES,
    bits: Iterable[int] = BITS,
    compress: Compress | Sequential = plain_compress,
    progress: Progress = lambda msg: None,
    evaluator: Evaluator | None = None,
) -> dict[str, LayerSensitivity]:
    """Per layer, each density alone (no clustering) and each bits alone (no pruning).

    Cost: len(layers) * (len(densities) + len(bits)) forward passes over the
    calibration set in one onnxruntime session (density 1.0 is free: score 0).
    """
    ev = evaluator or Evaluator(model, layers, inputs, labels)
    zero = Score(0.0) if labels is None else Score(0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0)
    result = {}
    for i, layer in enumerate(layers):
        counted(progress, "sensitivity scan", i, len(layers))
        s = LayerSensitivity(layer.name, int(np.prod(layer.shape)))
        for d in densities:
            s.density[float(d)] = zero if d >= 1 else ev.score({layer.name: (float(d), None)}, compress)
        for b in bits:
            s.bits[int(b)] = ev.score({layer.name: (1.0, int(b))}, compress)
        result[layer.name] = s
        progress(f"sensitivity {i + 1}/{len(layers)} {layer.name}: " + ", ".join(f"d={d:g} {v.error:.4f}" for d, v in s.density.items()))
    counted(progress, "sensitivity scan", len(layers), len(layers))
    return result
