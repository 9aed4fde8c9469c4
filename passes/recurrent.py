"""Lowering a recurrent node (part of the lower pass): R matrices on the accelerator, the
recurrence on the host, unrolled over the time steps the model was lowered for.

Each recurrent layer (`eiec.recurrent`) becomes a one-layer segment; every time step
calls it through an `EIESegment` node on h(t-1) (r * h(t-1) for a GRU's hidden gate
when `linear_before_reset=0`), and host ops add the step's projected input gates, apply
the activations and update the state, as the ONNX operator defines them (clip,
input_forget, peepholes, sequence_lens, every direction). All steps share
the segment, so the run report's cycles for that layer are cycles per time step.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eiec.errors import ModelError
from eiec.ir import EIE_DOMAIN, Layer, remove_initializer
from eiec.recurrent import GATES, directions, node_attr as attr, roles
from eiec.segment import Segment, blob_name

# ONNX's defaults for each recurrent op's activations (f, g, h), per direction
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# the activations the recurrent ops allow that take alpha and/or beta, with the ONNX ops' defaults
ACTIVATION_PARAMS = {"Affine": (1.0, 0.0), "LeakyRelu": (0.01, None), "ThresholdedRelu": (1.0, None),
                     "ScaledTanh": (1.0, 1.0), "HardSigmoid": (0.2, 0.5), "Elu": (1.0, None)}
PLAIN_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Softsign", "Softplus")


def activations(node: onnx.NodeProto) -> list[list[tuple[str, float | None, float | None]]]:
    """Per direction, the (op, alpha, beta) of each activation, alphas and betas consumed in
    order by the activations that take them (the ONNX spec's rule)."""
    dirs = len(directions(node))
    names = attr(node, "activations") or DEFAULT_ACTIVATIONS[node.op_type] * dirs
    alphas, betas = list(attr(node, "activation_alpha", [])), list(attr(node, "activation_beta", []))
    out = []
    for name in names:
        canon = next((a for a in (*ACTIVATION_PARAMS, *PLAIN_ACTIVATIONS) if a.lower() == name.lower()), None)
        if canon is None:
            raise ModelError(None, f"{node.op_type} {node.name}: activation {name!r} is not one the operator allows")
        alpha = beta = None
        if canon in ACTIVATION_PARAMS:
            da, db = ACTIVATION_PARAMS[canon]
            alpha = alphas.pop(0) if alphas else da
            if db is not None:
                beta = betas.pop(0) if betas else db
        out.append((canon, alpha, beta))
    per = len(DEFAULT_ACTIVATIONS[node.op_type])
    return [out[d * per:(d + 1) * per] for d in range(dirs)]


def layer_ranges(node: onnx.NodeProto, layers: list[Layer], values: dict[str, np.ndarray],
                 weights: dict[str, np.ndarray], biases: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per recurrent layer in `weights`, calibration rows of its input and output: every hidden
    state the node produced in that direction, and the layer (`weights`, `biases`: IR3's) on them.

    They set the segment's formats (their largest magnitudes); a GRU's hidden-gate layer
    reads r * h, no larger than h for the sigmoid reset gate, so h's rows stand in for it.
    """
    y = values[node.output[0]]  # [T, dirs, B, H]
    hidden = y.shape[-1]
    per = len(roles(node.op_type, hidden))
    out = {}
    for i, layer in enumerate(layers):
        if layer.name not in weights:
            continue
        d = i // per
        h = y[:, d].reshape(-1, hidden).astype(np.float32)
        out[layer.name] = (h, h @ weights[layer.name].T + biases[layer.name])
    return out


class _Emitter:
    """Host nodes of one unrolled recurrent node, with fresh, prefixed names."""

    def __init__(self, prefix: str, taken: set[str]):
        self.prefix, self.taken, self.nodes, self.inits = prefix, taken, [], []
        self.consts: dict[tuple, str] = {}

    def name(self, base: str) -> str:
        name, k = f"{self.prefix}.{base}", 0
        while name in self.taken:
            name, k = f"{self.prefix}.{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def const(self, base: str, value) -> str:
        """An initializer holding `value`, one per distinct value (every step reuses its axes)."""
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.consts:
            self.consts[key] = self.name(base)
            self.inits.append(numpy_helper.from_array(value, self.consts[key]))
        return self.consts[key]

    def op(self, op: str, inputs: list[str], outputs: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"{op.lower()}_node"), **attrs))
        return outs[0] if outputs == 1 else outs

    def activation(self, x: str, act: tuple[str, float | None, float | None]) -> str:
        op, alpha, beta = act
        if op in PLAIN_ACTIVATIONS:
            return self.op(op, [x])
        if op == "Affine":
            return self.op("Add", [self.op("Mul", [x, self.const("alpha", np.float32(alpha))]),
                                   self.const("beta", np.float32(beta))])
        if op == "ScaledTanh":
            inner = self.op("Tanh", [self.op("Mul", [x, self.const("beta", np.float32(beta))])])
            return self.op("Mul", [inner, self.const("alpha", np.float32(alpha))])
        kw = {"alpha": float(alpha)} | ({"beta": float(beta)} if beta is not None else {})
        return self.op(op, [x], **kw)


def unroll(model: onnx.ModelProto, node: onnx.NodeProto, parts: list[Segment | Layer], steps: int) -> None:
    """Replace `node` (IR3) by its unrolled recurrence over `steps` time steps, running each
    recurrent layer (in `find_layers` order) at every step: its segment, or for a layer the
    recipe skips, a dense host Gemm."""
    e = _Emitter(node.name, {n.name for n in model.graph.node} | {t for n in model.graph.node for t in
                                                                   (*n.input, *n.output)}
                 | {t.name for t in model.graph.initializer})
    op = node.op_type
    ins = list(node.input) + [""] * (8 - len(node.input))
    dirs = directions(node)
    hidden = int(attr(node, "hidden_size", 0)) or next(
        p.shape[1] if isinstance(p, Layer) else p.layers[0].in_shape[0] for p in parts)
    gh = GATES[op] * hidden
    clip = attr(node, "clip")
    acts = activations(node)
    digests = {}
    for p in parts:
        if isinstance(p, Segment):
            blob = p.to_blob()
            digests[p.name] = hashlib.sha256(blob).hexdigest()
            model.graph.initializer.append(numpy_helper.from_array(np.frombuffer(blob, np.uint8), blob_name(p.name)))

    def segment(i: int, x: str, k: int) -> str:
        part = parts[i]
        if isinstance(part, Layer):
            out = e.name(f"{part.name}.t{k}")
            e.nodes.append(helper.make_node("Gemm", [x, part.weight, part.bias], [out],
                                            name=e.name(f"{part.name}.t{k}_node"), transB=1))
            return out
        name, blob, digest = part.name, blob_name(part.name), digests[part.name]
        out = e.name(f"{name}.t{k}")
        e.nodes.append(helper.make_node("EIESegment", [x, blob], [out], name=e.name(f"{name}.t{k}_node"),
                                        domain=EIE_DOMAIN, digest=digest))
        return out

    def clipped(x: str) -> str:
        if clip is None:
            return x
        return e.op("Clip", [x, e.const("clip_lo", np.float32(-clip)), e.const("clip_hi", np.float32(clip))])

    def gates(x: str, n: int) -> list[str]:
        return e.op("Split", [x, e.const("split", np.full(n, hidden, np.int64))], outputs=n, axis=1)

    xg = ins[0]
    seq = e.op("Cast", [ins[4]], to=TensorProto.INT64) if ins[4] else None
    init_h = ins[5] or None  # [dirs, B, H]
    init_c = ins[6] or None if op == "LSTM" else None
    zeros = None
    if init_h is None or (op == "LSTM" and init_c is None):
        batch = e.op("Shape", [xg], start=1, end=2)
        zeros = e.op("ConstantOfShape", [e.op("Concat", [batch, e.const("hidden", np.array([hidden], np.int64))],
                                              axis=0)])
    per = len(roles(op, hidden))
    ys, hs, cs = [], [], []
    for d, direction in enumerate(dirs):
        f, g, h_act = (acts[d] + [None, None])[:3]
        xd = e.op("Slice", [xg, e.const("lo", np.array([d * gh], np.int64)),
                            e.const("hi", np.array([(d + 1) * gh], np.int64)), e.const("axis", np.array([2], np.int64))])
        flip = direction == "reverse" and seq is not None
        if flip:
            xd = e.op("ReverseSequence", [xd, seq], batch_axis=1, time_axis=0)
        xs = e.op("Split", [xd, e.const("ones", np.ones(steps, np.int64))], outputs=steps, axis=0) \
            if steps > 1 else [xd]
        pick = (lambda t: e.op("Gather", [t, e.const("dir", np.array(d, np.int64))], axis=0))
        h = pick(init_h) if init_h is not None else zeros
        c = (pick(init_c) if init_c is not None else zeros) if op == "LSTM" else None
        peep = None
        if op == "LSTM" and ins[7]:
            peep = gates(e.op("Unsqueeze", [pick(ins[7]), e.const("axes", np.array([0], np.int64))]), 3)
        out_t: list[str | None] = [None] * steps
        for k in range(steps):
            t = steps - 1 - k if direction == "reverse" and not flip else k
            x_t = e.op("Squeeze", [xs[t], e.const("axes", np.array([0], np.int64))])
            if op == "LSTM":
                i_, o_, f_, c_ = gates(e.op("Add", [x_t, segment(d * per, h, k)]), 4)
                if peep is not None:
                    i_ = e.op("Add", [i_, e.op("Mul", [peep[0], c])])
                    f_ = e.op("Add", [f_, e.op("Mul", [peep[2], c])])
                i_ = e.activation(clipped(i_), f)
                if attr(node, "input_forget", 0):
                    f_ = e.op("Sub", [e.const("one", np.float32(1)), i_])
                else:
                    f_ = e.activation(clipped(f_), f)
                c_new = e.op("Add", [e.op("Mul", [f_, c]), e.op("Mul", [i_, e.activation(clipped(c_), g)])])
                if peep is not None:
                    o_ = e.op("Add", [o_, e.op("Mul", [peep[1], c_new])])
                h_new = e.op("Mul", [e.activation(clipped(o_), f), e.activation(c_new, h_act)])
            elif op == "GRU":
                xz, xr, xh = gates(x_t, 3)
                rz, rr = gates(segment(d * per, h, k), 2)
                z = e.activation(clipped(e.op("Add", [xz, rz])), f)
                r = e.activation(clipped(e.op("Add", [xr, rr])), f)
                if attr(node, "linear_before_reset", 0):
                    rh = e.op("Mul", [r, segment(d * per + 1, h, k)])
                else:
                    rh = segment(d * per + 1, e.op("Mul", [r, h]), k)
                h_hat = e.activation(clipped(e.op("Add", [xh, rh])), g)
                h_new = e.op("Add", [h_hat, e.op("Mul", [z, e.op("Sub", [h, h_hat])])])
                c_new = None
            else:
                h_new = e.activation(clipped(e.op("Add", [x_t, segment(d * per, h, k)])), f)
                c_new = None
            if seq is not None:  # past its length a sequence keeps its state and outputs zeros
                live = e.op("Unsqueeze", [e.op("Less", [e.const("step", np.array(k, np.int64)), seq]),
                                          e.const("axes", np.array([1], np.int64))])
                out_t[t] = e.op("Where", [live, h_new, e.const("zero", np.float32(0))])
                h = e.op("Where", [live, h_new, h])
                c = e.op("Where", [live, c_new, c]) if c_new is not None else c
            else:
                out_t[t], h, c = h_new, h_new, c_new if c_new is not None else c
        yd = e.op("Concat", [e.op("Unsqueeze", [y, e.const("axes", np.array([0], np.int64))]) for y in out_t],
                  axis=0)  # [T, B, H]
        if flip:
            yd = e.op("ReverseSequence", [yd, seq], batch_axis=1, time_axis=0)
        ys.append(e.op("Unsqueeze", [yd, e.const("axes", np.array([1], np.int64))]))
        hs.append(e.op("Unsqueeze", [h, e.const("axes", np.array([0], np.int64))]))
        if c is not None:
            cs.append(e.op("Unsqueeze", [c, e.const("axes", np.array([0], np.int64))]))
    for name, parts, axis in zip(node.output, (ys, hs, cs), (1, 0, 0)):  # Y [T, dirs, B, H], Y_h, Y_c [dirs, B, H]
        if name and parts:
            e.nodes.append(helper.make_node("Concat", parts, [name], name=e.name("out_node"), axis=axis))
    _splice(model, node, e)


def _splice(model: onnx.ModelProto, node: onnx.NodeProto, e: _Emitter) -> None:
    """Put the emitted nodes where `node` was; drop what only assembled its weights."""
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.name == node.name)
    nodes[at:at + 1] = e.nodes
    dead_inputs = set(node.input[1:4])
    graph_outputs = {o.name for o in model.graph.output}
    while True:  # the selection, R and B assembly nodes and the decode nodes now read by nobody
        used = {t for n in nodes for t in n.input} | graph_outputs
        dead = [n for n in nodes if n.output and all(o not in used for o in n.output)
                and any(o in dead_inputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            dead_inputs |= set(n.input)
        nodes = [n for n in nodes if n not in dead]
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(e.inits)
    used = {t for n in nodes for t in n.input}
    for t in dead_inputs - used:
        remove_initializer(model, t)
    keep = [v for v in model.graph.value_info if v.name not in set(node.output)]
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(keep)


def fc_view(layer: Layer) -> Layer:
    """The recurrent layer as the one-layer FC chain `lower.build_segment` takes: it reads
    `<layer>:h` and writes `<layer>:gates` (the calibration rows `layer_ranges` gives)."""
    node = helper.make_node("Gemm", [f"{layer.name}:h", layer.weight, layer.bias], [f"{layer.name}:gates"],
                            name=layer.name)
    return dataclasses.replace(layer, kind="fc", node=node)


def time_steps(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """The number of time steps the node runs, from its input's static shape (the lower pass
    unrolls for the shapes the model was compiled for)."""
    for info in (model, onnx.shape_inference.infer_shapes(model)):
        vi = next((v for v in (*info.graph.value_info, *info.graph.input) if v.name == node.input[0]), None)
        if vi is not None and len(vi.type.tensor_type.shape.dim) == 3:
            dim = vi.type.tensor_type.shape.dim[0]
            if dim.HasField("dim_value") and dim.dim_value > 0:
                return int(dim.dim_value)
    raise ModelError(None, f"{node.op_type} {node.name}: the number of time steps is not fixed; give the "
                           f"input's sequence length with --input-shape or calibration data")
