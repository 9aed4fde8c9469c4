"""Train a small MobileNetV3 on digits and export it as a user would: models/mobilenet_digits.onnx.

Needs torch and torchvision (the `models` extra): `/work/torchenv/bin/python
models/make_mobilenet_digits.py`. The network is torchvision's MobileNetV3 (its
InvertedResidual blocks: 1x1 expand, depthwise 3x3/5x5, squeeze-excite with HardSigmoid,
1x1 project, BatchNorm everywhere, ReLU and HardSwish) with a block table sized for 28x28
single-channel digits. Trained on the train split only; the export has a fixed batch of 1
(no `dynamic_axes`), the TorchScript exporter's default opset, BatchNorm folded by the
exporter. Prints the onnxruntime accuracy on the calib and test splits.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

from digits import HERE, load_splits
from make_lenet5 import seed_everything

OUT = HERE / "mobilenet_digits.onnx"
SEED = 3
EPOCHS = 30
BATCH = 64
LR = 3e-3

# MobileNetV3-Small's pattern at digit scale: (in, kernel, expanded, out, SE, activation, stride)
BLOCKS = [
    (16, 3, 16, 16, True, "RE", 2),  # 14x14 -> 7x7
    (16, 3, 48, 24, False, "RE", 1),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),  # 7x7 -> 4x4
    (40, 5, 120, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
]
LAST_CHANNEL = 128  # the classifier's hidden width


class MobileNetDigits(nn.Module):
    """[N, 784] in [0, 1] -> logits [N, 10] through torchvision's MobileNetV3 on [N, 1, 28, 28]."""

    def __init__(self) -> None:
        super().__init__()
        setting = [InvertedResidualConfig(i, k, e, o, se, act, s, 1, 1.0) for i, k, e, o, se, act, s in BLOCKS]
        self.net = MobileNetV3(setting, LAST_CHANNEL, num_classes=10, dropout=0.2)
        # a one-channel stem (stride 2: 28x28 -> 14x14) in place of the RGB one
        self.net.features[0][0] = nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, 28, 28))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, gen: torch.Generator) -> nn.Module:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps = EPOCHS * -(-len(xt) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}: loss {total / len(xt):.4f}")
    return recalibrate_bn(model, xt)


def recalibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of the final weights over the whole train split, then eval mode.

    torchvision's MobileNetV3 uses BN momentum 0.01: after a short training the running
    statistics still average over early, different weights (eval-mode train accuracy 94.6 %
    with a training loss of 0.001). A cumulative average over one pass fixes that.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            model(x[i : i + BATCH])
    return model.eval()


def export(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """The TorchScript exporter's defaults (fixed batch, opset 20), with the names digits_*.npz use."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["input"], output_names=["logits"])
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def main() -> None:
    seed_everything(SEED)
    gen = torch.Generator().manual_seed(SEED)
    splits = load_splits()
    model = train(MobileNetDigits(), *splits["train"], gen)
    onnx.save(export(model, torch.from_numpy(splits["test"][0][:1])), OUT)
    sess = ort.InferenceSession(str(OUT), providers=["CPUExecutionProvider"])
    for name in ("train", "calib", "test"):
        x, y = splits[name]
        logits = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        print(f"onnxruntime {name} accuracy: {(logits.argmax(1) == y).mean():.4f}"
              f" (max |ort - torch| {np.abs(logits - ref).max():.2e})")
    params = sum(p.numel() for p in model.parameters())
    ops = sorted({n.op_type for n in onnx.load(OUT).graph.node})
    print(f"wrote {OUT.name} ({OUT.stat().st_size} bytes, {params} parameters), ops: {ops}")


if __name__ == "__main__":
    main()
