"""Train LeNet-5 (Deep Compression's Caffe variant, with ReLUs) on digits and export it to ONNX.

Needs torch, which the project venv does not have: run with a separate venv,
`/work/torchenv/bin/python models/make_lenet5.py`. Writes models/lenet5.onnx; prints
onnxruntime accuracy. `export_torch` is shared with make_zoo.py.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from digits import HERE, load_splits

OUT = HERE / "lenet5.onnx"
SEED = 5
EPOCHS = 12
BATCH = 64


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # one thread: reductions then run in a fixed order, so the weights are bit-reproducible
    torch.set_num_threads(1)


class LeNet5(nn.Module):
    """conv20@5x5-relu-pool, conv50@5x5-relu-pool, fc500-relu, fc10 on a flat [N, 784] input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}: loss {total / len(xt):.4f}")
    return model.eval()


def export_torch(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    output_name: str = "logits",
    fold_constants: bool = True,
) -> onnx.ModelProto:
    """Export with the TorchScript exporter: opset 17, input "input", dynamic batch dim 0."""
    model.eval()
    buf = io.BytesIO()
    # the legacy exporter is deprecated but kept on purpose: it writes plain Gemm/Conv graphs
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
    torch.onnx.export(
        model,
        (example,),
        buf,
        dynamo=False,  # the torch.export-based exporter needs onnxscript and adds noise nodes
        opset_version=17,
        input_names=["input"],
        output_names=[output_name],
        dynamic_axes={"input": {0: "N"}, output_name: {0: "N"}},
        do_constant_folding=fold_constants,
        training=torch.onnx.TrainingMode.EVAL,
    )
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    return proto


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def main() -> None:
    seed_everything(SEED)
    splits = load_splits()
    model = train(LeNet5(), *splits["train"], epochs=EPOCHS, seed=SEED)
    export_torch(model, torch.from_numpy(splits["test"][0][:2]), OUT)
    with torch.no_grad():
        x_train, y_train = splits["train"]
        train_acc = float((model(torch.from_numpy(x_train)).argmax(1).numpy() == y_train).mean())
    print(f"torch train accuracy: {train_acc:.4f}")
    for name in ("calib", "test"):
        x, y = splits[name]
        logits = ort_run(OUT, x)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        print(f"onnxruntime {name} accuracy: {(logits.argmax(1) == y).mean():.4f}"
              f" (max |ort - torch| {np.abs(logits - ref).max():.2e})")
    ops = sorted({n.op_type for n in onnx.load(OUT).graph.node})
    print(f"wrote {OUT.name} ({OUT.stat().st_size} bytes), ops: {ops}")


if __name__ == "__main__":
    main()
