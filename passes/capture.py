"""A layer's calibration inputs as its weight matrix sees them: the rows it multiplies
(FC: the batch; conv: im2col patches; recurrent: the hidden states), captured from
onnxruntime runs of the subgraphs between consecutive layers' inputs (`Stream`)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from collections import OrderedDict
from typing import Collection, Iterable, Mapping

import numpy as np
import onnx

from eiec.conv import conv_output_hw, im2col
from eiec.ir import Layer
from eiec.ortrun import (NO_ROW_AXIS, RowSession, common_batch, free_rows, graph_inputs, join_rows, node_reads, pad_rows,
                         producers, quiet_options, rows_independent, session, shape_skeleton, skeleton_row_axes,
                         upstream_nodes)
from eiec.parallel import map_layers

# Rows per layer the passes and the auto search reconstruct from, and their memory cap.
CAPTURE_ROWS = 8192
CAPTURE_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Observed:
    """What lowering reads of a calibration tensor that is not kept whole: its shape and largest magnitude."""

    shape: tuple[int, ...]
    max_abs: float


# Bytes of a tensor above which `max_abs` reduces its parts on all cores.
MAX_ABS_SPLIT_BYTES = 16 << 20


def max_abs(values: np.ndarray) -> float:
    """The largest |value| (0.0 for an empty tensor), without a |values| temporary (a ResNet activation is
    200 MB); a large tensor's parts on all cores."""
    if values.size == 0:
        return 0.0
    if values.nbytes < MAX_ABS_SPLIT_BYTES or not values.flags.c_contiguous:
        return _max_abs(values)
    return max(map_layers(_max_abs, np.array_split(values.reshape(-1), os.cpu_count() or 1)))


def _max_abs(values: np.ndarray) -> float:
    return max(-float(values.min()), float(values.max()), 0.0)


@dataclasses.dataclass(frozen=True)
class ObservedRun:
    """Tensors' `Observed` from one run of a model on calibration rows, and the run's `run_fingerprint`:
    they hold for any run with the same fingerprint."""

    fingerprint: bytes
    ranges: dict[str, Observed]


def run_fingerprint(nodes: Iterable[onnx.NodeProto], functions: Iterable[onnx.FunctionProto],
                    values: Mapping[str, np.ndarray | onnx.TensorProto], rows: Mapping[str, np.ndarray]) -> bytes:
    """sha256 of what a run of `nodes` (in order, calling `functions`) on calibration `rows` computes
    from: the nodes, the functions, the values of the tensors the nodes read that no node computes
    (initializers and fed weights, name -> array) and the rows. Equal fingerprints, equal tensors."""
    h = hashlib.sha256()

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for part in (*nodes, *functions):
        put(part.SerializeToString(deterministic=True))
    for kind, arrays in ((b"value", values), (b"row", rows)):
        for name in sorted(arrays):
            a = arrays[name]
            a = np.ascontiguousarray(onnx.numpy_helper.to_array(a) if isinstance(a, onnx.TensorProto) else a)
            put(kind + name.encode())
            put(f"{a.dtype.str}{a.shape}".encode())
            put(a.view(np.uint8).reshape(-1).data if a.size else b"")
    return h.digest()


def conv_params(layer: Layer) -> dict:
    """The im2col parameters of a canonical Conv layer (explicit pads, see eiec.ir)."""
    kh, kw = layer.shape[2], layer.shape[3]
    return {
        "kernel": tuple(layer.attr("kernel_shape", [kh, kw])),
        "pads": tuple(layer.attr("pads", [0, 0, 0, 0])),
        "strides": tuple(layer.attr("strides", [1, 1])),
        "dilations": tuple(layer.attr("dilations", [1, 1])),
        "group": int(layer.attr("group", 1)),
    }


def layer_rows(layer: Layer, x: np.ndarray) -> int:
    """How many rows the layer's weight matrix multiplies for input tensor x (FC: batch; conv: positions)."""
    if layer.kind == "fc":
        return x.shape[0]
    if layer.kind == "recurrent":
        return _hidden_states(layer, x).shape[0]
    p = conv_params(layer)
    Ho, Wo = conv_output_hw(x.shape[2:], p["kernel"], p["pads"], p["strides"], p["dilations"])
    return x.shape[0] * Ho * Wo


def layer_matrix(layer: Layer, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The chosen rows of the layer's input as its weight matrix sees them ([n, in] or [g, n, in_g])."""
    if layer.kind == "fc":
        return x.reshape(x.shape[0], -1)[rows]
    if layer.kind == "recurrent":
        return _hidden_states(layer, x)[rows]
    p = conv_params(layer)
    patches = im2col(x, rows=rows, **p)
    return patches[0] if p["group"] == 1 else patches


def _hidden_states(layer: Layer, y: np.ndarray) -> np.ndarray:
    """A recurrent layer's rows: its direction's hidden states in the node's output Y
    [T, dirs, B, H], which are the inputs h(t-1) of the next steps. (A GRU's hidden gate
    multiplies r * h(t-1); h stands in for it.)"""
    return y[:, int(layer.name.endswith("_reverse"))].reshape(-1, y.shape[-1])


def row_cap(layer: Layer, max_rows: int, max_bytes: int | None) -> int:
    cols = int(np.prod(layer.shape[1:])) * (int(layer.attr("group", 1)) if layer.kind == "conv" else 1)
    return max_rows if max_bytes is None else min(max_rows, max(1, max_bytes // (4 * max(cols, 1))))


class Subgraphs:
    """The model cut at its layers' inputs: onnxruntime sessions of the nodes between them.

    A `Stream` asks for the nodes that compute some tensors from what it holds; they run as
    one sub-model (those nodes, their initializers, the held tensors as inputs). `weights`
    (the layers' weights and biases, name -> array) are inputs of the sub-models, fed on every
    run (these arrays, or a compressed layer's overriding them): no session holds a copy of
    them, nor is any serialised for onnxruntime (VGG-16's fc6 is 400 MB), and the arithmetic
    is the whole model's (a weight onnxruntime may not treat as a constant). The fed rows
    are cut into chunks of the inputs' fixed batch (as `run_rows` does: the last one padded
    by repeating its last row), and every tensor is held per chunk, so nodes whose shapes
    are fixed for that batch (a Reshape to [1, -1]) run as they were exported; a model whose
    every node is row-wise (`eiec.ortrun.rows_independent`) runs all rows at once instead.
    """

    def __init__(self, model: onnx.ModelProto, fed: Iterable[str], weights: dict[str, np.ndarray]):
        self.model = model
        g = model.graph
        self.order = {n.name: i for i, n in enumerate(g.node)}
        self.producer = producers(g)
        self.reads = [node_reads(n) for n in g.node]
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = {vi.name: vi for vi in g.input}
        self.weights = weights
        declared = {gi.name: gi.dims for gi in graph_inputs(model)}
        self.fed = [n for n in fed if n in declared]
        self.batch = common_batch(declared, self.fed)
        if self.batch is not None and rows_independent(model, self.fed):
            # every node row-wise (`eiec.ortrun.lift_fixed_batch`): all rows in one run, whatever
            # batch the inputs declare (VGG-16's FC weights streamed once, not once per row)
            self.batch = None
            self.inputs.update({n: free_rows(self.inputs[n]) for n in self.fed})
        self._sessions: OrderedDict[tuple, RowSession] = OrderedDict()
        self._axes: dict[str, int | None] | None = None

    def chunks(self, rows: dict[str, np.ndarray]) -> tuple[list[dict[str, np.ndarray]], list[int]]:
        """The fed rows per run: chunks of the fixed batch (one chunk when it is symbolic), and their real rows."""
        whole = {k: v for k, v in rows.items() if np.ndim(v) == 0}  # scalars have no rows
        rows = {k: v for k, v in rows.items() if k not in whole}
        n = next(iter(rows.values())).shape[0] if rows else 0
        size = self.batch
        if size is None or n == size or n == 0:
            return [{**rows, **whole}], [n]
        starts = range(0, n, size)
        return ([{**{k: pad_rows(v[s:s + size], size) for k, v in rows.items()}, **whole} for s in starts],
                [min(size, n - s) for s in starts])

    def join(self, name: str, parts: list[np.ndarray], real: list[int]) -> np.ndarray:
        """Tensor `name` of all rows from its chunks (their real rows, on its row axis)."""
        if self.batch is None or real == [self.batch]:
            return parts[0]
        if self._axes is None:  # by shape inference, once: the model's row axes of the tensors asked for
            skeleton = shape_skeleton(self.model)
            have = {vi.name for vi in skeleton.graph.output}
            skeleton.graph.output.extend(onnx.ValueInfoProto(name=t) for t in self.producer if t not in have)
            self._axes = skeleton_row_axes(skeleton, self.fed)
        axis = 0 if name in self.fed else self._axes.get(name, NO_ROW_AXIS)  # fed rows lead
        return join_rows(list(zip(real, parts)), self.batch, axis)

    def nodes_for(self, targets: Iterable[str], held: Collection[str]) -> list[int]:
        """The nodes (graph order) that compute `targets` from the tensors `held`, initializers and graph inputs."""
        return sorted(upstream_nodes(targets, self.producer, self.reads, held=held))

    def session(self, nodes: list[int], inputs: list[tuple[str, np.ndarray]], outputs: list[str]) -> RowSession:
        """The sub-model of `nodes` reading the held `inputs` (name, one chunk's value), writing `outputs`."""
        key = (tuple(nodes), tuple((n, a.dtype.str, a.shape) for n, a in inputs), tuple(outputs))
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        g = self.model.graph
        sub = onnx.GraphProto(name=g.name, node=[g.node[i] for i in nodes])
        for name, a in inputs:
            sub.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)))
        read = set().union(*(self.reads[i] for i in nodes)) - {n for n, _ in inputs}
        for name in sorted(read):
            if name in self.weights:
                w = self.weights[name]
                sub.input.append(onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(w.dtype), list(w.shape)))
            elif name in self.inits:
                sub.initializer.append(self.inits[name])
            elif name in self.inputs:
                sub.input.append(self.inputs[name])
        sub.output.extend(onnx.ValueInfoProto(name=t) for t in outputs)
        m = onnx.helper.make_model(sub, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        m.functions.extend(self.model.functions)
        sess = session(m, quiet_options(stop_spinning=True))  # numpy work on the layer follows each run
        self._sessions[key] = sess
        while len(self._sessions) > 2:  # the dense and compressed streams take the same steps
            self._sessions.popitem(last=False)
        return sess


class Stream:
    """The model's tensors on the calibration rows, computed up to each layer's input in turn.

    `advance` runs only the nodes between what the stream holds and the tensors asked for,
    then keeps just the tensors the nodes still to come will read (`later`): at any time the
    stream holds the frontier of the graph, not every layer's input. Copies share arrays
    (they are never written to). The `watch`ed tensors the stream feeds or computes are
    outputs of its runs, and reduced to their `Observed` on the way (`observed`; None: not
    reduced), whether kept or not.
    """

    def __init__(self, graph: Subgraphs, rows: dict[str, np.ndarray], watch: Collection[str] = ()):
        self.graph = graph
        chunks, self.real = graph.chunks(rows)
        self.held: dict[str, list[np.ndarray]] = {k: [c[k] for c in chunks] for k in chunks[0]}
        self.done: set[int] = set()  # the nodes run
        self.watch = frozenset(watch)
        self.observed: dict[str, Observed] | None = {}
        for name in self.watch & rows.keys():
            v = np.asarray(rows[name])
            self.observed[name] = Observed(v.shape, max_abs(v))

    def copy(self) -> "Stream":
        other = copy.copy(self)
        other.held, other.done = dict(self.held), set(self.done)
        other.observed = None if self.observed is None else dict(self.observed)
        return other

    def _observe(self, name: str) -> None:
        v = self.graph.join(name, self.held[name], self.real)
        self.observed[name] = Observed(v.shape, max_abs(v))

    def ran(self, node_name: str) -> bool:
        return self.graph.order[node_name] in self.done

    def advance(self, target: str, later: Iterable[str], weights: dict[str, np.ndarray]) -> np.ndarray:
        """Tensor `target` on all rows, the model running with `weights` (name -> array) overriding
        its initializers; then only what computing the tensors `later` needs is kept."""
        gr = self.graph
        nodes = gr.nodes_for([target], self.held)
        done = self.done | set(nodes)
        produced = {o for i in nodes for o in gr.model.graph.node[i].output if o}
        available = self.held.keys() | produced
        keep = set(later) | set().union(*(gr.reads[i] for i in gr.nodes_for(later, available)))
        if nodes:
            outputs = [target] + sorted(((keep | self.watch) & produced) - {target})
            read = set().union(*(gr.reads[i] for i in nodes))
            inputs = sorted(read & self.held.keys())
            sess = gr.session(nodes, [(n, self.held[n][0]) for n in inputs], outputs)
            over = {k: weights.get(k, v) for k, v in gr.weights.items() if k in read}
            results = [sess.run(outputs, {**{n: self.held[n][c] for n in inputs}, **over})
                       for c in range(len(self.real))]
            for j, name in enumerate(outputs):
                self.held[name] = [r[j] for r in results]
                if name in self.watch and self.observed is not None:
                    self._observe(name)
            del results
        if target in self.held:
            value = gr.join(target, self.held[target], self.real)
        else:  # an initializer the layer reads as its input: the same for every row
            value = weights.get(target, onnx.numpy_helper.to_array(gr.inits[target]))
        self.held = {k: v for k, v in self.held.items() if k in keep}
        self.done = done
        return value


def capture_layer_inputs(
    model: onnx.ModelProto,
    layers: list[Layer],
    inputs: dict[str, np.ndarray],
    max_rows: int = 20000,
    seed: int = 0,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Each layer's inputs on the calibration data, as the rows its weight matrix multiplies.

    The model runs layer input by layer input (`Stream`), holding only the tensors later
    layers still need. FC: X [n, in]. Conv: im2col patches, [n, in/g*kh*kw] when g = 1,
    else [g, n, in/g*kh*kw] (the per-group form every `reconstruct` function takes).
    At most max_rows rows (and, with max_bytes, at most max_bytes of float32 rows per
    layer), picked uniformly without replacement (seeded) and kept in order.
    """
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    todo = sorted(layers, key=lambda l: order[l.node.name])
    stream = Stream(Subgraphs(model, inputs, {}), inputs)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(todo):
        x = stream.advance(layer.input, [l.input for l in todo[i + 1:]], {})
        out[layer.name] = layer_matrix(layer, x, pick_rows(layer_rows(layer, x), row_cap(layer, max_rows, max_bytes), rng))
    return {layer.name: out[layer.name] for layer in layers}


def pick_rows(n: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    if n <= max_rows:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_rows, replace=False))
