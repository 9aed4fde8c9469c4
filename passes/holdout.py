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
        held = min(n - 1, max(1, int(round(hold_out * n))))
        perm = np.random.default_rng([seed, 0x5E1D]).permutation(n)
        rec, out = np.sort(perm[held:]), np.sort(perm[:held])
    pick = lambda rows: {k: v[rows] for k, v in inputs.items()}
    return CalibrationSplit(pick(rec), pick(out), None if labels is None else labels[rec],
                            None if labels is None else labels[out], rec, out)


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
    held = min(n - 2, max(1, int(round(confirm * n))))
    perm = np.random.default_rng([seed, 0xC0F1]).permutation(n)
    sel, conf = np.sort(perm[held:]), np.sort(perm[:held])
    pick = lambda rows: {k: v[rows] for k, v in inputs.items()}
    return ConfirmationSplit(pick(sel), pick(conf), None if labels is None else labels[sel],
                             None if labels is None else labels[conf])
