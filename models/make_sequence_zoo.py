"""Export small PyTorch sequence models as torch.onnx.export writes them by default.

Needs torch: `/work/torchenv/bin/python models/make_sequence_zoo.py`. Writes
tests/models/sequence_{encoder,decoder,lstm,gru}.onnx: fixed batch 1 (the exporter's default:
no dynamic axes), opset 17, input "input" [1, tokens, features], output "output". Every
weight matrix is on the 14 levels +-0.25 .. +-1.75 at 30 % density and every bias a
multiple of 0.25, so a 4-bit codebook holds them without loss (tests/helpers.py, LEVELS).
Each export is checked against torch in onnxruntime.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from make_lenet5 import HERE, ort_run, seed_everything

OUT_DIR = HERE.parent / "tests" / "models"
SEED = 23
LEVELS = np.array([k * 0.25 for k in range(-7, 8) if k != 0], np.float32)
TOKENS, FEATURES = 5, 16


class Block(nn.Module):
    """torch's TransformerEncoderLayer (post-LN, ReLU FFN), causal when `decoder`, then a Linear head."""

    def __init__(self, decoder: bool) -> None:
        super().__init__()
        self.decoder = decoder
        self.layer = nn.TransformerEncoderLayer(FEATURES, nhead=2, dim_feedforward=32, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(FEATURES, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.decoder else None
        return self.head(self.layer(x, src_mask=mask))


class Recurrent(nn.Module):
    """nn.LSTM / nn.GRU (batch_first), every step's output through a Linear head."""

    def __init__(self, cls: type[nn.Module], bidirectional: bool) -> None:
        super().__init__()
        self.rnn = cls(FEATURES, 8, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(16 if bidirectional else 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


ZOO = {
    "sequence_encoder": lambda: Block(decoder=False),
    "sequence_decoder": lambda: Block(decoder=True),
    "sequence_lstm": lambda: Recurrent(nn.LSTM, bidirectional=False),
    "sequence_gru": lambda: Recurrent(nn.GRU, bidirectional=True),
}


def lossless(model: nn.Module, rng: np.random.Generator) -> None:
    """Every matrix on LEVELS at 30 % density, every vector (bias, LayerNorm) a multiple of 0.25."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                w = np.where(rng.random(p.shape) < 0.3, rng.choice(LEVELS, p.shape), 0).astype(np.float32)
            elif "norm" in name and name.endswith("weight"):
                w = np.ones(p.shape, np.float32)
            else:
                w = rng.choice([-0.5, -0.25, 0.0, 0.25, 0.5], p.shape).astype(np.float32)
            p.copy_(torch.from_numpy(w / 2))


def make(name: str, out_dir: Path = OUT_DIR) -> Path:
    seed_everything(SEED)
    model = ZOO[name]().eval()
    lossless(model, np.random.default_rng([SEED, list(ZOO).index(name)]))
    x = torch.randn(1, TOKENS, FEATURES)
    path = out_dir / f"{name}.onnx"
    buf = io.BytesIO()
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["output"])  # no dynamic_axes: batch 1, as the exporter writes by default
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    with torch.no_grad():
        ref = model(x).numpy()
    err = float(np.abs(ort_run(path, x.numpy()) - ref).max())
    ops = sorted({n.op_type for n in proto.graph.node})
    print(f"{path.name}: {path.stat().st_size} bytes, max |ort - torch| {err:.1e}, ops {ops}")
    if err > 1e-4:
        raise RuntimeError(f"{name}: onnxruntime disagrees with torch by {err}")
    return path


def main() -> None:
    for name in ZOO:
        make(name)


if __name__ == "__main__":
    main()
