"""Transformer blocks and recurrent models built with onnx.helper, the way exporters write them.

Weights are on `helpers.LEVELS` at 30 % density, so a 4-bit codebook holds them without
loss and a compiled model must match the original to fixed-point precision.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from typing import Callable

from helpers import lossless_weights, make_model, tensor

Weights = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


def _c(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=onnx.numpy_helper.from_array(np.asarray(value), name))


def transformer_block(decoder: bool = False, opset: int = 17, batch: int | str = 1, tokens: int = 5,
                      d_model: int = 16, heads: int = 2, ffn: int = 32, fused_qkv: bool = True,
                      seed: int = 0, weights: Weights | None = None) -> onnx.ModelProto:
    """A post-LN encoder layer (torch.nn.TransformerEncoderLayer's graph: Q/K/V/out
    projections, attention, residual + LayerNorm, Linear -> ReLU -> Linear, residual +
    LayerNorm); `decoder` adds a causal mask to the attention scores (GPT-style block).
    Linear layers are MatMul(x, W^T) + Add(b) on [batch, tokens, d_model], as torch
    writes them; Q/K/V are one [d, 3d] MatMul split in three (torch's fused in_proj), or
    three MatMuls (`fused_qkv=False`, as Hugging Face models write them). `weights(rng,
    shape)` draws each matrix (default: lossless ones)."""
    rng = np.random.default_rng(seed)
    d, dh = d_model, d_model // heads
    w = lambda *s: (weights or lossless_weights)(rng, s)  # noqa: E731
    inits = {"in_proj.w": w(d, 3 * d), "in_proj.b": rng.choice([-0.5, 0.0, 0.5], 3 * d).astype(np.float32),
             "out_proj.w": w(d, d), "out_proj.b": np.zeros(d, np.float32),
             "linear1.w": w(d, ffn), "linear1.b": np.full(ffn, 0.25, np.float32),
             "linear2.w": w(ffn, d), "linear2.b": np.zeros(d, np.float32),
             "ln1.g": np.ones(d, np.float32), "ln1.b": np.zeros(d, np.float32),
             "ln2.g": np.ones(d, np.float32), "ln2.b": np.zeros(d, np.float32),
             "heads_shape": np.array([0, 0, heads, dh], np.int64), "merge_shape": np.array([0, 0, d], np.int64),
             "scale": np.array(1 / np.sqrt(dh), np.float32)}
    if fused_qkv:
        split = ([helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=-1, name="split")] if opset < 13 else
                 [helper.make_node("Split", ["qkv", "split_sizes"], ["q", "k", "v"], axis=-1, name="split")])
        if opset >= 13:
            inits["split_sizes"] = np.array([d, d, d], np.int64)
        nodes = [helper.make_node("MatMul", ["x", "in_proj.w"], ["qkv0"], name="in_proj"),
                 helper.make_node("Add", ["in_proj.b", "qkv0"], ["qkv"], name="in_proj_add"), *split]
    else:  # Hugging Face's separate query/key/value Linear layers
        wqkv, bqkv = inits.pop("in_proj.w"), inits.pop("in_proj.b")
        nodes = []
        for i, t in enumerate("qkv"):
            inits[f"{t}.w"], inits[f"{t}.b"] = wqkv[:, i * d:(i + 1) * d], bqkv[i * d:(i + 1) * d]
            nodes += [helper.make_node("MatMul", ["x", f"{t}.w"], [f"{t}0"], name=f"{t}_proj"),
                      helper.make_node("Add", [f"{t}0", f"{t}.b"], [t], name=f"{t}_proj_add")]
    for t in "qkv":
        nodes += [helper.make_node("Reshape", [t, "heads_shape"], [f"{t}4"], name=f"{t}_heads"),
                  helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_t",
                                   perm=[0, 2, 3, 1] if t == "k" else [0, 2, 1, 3])]
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["scores0"], name="qk"),
              helper.make_node("Mul", ["scores0", "scale"], ["scores1"], name="scale")]
    scores = "scores1"
    if decoder:
        inits["causal"] = np.triu(np.full((tokens, tokens), -1e4, np.float32), 1)
        nodes.append(helper.make_node("Add", ["scores1", "causal"], ["scores2"], name="mask"))
        scores = "scores2"
    nodes += [helper.make_node("Softmax", [scores], ["attn"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["attn", "vh"], ["ctx4"], name="pv"),
              helper.make_node("Transpose", ["ctx4"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx_t"),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx"], name="merge"),
              helper.make_node("MatMul", ["ctx", "out_proj.w"], ["o0"], name="out_proj"),
              helper.make_node("Add", ["o0", "out_proj.b"], ["o"], name="out_proj_add"),
              helper.make_node("Add", ["x", "o"], ["r1"], name="residual1"),
              *_layer_norm("r1", "ln1", "h1", opset),
              helper.make_node("MatMul", ["h1", "linear1.w"], ["f0"], name="linear1"),
              helper.make_node("Add", ["f0", "linear1.b"], ["f1"], name="linear1_add"),
              helper.make_node("Relu", ["f1"], ["f2"], name="relu"),
              helper.make_node("MatMul", ["f2", "linear2.w"], ["f3"], name="linear2"),
              helper.make_node("Add", ["f3", "linear2.b"], ["f4"], name="linear2_add"),
              helper.make_node("Add", ["h1", "f4"], ["r2"], name="residual2"),
              *_layer_norm("r2", "ln2", "y", opset)]
    return make_model(nodes, [tensor("x", [batch, tokens, d])], [tensor("y", [batch, tokens, d])], inits, opset,
                      name="decoder_block" if decoder else "encoder_block")


def _layer_norm(x: str, p: str, y: str, opset: int) -> list[onnx.NodeProto]:
    """LayerNormalization (opset 17+), or the ReduceMean/Sub/Pow/Sqrt/Div form older exports write."""
    if opset >= 17:
        return [helper.make_node("LayerNormalization", [x, f"{p}.g", f"{p}.b"], [y], axis=-1, epsilon=1e-5,
                                 name=p)]
    axes = {"axes": [-1]} if opset < 18 else {}
    return [helper.make_node("ReduceMean", [x], [f"{p}.mu"], name=f"{p}.mean", **axes),
            helper.make_node("Sub", [x, f"{p}.mu"], [f"{p}.xc"], name=f"{p}.sub"),
            helper.make_node("Mul", [f"{p}.xc", f"{p}.xc"], [f"{p}.sq"], name=f"{p}.sq"),
            helper.make_node("ReduceMean", [f"{p}.sq"], [f"{p}.var"], name=f"{p}.var", **axes),
            _c(f"{p}.eps", np.float32(1e-5)),
            helper.make_node("Add", [f"{p}.var", f"{p}.eps"], [f"{p}.ve"], name=f"{p}.add_eps"),
            helper.make_node("Sqrt", [f"{p}.ve"], [f"{p}.sd"], name=f"{p}.sqrt"),
            helper.make_node("Div", [f"{p}.xc", f"{p}.sd"], [f"{p}.n"], name=f"{p}.div"),
            helper.make_node("Mul", [f"{p}.n", f"{p}.g"], [f"{p}.ng"], name=f"{p}.gamma"),
            helper.make_node("Add", [f"{p}.ng", f"{p}.b"], [y], name=f"{p}.beta")]


GATE_COUNT = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent(op: str = "LSTM", direction: str = "forward", opset: int = 17, batch: int | str = 1,
              steps: int = 4, inputs: int = 6, hidden: int = 8, batch_first: bool = True,
              initial_state: bool = False, seq_lens: bool = False, peepholes: bool = False,
              extra: dict | None = None, seed: int = 0, weights: Weights | None = None,
              head: bool = True) -> onnx.ModelProto:
    """One ONNX LSTM/GRU/RNN layer, then a Linear head on every step's output.

    `batch_first` writes what torch.onnx.export does for `nn.LSTM(batch_first=True)`:
    x [batch, steps, inputs] transposed to the op's [steps, batch, inputs]; else x is
    [steps, batch, inputs] (`batch_first=False`). Initial states and sequence lengths
    are constants (graph inputs of int type cannot be drawn at random). `extra`: more
    attributes (activations, clip, linear_before_reset, input_forget). `weights(rng, shape)`
    draws W and R (default: lossless ones, halved); without `head` the outputs are Y and Y_h."""
    rng = np.random.default_rng(seed)
    draw = weights or (lambda r, shape: lossless_weights(r, shape) / 2)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATE_COUNT[op] * hidden
    bsz = batch if isinstance(batch, int) else 2
    inits = {"W": draw(rng, (dirs, g, inputs)), "R": draw(rng, (dirs, g, hidden)),
             "B": rng.choice([-0.25, 0.0, 0.25], (dirs, 2 * g)).astype(np.float32),
             "head.w": lossless_weights(rng, (dirs * hidden, 3)), "head.b": np.full(3, 0.5, np.float32)}
    names = ["xt" if batch_first else "x", "W", "R", "B", "", "", "", ""]
    if seq_lens:
        inits["seq"] = np.array([steps, max(1, steps - 2)][:bsz] + [steps] * max(0, bsz - 2), np.int32)
        names[4] = "seq"
    if initial_state:
        shape = (dirs, bsz, hidden)
        inits["h0"] = rng.choice([-0.5, 0.0, 0.5], shape).astype(np.float32)
        names[5] = "h0"
        if op == "LSTM":
            inits["c0"] = rng.choice([-0.5, 0.0, 0.5], shape).astype(np.float32)
            names[6] = "c0"
    if peepholes:
        inits["P"] = rng.choice([-0.25, 0.25], (dirs, 3 * hidden)).astype(np.float32)
        names[7] = "P"
    while names and not names[-1]:
        names.pop()
    attrs = {"hidden_size": hidden, "direction": direction, **(extra or {})}
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    nodes = []
    if batch_first:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time_major"))
    nodes.append(helper.make_node(op, names, outputs, name=op.lower(), **attrs))
    in_shape = [batch, steps, inputs] if batch_first else [steps, batch, inputs]
    if not head:
        del inits["head.w"], inits["head.b"]
        return make_model(nodes, [tensor("x", in_shape)], [tensor("Y", [steps, dirs, batch, hidden]),
                                                           tensor("Y_h", [dirs, batch, hidden])],
                          inits, opset, name=f"{op.lower()}_{direction}")
    # Y [T, dirs, B, H] -> [B, T, dirs * H] -> head
    inits["flat"] = np.array([0, 0, dirs * hidden], np.int64)
    nodes += [helper.make_node("Transpose", ["Y"], ["Yt"], perm=[2, 0, 1, 3], name="batch_major"),
              helper.make_node("Reshape", ["Yt", "flat"], ["feat"], name="merge_dirs")]
    nodes += [helper.make_node("MatMul", ["feat", "head.w"], ["logits0"], name="head"),
              helper.make_node("Add", ["logits0", "head.b"], ["y"], name="head_add")]
    outs = [tensor("y", [batch, steps, 3]), tensor("Y_h", [dirs, batch, hidden])]
    return make_model(nodes, [tensor("x", in_shape)], outs, inits, opset, name=f"{op.lower()}_{direction}")
