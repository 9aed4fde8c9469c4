"""eiec's onnxruntime custom ops (domain ai.onnx.contrib) and sessions that can run them.

Ops are onnxruntime-extensions Python ops, registered once at import through `custom_op`.
An exception inside an op aborts the process, so registered ops return NaN instead.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import numpy as np
import onnx
import onnxruntime
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from eiec.ortrun import session
from eiec.codec import decode_image, image_from_streams

# onnxruntime-extensions 0.15 reads int64, float and string attributes only (an INTS attribute
# declared here fails session creation), so list-valued attributes travel as "a,b,c" strings;
# undeclared attributes on a node (e.g. EIEDecode's `shape` ints, for tools) are ignored.


def parse_ints(text: str) -> tuple[int, ...]:
    """A comma-separated int list attribute ("" -> ())."""
    return tuple(int(t) for t in text.split(",") if t.strip())


# op_type -> the body onnxruntime-extensions calls; kept across importlib.reload (the module
# namespace is reused), because registering an op_type twice breaks every later session
_REGISTERED: dict[str, Callable] = globals().get("_REGISTERED", {})


def custom_op(op_type: str, inputs: list[int], outputs: list[int], attrs: dict[str, int],
              output_shape: Callable[..., tuple[int, ...]]):
    """Register `body` as ai.onnx.contrib::`op_type` once; returns `body` itself (it may raise).

    The registered wrapper turns an exception into a warning and a NaN output of
    `output_shape(*inputs, **attrs)`, because an exception escaping a Python op aborts the process.
    """
    def register(body: Callable) -> Callable:
        def safe(*args, **kwargs):
            try:
                return body(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - anything escaping here aborts the process
                warnings.warn(f"eiec {op_type}: {e}; output set to NaN", RuntimeWarning, stacklevel=2)
                try:
                    shape = output_shape(*args, **kwargs)
                except Exception:  # noqa: BLE001
                    shape = (0,)
                return np.full(shape, np.nan, np.float32)

        if op_type not in _REGISTERED:
            onnx_op(op_type=op_type, inputs=inputs, outputs=outputs, attrs=attrs)(safe)
            _REGISTERED[op_type] = safe
        return body
    return register


# ---- EIEDecode: the packed per-PE streams of one layer -> its dense float32 weight ----

def eie_decode_weight(entries: np.ndarray, pe_start: np.ndarray, col_ptr: np.ndarray,
                      codebook: np.ndarray, shape: tuple[int, ...], pes: int, weight_bits: int,
                      rel_bits: int) -> np.ndarray:
    """codebook[indices] for the indices the streams encode, shaped like the weight."""
    rows = int(shape[0])
    cols = int(np.prod(shape[1:], dtype=np.int64))
    col_ptr = np.asarray(col_ptr, np.int64)
    if col_ptr.shape != (pes, cols + 1):
        raise ValueError(f"col_ptr has shape {col_ptr.shape}, expected {(pes, cols + 1)}")
    img = image_from_streams(entries, pe_start, col_ptr, rows, pes, weight_bits, rel_bits)
    indices = decode_image(img)
    codebook = np.asarray(codebook, np.float32).ravel()
    if indices.size and int(indices.max()) >= codebook.size:
        raise ValueError(f"codebook index {int(indices.max())} beyond codebook of {codebook.size}")
    return codebook[indices].reshape(shape)


@custom_op("EIEDecode",
           inputs=[PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_int64,
                   PyCustomOpDef.dt_float],
           outputs=[PyCustomOpDef.dt_float],
           attrs={"shape_csv": PyCustomOpDef.dt_string, "pes": PyCustomOpDef.dt_int64,
                  "weight_bits": PyCustomOpDef.dt_int64, "rel_bits": PyCustomOpDef.dt_int64},
           output_shape=lambda *inputs, shape_csv="", **_: parse_ints(shape_csv))
def eie_decode(entries: np.ndarray, pe_start: np.ndarray, col_ptr: np.ndarray, codebook: np.ndarray,
               shape_csv: str = "", pes: int = 1, weight_bits: int = 4, rel_bits: int = 4) -> np.ndarray:
    """The op body: inputs and attributes as EIEDecode nodes carry them (see passes/encode.py)."""
    return eie_decode_weight(entries, pe_start, col_ptr, codebook, parse_ints(shape_csv),
                             int(pes), int(weight_bits), int(rel_bits))


# ---- sessions ----

def session_options() -> onnxruntime.SessionOptions:
    """Session options with the onnxruntime-extensions library (and so eiec's ops) registered."""
    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    so.log_severity_level = 3  # IR3 dumps keep encoded streams ORT calls unused: not worth a warning
    return so


def make_session(model_or_path: onnx.ModelProto | bytes | str | os.PathLike,
                 options: onnxruntime.SessionOptions | None = None) -> onnxruntime.InferenceSession:
    """A CPU InferenceSession that can run IR3/IR4 (eiec custom ops)."""
    return session(model_or_path, options or session_options())
