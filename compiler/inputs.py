"""Input data: a model's inputs (and labels) loaded from an .npz and checked against it,
or random rows when there is none. Calibration for compiling, inputs for running and
validating all come through here.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from .errors import FormatError, InputError, ModelError
from .ortrun import graph_inputs
from .report import format_dims
from .tensorfile import check_npz

LABELS_KEY = "labels"
# optional per-row marks: the rows `auto` scores on (True), never reconstructs on; say, the rows
# the model never trained on, when the rest of the file is training data
HELD_OUT_KEY = "held_out"


def random_inputs(model: onnx.ModelProto, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n rows of random data per graph input, for when no calibration file is given.

    Float inputs are standard normal: trained models mostly see normalised inputs, and
    N(0, 1) exercises both signs of every weight (uniform [0, 1] would not). The
    leading dimension is the batch: n rows whatever the model declares (`eiec.ortrun`
    feeds a fixed batch in chunks); any other dynamic dimension, or a non-float input,
    is a ModelError: random data cannot guess it.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for gi in graph_inputs(model):
        if not np.issubdtype(gi.dtype, np.floating):
            raise ModelError(None, f"input {gi.name!r} is {gi.dtype}: random calibration data only for float inputs; pass --calibration")
        if not gi.dims or any(d is None for d in gi.dims[1:]):
            raise ModelError(None, f"input {gi.name!r} has free dimensions ({format_dims(gi.dims)}) beyond the batch: "
                                   f"random data cannot choose them; pass --calibration data or --input-shape {gi.name}:DIMS")
        out[gi.name] = rng.standard_normal((n, *gi.dims[1:])).astype(gi.dtype)
    return out


def load_calibration(path: str | os.PathLike, model: onnx.ModelProto,
                     expected: str = "the model's") -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Calibration inputs (and optional integer `labels`) from an .npz, checked against the model.

    Keys must be the graph inputs (plus optionally `labels`, 1-D integers, one per
    row). Each array must cast to its input's dtype (same kind), match its fixed
    dimensions, share one batch length and be finite. Every problem is an InputError
    naming the file and the key.
    """
    path = os.fspath(path)
    try:  # bounded memory, no pickles, intact members: np.load below cannot blow up
        check_npz(path)
    except FormatError as e:
        raise InputError(path, e.reason) from None
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read calibration data: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InputError(path, "calibration data must be an .npz archive of named arrays")
    wanted = {gi.name: gi for gi in graph_inputs(model)}
    arrays: dict[str, np.ndarray] = {}
    with npz:
        for key in npz.files:
            if key not in wanted and key not in (LABELS_KEY, HELD_OUT_KEY):
                raise InputError(path, f"{key}: not an input of the model (inputs: {', '.join(wanted)}; "
                                       f"or '{LABELS_KEY}', '{HELD_OUT_KEY}')")
            try:
                arrays[key] = npz[key]
            except ValueError as e:  # object arrays need pickle, which we never allow
                raise InputError(path, f"{key}: cannot load ({e})") from None
    missing = [k for k in wanted if k not in arrays]
    if missing:
        raise InputError(path, f"{missing[0]}: model input missing from the calibration data")
    n = None
    inputs: dict[str, np.ndarray] = {}
    for name, gi in wanted.items():
        a = arrays[name]
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise InputError(path, f"{name}: dtype {a.dtype} is not numeric")
        if not np.can_cast(a.dtype, gi.dtype, "same_kind"):
            raise InputError(path, f"{name}: dtype {a.dtype} does not cast to the model's {gi.dtype}")
        if a.ndim != len(gi.dims) or a.ndim == 0:
            raise InputError(path, f"{name}: shape {a.shape} has rank {a.ndim}, not that of {expected} ({format_dims(gi.dims)})")
        for axis, (have, want) in enumerate(zip(a.shape, gi.dims)):
            if axis > 0 and want is not None and have != want:
                raise InputError(path, f"{name}: shape {a.shape} does not match {expected} ({format_dims(gi.dims)})")
        if a.shape[0] == 0:
            raise InputError(path, f"{name}: has no rows")
        if n is not None and a.shape[0] != n:
            raise InputError(path, f"{name}: {a.shape[0]} rows, but other inputs have {n}")
        n = a.shape[0]
        if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            raise InputError(path, f"{name}: contains NaN or Inf")
        cast = a.astype(gi.dtype)
        if np.issubdtype(gi.dtype, np.inexact) and not np.all(np.isfinite(cast)):
            raise InputError(path, f"{name}: values overflow {gi.dtype}")
        inputs[name] = cast
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(path, f"{LABELS_KEY}: must be 1-D integers, got {labels.dtype} shape {labels.shape}")
        if labels.shape[0] != n:
            raise InputError(path, f"{LABELS_KEY}: {labels.shape[0]} labels for {n} rows")
        labels = labels.astype(np.int64)
    held = arrays.get(HELD_OUT_KEY)
    if held is not None and (held.ndim != 1 or held.shape[0] != n or held.dtype != bool
                             or held.all() or not held.any()):
        raise InputError(path, f"{HELD_OUT_KEY}: must be 1-D booleans, one per row ({n}), some true and some "
                               f"false; got {held.dtype} shape {held.shape}")
    return inputs, labels


def load_held_out(path: str | os.PathLike) -> np.ndarray | None:
    """The calibration file's `held_out` marks (checked by `load_calibration`), if it has them."""
    with np.load(os.fspath(path), allow_pickle=False) as npz:
        return npz[HELD_OUT_KEY] if HELD_OUT_KEY in npz.files else None
