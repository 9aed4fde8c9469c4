"""Export small random-init PyTorch models that cover the exporter patterns eiec must import.

Needs torch: `/work/torchenv/bin/python models/make_zoo.py`. Writes tests/models/torch_*.onnx
(opset 17, input "input" with a dynamic batch dim, output "output") and checks each in ORT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from make_lenet5 import HERE, export_torch, ort_run, seed_everything

OUT_DIR = HERE.parent / "tests" / "models"
SEED = 17


class MLP(nn.Module):
    """FCs with and without bias; fc2 feeds fc3 with no ReLU between (negative activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 32, bias=False)
        self.fc3 = nn.Linear(32, 24)
        self.fc4 = nn.Linear(24, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(torch.relu(self.fc1(x)))
        x = torch.relu(self.fc3(x))
        return torch.softmax(self.fc4(x), dim=1)


class ConvNet(nn.Module):
    """Padded conv, strided bias-less conv, max-pool, non-square conv, avg-pool, flatten, FC."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(16, 16, (3, 1), padding=(1, 0))
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))  # 16x16
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)  # 8x8 -> 4x4
        x = nn.functional.avg_pool2d(torch.relu(self.conv3(x)), 2)  # 4x4 -> 2x2
        return self.fc(torch.flatten(x, 1))


class DepthwiseDilated(nn.Module):
    """1x1 conv, depthwise 3x3 (groups=channels), grouped 3x3, dilated 3x3, global pool, FC."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 12, 3, padding=2, dilation=2)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.expand(x))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.dilated(x))
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class ResNetBlock(nn.Module):
    """conv-BN-relu-conv-BN + identity, relu, global pool, FC (BN kept as inference BN)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        y = nn.functional.adaptive_avg_pool2d(y, 1)
        return self.fc(torch.flatten(y, 1))


class Inception(nn.Module):
    """1x1, 1x1->3x3, 1x1->5x5 and maxpool->1x1 branches joined by Concat; pool; FC."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b3_reduce = nn.Conv2d(8, 4, 1)
        self.b3 = nn.Conv2d(4, 6, 3, padding=1)
        self.b5_reduce = nn.Conv2d(8, 2, 1)
        self.b5 = nn.Conv2d(2, 4, 5, padding=2)
        self.bp = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(18, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu
        branches = [
            r(self.b1(x)),
            r(self.b3(r(self.b3_reduce(x)))),
            r(self.b5(r(self.b5_reduce(x)))),
            r(self.bp(nn.functional.max_pool2d(x, 3, stride=1, padding=1))),
        ]
        y = nn.functional.adaptive_avg_pool2d(torch.cat(branches, dim=1), 1)
        return self.fc(torch.flatten(y, 1))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], dim=1)


class FireNet(nn.Module):
    """SqueezeNet in miniature: strided stem, two fire modules, ceil-mode max-pool, conv head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.fire2 = Fire(16, 4, 8)
        self.fire3 = Fire(16, 6, 12)
        self.head = nn.Conv2d(24, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))  # 16x16 -> 8x8
        x = self.fire2(x)
        x = nn.functional.max_pool2d(x, 3, stride=2, ceil_mode=True)  # 8x8 -> 4x4
        x = torch.relu(self.head(self.fire3(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorm non-trivial running stats and affine params so it is not an identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


# name -> (module class, input shape without the batch dim, keep BN unfolded)
ZOO: dict[str, tuple[type[nn.Module], tuple[int, ...], bool]] = {
    "torch_mlp": (MLP, (64,), False),
    "torch_convnet": (ConvNet, (3, 16, 16), False),
    "torch_depthwise_dilated": (DepthwiseDilated, (4, 16, 16), False),
    "torch_resnet_block": (ResNetBlock, (8, 8, 8), True),
    "torch_inception": (Inception, (8, 12, 12), False),
    "torch_fire": (FireNet, (3, 16, 16), False),
}


def make(name: str, out_dir: Path = OUT_DIR) -> Path:
    cls, shape, keep_bn = ZOO[name]
    seed_everything(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = cls().eval()
    with torch.no_grad():
        randomize_bn(model, gen)
    x = torch.randn(3, *shape, generator=gen)
    path = out_dir / f"{name}.onnx"
    # constant folding would fold BN into the conv weights; keep it off where BN must survive
    proto = export_torch(model, x, path, output_name="output", fold_constants=not keep_bn)
    ops = sorted({n.op_type for n in proto.graph.node})
    if keep_bn and "BatchNormalization" not in ops:
        raise RuntimeError(f"{name}: exporter folded BatchNormalization away")
    xb = torch.randn(5, *shape, generator=gen)  # a batch size different from the export's
    with torch.no_grad():
        ref = model(xb).numpy()
    got = ort_run(path, xb.numpy())
    err = float(np.abs(got - ref).max())
    print(f"{path.name}: input [N, {', '.join(map(str, shape))}] -> {list(got.shape[1:])}, "
          f"{path.stat().st_size} bytes, max |ort - torch| {err:.1e}, ops {ops}")
    if err > 1e-4:
        raise RuntimeError(f"{name}: onnxruntime disagrees with torch by {err}")
    return path


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in ZOO:
        make(name)


if __name__ == "__main__":
    main()
