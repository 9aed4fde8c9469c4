"""Export width-reduced torchvision architectures the way users export them: the test corpus.

Needs torch and torchvision (the `models` extra; see models/README.md for the venv):
`/work/torchenv/bin/python tests/models/make_corpus.py`. Writes tests/models/tv_*.onnx and
checks each in onnxruntime against torch.

Every file is what `torch.onnx.export(model, (x,), path, ...)` writes with no names and no
`dynamic_axes`: one input of fixed shape [1, 3, 64, 64], one output [1, 10]. The four
architectures go through the TorchScript exporter (`dynamo=False`, opset 20, its default,
which folds each BatchNormalization into its conv); one more goes through the dynamo
exporter (`dynamo=True`, the default since torch 2.9, which keeps BatchNormalization
nodes), and one more through the TorchScript exporter at opset 11 (no HardSwish op: it
writes HardSigmoid and Mul). Random weights with a fixed seed, shrunk in width to keep
each file small; BatchNorm gets the exact running statistics of a few random batches
(train mode, cumulative average), so eval-mode BN is far from an identity.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torchvision.models import mobilenet_v3_small
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.squeezenet import Fire, SqueezeNet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "models"))
from make_lenet5 import seed_everything  # noqa: E402  (models/ is not a package)

SEED = 11
SHAPE = (1, 3, 64, 64)
CLASSES = 10
WARMUP_BATCHES = 4  # train-mode batches of 8 whose statistics BatchNorm keeps


class NarrowResNet18(ResNet):
    """torchvision's ResNet-18 (BasicBlock x [2, 2, 2, 2]) with widths w..8w instead of 64..512."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        # rebuild every width-dependent part with torchvision's own _make_layer; forward is ResNet's
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 2, stride=2)
        self.fc = nn.Linear(8 * width, num_classes)


def narrow_squeezenet1_1(divisor: int, num_classes: int) -> SqueezeNet:
    """torchvision's SqueezeNet 1.1 with every conv's channel count divided by `divisor`."""
    model = SqueezeNet("1_1", num_classes=num_classes)
    d = divisor
    layers: list[nn.Module] = []
    for m in model.features:
        if isinstance(m, nn.Conv2d):  # the stem: keep its 3 input channels
            m = nn.Conv2d(m.in_channels, m.out_channels // d, m.kernel_size, m.stride)
        elif isinstance(m, Fire):
            m = Fire(m.inplanes // d, m.squeeze.out_channels // d,
                     m.expand1x1.out_channels // d, m.expand3x3.out_channels // d)
        layers.append(m)
    model.features = nn.Sequential(*layers)
    final = model.classifier[1] = nn.Conv2d(512 // d, num_classes, kernel_size=1)
    # SqueezeNet's own initialisation (it has no BatchNorm: with torch's default init the
    # activations die out and the output is its bias, the same for every input)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01) if m is final else nn.init.kaiming_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def narrow_efficientnet_b0(width_mult: float, depth_mult: float, num_classes: int) -> EfficientNet:
    """torchvision's EfficientNet-B0 block table at other width and depth multipliers."""
    setting, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=width_mult, depth_mult=depth_mult)
    return EfficientNet(setting, dropout=0.2, last_channel=last_channel, num_classes=num_classes)


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v3_small": lambda: mobilenet_v3_small(width_mult=0.25, num_classes=CLASSES),
    "resnet18": lambda: NarrowResNet18(width=8, num_classes=CLASSES),
    "squeezenet1_1": lambda: narrow_squeezenet1_1(divisor=4, num_classes=CLASSES),
    "efficientnet_b0": lambda: narrow_efficientnet_b0(0.2, 0.5, CLASSES),
}
# file stem -> (architecture, exporter options beyond the defaults)
CORPUS: dict[str, tuple[str, dict]] = {
    "tv_mobilenet_v3_small": ("mobilenet_v3_small", {"dynamo": False}),
    "tv_resnet18": ("resnet18", {"dynamo": False}),
    "tv_squeezenet1_1": ("squeezenet1_1", {"dynamo": False}),
    "tv_efficientnet_b0": ("efficientnet_b0", {"dynamo": False}),
    "tv_efficientnet_b0_dynamo": ("efficientnet_b0", {"dynamo": True}),
    "tv_mobilenet_v3_small_opset11": ("mobilenet_v3_small", {"dynamo": False, "opset_version": 11}),
}


def build(arch: str, gen: torch.Generator) -> nn.Module:
    """The architecture with fixed-seed weights and BatchNorm statistics of random batches."""
    model = ARCHS[arch]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the running stats are the batches' exact ones
    model.train()
    with torch.no_grad():
        for _ in range(WARMUP_BATCHES):
            model(torch.randn(8, *SHAPE[1:], generator=gen))
    return model.eval()


def export(model: nn.Module, x: torch.Tensor, options: dict) -> onnx.ModelProto:
    """torch.onnx.export with only `options` set: what a user gets, in memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if options.get("dynamo"):
            program = torch.onnx.export(model, (x,), **options)
            return program.model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, **options)
    return onnx.load_from_string(buf.getvalue())


def make(stem: str, out_dir: Path = HERE) -> Path:
    arch, options = CORPUS[stem]
    seed_everything(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = build(arch, gen)
    proto = export(model, torch.randn(*SHAPE, generator=gen), options)
    onnx.checker.check_model(proto, full_check=True)
    path = out_dir / f"{stem}.onnx"
    onnx.save(proto, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    err = 0.0
    for _ in range(3):
        x = torch.randn(*SHAPE, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        err = max(err, float(np.abs(sess.run(None, {name: x.numpy()})[0] - ref).max()))
    ops = sorted({n.op_type for n in proto.graph.node})
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    params = sum(p.numel() for p in model.parameters())
    print(f"{path.name}: opset {opset}, input {name} {list(SHAPE)}, {params:,} parameters, "
          f"{path.stat().st_size:,} bytes, max |ort - torch| {err:.1e}, ops {ops}")
    if err > 1e-4:
        raise RuntimeError(f"{stem}: onnxruntime disagrees with torch by {err}")
    return path


def main() -> None:
    for stem in CORPUS:
        make(stem)


if __name__ == "__main__":
    main()
