"""Running a model on many rows in onnxruntime: eiec's one way to make a session and feed it.

Rows are the leading (batch) axis of every fed input. A model declares that axis either
symbolic (any number of rows per run) or fixed, as torch.onnx.export writes it by
default (x[1, 784]). `run_rows` feeds a fixed-batch model chunks of exactly that size,
pads the last chunk by repeating its last row and drops the padded rows' outputs, so
every caller (calibration, auto, Q-format ranges, validate, `eiec run`) gets one output
row per input row whatever the declared batch; a symbolic batch runs in one go.

An output need not carry its rows on its leading axis: ONNX's LSTM writes Y as
[seq, directions, batch, hidden] and Y_h as [directions, batch, hidden]. `row_axes`
finds each output's row axis by shape inference; import records them in the model's
metadata (`ROW_AXES_KEY`), which every IR and a .eie's host graph keep, since a
rewritten graph (or one with eiec's custom ops) may no longer let inference follow
them. `session` keeps them with the session for `run_rows` to join the chunks on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError, ModelError
from .report import format_dims


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]  # None = dynamic (symbolic or unnamed)


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The model's real inputs (initializers listed as inputs are not)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        out.append(GraphInput(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return out


ROWS = "eiec_rows"  # the symbolic dim `row_axes` gives the fed inputs' leading axis
# Initializers up to this many elements stay in the shape skeleton (shape operands a
# Reshape or Expand needs); larger ones become inputs of the same shape.
_SHAPE_OPERAND_ELEMS = 64
ROW_AXES_KEY = "eiec.row_axes"  # metadata_props key: JSON {output: row axis}, when any is not 0


def shape_skeleton(model: onnx.ModelProto, outputs_as_declared: bool = False) -> onnx.ModelProto:
    """`model` without its weights, for shape inference: large initializers become inputs
    of their shape, graph outputs lose their declared shapes (a fixed batch there would
    contradict a symbolic one; `outputs_as_declared` keeps them, for `onnx.checker`).
    Copies no weights."""
    g = model.graph
    light = onnx.GraphProto(name=g.name, node=g.node, input=g.input)
    declared = {vi.name for vi in g.input}
    for t in g.initializer:
        if np.prod(t.dims, dtype=np.int64) <= _SHAPE_OPERAND_ELEMS:
            light.initializer.append(t)
        elif t.name not in declared:
            light.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if outputs_as_declared:
        light.output.extend(g.output)
    else:
        for vi in g.output:
            light.output.append(onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, None))
    out = onnx.helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version)
    out.functions.extend(model.functions)
    out.metadata_props.extend(p for p in model.metadata_props if p.key == ROW_AXES_KEY)
    return out


def _rows_inferred(model: onnx.ModelProto, fed: Collection[str]) -> tuple[onnx.GraphProto | None, set[str]]:
    """The model's skeleton with the leading dims of the inputs `fed` symbolic (ROWS), shapes
    inferred on every edge (None when inference refuses the graph), and the tensors that
    depend on `fed`. A graph input also listed as an output (a capture of what a layer reads)
    is left out of the outputs: inference would take its undeclared output shape for the
    input's and lose the rows everywhere downstream."""
    skeleton = shape_skeleton(model)
    names = {vi.name for vi in skeleton.graph.input}
    outputs = [vi for vi in skeleton.graph.output if vi.name not in names]
    del skeleton.graph.output[:]
    skeleton.graph.output.extend(outputs)
    for vi in skeleton.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in fed and len(dims):
            dims[0].Clear()
            dims[0].dim_param = ROWS
    reached, grew = set(fed), True
    while grew:  # to a fixed point: a user's graph need not be sorted
        grew = False
        for node in skeleton.graph.node:
            if not reached.issuperset(node.output) and reached.intersection(node_reads(node)):
                reached.update(node.output)
                grew = True
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True).graph
    except Exception:  # noqa: BLE001 - inference refusing the graph leaves every axis unknown
        inferred = None
    return inferred, reached


def _rows_at(vi: onnx.ValueInfoProto) -> list[int]:
    return [i for i, d in enumerate(vi.type.tensor_type.shape.dim) if d.dim_param == ROWS]


def row_axes(model: onnx.ModelProto, fed: Collection[str] | None = None) -> dict[str, int | None]:
    """Per graph output computed from the rows, the axis they are on (None: not known).

    The rows are the leading axis of the inputs `fed` (default: every real input). Shape
    inference runs on the skeleton with those dims symbolic (ROWS); an output's axis is
    the one that is ROWS, None when inference loses it (a Reshape to a constant shape,
    an op without shape inference). Outputs that do not depend on `fed` are left out."""
    fed = {gi.name for gi in graph_inputs(model)} if fed is None else set(fed)
    inferred, reached = _rows_inferred(model, fed)
    shapes = {} if inferred is None else {vi.name: vi for vi in inferred.output}
    axes: dict[str, int | None] = {}
    for vi in model.graph.output:
        if vi.name in fed:  # an input passed through: its rows lead
            axes[vi.name] = 0
        elif vi.name in reached:
            found = _rows_at(shapes[vi.name]) if vi.name in shapes else []
            axes[vi.name] = found[0] if len(found) == 1 else None
    return axes


# Ops that compute each row of their outputs from the same row of their inputs whatever their
# attributes, when the rows lead every input and output that depends on them (what
# `rows_independent` checks) and their other inputs do not depend on the rows.
_ROWWISE = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BitShift",
    "Cast", "CastLike", "Ceil", "Celu", "Clip", "Conv", "ConvInteger", "ConvTranspose", "Cos", "Cosh",
    "DepthToSpace", "Div", "Dropout", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten",
    "Floor", "Gelu", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GroupNormalization", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "IsInf", "IsNaN",
    "LRN", "LeakyRelu", "Less", "LessOrEqual", "Log", "LpPool", "Max", "MaxPool", "Mean", "Min", "Mish", "Mod",
    "Mul", "Neg", "Not", "Or", "PRelu", "Pad", "Pow", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin",
    "Sinh", "Softplus", "Softsign", "SpaceToDepth", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh",
    "ThresholdedRelu", "Tile", "Transpose", "Unsqueeze", "Upsample", "Where", "Xor",
})
# Ops that work along one axis (attribute "axis", default): row-wise when it is not the rows'.
_ALONG_AXIS = {"Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "LpNormalization": -1,
               "LayerNormalization": -1, "Concat": None, "Split": 0, "Gather": 0}


def rows_independent(model: onnx.ModelProto, fed: Collection[str] | None = None) -> bool:
    """Does every node compute each row (leading-axis slice of the inputs `fed`, default every
    real input) from that row alone, so the model gives the same rows run on any number of
    them at once?

    Checked on the skeleton with symbolic rows (`_rows_inferred`): every tensor that depends
    on the inputs carries the rows on its leading axis, and only there, and its node is of
    `_ROWWISE`, or of `_ALONG_AXIS` along another axis, or a Gemm / MatMul whose rows enter
    through its first input alone (transA = 0), or an inference-mode BatchNormalization.
    Anything else (a Softmax over the rows, a Reshape to a constant batch, subgraphs, custom
    ops, a tensor whose shape inference lost) is not known to be row-wise: False."""
    fed = {gi.name for gi in graph_inputs(model)} if fed is None else set(fed)
    inferred, reached = _rows_inferred(model, fed)
    if inferred is None or not fed:
        return False
    info = {vi.name: vi for vi in (*inferred.input, *inferred.value_info, *inferred.output)}

    def leading(name: str) -> bool:
        vi = info.get(name)
        return vi is not None and vi.type.HasField("tensor_type") and _rows_at(vi) == [0]

    for node in inferred.node:
        ins = [t for t in node.input if t in reached]
        if not ins:
            continue  # computes the same whatever the rows
        if node.domain not in ("", "ai.onnx") or not all(map(leading, [*ins, *(o for o in node.output if o)])):
            return False
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op in ("Gemm", "MatMul"):
            if ins != [node.input[0]] or attrs.get("transA", 0):
                return False
        elif op == "BatchNormalization":
            if ins != [node.input[0]] or attrs.get("training_mode", 0):
                return False
        elif op in _ALONG_AXIS:
            rank = len(info[ins[0]].type.tensor_type.shape.dim)
            axis = attrs.get("axis", _ALONG_AXIS[op])
            if axis is None or axis % max(rank, 1) == 0:
                return False
            if (op == "Gather" and ins != [node.input[0]]) or (op == "Concat" and len(ins) != len(node.input)):
                return False  # rows as indices; a constant joined to every row
        elif op not in _ROWWISE:
            return False
    return True


def lift_fixed_batch(model: onnx.ModelProto, fed: Collection[str] | None = None) -> bool:
    """Make the fixed leading dim of the inputs `fed` (default: every real input) symbolic, in
    place, when the model is `rows_independent` of them: `run_rows` then runs all rows at once
    instead of one run per batch (a VGG-sized model streams its weights once, not once per
    row). Drops the declared shapes of intermediate tensors and outputs (they say the old
    batch). False: nothing changed."""
    names = {gi.name for gi in graph_inputs(model)} if fed is None else set(fed)
    inputs = [gi for gi in graph_inputs(model) if gi.name in names]
    if not any(gi.dims and gi.dims[0] is not None for gi in inputs) or not rows_independent(model, names):
        return False
    for vi in model.graph.input:
        if vi.name in names:
            vi.CopyFrom(free_rows(vi))
    del model.graph.value_info[:]
    for vi in model.graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    return True


def free_rows(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A copy of an input's declaration with its leading dim symbolic (ROWS)."""
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    dims = out.type.tensor_type.shape.dim
    if len(dims):
        dims[0].Clear()
        dims[0].dim_param = ROWS
    return out


def node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads: its inputs and what its subgraphs (If, Loop, Scan) read."""
    names = set(node.input)
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
            for inner in g.node:
                names |= node_reads(inner)
    return names


def producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> the index of the node that writes it (optional outputs, named "", left out)."""
    return {o: i for i, n in enumerate(graph.node) for o in n.output if o}


def upstream_nodes(targets: Iterable[str], producer: dict[str, int], reads: Sequence[Collection[str]],
                   held: Collection[str] = (), done: Collection[int] = ()) -> set[int]:
    """The nodes that compute `targets`: walked back through what each node reads (`reads[i]`,
    e.g. `node_reads`) to the tensors that have no producer (graph inputs, initializers), the
    tensors `held` and the nodes `done`, none of which is included."""
    found: set[int] = set()
    stack = [t for t in targets if t not in held]
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in found or i in done:
            continue
        found.add(i)
        stack.extend(r for r in reads[i] if r and r not in held)
    return found


def record_row_axes(model: onnx.ModelProto, axes: dict[str, int]) -> None:
    """Store `axes` in `model`'s metadata (nothing when empty: every output's rows lead)."""
    kept = [p for p in model.metadata_props if p.key != ROW_AXES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if axes:
        model.metadata_props.add(key=ROW_AXES_KEY, value=json.dumps(axes, sort_keys=True))


class RowSession(ort.InferenceSession):
    """An onnxruntime session that knows its outputs' row axes (`row_axes`) for `run_rows`.

    `skeleton` is the model's `shape_skeleton`, kept when an input has a fixed leading
    dim (only then are rows chunked and joined)."""

    def __init__(self, model: bytes | str, options: ort.SessionOptions, skeleton: onnx.ModelProto | None):
        super().__init__(model, options, providers=["CPUExecutionProvider"])
        self.skeleton = skeleton
        self._axes: dict[frozenset[str], dict[str, int | None]] = {}

    def row_axes(self, fed: Collection[str]) -> dict[str, int | None]:
        """`row_axes` of the model when `fed` are the inputs fed per row, with the axes
        import recorded in the model (ROW_AXES_KEY) for the outputs it names. Asked only
        once rows were chunked: an input has a fixed batch, so `skeleton` is set."""
        key = frozenset(fed)
        if key not in self._axes:
            self._axes[key] = skeleton_row_axes(self.skeleton, key)
        return self._axes[key]


def skeleton_row_axes(skeleton: onnx.ModelProto, fed: Collection[str]) -> dict[str, int | None]:
    """`row_axes` of a `shape_skeleton`, with the axes import recorded (ROW_AXES_KEY) for the outputs it names."""
    stored = next((p.value for p in skeleton.metadata_props if p.key == ROW_AXES_KEY), "{}")
    return {**row_axes(skeleton, fed), **json.loads(stored)}


def quiet_options(stop_spinning: bool = False) -> ort.SessionOptions:
    """Session options that do not warn (overridable initializers make ORT warn once per weight).

    stop_spinning: onnxruntime's threads stop spinning when a run returns (by default they spin
    on, on the cores the numpy work between runs needs; what they compute does not change)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def session(model: onnx.ModelProto | bytes | str | os.PathLike,
            options: ort.SessionOptions | None = None) -> RowSession:
    """A CPU onnxruntime session (`quiet_options` unless `options` are given)."""
    proto = model if isinstance(model, onnx.ModelProto) else None
    if proto is not None:
        model = proto.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    if options is None:
        options = quiet_options()
    sess = RowSession(model, options, None)
    if any(d and d[0] is not None for d in _declared(sess).values()):
        if proto is None:
            proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
        sess.skeleton = shape_skeleton(proto)
    return sess


def _declared(sess: ort.InferenceSession) -> dict[str, tuple[int | None, ...] | None]:
    """Per session input, its declared dims (None per dynamic axis; None when the rank is unknown)."""
    return {i.name: None if i.shape is None else tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape)
            for i in sess.get_inputs()}


def fixed_batch(sess: ort.InferenceSession, fed: Sequence[str]) -> int | None:
    """The rows per run the session's inputs `fed` admit: their fixed leading dim, None when symbolic.

    Inputs declaring different fixed leading dims have no common row count: a ModelError.
    """
    return common_batch(_declared(sess), fed)


def common_batch(declared: dict[str, tuple[int | None, ...] | None], fed: Sequence[str]) -> int | None:
    """`fixed_batch` of inputs with these declared dims (None per dynamic axis)."""
    sizes = {declared[n][0] for n in fed if declared.get(n) and declared[n][0] is not None}
    if len(sizes) > 1:
        raise ModelError(None, f"inputs declare different fixed batch sizes ({', '.join(map(str, sorted(sizes)))}): "
                               "eiec cannot tell which rows belong together")
    return sizes.pop() if sizes else None


def check_rows(sess: ort.InferenceSession, rows: dict[str, np.ndarray], what: str = "the model's") -> None:
    """Every fed array has its input's rank and every fixed dim past the batch (InputError otherwise)."""
    declared = _declared(sess)
    for name, a in rows.items():
        dims = declared.get(name)
        if dims is None:
            continue
        if a.ndim != len(dims) or any(w is not None and h != w for h, w in zip(a.shape[1:], dims[1:])):
            raise InputError(None, f"input {name!r}: shape ({format_dims(a.shape)}) does not match "
                                   f"{what} ({format_dims(dims)})")


def run_rows(sess: ort.InferenceSession, names: Sequence[str] | None, rows: dict[str, np.ndarray],
             whole: dict[str, np.ndarray] | None = None,
             before_chunk: Callable[[int], None] | None = None,
             run_options: ort.RunOptions | None = None,
             run_chunks: Callable[[list[str], list[dict[str, Any]], list[int]], list[list[Any]]] | None = None
             ) -> list[Any]:
    """Run `rows` (all sharing one leading row count) in chunks the session's inputs admit.

    `whole` are fed unchanged to every chunk (e.g. weights overriding initializers).
    `before_chunk(real_rows)` is called before each run with how many rows of the chunk
    are real (the rest pad a fixed batch). `run_chunks(names, feeds, reals)`, when given,
    runs every chunk's feed instead (all at once: eiec.runtime.stages) and returns each
    chunk's outputs. How the chunks' outputs join (`join_rows`) follows the outputs' row axes
    (`RowSession.row_axes`; for another session, the leading axis).
    """
    names = list(names) if names is not None else [o.name for o in sess.get_outputs()]
    whole = {**(whole or {}), **{k: v for k, v in rows.items() if np.ndim(v) == 0}}  # scalars have no rows
    rows = {k: v for k, v in rows.items() if k not in whole}
    n = next(iter(rows.values())).shape[0] if rows else 0
    size = fixed_batch(sess, list(rows)) if rows else None
    whole_rows = size is None or n == size or n == 0  # one run on the rows as fed
    if whole_rows:
        feeds, reals = [{**rows, **whole}], [n]
    else:
        reals = [min(size, n - start) for start in range(0, n, size)]
        feeds = [{**{k: pad_rows(v[start:start + real], size) for k, v in rows.items()}, **whole}
                 for start, real in zip(range(0, n, size), reals)]
    if run_chunks is not None:
        outs = run_chunks(names, feeds, reals)
    else:
        outs = []
        for feed, real in zip(feeds, reals):
            if before_chunk is not None:
                before_chunk(real)
            outs.append(sess.run(names, feed, run_options))
    if whole_rows:
        return outs[0]
    axes = sess.row_axes(list(rows)) if isinstance(sess, RowSession) else dict.fromkeys(names, 0)
    return [join_rows([(real, o[i]) for real, o in zip(reals, outs)], size, axes.get(name, NO_ROW_AXIS))
            for i, name in enumerate(names)]


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    """The chunk with its last row repeated up to `size` rows (a real row: no NaN from zeros)."""
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.repeat(a[-1:], size - a.shape[0], axis=0)])


NO_ROW_AXIS = -1  # the row axis of an output that does not depend on the rows


def join_rows(parts: list[tuple[int, Any]], size: int, axis: int | None) -> Any:
    """One output of all chunks (`parts`: each chunk's real rows and output).

    On a known row axis of the chunk size: the real rows, concatenated. With the axis
    unknown (None): on the leading axis, the real rows when it is the chunk size, else
    the chunks whole when it is a multiple of it (e.g. [tokens x rows, features] from a
    Reshape; a padded chunk's copies of its last row stay in). An output that does not
    depend on the rows (or fits none of these) is the first chunk's."""
    first = parts[0][1]
    if isinstance(first, list) and len(first) == size:  # a sequence output (e.g. ZipMap), one item per row
        return [item for real, p in parts for item in p[:real]]
    if not isinstance(first, np.ndarray) or axis == NO_ROW_AXIS:
        return first
    if axis is None and first.ndim and first.shape[0] != size and first.shape[0] % size == 0:
        return np.concatenate([p for _, p in parts])
    axis = axis or 0
    if first.ndim > axis and first.shape[axis] == size:
        return np.concatenate([p.take(np.arange(real), axis=axis) for real, p in parts], axis=axis)
    return first
