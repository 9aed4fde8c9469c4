"""The calibration rows split for `auto`: the layers are reconstructed on one part and
every candidate recipe is scored on the other, so the budget holds on rows not fitted to;
of the scored rows, a part the search never sees confirms the recipe it chose
(`confirmation_split`), so the figure printed was measured on rows the choice never saw."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# Fraction of the calibration rows `auto` holds out from reconstruction to score recipes on.
HOLD_OUT = 0.5
# Fraction of the scored rows kept from the search to measure the chosen recipe on.
CONFIRM = 1 / 3


@dataclass
class CalibrationSplit:
    """The calibration rows split for `auto`: reconstruct on one part, score the budget on the other."""

    reconstruction: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    reconstruction_labels: np.ndarray | None
    held_out_labels: np.ndarray | None
    reconstruction_rows: np.ndarray  # row numbers in the calibration set, increasing
    held_out_rows: np.ndarray


def split_calibration(inputs: dict[str, np.ndarray], labels: np.ndarray | None = None,
                      seed: int = 0, hold_out: float = HOLD_OUT,
                      marked: np.ndarray | None = None) -> CalibrationSplit | None:
    """A seeded split of the calibration rows: round(hold_out * n) rows held out, the rest reconstruct;
    or, given `marked` (the file's `held_out` booleans), exactly the marked rows held out.

    Any rows run on any model (`eiec.ortrun` pads a fixed batch), so the split is the same
    whatever batch the model declares. Deterministic in (number of rows, seed); each part
    keeps the rows' order. None when there are fewer than two rows (nothing to hold out).
    """
    n = next(iter(inputs.values())).shape[0]
    if n < 2:
        return None
    if marked is not None:
        rec, out = np.flatnonzero(~marked), np.flatnonzero(marked)
    else:
        rec, out = _seeded_parts(n, min(n - 1, max(1, int(round(hold_out * n)))), [seed, 0x5E1D])
    (x_rec, y_rec), (x_out, y_out) = _pick(inputs, labels, rec), _pick(inputs, labels, out)
    return CalibrationSplit(x_rec, x_out, y_rec, y_out, rec, out)


@dataclass
class ConfirmationSplit:
    """The scored rows split: the search chooses on `selection`, the choice is measured on `confirmation`."""

    selection: dict[str, np.ndarray]
    confirmation: dict[str, np.ndarray]
    selection_labels: np.ndarray | None
    confirmation_labels: np.ndarray | None


def confirmation_split(inputs: dict[str, np.ndarray], labels: np.ndarray | None = None, seed: int = 0,
                       confirm: float = CONFIRM) -> ConfirmationSplit | None:
    """A seeded split of the scored rows: round(confirm * n) rows (at least one) confirm, the
    rest select; None when there are fewer than three rows (one row selects nothing).
    Deterministic in (number of rows, seed); each part keeps the rows' order."""
    n = next(iter(inputs.values())).shape[0]
    if n < 3:
        return None
    sel, conf = _seeded_parts(n, min(n - 2, max(1, int(round(confirm * n)))), [seed, 0xC0F1])
    (x_sel, y_sel), (x_conf, y_conf) = _pick(inputs, labels, sel), _pick(inputs, labels, conf)
    return ConfirmationSplit(x_sel, x_conf, y_sel, y_conf)


def _seeded_parts(n: int, held: int, seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers 0..n-1 split by a seeded permutation: (the rest, `held` of them), each increasing."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[held:]), np.sort(perm[:held])


def _pick(inputs: dict[str, np.ndarray], labels: np.ndarray | None,
          rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    return {k: v[rows] for k, v in inputs.items()}, None if labels is None else labels[rows]
