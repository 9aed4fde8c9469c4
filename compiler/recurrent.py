"""Recurrent layers (ONNX LSTM, GRU, RNN) in the canonical IR: which matrices are layers.

Import (`eiec.importer`) splits a recurrent node with constant weights in two:

* its input matrices W (every direction's gates, stacked) become one canonical Gemm
  layer `<node>.W` on the [time x batch, input] rows: the input projection does not
  depend on the recurrence, so it runs one matrix-vector product per time step like
  any linear layer on a 3-D activation;
* the node itself keeps the recurrence. Its X is the projected gates, its W a selection
  (identity blocks made at run time, so ONNX computes the same thing), and its R and B are
  assembled from one [gate rows, hidden] matrix and one bias per recurrent layer:
  `R = Concat_dirs(Unsqueeze(Concat_roles(R layers)))`,
  `B = Concat_dirs(Unsqueeze(Pad(Concat_roles(R biases), [gate rows, 0])))`.

The recurrent layers are `<node>.R` per direction (`.R_reverse` for the second), and for
a GRU `<node>.R_zr` (update and reset gates) and `<node>.R_h` (the hidden gate): with
`linear_before_reset=0` the hidden gate's matrix multiplies r * h, which is known only
after the reset gate, so it is a matrix of its own. Two matrices (W and R), not one
[gates, input + hidden] matrix on the concatenated vector as EIE ran NT-LSTM: the same
multiply-accumulates, but the GRU needs R_h apart anyway, W's products do not wait for
the previous step, and recipes can prune input and recurrent weights differently.
The lower pass (`eiec.passes.recurrent`) unrolls the recurrence over the time steps.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# the ops the assembly of R and B goes through: find_layers walks them back to the layers
ASSEMBLY_OPS = ("Concat", "Unsqueeze", "Pad")


def roles(op: str, hidden: int) -> list[tuple[str, int, int]]:
    """Each recurrent layer of one direction: (suffix, first gate row, end gate row)."""
    if op == "GRU":
        return [("R_zr", 0, 2 * hidden), ("R_h", 2 * hidden, 3 * hidden)]
    return [("R", 0, GATES[op] * hidden)]


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute of a NodeProto, strings decoded."""
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, list):
                return [x.decode() if isinstance(x, bytes) else x for x in v]
            return v.decode() if isinstance(v, bytes) else v
    return default


def directions(node: onnx.NodeProto) -> list[str]:
    """The directions a recurrent node runs, in the order of its weights' first axis."""
    d = node_attr(node, "direction", "forward")
    return ["forward", "reverse"] if d == "bidirectional" else [d]


def layer_name(node_name: str, suffix: str, direction: int) -> str:
    return f"{node_name}.{suffix}" + ("_reverse" if direction else "")


def assembled_from(producers: dict[str, onnx.NodeProto], tensor: str) -> list[str]:
    """The tensors a recurrent node's R or B input is assembled from, in order."""
    node = producers.get(tensor)
    if node is None or node.op_type not in ASSEMBLY_OPS:
        return [tensor]
    parts = node.input if node.op_type == "Concat" else node.input[:1]
    return [leaf for t in parts for leaf in assembled_from(producers, t)]


def canonicalize_recurrent(rw, node) -> None:
    """Rewrite an LSTM/GRU/RNN graphsurgeon node with constant W, R (and B) into the form
    above (`rw`: the importer's rewriter, for fresh names, nodes and the N-D linear layer)."""
    ins = list(node.inputs) + [None] * (8 - len(node.inputs))
    x, w, r, b = ins[:4]
    consts = [t for t in (w, r, b) if t is not None and t.name]
    if (not all(isinstance(t, gs.Constant) and t.values.dtype == np.float32 and t.values.ndim == len(e)
                for t, e in zip(consts, ("dgi", "dgh", "db")))
            or len(consts) < 2 or x.shape is None or len(x.shape) != 3):
        return  # run-time weights, or an input of unknown rank: a host op
    if node.attrs.get("layout", 0):
        return  # batch-major [batch, time, ...] layout: onnxruntime does not run it either
    lead = list(x.shape[:2])
    if sum(not isinstance(d, int) or d < 0 for d in lead) > 1:
        return
    dirs, gh, inp = w.values.shape
    hidden = r.values.shape[2]
    bias = b.values if b is not None and b.name else np.zeros((dirs, 2 * gh), np.float32)
    # the input projection of every direction: one canonical Gemm on [time x batch, input]
    proj = rw.add_node("Gemm", f"{node.name}.W", [], [])
    gates = rw.variable(f"{node.name}.gates")
    rows = rw.tokens(x, inp)
    flat = rw.variable(f"{node.name}.W.out")
    rw.make_gemm(proj, rows, w.values.reshape(dirs * gh, inp), bias[:, :gh].reshape(-1), None, None, flat)
    rw.untokens(flat, gates, lead, dirs * gh)

    def const(base: str, values) -> gs.Constant:
        return gs.Constant(rw.fresh(base), np.ascontiguousarray(values))

    def joined(base: str, parts: list, op: str, **attrs) -> gs.Tensor:
        out = rw.variable(base)
        rw.add_node(op, base, parts, [out], attrs)
        return out

    # W: direction d's gates are columns d*gh.. of the projected input. Made at run time from
    # a shape, not stored: the identity would be the model's largest tensor (and count as
    # its parameters)
    zero = joined(f"{node.name}.zero", [const(f"{node.name}.square", np.array([gh, gh], np.int64))],
                  "ConstantOfShape", value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    eye = joined(f"{node.name}.eye", [zero], "EyeLike")
    blocks = [eye if dirs == 1 else joined(f"{node.name}.select{d}", [eye, zero] if d == 0 else [zero, eye],
                                           "Concat", axis=1) for d in range(dirs)]
    select = [joined(f"{node.name}.select{d}_dir", [b, const(f"{node.name}.select_axes", np.array([0], np.int64))],
                     "Unsqueeze") for d, b in enumerate(blocks)]
    select = select[0] if dirs == 1 else joined(f"{node.name}.select", select, "Concat", axis=0)

    r_dirs, b_dirs = [], []
    for d in range(dirs):
        ws, bs = [], []
        for suffix, lo, hi in roles(node.op, hidden):
            name = layer_name(node.name, suffix, d)
            ws.append(const(f"{name}.weight", r.values[d, lo:hi]))
            bs.append(const(f"{name}.bias", bias[d, gh + lo:gh + hi]))
        tag = layer_name(node.name, "", d)
        rd = ws[0] if len(ws) == 1 else joined(f"{tag}R_gates", ws, "Concat", axis=0)
        bd = bs[0] if len(bs) == 1 else joined(f"{tag}B_gates", bs, "Concat", axis=0)
        bd = joined(f"{tag}B_padded", [bd, const(f"{tag}B_pads", np.array([gh, 0], np.int64))], "Pad")
        r_dirs.append(joined(f"{tag}R_dir", [rd, const(f"{tag}R_axes", np.array([0], np.int64))], "Unsqueeze"))
        b_dirs.append(joined(f"{tag}B_dir", [bd, const(f"{tag}B_axes", np.array([0], np.int64))], "Unsqueeze"))
    r_all = r_dirs[0] if dirs == 1 else joined(f"{node.name}.R_all", r_dirs, "Concat", axis=0)
    b_all = b_dirs[0] if dirs == 1 else joined(f"{node.name}.B_all", b_dirs, "Concat", axis=0)
    rest = [t if t is not None else gs.Variable("") for t in ins[4:len(node.inputs)]]
    node.inputs.clear()
    node.inputs.extend([gates, select, r_all, b_all, *rest])
    if not node.outputs or not node.outputs[0].name:  # Y: the lower pass reads its range
        y = rw.variable(f"{node.name}.Y")
        if node.outputs:
            node.outputs[0] = y
        else:
            node.outputs.append(y)
