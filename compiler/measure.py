"""Measuring a compressed model against the original on the same rows: relative output
error, accuracy lost, and the expected accuracy drop on new rows with its upper confidence
bound. What `auto` budgets (eiec.passes.auto) and what `eiec validate` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# The budget is checked against a one-sided upper confidence bound of the held-out estimate:
# BOOTSTRAP resamples (seeded) of the scored rows, the CONFIDENCE quantile of the estimate.
CONFIDENCE = 0.9
BOOTSTRAP = 200


def class_scores(outputs: list[np.ndarray]) -> np.ndarray | None:
    """Per row, the model's class scores (float64 [rows, classes]), or None when no output has them.

    The first float output with more than one value per row; rows of probabilities
    (non-negative, summing to 1, as a final Softmax gives) become their logs, so a margin
    is a log-odds ratio whichever way the model ends (a skl2onnx classifier's `label` output
    comes first and is skipped, its `probabilities` are used).
    """
    for y in outputs:
        y = np.asarray(y)
        if np.issubdtype(y.dtype, np.floating) and y.ndim >= 2 and y[0].size > 1:
            f = y.reshape(y.shape[0], -1).astype(np.float64)
            if f.min(initial=0.0) >= 0 and np.allclose(f.sum(axis=1), 1.0, atol=1e-3):
                f = np.log(np.maximum(f, 1e-30))
            return f
    return None


def label_margins(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, the label's score minus the best other class's: > 0 exactly when the row is right."""
    rows = np.arange(scores.shape[0])
    other = scores.copy()
    other[rows, labels] = -np.inf
    return scores[rows, labels] - other.max(axis=1)


def expected_drop(margins: np.ndarray, shifts: np.ndarray) -> float:
    """Accuracy points a compressed model is expected to lose on new rows (net: gains offset losses).

    margins: the original model's label margins on the scored rows; shifts: how much the
    compressed model moved each of them. A new row's margin is modelled as one of the
    margins plus one of the shifts, drawn independently: expected accuracy = the fraction
    of all n^2 (margin, shift) pairs whose sum is > 0. Pairing every row's margin with
    every row's shift turns n yes/no outcomes into n^2 graded ones: a shift that would flip
    a row with a thinner margin counts, even when no scored row was that close.
    """
    s = np.sort(shifts)
    right = 1.0 - np.searchsorted(s, -margins, side="right") / s.size
    return 100.0 * (float(np.mean(margins > 0)) - float(np.mean(right)))


def upper_bound(statistic: Callable[[np.ndarray], float], n: int, seed: int = 0) -> float:
    """The CONFIDENCE quantile of `statistic(rows)` over BOOTSTRAP seeded resamples of n rows."""
    rng = np.random.default_rng([seed, 0xB007])
    values = [statistic(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]
    return float(np.quantile(values, CONFIDENCE))


@dataclass(frozen=True)
class Score:
    """A model's outputs against the original's on the scored rows."""

    error: float  # ||y - y_ref|| / ||y_ref|| over all float outputs
    error_bound: float = 0.0  # its upper confidence bound over the rows (`upper_bound`)
    accuracy_drop: float | None = None  # accuracy points (percent) lost, net, counted on these rows (with labels)
    # points of the rows the original got right and this model gets wrong (gains do not offset)
    accuracy_lost: float | None = None
    rows_lost: int | None = None  # the same, counted in rows
    drop_estimate: float | None = None  # `expected_drop`: points expected lost on new rows
    drop_bound: float | None = None  # its upper confidence bound (what an accuracy budget is checked on)

    def value(self, metric: str) -> tuple[float, float]:
        """(estimate, upper bound) of the budgeted measure: "accuracy" points or relative output "error"."""
        return (self.drop_estimate, self.drop_bound) if metric == "accuracy" else (self.error, self.error_bound)


def top1_correct(outputs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Per row, is the first output's top-1 right: its argmax, or its value when it is an
    integer label per row (skl2onnx classifiers put `label` before `probabilities`)."""
    y = outputs[0]
    flat = y.reshape(y.shape[0], -1)
    pred = flat[:, 0] if np.issubdtype(y.dtype, np.integer) and flat.shape[1] == 1 else flat.argmax(axis=1)
    return pred == labels


def _margins(outputs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Label margins (`label_margins`); +-1 (right / wrong) when no output has class scores."""
    scores = class_scores(outputs)
    if scores is None or scores.shape[1] <= int(labels.max(initial=0)):
        return np.where(top1_correct(outputs, labels), 1.0, -1.0)
    return label_margins(scores, labels)


def measure(reference: list[np.ndarray], outputs: list[np.ndarray], labels: np.ndarray | None = None) -> Score:
    """A compressed model's `outputs` against the original's `reference` on the same rows (with their
    `labels`, if any): what `auto` budgets and what `eiec validate` prints."""
    n = reference[0].shape[0]
    # per-row outputs only: a recurrent node's final state Y_h [directions, batch, hidden] has no row axis
    pairs = [(np.asarray(y, np.float64), np.asarray(r, np.float64)) for y, r in zip(outputs, reference)
             if np.issubdtype(r.dtype, np.floating) and r.shape[:1] == (n,)]
    num = np.zeros(n) + sum(np.sum(((y - r) ** 2).reshape(n, -1), axis=1) for y, r in pairs)
    den = np.zeros(n) + sum(np.sum((r**2).reshape(n, -1), axis=1) for _, r in pairs)

    def rel(rows: np.ndarray) -> float:
        d = den[rows].sum()
        return float(np.sqrt(num[rows].sum() / d)) if d > 0 else float(np.sqrt(num[rows].sum()))

    error = rel(np.arange(n))
    error_bound = upper_bound(rel, n) if np.isfinite(error) else np.inf
    if labels is None:
        return Score(error, error_bound)
    ref_correct, correct = top1_correct(reference, labels), top1_correct(outputs, labels)
    drop = 100.0 * (float(np.mean(ref_correct)) - float(np.mean(correct)))
    lost_rows = int(np.count_nonzero(ref_correct & ~correct))
    a = _margins(reference, labels)
    shift = _margins(outputs, labels) - a
    if not np.all(np.isfinite(shift)):
        estimate = bound = np.inf
    else:
        estimate = expected_drop(a, shift)
        bound = upper_bound(lambda rows: expected_drop(a[rows], shift[rows]), n)
    return Score(error, error_bound, drop, 100.0 * lost_rows / n, lost_rows, estimate, bound)
