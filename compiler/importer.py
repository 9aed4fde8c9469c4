"""Model import: read an ONNX file safely, check it, and rewrite it into the canonical IR0.

`load_model` is eiec's only door from a user's file: sizes, external-data locations
and weight values are checked before anything is allocated or run; `canonicalize` then
folds constants and rewrites FC/conv layers into the forms `eiec.ir` documents.

Opset: models older than 17 are converted up to 17; newer models keep their opset,
because the version converter's down-adapters are incomplete and could silently change
semantics, while Gemm/Conv/BatchNormalization mean the same from 17 on. So the canonical
opset of the default domain is max(model opset, ir.OPSET).
"""

from __future__ import annotations

import heapq
from functools import partial
import math
import os
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.inliner
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .errors import ModelError
from .fileio import input_file_size
from .ir import OPSET, copy_model, find_layers, get_initializer
from .ortrun import record_row_axes, row_axes, shape_skeleton
from .recurrent import GATES, canonicalize_recurrent
from .report import format_dims

InputShapes = dict[str, tuple[int | None, ...]]  # graph input -> dims to fix (None keeps one)

MAX_FILE_BYTES = 2**31 - 1  # protobuf cannot parse more; bigger models need external data
MAX_TENSOR_ELEMENTS = 2**31  # per declared tensor, checked before any allocation
MAX_TOTAL_BYTES = 2**31 - 2**26  # all weights once loaded; keeps the model serialisable
MAX_FOLD_ELEMENTS = 2**24  # largest tensor constant folding may create

DEFAULT_DOMAINS = ("", "ai.onnx", None)  # graphsurgeon says None for the default domain
KNOWN_DOMAINS = (*DEFAULT_DOMAINS, "ai.onnx.ml")  # ai.onnx.ml ops run on the host in ORT
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_SUBBYTE_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4,
                 TensorProto.INT2: 2, TensorProto.UINT2: 2,
                 TensorProto.FLOAT6E2M3: 6, TensorProto.FLOAT6E3M2: 6}


def load_model(path: str | os.PathLike, input_shapes: InputShapes | None = None) -> onnx.ModelProto:
    """Read, check and canonicalise the ONNX model at `path` (see `canonicalize`)."""
    return canonicalize(read_model(path), os.fspath(path), input_shapes)


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The ONNX model at `path` as written, its external data loaded; every string and
    tensor checked (ModelError naming the file), nothing rewritten."""
    path = os.fspath(path)
    size = input_file_size(path, ModelError, "an ONNX model")
    if size > MAX_FILE_BYTES:
        raise ModelError(path, f"{size} bytes is over the 2 GiB protobuf limit; "
                               "save the weights as external data")
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(path, f"not an ONNX model or truncated (protobuf parse failed: {e})") from None
    if not model.HasField("graph"):
        raise ModelError(path, "not an ONNX model (no graph)")
    check_strings(model, path)
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    check_tensors(model, path, base)
    return model


def check_strings(msg, path: str, where: str = "model") -> None:
    """Every string field holds valid UTF-8 (protobuf's upb parser hands back bytes otherwise)."""
    for fd, value in msg.ListFields():
        if fd.type not in (fd.TYPE_STRING, fd.TYPE_MESSAGE):
            continue
        here = f"{where}.{fd.name}"
        for v in (value if fd.is_repeated else [value]):
            if fd.type == fd.TYPE_MESSAGE:
                check_strings(v, path, here)
            elif not isinstance(v, str):
                raise ModelError(path, f"{here} is not valid UTF-8 text ({bytes(v)[:20]!r})")


def canonicalize(model: onnx.ModelProto, path: str, input_shapes: InputShapes | None = None) -> onnx.ModelProto:
    """Check `model` and return its canonical IR0 (a new model; `model` is left as is).

    `input_shapes` fixes dims of the graph inputs (None in a shape keeps that dim) before
    shape inference, so a model with free spatial sizes imports with its conv geometry
    known. Raises ModelError(path, ...) for anything wrong with the model. External data
    must already be loaded (`load_model` does that after checking every location).
    """
    model = _checked(fix_input_shapes(copy_model(model), input_shapes or {}, path), path)
    axes = row_axes(model)  # before the rewrites below, which may hide them from inference
    # graphsurgeon warns on stdout about things handled below (non-tensor types, no colours)
    with gs.logger.G_LOGGER.suppress(gs.logger.G_LOGGER.ERROR):
        graph = _import_graph(model)
        _name_nodes(graph)
        _fold_constants(graph, list(model.opset_import))
        _Rewriter(graph).run()
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        _name_nodes(graph)
        out = gs.export_onnx(graph, do_type_check=False, opset_imports=list(model.opset_import))
    out.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(list(out.opset_import)))
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field, getattr(model, field))
    out.metadata_props.extend(model.metadata_props)
    record_row_axes(out, {name: axis for name, axis in axes.items() if axis})  # those not leading
    # graphsurgeon only knows tensor types: put back the declared ones (maps, sequences, docs)
    declared = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    for v in (*out.graph.input, *out.graph.output):
        if v.name in declared:
            v.CopyFrom(declared[v.name])
    del out.graph.value_info[:]
    # shapes on every edge help later passes; a failure here would be an eiec bug, not a user error
    out = infer_shapes(out, check_type=True, strict_mode=True)
    onnx.checker.check_model(shape_skeleton(out, outputs_as_declared=True))  # eiec wrote the weights
    _check_layers_finite(out, path)
    return out


# ---------------------------------------------------------------- checks before canonicalisation

def fix_input_shapes(model: onnx.ModelProto, shapes: InputShapes, path: str) -> onnx.ModelProto:
    """Set the named graph inputs' dims in place (None keeps a dim); returns `model`.

    Each name must be a real input, each shape of its rank, and a dim the model fixes
    may only be restated: anything else is a ModelError naming the input and both shapes.
    """
    inits = {t.name for t in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in inits}
    for name, dims in shapes.items():
        if name not in inputs:
            raise ModelError(path, f"input shape for {name!r}: not an input of the model (inputs: {', '.join(inputs)})")
        tt = inputs[name].type.tensor_type
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        shown = f"({format_dims(declared)})"
        if not tt.HasField("shape") or len(declared) != len(dims):
            raise ModelError(path, f"input {name!r}: shape ({format_dims(dims)}) "
                                   f"has rank {len(dims)}, the model declares {shown}")
        for axis, (have, want) in enumerate(zip(declared, dims)):
            if want is None:
                continue
            if have is not None and have != want:
                raise ModelError(path, f"input {name!r}: dim {axis} is fixed at {have} in the model {shown}, "
                                       f"not {want}")
            tt.shape.dim[axis].Clear()
            tt.shape.dim[axis].dim_value = int(want)
    return model


def _checked(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    """Validate, toposort, convert to opset >= 17 and infer shapes."""
    if len(model.graph.node) == 0:
        raise ModelError(path, "empty graph: no nodes")
    if len(model.graph.output) == 0:
        raise ModelError(path, "empty graph: no outputs")
    check_tensors(model, path, base=None)
    _check_finite(model, path)
    if model.functions:
        # model-local functions would hide their ops behind custom domains
        local = {f.domain for f in model.functions}
        model = _guard(path, "cannot inline local functions", onnx.inliner.inline_local_functions, model)
        used = {n.domain for n in model.graph.node}
        kept = [o for o in model.opset_import if o.domain not in local or o.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    _check_domains(model, path)
    # value_info is an exporter's hint, often stale (shapes from before a rewrite); onnx
    # infers every edge of the domains above itself, and would refuse a stale hint
    del model.graph.value_info[:]
    _sort_nodes(model.graph, path)
    _guard(path, "invalid model", onnx.checker.check_model, model)
    version = _default_opset(model)
    if version < OPSET:
        model = _guard(path, f"cannot convert opset {version} to {OPSET}",
                       onnx.version_converter.convert_version, model, OPSET)
        model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import)))
        _guard(path, f"invalid after conversion to opset {OPSET}", onnx.checker.check_model, model)
    return _guard(path, "shape inference failed", infer_shapes, model, check_type=True, strict_mode=True, data_prop=True)


def infer_shapes(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    """`model` with the shapes `onnx.shape_inference.infer_shapes(model, **options)` finds on
    every edge and output, in place: inferred on the weightless `shape_skeleton` (the weights
    are inputs of their shape; those a shape may be computed from stay), so a VGG-sized
    model's 500 MB are not serialised and parsed back for it."""
    inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model, outputs_as_declared=True), **options).graph
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.value_info)
    del model.graph.output[:]
    model.graph.output.extend(inferred.output)
    return model


def _guard(path: str, what: str, fn, *args, **kwargs):
    """Call an onnx tool; its failure on the user's model becomes one ModelError line."""
    try:
        return fn(*args, **kwargs)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError,
            RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ModelError(path, f"{what}: {first}") from None


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else 0


def _iter_tensors(graph: onnx.GraphProto, where: str = "") -> Iterator[tuple[str, TensorProto]]:
    """Every TensorProto of the graph and its subgraphs, with a human-readable place."""
    for t in graph.initializer:
        yield f"initializer '{t.name}'{where}", t
    for s in graph.sparse_initializer:
        yield f"sparse initializer '{s.values.name}'{where}", s.values
        yield f"sparse initializer indices '{s.values.name}'{where}", s.indices
    for node in graph.node:
        for a in node.attribute:
            here = f"attribute '{a.name}' of node '{node.name or node.op_type}'{where}"
            if a.HasField("t"):
                yield here, a.t
            for t in a.tensors:
                yield here, t
            if a.HasField("sparse_tensor"):
                yield here, a.sparse_tensor.values
                yield here, a.sparse_tensor.indices
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                yield from _iter_tensors(g, f" in subgraph of '{node.name or node.op_type}'")


def _tensor_nbytes(dtype: int, count: int) -> int | None:
    """Bytes of `count` elements stored raw; None for strings."""
    if dtype == TensorProto.STRING:
        return None
    if dtype in _SUBBYTE_BITS:
        return -(-count * _SUBBYTE_BITS[dtype] // 8)
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype)).itemsize


def _typed_entries(dtype: int, count: int) -> int:
    """How many entries the typed *_data field holds for `count` elements."""
    if dtype in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * count
    if dtype in _SUBBYTE_BITS:
        return -(-count * _SUBBYTE_BITS[dtype] // 8)
    return count


def check_tensors(model: onnx.ModelProto, path: str, base: str | None) -> None:
    """Declared sizes agree with the data, nothing is huge; load external data from `base`.

    With base=None external data is an error (it should have been loaded already).
    """
    total = 0
    for where, t in _iter_tensors(model.graph):
        try:
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        except (KeyError, ValueError):
            raise ModelError(path, f"{where} has unknown data type {t.data_type}") from None
        if any(d < 0 for d in t.dims):
            raise ModelError(path, f"{where} has negative dims {list(t.dims)}")
        count = math.prod(t.dims)
        if count > MAX_TENSOR_ELEMENTS:
            raise ModelError(path, f"{where} declares {count} elements (dims {list(t.dims)}), "
                                   f"over the limit of {MAX_TENSOR_ELEMENTS}")
        nbytes = _tensor_nbytes(t.data_type, count)
        if t.data_location == TensorProto.EXTERNAL:
            if base is None:
                raise ModelError(path, f"{where} has external data that was not loaded")
            if nbytes is None:
                raise ModelError(path, f"{where}: external string tensors are not supported")
            _load_external(t, where, nbytes, path, base)
        elif t.HasField("raw_data"):
            if nbytes is not None and len(t.raw_data) != nbytes:
                raise ModelError(path, f"{where} declares dims {list(t.dims)} ({nbytes} bytes) "
                                       f"but holds {len(t.raw_data)} bytes")
        else:
            field = onnx.helper.tensor_dtype_to_field(t.data_type)
            have, want = len(getattr(t, field)), _typed_entries(t.data_type, count)
            if have != want:
                raise ModelError(path, f"{where} declares dims {list(t.dims)} ({want} values) "
                                       f"but holds {have}")
        total += nbytes or 0
        if total > MAX_TOTAL_BYTES:
            raise ModelError(path, f"weights exceed {MAX_TOTAL_BYTES} bytes in total")


def _load_external(t: TensorProto, where: str, nbytes: int, path: str, base: str) -> None:
    """Read one tensor's external data into raw_data after checking where it points."""
    info = {kv.key: kv.value for kv in t.external_data}
    location = info.get("location", "")
    if not location:
        raise ModelError(path, f"{where} has external data without a location")
    if os.path.isabs(location) or os.path.splitdrive(location)[0]:
        raise ModelError(path, f"external data location '{location}' of {where} is an absolute path")
    try:
        target = os.path.realpath(os.path.join(base, location))
    except (ValueError, OSError):
        raise ModelError(path, f"external data location '{location}' of {where} is not a path") from None
    # realpath resolves '..' and symlinks, so this also catches links that escape the folder
    if os.path.commonpath([base, target]) != base or target == base:
        raise ModelError(path, f"external data location '{location}' of {where} is outside the model's folder")
    if not os.path.isfile(target):
        raise ModelError(path, f"external data file '{location}' of {where} is missing")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else nbytes
    except ValueError:
        raise ModelError(path, f"external data of {where} has a non-integer offset or length") from None
    size = os.path.getsize(target)
    if offset < 0 or length != nbytes:
        raise ModelError(path, f"external data of {where} in '{location}': length {length} at offset "
                               f"{offset} does not match dims {list(t.dims)} ({nbytes} bytes)")
    if offset + length > size:
        raise ModelError(path, f"external data of {where}: offset {offset} + length {length} "
                               f"is past the end of '{location}' ({size} bytes)")
    with open(target, "rb") as f:
        f.seek(offset)
        t.raw_data = f.read(length)
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT


def _check_finite(model: onnx.ModelProto, path: str) -> None:
    """No constant holds NaN. Inf is a value masks use (a causal mask's -inf, as torch writes
    it); `_check_layers_finite` refuses it in what becomes a layer's weights or bias."""
    for where, t in _iter_tensors(model.graph):
        if t.data_type in FLOAT_TYPES:
            if np.isnan(numpy_helper.to_array(t)).any():
                raise ModelError(path, f"{where} contains NaN")
    for node in model.graph.node:
        for a in node.attribute:
            if a.name in ("value_float", "value_floats"):
                v = np.asarray(onnx.helper.get_attribute_value(a), np.float32)
                if np.isnan(v).any():
                    raise ModelError(path, f"attribute '{a.name}' of node '{node.name or node.op_type}' "
                                           "contains NaN")


def _check_layers_finite(model: onnx.ModelProto, path: str) -> None:
    """Every layer's weights and bias are finite: the accelerator cannot hold an infinity."""
    for layer in find_layers(model):
        for role, name in (("weight", layer.weight), ("bias", layer.bias)):
            if not np.isfinite(get_initializer(model, name)).all():
                raise ModelError(path, f"layer {layer.name}: its {role} {name!r} contains Inf")


def _check_domains(model: onnx.ModelProto, path: str) -> None:
    for o in model.opset_import:
        if o.domain not in KNOWN_DOMAINS:
            raise ModelError(path, f"unsupported operator domain '{o.domain}'")
        try:  # onnx's own table of released opsets; an unknown one would fail deep in export
            onnx.helper.find_min_ir_version_for([o])
        except ValueError:
            raise ModelError(path, f"opset {o.version} of domain '{o.domain or 'ai.onnx'}' is not "
                                   f"a released version this onnx ({onnx.__version__}) knows") from None

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain not in KNOWN_DOMAINS:
                raise ModelError(path, f"node '{node.name or node.op_type}' uses unsupported "
                                       f"operator domain '{node.domain}'")
            for a in node.attribute:
                for g in [a.g] if a.HasField("g") else list(a.graphs):
                    walk(g)
    walk(model.graph)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs may read (an over-approximation is harmless)."""
    names: set[str] = set()
    for a in node.attribute:
        for g in [a.g] if a.HasField("g") else list(a.graphs):
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_inputs(n))
    return names


def _sort_nodes(graph: onnx.GraphProto, path: str) -> None:
    """Reject duplicate tensor names and cycles; otherwise put the nodes in a stable topological order."""
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for i, node in enumerate(nodes):
        for o in node.output:
            if not o:
                continue
            if o in producer:
                first = nodes[producer[o]]
                raise ModelError(path, f"tensor '{o}' is produced twice (nodes '{first.name or first.op_type}' "
                                       f"and '{node.name or node.op_type}')")
            if o in defined:
                raise ModelError(path, f"node '{node.name or node.op_type}' overwrites graph input "
                                       f"or initializer '{o}'")
            producer[o] = i
    deps = [{producer[x] for x in (set(n.input) | _subgraph_inputs(n)) if x in producer} for n in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:  # Kahn's algorithm, smallest original index first: stable and deterministic
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = nodes[next(i for i, w in enumerate(waiting) if w > 0)]
        raise ModelError(path, f"graph has a cycle through node '{stuck.name or stuck.op_type}'")
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


# ---------------------------------------------------------------- canonicalisation

def _import_graph(model: onnx.ModelProto) -> gs.Graph:
    # Initializers listed as graph inputs (IR < 4 style) are weights, not inputs: a layer
    # whose weight could be overridden at run time cannot be compressed.
    inits = {t.name for t in model.graph.initializer}
    if any(v.name in inits for v in model.graph.input):
        kept = [v for v in model.graph.input if v.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return gs.import_onnx(model)


def _name_nodes(graph: gs.Graph) -> None:
    """Keep existing unique names; give the rest `<name>_<k>` or `<op>_<k>`, deterministically."""
    taken: set[str] = set()
    unnamed = []
    for node in graph.nodes:
        if node.name and node.name not in taken:
            taken.add(node.name)
        else:
            unnamed.append(node)
    counters: dict[str, int] = {}
    for node in unnamed:
        base = node.name or node.op
        k = counters.get(base, 0)
        while f"{base}_{k}" in taken:
            k += 1
        node.name = f"{base}_{k}"
        counters[base] = k + 1
        taken.add(node.name)


def _is_const(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant)


def _const_f32(t: gs.Tensor | None, ndim: int | None = None) -> bool:
    if t is None or not _is_const(t) or t.values.dtype != np.float32:
        return False
    return ndim is None or t.values.ndim == ndim


def _fold_constants(graph: gs.Graph, opsets: list[onnx.OperatorSetIdProto]) -> None:
    """Replace every node whose inputs are all constant by its (bounded-size) value.

    Shape arithmetic is folded too (`_ShapeFolder`): a `Shape` of a tensor whose dims
    the graph states is a constant, so a Reshape target computed from it folds.
    """
    outputs = {t.name for t in graph.outputs}
    shapes = _ShapeFolder(graph)
    for node in list(graph.nodes):  # graph order is topological, so chains fold in one sweep
        if node.domain in DEFAULT_DOMAINS and shapes.visit(node):
            continue
        if (node.domain not in DEFAULT_DOMAINS or node.op in NONDETERMINISTIC
                or (not node.inputs and node.op != "Constant")
                or not all(_is_const(t) or not t.name for t in node.inputs)
                or any(isinstance(v, gs.Graph) for v in node.attrs.values())
                or any(o.name in outputs for o in node.outputs)):
            continue
        values = _evaluate(node, opsets)
        if values is None:
            continue
        outs = list(node.outputs)
        node.outputs.clear()
        for out, v in zip(outs, values):
            out.to_constant(v)


class _ShapeFolder:
    """Folds shape arithmetic (Shape -> Gather/Slice/Squeeze/Unsqueeze/Cast -> Concat -> Reshape).

    A tracked vector holds, per element, its value or, for a dim the graph leaves
    symbolic, the (tensor, axis) it was read from. A vector whose every element is
    known becomes a constant, and ordinary constant folding takes it from there. A
    Reshape whose target is known except for dims read from its own input at the same
    axis gets the constant target with 0 there ("copy this dim"), the same shape for
    every batch size; so does a Flatten-like `x.view(x.size(0), -1)` with a free batch.
    """

    MAX_RANK = 64  # longer int vectors are not shapes

    def __init__(self, graph: gs.Graph):
        self.outputs = {t.name for t in graph.outputs}
        self.names = set(graph.tensors())
        self.known: dict[str, tuple[list, tuple[int, ...], np.dtype]] = {}  # name -> (elements, shape, dtype)

    def vector(self, t: gs.Tensor) -> tuple[list, tuple[int, ...], np.dtype] | None:
        if t.name in self.known:
            return self.known[t.name]
        if (_is_const(t) and t.values.dtype.kind == "i" and t.values.ndim <= 1
                and t.values.size <= self.MAX_RANK):
            return [int(v) for v in t.values.ravel()], t.values.shape, t.values.dtype
        return None

    def visit(self, node: gs.Node) -> bool:
        """Track or fold the node's output; True when the node is handled here."""
        if node.op == "Reshape" and len(node.inputs) == 2:
            return self.reshape(node)
        if not node.outputs or any(o.name in self.outputs for o in node.outputs):
            return False
        result = self.evaluate(node)
        if result is None:
            return False
        elements, shape, dtype = result
        out = node.outputs[0]
        if all(isinstance(e, int) for e in elements):
            node.outputs.clear()
            out.to_constant(np.array(elements, dtype).reshape(shape))
        else:
            self.known[out.name] = result
        return True

    def evaluate(self, node: gs.Node) -> tuple[list, tuple[int, ...], np.dtype] | None:
        ins = node.inputs
        if node.op == "Shape":
            dims = ins[0].shape
            if dims is None or len(ins) != 1:
                return None
            elements = [d if isinstance(d, int) and d >= 0 else (ins[0].name, i) for i, d in enumerate(dims)]
            elements = elements[slice(node.attrs.get("start", 0), node.attrs.get("end"))]
            return elements, (len(elements),), np.dtype(np.int64)
        if node.op == "Size" and ins[0].shape is not None and all(isinstance(d, int) for d in ins[0].shape):
            return [math.prod(ins[0].shape)], (), np.dtype(np.int64)
        vecs = [self.vector(t) if t.name else None for t in ins]
        if not vecs or vecs[0] is None or not any(t.name in self.known for t in ins):
            return None  # nothing symbolic: plain constant folding does the rest
        elements, shape, dtype = vecs[0]
        if node.op in ("Identity", "Cast") and len(shape) <= 1:
            to = node.attrs.get("to", onnx.helper.np_dtype_to_tensor_dtype(dtype))
            if to not in (TensorProto.INT64, TensorProto.INT32):
                return None
            return elements, shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
        if node.op == "Gather" and len(shape) == 1 and node.attrs.get("axis", 0) in (0, -1):
            idx = vecs[1]
            if idx is None or ins[1].name in self.known:
                return None
            picks, idx_shape, _ = idx
            if not all(-len(elements) <= i < len(elements) for i in picks):
                return None
            return [elements[i] for i in picks], idx_shape, dtype
        if node.op == "Slice" and len(shape) == 1 and 3 <= len(ins) <= 5:
            params = [self.vector(t) if t.name else None for t in ins[1:]]
            if any(p is None or len(p[0]) != 1 or t.name in self.known for p, t in zip(params, ins[1:])):
                return None
            starts, ends = params[0][0][0], params[1][0][0]
            if len(params) > 2 and params[2][0][0] not in (0, -1):
                return None
            step = params[3][0][0] if len(params) > 3 else 1
            if step == 0:
                return None
            picked = elements[slice(starts, ends, step)]
            return picked, (len(picked),), dtype
        if node.op == "Concat" and node.attrs.get("axis") in (0, -1):
            if any(v is None or len(v[1]) != 1 for v in vecs):
                return None
            return [e for v in vecs for e in v[0]], (sum(len(v[0]) for v in vecs),), dtype
        if node.op == "Unsqueeze" and shape == () and len(ins) == 2:
            axes = vecs[1]
            if axes is None or axes[0] not in ([0], [-1]):
                return None
            return elements, (1,), dtype
        if node.op == "Squeeze" and shape == (1,):
            axes = vecs[1] if len(ins) == 2 else None
            if len(ins) == 2 and (axes is None or axes[0] not in ([0], [-1])):
                return None
            return elements, (), dtype
        return None

    def reshape(self, node: gs.Node) -> bool:
        data, target = node.inputs
        vec = self.known.get(target.name)
        if vec is None or len(vec[1]) != 1 or node.attrs.get("allowzero", 0):
            return False
        elements = vec[0]
        if not all(isinstance(e, int) or e == (data.name, i) for i, e in enumerate(elements)):
            return False
        # allowzero=0: a 0 copies the input's dim at that axis, which is what the vector read
        name, k = f"{node.name}.shape", 0
        while name in self.names:
            name, k = f"{node.name}.shape_{k}", k + 1
        self.names.add(name)
        node.inputs[1] = gs.Constant(name, np.array(
            [e if isinstance(e, int) else 0 for e in elements], np.int64))
        return True


def _evaluate(node: gs.Node, opsets: list[onnx.OperatorSetIdProto]) -> list[np.ndarray] | None:
    """The node's outputs, or None when their size is unknown, too big, or evaluation fails."""
    proto = OnnxExporter.export_node(node)
    inits = [OnnxExporter.export_tensor_proto(t) for t in node.inputs if t.name]
    version = max((o.version for o in opsets if o.domain in DEFAULT_DOMAINS), default=OPSET)
    try:
        schema = onnx.defs.get_schema(node.op, version, "")
        types = {t.name: onnx.helper.make_tensor_type_proto(t.data_type, t.dims) for t in inits}
        inferred = onnx.shape_inference.infer_node_outputs(
            schema, proto, types, {t.name: t for t in inits}, opset_imports=opsets)
    except Exception:  # onnx raises several types here; not folding is always safe
        return None
    dtypes = []
    for o in proto.output:
        tt = inferred.get(o, onnx.TypeProto()).tensor_type
        if not o or not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim):
            return None
        if math.prod(d.dim_value for d in tt.shape.dim) > MAX_FOLD_ELEMENTS:
            return None
        dtypes.append(tt.elem_type)
    sub = onnx.helper.make_model(
        onnx.helper.make_graph([proto], "fold", [], [onnx.helper.make_empty_tensor_value_info(o)
                                                      for o in proto.output], inits),
        opset_imports=opsets)
    try:
        values = [np.asarray(v) for v in ReferenceEvaluator(sub).run(None, {})]
    except Exception:  # leave the node to onnxruntime rather than guess
        return None
    for v, dt in zip(values, dtypes):
        try:
            if onnx.helper.np_dtype_to_tensor_dtype(v.dtype) != dt:
                return None
        except (KeyError, ValueError, TypeError):
            return None
    return values


def _bias_vector(c: np.ndarray, n: int) -> np.ndarray | None:
    """`c` as a [n] vector if it broadcasts the same value to every row of an [m, n] output."""
    if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
        return None
    if c.size == 1:
        return np.full(n, c.reshape(()), c.dtype)
    if c.shape[-1] == n:
        return c.reshape(n)
    return None


class _Rewriter:
    """The layer rewrites of import: Gemm, MatMul(+Add), Conv, then BatchNormalization folding."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.names = set(graph.tensors().keys())
        self.canonical: set[int] = set()  # id() of canonical Gemm/Conv nodes
        # id() of a tensor -> the same values in the layout a layer reads (see `inner`)
        self.relabelled: dict[str, dict[int, gs.Tensor]] = {"tokens": {}, "conv1d": {}}  # activations
        self.outer: dict[str, dict[int, gs.Tensor]] = {"tokens": {}, "conv1d": {}}  # layer outputs put back

    def run(self) -> None:
        rewrites = {"Gemm": self.gemm, "MatMul": self.matmul, "Conv": self.conv,
                    **{op: partial(canonicalize_recurrent, self) for op in GATES}}
        for node in list(self.graph.nodes):
            if node.op in rewrites and node.domain in DEFAULT_DOMAINS and node.outputs:
                rewrites[node.op](node)
        for node in list(self.graph.nodes):
            if node.op == "BatchNormalization" and node.domain in DEFAULT_DOMAINS:
                self.fold_batchnorm(node)

    # -- helpers
    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def own(self, const: gs.Constant | None, node: gs.Node, values: np.ndarray, suffix: str) -> gs.Constant:
        """A constant holding `values` that only `node` reads (its weight or bias)."""
        values = np.ascontiguousarray(values, np.float32)
        if const is not None and len(const.outputs) == 1:
            if const.values.shape != values.shape or not np.array_equal(const.values, values):
                const.values = values
            return const
        return gs.Constant(self.fresh(f"{node.name}.{suffix}"), values)

    def variable(self, base: str) -> gs.Variable:
        return gs.Variable(self.fresh(base), dtype=np.float32)

    def add_node(self, op: str, name: str, inputs: list, outputs: list, attrs: dict | None = None) -> gs.Node:
        node = gs.Node(op, self.fresh_node(name), attrs or {}, inputs, outputs)
        self.graph.nodes.append(node)
        return node

    def fresh_node(self, base: str) -> str:
        taken = {n.name for n in self.graph.nodes}
        name, k = base, 0
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    def make_gemm(self, node: gs.Node, x: gs.Tensor, w: np.ndarray, b: np.ndarray,
                  w_const: gs.Constant | None, b_const: gs.Constant | None, out: gs.Tensor) -> None:
        """Turn `node` into the canonical Gemm(x, W[out, in], b[out]) -> out."""
        wc = self.own(w_const, node, w, "weight")
        bc = self.own(b_const, node, b, "bias")
        node.inputs.clear()
        node.outputs.clear()
        node.op = "Gemm"
        node.attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}
        node.inputs.extend([x, wc, bc])
        node.outputs.append(out)
        self.canonical.add(id(node))

    # -- rewrites
    def gemm(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if not _const_f32(b, 2):
            return  # B computed at run time: a host op
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        w = b.values if node.attrs.get("transB", 0) else b.values.T  # [out, in]
        w = w * np.float32(alpha) if alpha != 1.0 else w
        n = w.shape[0]
        y = node.outputs[0]
        bias, b_const, post = np.zeros(n, np.float32), None, None
        if c is not None:
            vec = _bias_vector(c.values, n) if _const_f32(c) else None
            if vec is not None:
                bias = vec * np.float32(beta) if beta != 1.0 else vec
                b_const = c if c.values.shape == (n,) else None
            else:
                post = c  # varies per row (or is computed): keep it as an Add after the layer
        x = a
        if node.attrs.get("transA", 0):
            x = self.variable(f"{a.name}.T")
            self.add_node("Transpose", f"{node.name}.transA", [a], [x], {"perm": [1, 0]})
        out = y
        if post is not None:
            out = self.variable(f"{node.name}.out")
            if beta != 1.0:
                if _is_const(post):
                    post = gs.Constant(self.fresh(f"{node.name}.C"),
                                       np.ascontiguousarray(post.values * np.float32(beta)))
                else:
                    scaled = self.variable(f"{node.name}.betaC")
                    self.add_node("Mul", f"{node.name}.beta",
                                  [post, gs.Constant(self.fresh(f"{node.name}.beta"), np.float32(beta))],
                                  [scaled])
                    post = scaled
        self.make_gemm(node, x, w, bias, b, b_const, out)
        if post is not None:
            self.add_node("Add", f"{node.name}.C", [out, post], [y])

    def matmul(self, node: gs.Node) -> None:
        x, b = node.inputs
        if _is_const(x) or not _const_f32(b, 2) or x.shape is None or len(x.shape) < 2:
            return  # a run-time (activation x activation) or unknown-rank product stays a host MatMul
        w = b.values.T
        n = w.shape[0]
        y = node.outputs[0]
        lead = list(x.shape[:-1])
        if sum(not isinstance(d, int) or d < 0 for d in lead) > 1:
            return  # two free leading dims: the tokens' layout is unknown until run time
        if len(lead) > 1:  # [..., K] @ [K, N]: one matrix-vector product per token, on [tokens, K]
            x = self.tokens(x, w.shape[1])
        bias, b_const, out, add = np.zeros(n, np.float32), None, y, None
        if len(y.outputs) == 1 and y not in self.graph.outputs:
            add = y.outputs[0]
            other = [t for t in add.inputs if t is not y]
            if (add.op == "Add" and add.domain in DEFAULT_DOMAINS and len(other) == 1
                    and _const_f32(other[0]) and _bias_vector(other[0].values, n) is not None):
                bias = _bias_vector(other[0].values, n)
                b_const = other[0] if other[0].values.shape == (n,) else None
                out = add.outputs[0]
                add.outputs.clear()
            else:
                add = None
        if len(lead) > 1:
            y_nd, out = out, self.variable(f"{node.name}.tokens_out")
            self.untokens(out, y_nd, lead, n)
        self.make_gemm(node, x, w, bias, b, b_const, out)
        if add is not None:
            add.inputs.clear()  # only now: while the Add reads the bias, the bias keeps its name

    def tokens(self, x: gs.Tensor, k: int) -> gs.Tensor:
        """`x` [..., k] as [tokens, k], one Reshape per tensor (Q, K and V read the same one)."""
        inner = self.inner(x, "tokens")
        if inner is None:
            inner = self.variable(f"{x.name}.tokens")
            self.add_node("Reshape", f"{x.name}.tokens",
                          [x, gs.Constant(self.fresh(f"{x.name}.tokens_shape"), np.array([-1, k], np.int64))], [inner])
            self.relabelled["tokens"][id(x)] = inner
        return inner

    def inner(self, x: gs.Tensor, layout: str) -> gs.Tensor | None:
        """The tensor in `layout` ("tokens": [tokens, k]; "conv1d": [N, C, 1, L]) that x is a
        relabelling of, if an earlier rewrite made one: a layer's output put back to x's
        layout (`self.outer`), perhaps through a Relu, which then moves before the
        relabelling, so consecutive layers with only a ReLU between them stay one segment."""
        for known in (self.relabelled[layout], self.outer[layout]):
            if id(x) in known:
                return known[id(x)]
        src = x.inputs[0] if len(x.inputs) == 1 else None
        if (src is None or src.op != "Relu" or src.domain not in DEFAULT_DOMAINS
                or id(src.inputs[0]) not in self.outer[layout] or len(src.inputs[0].outputs) != 1
                or src.inputs[0] in self.graph.outputs):
            return None
        back = src.inputs[0].inputs[0]  # the node that put the layer's output back to x's layout
        inner = self.variable(f"{src.name}.{layout}")
        inner.shape = self.outer[layout][id(src.inputs[0])].shape
        src.inputs[0] = self.outer[layout][id(src.inputs[0])]
        src.outputs[0] = inner
        back.inputs[0], back.outputs[0] = inner, x
        self.outer[layout][id(x)] = inner
        return inner

    def untokens(self, flat: gs.Tensor, y: gs.Tensor, lead: list, n: int) -> None:
        """Reshape a linear layer's [tokens, n] output `flat` back to `y` [*lead, n]
        (`lead`: the activation's leading dims, at most one of them free)."""
        shape = gs.Constant(self.fresh(f"{y.name}.shape"), np.array(
            [d if isinstance(d, int) and d >= 0 else -1 for d in lead] + [n], np.int64))
        self.add_node("Reshape", f"{y.name}.untokens", [flat, shape], [y])
        self.outer["tokens"][id(y)] = flat

    def conv(self, node: gs.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if _const_f32(w, 3) and (b is None or _const_f32(b, 1)):
            self.conv1d(node)
            return
        if not _const_f32(w, 4) or (b is not None and not _const_f32(b, 1)):
            return  # 1-D/3-D convs and run-time weights stay host ops
        kernel = [int(k) for k in w.values.shape[2:]]
        strides = [int(s) for s in node.attrs.get("strides", [1, 1])]
        dilations = [int(d) for d in node.attrs.get("dilations", [1, 1])]
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            spatial = list(x.shape[2:]) if x.shape is not None else []
            if len(spatial) != 2 or not all(isinstance(d, int) for d in spatial):
                return  # padding depends on the run-time image size
            total = [max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
                     for size, s, k, d in zip(spatial, strides, kernel, dilations)]
            small = [t // 2 for t in total]
            big = [t - t // 2 for t in total]
            pads = small + big if auto_pad == "SAME_UPPER" else big + small
        elif auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        else:
            pads = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]
        out_ch = w.values.shape[0]
        bias = b.values if b is not None else np.zeros(out_ch, np.float32)
        wc = self.own(w, node, w.values, "weight")
        bc = self.own(b, node, bias, "bias")
        node.attrs = {"dilations": dilations, "group": int(node.attrs.get("group", 1)),
                      "kernel_shape": kernel, "pads": pads, "strides": strides}
        node.inputs.clear()  # graphsurgeon's synchronised lists take no slice deletion
        node.inputs.extend([x, wc, bc])
        self.canonical.add(id(node))

    def conv1d(self, node: gs.Node) -> None:
        """A 1-D conv as the 2-D conv of height 1 it equals: Unsqueeze(x, 2) -> Conv -> Squeeze(2)."""
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if x.shape is None or len(x.shape) != 3:
            return  # the rank is needed to insert the height axis
        x4 = self.inner(x, "conv1d")
        if x4 is None:
            x4 = self.variable(f"{x.name}.h1")
            self.add_node("Unsqueeze", f"{x.name}.h1",
                          [x, gs.Constant(self.fresh(f"{x.name}.h1_axes"), np.array([2], np.int64))], [x4])
            self.relabelled["conv1d"][id(x)] = x4  # every 1-D conv of x reads the same one
            if x.shape is not None:
                x4.shape = [*x.shape[:2], 1, *x.shape[2:]]
        attrs = node.attrs
        pads = [int(p) for p in attrs.get("pads", [0, 0])]
        node.attrs = {**{k: v for k, v in attrs.items() if k not in ("kernel_shape", "pads", "strides", "dilations")},
                      "kernel_shape": [1, int(w.values.shape[2])], "pads": [0, pads[0], 0, pads[1]],
                      "strides": [1, int(attrs.get("strides", [1])[0])],
                      "dilations": [1, int(attrs.get("dilations", [1])[0])]}
        w4 = gs.Constant(self.fresh(f"{node.name}.weight"), np.ascontiguousarray(w.values[:, :, None, :]))
        y4 = self.variable(f"{y.name}.h1")
        if y.shape is not None:
            y4.shape = [*y.shape[:2], 1, *y.shape[2:]]
        node.inputs[0], node.inputs[1] = x4, w4
        node.outputs[0] = y4
        self.add_node("Squeeze", f"{y.name}.h1",
                      [y4, gs.Constant(self.fresh(f"{y.name}.h1_axes"), np.array([2], np.int64))], [y])
        self.outer["conv1d"][id(y)] = y4
        self.conv(node)

    def fold_batchnorm(self, node: gs.Node) -> None:
        x = node.inputs[0]
        if (node.attrs.get("training_mode", 0) or len([o for o in node.outputs if o.name]) != 1
                or not all(_const_f32(t, 1) for t in node.inputs[1:5]) or len(x.inputs) != 1):
            return
        layer = x.inputs[0]
        if id(layer) not in self.canonical or len(x.outputs) != 1 or x in self.graph.outputs:
            return
        w_const, b_const = layer.inputs[1], layer.inputs[2]
        gamma, beta, mean, var = (t.values.astype(np.float64) for t in node.inputs[1:5])
        if gamma.shape != (w_const.values.shape[0],):
            return
        scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        w = w_const.values * scale.reshape((-1,) + (1,) * (w_const.values.ndim - 1))
        b = (b_const.values - mean) * scale + beta
        y = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        for i, (const, values, suffix) in enumerate([(w_const, w, "weight"), (b_const, b, "bias")], 1):
            owned = self.own(const, layer, values, suffix)
            if owned is not const:
                layer.inputs[i] = owned
        layer.outputs.clear()
        layer.outputs.append(y)
