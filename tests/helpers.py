"""Shared plumbing for the end-to-end tests: build small ONNX models, compile, validate.

Plain functions only (shared fixtures are in conftest.py). Models are built with
onnx.helper, and the CLI is called in-process through `eiec.cli.main`.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from eiec.cli import main as cli_main

# 16-bit activations with 4x range headroom (lower.HEADROOM): the relative L2 error a
# lossless compile (weights already on a 4-bit grid, nothing pruned) may show
FIXED_POINT_REL_L2 = 4e-3
from eiec.container import read_eie
from eiec.driver import compile_model
from eiec.ir import OPSET
from eiec.runtime.validate import validate

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
ZOO = ROOT / "tests" / "models"

# Weights drawn from these 14 nonzero levels (plus 0.0) are clustered without loss by a
# 4-bit codebook (15 nonzero entries): every difference from the original model is then
# the fixed-point datapath's, so a wrong transpose/alpha/beta/pad shows as an O(1) error.
LEVELS = np.array([k * 0.25 for k in range(-7, 8) if k != 0], np.float32)


@dataclass
class Compiled:
    model: Path
    eie: Path
    result: dict[str, Any]  # eiec.runtime.validate.validate(...)
    manifest: dict[str, Any]  # as stored in the .eie (segments included)
    dump_dir: Path | None


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(text)
    return path


def save_inputs(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return Path(path)


def compile_and_validate(model_path: Path | str, folder: Path, recipe_text: str,
                         calibration: Path | str | None = None, input_path: Path | str | None = None,
                         random_n: int | None = None, dump: bool = False, seed: int = 0) -> Compiled:
    """Compile `model_path` into `folder` with the recipe, then validate it against the original."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(model_path).stem
    recipe = write_recipe(folder, recipe_text, f"{stem}.recipe.yaml")
    eie = folder / f"{stem}.eie"
    dump_dir = folder / f"{stem}_ir" if dump else None
    compile_model(str(model_path), str(eie), str(recipe),
                        str(calibration) if calibration is not None else None,
                        str(dump_dir) if dump_dir is not None else None, seed=seed)
    result = validate(str(model_path), str(eie), str(input_path) if input_path is not None else None,
                      random_n, None)
    return Compiled(Path(model_path), eie, result, read_eie(eie).manifest, dump_dir)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`eiec ARGV...` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def lossless_weights(rng: np.random.Generator, shape: tuple[int, ...], density: float = 0.3) -> np.ndarray:
    """Weights on `LEVELS` with exactly round(density * size) nonzeros (at least one)."""
    w = np.zeros(int(np.prod(shape)), np.float32)
    k = max(1, int(round(density * w.size)))
    where = rng.choice(w.size, k, replace=False)
    w[where] = rng.choice(LEVELS, k)
    # with every level present, k-means' linear initialisation puts a centroid on each one
    w[where[: min(k, LEVELS.size)]] = LEVELS[: min(k, LEVELS.size)]
    return w.reshape(shape)


def make_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], initializers: dict[str, np.ndarray],
               opset: int = 17, name: str = "model") -> onnx.ModelProto:
    """A checked model from onnx.helper parts; initializers given as arrays."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    return model


def tensor(name: str, dims: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def canonical_convnet(seed: int = 0, hw: int = 8, stride: int = 1) -> onnx.ModelProto:
    """Canonical IR0: Conv(3->4, 3x3, pad 1) -> Relu -> Flatten -> Gemm fc1 (->6) -> Relu -> Gemm fc2 (6->3).

    Input [2, 3, hw, hw]; fc1 reads 4 * (hw / stride)^2 features.
    """
    rng = np.random.default_rng(seed)
    side = (hw + 2 - 3) // stride + 1
    inits = {
        "conv1.w": rng.standard_normal((4, 3, 3, 3)), "conv1.b": rng.standard_normal(4),
        "fc1.w": rng.standard_normal((6, 4 * side * side)), "fc1.b": rng.standard_normal(6),
        "fc2.w": rng.standard_normal((3, 6)), "fc2.b": rng.standard_normal(3),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[stride, stride], dilations=[1, 1], group=1),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Flatten", ["r1"], ["f1"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f1", "fc1.w", "fc1.b"], ["g1"], name="fc1", alpha=1.0, beta=1.0, transA=0, transB=1),
        helper.make_node("Relu", ["g1"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "fc2.w", "fc2.b"], ["y"], name="fc2", alpha=1.0, beta=1.0, transA=0, transB=1),
    ]
    graph = helper.make_graph(
        nodes, "canonical",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
