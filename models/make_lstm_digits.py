"""Train an LSTM that reads each digit row by row (28 time steps of 28 pixels) and export it.

Needs torch: `/work/torchenv/bin/python models/make_lstm_digits.py`. Writes
models/lstm_digits.onnx: input "input" float32 [1, 784] (a fixed batch, as torch.onnx.export
writes by default; the digits npz files feed it), reshaped to [1, 28, 28], an
nn.LSTM(28 -> 64, batch_first), the last step's hidden state through Linear(64 -> 10) to
"logits". Opset 17, legacy TorchScript exporter (it writes the ONNX LSTM op).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from digits import HERE, load_splits
from make_lenet5 import seed_everything, train

OUT = HERE / "lstm_digits.onnx"
SEED = 28
EPOCHS = 30


class RowLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, 64, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x.view(-1, 28, 28))
        return self.fc(h[-1])


def main() -> None:
    seed_everything(SEED)
    splits = load_splits()
    model = train(RowLSTM(), *splits["train"], epochs=EPOCHS, seed=SEED)
    x_test, y_test = splits["test"]
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    buf = io.BytesIO()
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
    torch.onnx.export(model, (torch.from_numpy(x_test[:1]),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, OUT)
    print(f"{OUT.name}: torch test accuracy {100 * acc:.2f} %, {OUT.stat().st_size} bytes, "
          f"ops {sorted({n.op_type for n in proto.graph.node})}")


if __name__ == "__main__":
    main()
