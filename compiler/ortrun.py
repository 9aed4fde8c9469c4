"""Running a model on many rows in onnxruntime: eiec's one way to make a session and feed it.

Rows are the leading (batch) axis of every fed input. A model declares that axis either
symbolic (any number of rows per run) or fixed, as torch.onnx.export writes it by
default (x[1, 784]). `run_rows` feeds a fixed-batch model chunks of exactly that size,
pads the last chunk by repeating its last row and drops the padded rows' outputs, so
every caller (calibration, auto, Q-format ranges, validate, `eiec run`) gets one output
row per input row whatever the declared batch; a symbolic batch runs in one go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError, ModelError
from .report import format_dims


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]  # None = dynamic (symbolic or unnamed)


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The model's real inputs (initializers listed as inputs are not)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        out.append(GraphInput(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return out


def session(model: onnx.ModelProto | bytes | str | os.PathLike,
            options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session (quiet: overridable initializers make ORT warn once per weight)."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _declared(sess: ort.InferenceSession) -> dict[str, tuple[int | None, ...] | None]:
    """Per session input, its declared dims (None per dynamic axis; None when the rank is unknown)."""
    return {i.name: None if i.shape is None else tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape)
            for i in sess.get_inputs()}


def fixed_batch(sess: ort.InferenceSession, fed: Sequence[str]) -> int | None:
    """The rows per run the session's inputs `fed` admit: their fixed leading dim, None when symbolic.

    Inputs declaring different fixed leading dims have no common row count: a ModelError.
    """
    declared = _declared(sess)
    sizes = {declared[n][0] for n in fed if declared.get(n) and declared[n][0] is not None}
    if len(sizes) > 1:
        raise ModelError(None, f"inputs declare different fixed batch sizes ({', '.join(map(str, sorted(sizes)))}): "
                               "eiec cannot tell which rows belong together")
    return sizes.pop() if sizes else None


def check_rows(sess: ort.InferenceSession, rows: dict[str, np.ndarray], what: str = "the model's") -> None:
    """Every fed array has its input's rank and every fixed dim past the batch (InputError otherwise)."""
    declared = _declared(sess)
    for name, a in rows.items():
        dims = declared.get(name)
        if dims is None:
            continue
        if a.ndim != len(dims) or any(w is not None and h != w for h, w in zip(a.shape[1:], dims[1:])):
            raise InputError(None, f"input {name!r}: shape ({format_dims(a.shape)}) does not match "
                                   f"{what} ({format_dims(dims)})")


def run_rows(sess: ort.InferenceSession, names: Sequence[str] | None, rows: dict[str, np.ndarray],
             whole: dict[str, np.ndarray] | None = None,
             before_chunk: Callable[[int], None] | None = None,
             run_options: ort.RunOptions | None = None) -> list[Any]:
    """Run `rows` (all sharing one leading row count) in chunks the session's inputs admit.

    `whole` are fed unchanged to every chunk (e.g. weights overriding initializers).
    `before_chunk(real_rows)` is called before each run with how many rows of the chunk
    are real (the rest pad a fixed batch). An output whose leading dim is the chunk size
    is per row (concatenated, padding dropped); any other output is taken from the first
    chunk.
    """
    names = list(names) if names is not None else [o.name for o in sess.get_outputs()]
    whole = {**(whole or {}), **{k: v for k, v in rows.items() if np.ndim(v) == 0}}  # scalars have no rows
    rows = {k: v for k, v in rows.items() if k not in whole}
    n = next(iter(rows.values())).shape[0] if rows else 0
    size = fixed_batch(sess, list(rows)) if rows else None
    if size is None or n == size or n == 0:
        if before_chunk is not None:
            before_chunk(n)
        return sess.run(names, {**rows, **whole}, run_options)
    chunks = []
    for start in range(0, n, size):
        real = min(size, n - start)
        piece = {k: _padded(v[start:start + real], size) for k, v in rows.items()}
        if before_chunk is not None:
            before_chunk(real)
        chunks.append((real, sess.run(names, {**piece, **whole}, run_options)))
    return [_join([(real, outs[i]) for real, outs in chunks], size) for i in range(len(names))]


def _padded(a: np.ndarray, size: int) -> np.ndarray:
    """The chunk with its last row repeated up to `size` rows (a real row: no NaN from zeros)."""
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.repeat(a[-1:], size - a.shape[0], axis=0)])


def _join(parts: list[tuple[int, Any]], size: int) -> Any:
    first = parts[0][1]
    if isinstance(first, np.ndarray) and first.ndim >= 1 and first.shape[0] == size:
        return np.concatenate([p[:real] for real, p in parts])
    if isinstance(first, list) and len(first) == size:  # a sequence output (e.g. ZipMap), one item per row
        return [item for real, p in parts for item in p[:real]]
    return first
