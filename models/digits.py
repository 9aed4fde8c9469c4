"""The digits data every shipped model is trained and evaluated on.

scikit-learn's 8x8 digits (1797 images, values 0..16) upsampled to MNIST's 28x28, scaled to
[0, 1] float32 and flattened to 784, split deterministically into disjoint train/calib/test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.datasets import load_digits

SEED = 20160204  # fixed: the split (and so every shipped file) must not change between runs
SIDE = 28
N_CALIB = 300
N_TEST = 300
HERE = Path(__file__).resolve().parent


def upsample(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8] in 0..16 -> [N, 784] float32 in [0, 1] (bilinear, deterministic)."""
    factor = SIDE / images.shape[1]
    # zoom over the two image axes only; order=1 (bilinear) never overshoots [0, 16]
    big = ndimage.zoom(images.astype(np.float64), (1.0, factor, factor), order=1)
    big = np.clip(big / 16.0, 0.0, 1.0).astype(np.float32)
    return big.reshape(len(images), SIDE * SIDE)


def load_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "calib", "test"} -> (inputs float32 [N, 784], labels int64 [N]); disjoint."""
    digits = load_digits()
    x = upsample(digits.images)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    test, calib, train = np.split(order, [N_TEST, N_TEST + N_CALIB])
    parts = {"train": train, "calib": calib, "test": test}
    splits = {name: (x[idx], y[idx]) for name, idx in parts.items()}
    # the image set has no duplicate rows, so index-disjoint splits are row-disjoint; check it
    rows = np.concatenate([s[0] for s in splits.values()])
    if len(np.unique(rows, axis=0)) != len(rows):
        raise RuntimeError("digits splits share identical rows")
    return splits


def calibration_rows(n: int, splits: dict | None = None) -> dict[str, np.ndarray]:
    """n calibration rows, never test rows: the first n calibration rows; past 300, all of them
    then training rows, with `held_out` marking the 300 the models never trained on (eiec's
    `auto` scores on those and reconstructs on the training rows: scored on training rows, whose
    margins training widened, its estimate would promise too much)."""
    splits = splits or load_splits()
    (xc, yc), (xt, yt) = splits["calib"], splits["train"]
    if n <= len(xc):
        return {"input": xc[:n], "labels": yc[:n]}
    if n > len(xc) + len(xt):
        raise ValueError(f"the digits set has {len(xc) + len(xt)} rows outside the test split, not {n}")
    extra = n - len(xc)
    return {"input": np.concatenate([xc, xt[:extra]]), "labels": np.concatenate([yc, yt[:extra]]),
            "held_out": np.arange(n) < len(xc)}


def save_npz(out_dir: Path = HERE) -> None:
    """Write digits_calib.npz, digits_calib1000.npz and digits_test.npz ("input" float32 [N, 784],
    "labels" int64; digits_calib1000.npz also "held_out", see `calibration_rows`)."""
    splits = load_splits()
    for name in ("calib", "test"):
        x, y = splits[name]
        np.savez(out_dir / f"digits_{name}.npz", input=x, labels=y)
    np.savez_compressed(out_dir / "digits_calib1000.npz", **calibration_rows(1000, splits))


if __name__ == "__main__":
    save_npz()
    for name, (x, y) in load_splits().items():
        print(f"{name}: {x.shape} {x.dtype}, labels {np.bincount(y, minlength=10).tolist()}")
