"""Train LeNet-300-100 (scikit-learn MLP) on the digits train split and export it to ONNX.

Run with the project venv: `.venv/bin/python models/make_lenet_300_100.py`. Writes
models/lenet_300_100.onnx and (re)writes the digits npz files; prints onnxruntime accuracy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from digits import HERE, load_splits, save_npz

OUT = HERE / "lenet_300_100.onnx"


def train(x: np.ndarray, y: np.ndarray) -> MLPClassifier:
    clf = MLPClassifier(
        hidden_layer_sizes=(300, 100),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        batch_size=64,
        learning_rate_init=1e-3,
        max_iter=200,
        random_state=0,
    )
    with warnings.catch_warnings():
        # training loss stops improving well before max_iter; an unconverged run is an error
        warnings.simplefilter("error", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def export(clf: MLPClassifier, path: Path) -> onnx.ModelProto:
    # zipmap=False: "probabilities" is a plain float tensor [N, 10] instead of a list of maps
    model = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 784]))],
        target_opset={"": 17, "ai.onnx.ml": 3},
        options={id(clf): {"zipmap": False}},
    )
    model.graph.name = "lenet_300_100"
    model.doc_string = "LeNet-300-100 (sklearn MLPClassifier) on 28x28 upsampled sklearn digits"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return model


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probabilities"], {"input": x})
    return float((probs.argmax(axis=1) == y).mean())


def main() -> None:
    save_npz()
    splits = load_splits()
    clf = train(*splits["train"])
    export(clf, OUT)
    print(f"iterations: {clf.n_iter_}, final loss: {clf.loss_:.5f}")
    print(f"sklearn train accuracy: {clf.score(*splits['train']):.4f}")
    for name in ("calib", "test"):
        print(f"onnxruntime {name} accuracy: {ort_accuracy(OUT, *splits[name]):.4f}")
    ops = sorted({n.op_type for n in onnx.load(OUT).graph.node})
    print(f"wrote {OUT.name} ({OUT.stat().st_size} bytes), ops: {ops}")


if __name__ == "__main__":
    main()
