"""The lower pass (IR3 -> IR4): claim the chains of layers the accelerator runs.

A chain is FC/conv layers with their bias and ReLU fused, linked directly or through
a Flatten/Reshape that only relabels the vector; each becomes one `EIESegment` node
whose program keeps the activations in the PEs between layers. A recurrent node's R
matrices become one-layer segments its unrolled time steps call (`.recurrent`).
Everything else stays a host op. Also picks each layer's Q-formats and splits
images that do not fit the PE memories into tiles.

Q-formats (docs/simulator.md, "Choosing the formats"): a segment's input format holds
`HEADROOM` times its calibration range; every later format holds the smaller of a
worst-case bound propagated from the input format by interval arithmetic over the
quantised weights (then nothing can saturate there) and `HEADROOM` times its calibration
range. A recipe's `q_format` overrides either.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import networkx as nx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eiec import isa
from eiec.codec import decode_image, image_from_streams
from eiec.conv import block_diagonal
from eiec.errors import RecipeError
from eiec.fixedpoint import choose_frac, int_range, quantize, round_shift
from eiec.image import LINE_BYTES, SparseImage
from eiec.ir import ACTIVATION_PRODUCT, EIE_DOMAIN, Layer, copy_model, find_layers, get_initializer, producers, remove_initializer
from eiec.ortrun import free_rows, graph_inputs, quiet_options, rows_independent, session
from eiec.parallel import map_layers
from eiec.passmanager import Context, PassResult
from eiec.segment import ConvGeometry, LayerSpec, Segment, blob_name
from eiec.target import Target
from eiec.tiling import tile_layer

from .capture import Observed, Stream, Subgraphs, max_abs, run_fingerprint
from .recurrent import fc_view, layer_ranges, time_steps, unroll

# A format holds at least this many times the largest calibration value (up to twice that
# after rounding to a power of two), unless the worst-case bound is smaller: real inputs
# exceed the calibration range (bench/qformat.py measures what this costs and buys).
HEADROOM = 4.0
RELABEL_OPS = ("Flatten", "Reshape")
# ops that hold a layer's weights; any left in IR4 run on the host and `eiec inspect` lists them
_ONNX_WEIGHTED = ("Gemm", "Conv", "MatMul", "ConvTranspose", "Einsum", "LSTM", "GRU", "RNN")
HOST_LAYER_OPS = {
    "": _ONNX_WEIGHTED,
    "ai.onnx": _ONNX_WEIGHTED,
    "ai.onnx.ml": ("LinearClassifier", "LinearRegressor", "SVMClassifier", "SVMRegressor"),
}


class Lower:
    name = "lower"

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        layers = {l.name: l for l in find_layers(model) if _decode_node(model, l) is not None}
        if not layers:
            return PassResult(model, {"segments": [], "host_layers": _host_layers(model)}, False)
        names = list(layers)
        indices = dict(zip(names, map_layers(lambda n: _indices_of(model, layers[n]), names)))
        values = _run_for_ranges(model, layers, indices, range_tensors(model, layers), ctx)
        chains = find_chains(model, {n: l for n, l in layers.items() if l.kind != "recurrent"},
                             {t: v.shape[1:] for t, v in values.items()})
        recurrent = [l for l in layers.values() if l.kind == "recurrent"]

        def tiles_of(link: ChainLink) -> list[SparseImage]:  # independent per layer: all cores
            ctx.progress(f"tile {link.layer.name}")
            return tile_layer(link.layer.name, pe_matrix(link.layer, indices[link.layer.name]), ctx.target)

        links = [link for chain in chains for link in chain.links] + [ChainLink(l, None, None) for l in recurrent]
        tiles = dict(zip([l.layer.name for l in links], map_layers(tiles_of, links)))
        model = copy_model(model)
        overrides = {n: q for n, l in layers.items() if (q := ctx.layer_recipe(l).q_format)}
        segments = []
        rules = {}
        for i, chain in enumerate(chains):
            ctx.progress(f"lower segment {i} ({', '.join(chain.names)})")
            seg, seg_rules = build_segment(f"segment{i}", chain, model, values, indices, tiles, ctx.target,
                                           overrides, ctx.recipe.path)
            rules[seg.name] = seg_rules
            _replace_chain(model, chain, seg)
            segments.append(seg)
        for node_name in dict.fromkeys(l.node.name for l in recurrent):  # each recurrent node, unrolled
            node_layers = [l for l in find_layers(model) if l.kind == "recurrent" and l.node.name == node_name]
            segs = lower_recurrent(model, node_layers, set(layers), values, indices, tiles, ctx, overrides,
                                   len(segments), rules)
            segments += segs
        ctx.state.segments = segments
        stats = {
            "segments": [{"name": s.name, "layers": [l.name for l in s.layers], "resident": s.resident,
                          "instructions": len(s.program),
                          "tiles": {l.name: len(l.tiles) for l in s.layers},
                          "q_formats": {l.name: [l.in_frac, l.w_frac, l.out_frac] for l in s.layers},
                          "q_rules": rules[s.name]}
                         for s in segments],
            "host_layers": _host_layers(model),
        }
        return PassResult(model, stats)


def lower_recurrent(model: onnx.ModelProto, layers: list[Layer], encoded: set[str], values: dict[str, np.ndarray],
                    indices: dict[str, np.ndarray], tiles: dict[str, list[SparseImage]], ctx: Context,
                    overrides: dict[str, dict[str, int]], first: int, rules: dict) -> list[Segment]:
    """A recurrent node's `encoded` layers as one-layer segments, and the node unrolled around
    them (`eiec.passes.recurrent`); a layer the recipe skips stays a dense host product."""
    node = next(n for n in model.graph.node if n.name == layers[0].node.name)
    weights = {}
    for l in layers:
        if l.name in encoded:
            codebook = get_initializer(model, _decode_node(model, l).input[3]).astype(np.float32)
            weights[l.name] = codebook[indices[l.name]].reshape(l.shape)
    biases = {l.name: get_initializer(model, l.bias).astype(np.float32) for l in layers}
    rows = layer_ranges(node, layers, values, weights, biases)
    parts: list[Segment | Layer] = []
    segs = []
    for l in layers:
        if l.name not in encoded:
            parts.append(l)
            continue
        view = fc_view(l)
        values[view.node.input[0]], values[view.node.output[0]] = rows[l.name]
        name = f"segment{first + len(segs)}"
        ctx.progress(f"lower {name} ({l.name}, every time step)")
        seg, rules[name] = build_segment(name, Chain([ChainLink(view, None, None)]), model, values, indices, tiles,
                                         ctx.target, overrides, ctx.recipe.path)
        segs.append(seg)
        parts.append(seg)
    unroll(model, node, parts, time_steps(model, node))
    return segs


@dataclasses.dataclass
class ChainLink:
    layer: Layer
    relu: onnx.NodeProto | None  # the fused Relu, if any
    relabel: onnx.NodeProto | None  # a Flatten/Reshape before this layer, inside the chain

    @property
    def output(self) -> str:
        return self.relu.output[0] if self.relu is not None else self.layer.node.output[0]


@dataclasses.dataclass
class Chain:
    links: list[ChainLink]

    @property
    def names(self) -> list[str]:
        return [l.layer.name for l in self.links]

    @property
    def input(self) -> str:
        first = self.links[0]
        return first.relabel.input[0] if first.relabel is not None else first.layer.node.input[0]

    @property
    def output(self) -> str:
        return self.links[-1].output

    def nodes(self) -> list[onnx.NodeProto]:
        out = []
        for l in self.links:
            out += [n for n in (l.relabel, l.layer.node, l.relu) if n is not None]
        return out


def _decode_node(model: onnx.ModelProto, layer: Layer) -> onnx.NodeProto | None:
    src = producers(model).get(layer.weight)
    return src if src is not None and src.op_type == "EIEDecode" else None


def _graph(model: onnx.ModelProto) -> tuple[nx.DiGraph, dict[str, list[int]]]:
    """Node-index DAG of the model and, per tensor, the nodes consuming it."""
    g = nx.DiGraph()
    consumers: dict[str, list[int]] = {}
    prod = {}
    for i, n in enumerate(model.graph.node):
        g.add_node(i)
        for o in n.output:
            prod[o] = i
    for i, n in enumerate(model.graph.node):
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(i)
                if t in prod:
                    g.add_edge(prod[t], i)
    return g, consumers


def find_chains(model: onnx.ModelProto, layers: dict[str, Layer],
                shapes: dict[str, tuple[int, ...]]) -> list[Chain]:
    """Maximal chains of encoded layers, in topological order.

    `shapes` gives the per-sample shape of the tensors around the layers (from a
    calibration run); a Flatten/Reshape joins a chain only when it maps the batch
    to itself and the rest to one vector, i.e. when it only relabels.
    """
    g, consumers = _graph(model)
    nodes = model.graph.node
    graph_outputs = {o.name for o in model.graph.output}
    by_node = {l.node.name: l for l in layers.values()}

    def only_consumer(tensor: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        if len(users) != 1 or tensor in graph_outputs:
            return None
        return nodes[users[0]]

    def relabels(n: onnx.NodeProto) -> bool:
        src, dst = shapes.get(n.input[0]), shapes.get(n.output[0])
        return (n.op_type in RELABEL_OPS and src is not None and dst is not None
                and dst == (int(np.prod(src)),))

    claimed: set[str] = set()
    chains = []
    for i in nx.lexicographical_topological_sort(g):
        layer = by_node.get(nodes[i].name)
        if layer is None or layer.name in claimed:
            continue
        links = []
        relabel = None
        while layer is not None:
            claimed.add(layer.name)
            nxt = only_consumer(layer.node.output[0])
            relu = nxt if nxt is not None and nxt.op_type == "Relu" else None
            link = ChainLink(layer, relu, relabel)
            links.append(link)
            layer, relabel = None, None
            after = only_consumer(link.output)
            if after is not None and relabels(after):
                relabel, after = after, only_consumer(after.output[0])
            cand = by_node.get(after.name) if after is not None else None
            if cand is None or cand.name in claimed or cand.node.input[0] != (
                    relabel.output[0] if relabel is not None else link.output):
                continue
            # conv feeds conv directly; FC reads a vector (after a relabel when 4-D)
            if cand.kind == "conv" and (relabel is not None or link.layer.kind != "conv"):
                continue
            if cand.kind == "fc" and relabel is None and link.layer.kind == "conv":
                continue
            layer, relabel = cand, relabel
        chains.append(Chain(links))
    return chains


def range_tensors(model: onnx.ModelProto, layers: dict[str, Layer]) -> list[str]:
    """The tensors whose shapes and ranges lowering the (encoded) layers may read: each layer's input
    (a chain's input), its output or, when a Relu is its only consumer, the Relu's (a link's output:
    `find_chains` fuses that Relu), and the output of a Flatten/Reshape reading one of them (to tell
    whether it only relabels). A fused Relu's input and the tensors between chains are not read."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    around = set()
    for l in layers.values():
        out = l.node.output[0]
        users = consumers.get(out, [])
        fused = len(users) == 1 and users[0].op_type == "Relu" and out not in graph_outputs
        around |= {l.node.input[0], users[0].output[0] if fused else out}
    for n in model.graph.node:
        if n.op_type in RELABEL_OPS and n.input[0] in around:
            around.add(n.output[0])
    return sorted(around)


def _run_for_ranges(model: onnx.ModelProto, layers: dict[str, Layer], indices: dict[str, np.ndarray],
                    tensors: list[str], ctx: Context) -> dict[str, np.ndarray | Observed]:
    """Run the IR3 model on the calibration inputs: the watched tensors' shapes and ranges.

    Each EIEDecode is replaced by a graph input fed the weight it decodes to: the same
    model in plain ONNX, without handing VGG-sized weights through a Python op or
    serialising them into the probe model. When the reconstruct pass ran this very model
    on these rows (ctx.state.observed_run: the same `run_fingerprint`) and watched these
    tensors, its ranges are the answer and nothing runs. Else the model runs tensor by
    tensor (`capture.Stream`, holding only what the tensors still to come need), each
    reduced to its `Observed` on the way, except a recurrent node's hidden states
    (`recurrent.layer_ranges` reads them whole); a row-wise model runs whole, a few rows
    at a time instead (`_ranges_by_rows`).
    """
    decode_nodes = {_decode_node(model, l).name for l in layers.values()}
    kept = [n for n in model.graph.node if n.name not in decode_nodes]
    used = {t for n in kept for t in n.input}
    weights = {}
    for name, layer in layers.items():
        codebook = get_initializer(model, _decode_node(model, layer).input[3]).astype(np.float32)
        weights[layer.weight] = codebook[indices[name]].reshape(layer.shape)
    inits = [t for t in model.graph.initializer if t.name in used]
    whole = {l.node.output[0] for l in layers.values() if l.kind == "recurrent"}
    run = ctx.state.observed_run
    if not whole and run is not None and run.ranges.keys() >= set(tensors):
        values = {**{t.name: t for t in inits}, **weights}
        if run.fingerprint == run_fingerprint(kept, model.functions, values, ctx.calibration):
            ctx.progress("ranges: the reconstruct pass's run of this model")
            return {t: run.ranges[t] for t in tensors}
    graph = helper.make_graph(
        kept, "lower_probe",
        list(model.graph.input) + [helper.make_tensor_value_info(w, TensorProto.FLOAT, list(v.shape))
                                   for w, v in weights.items()],
        list(model.graph.output), inits)
    probe = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    made = {o: i for i, n in enumerate(kept) for o in n.output}
    order = sorted(tensors, key=lambda t: made.get(t, -1))  # graph inputs first, then as computed
    feeds = {i.name: ctx.calibration[i.name] for i in graph_inputs(probe) if i.name not in weights}
    if not whole and rows_independent(probe, feeds) and set(order) <= feeds.keys() | made.keys():
        return _ranges_by_rows(probe, feeds, weights, tensors)
    stream = Stream(Subgraphs(probe, feeds, weights), feeds)
    values: dict[str, np.ndarray | Observed] = {}
    for i, t in enumerate(order):
        v = stream.advance(t, order[i + 1:], weights)
        values[t] = v if t in whole else Observed(v.shape, max_abs(v))
    return {t: values[t] for t in tensors}


# Bytes of watched tensors the range probe of a row-wise model holds at once (`_ranges_by_rows`).
PROBE_BYTES = 512 << 20


def _ranges_by_rows(probe: onnx.ModelProto, feeds: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                    tensors: list[str]) -> dict[str, Observed]:
    """`_run_for_ranges` of a model whose every node is row-wise (`eiec.ortrun.rows_independent`):
    one session over the whole probe, run on a few rows at a time with every watched tensor an
    output, each reduced to its `Observed` per run (a largest magnitude is the same whatever rows
    are taken together). One row first, to learn the watched bytes per row; then as many rows a
    run as PROBE_BYTES holds. Against a session per watched tensor (each converting its inputs
    and outputs to the kernels' layouts): a third of the CPU time on ResNet-50."""
    fed = list(feeds)
    model = onnx.ModelProto()
    model.CopyFrom(probe)
    for vi in model.graph.input:  # the rows free, whatever batch the model declares
        if vi.name in feeds:
            vi.CopyFrom(free_rows(vi))
    outputs = [t for t in tensors if t not in feeds]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in outputs)
    sess = session(model, quiet_options(stop_spinning=True))  # the ranges' numpy reductions follow each run
    n = len(feeds[fed[0]])
    observed: dict[str, tuple[tuple[int, ...], float]] = {t: (feeds[t].shape, max_abs(feeds[t])) for t in tensors if t in feeds}
    r0, step = 0, 1
    while r0 < n:
        r1 = min(n, r0 + step)
        got = sess.run(outputs, {**{k: v[r0:r1] for k, v in feeds.items()}, **weights})
        for t, v in zip(outputs, got):
            shape = (n, *v.shape[1:]) if v.ndim and v.shape[0] == r1 - r0 else v.shape
            observed[t] = (shape, max(max_abs(v), observed[t][1] if t in observed else 0.0))
        if r0 == 0:
            step = max(1, PROBE_BYTES // max(1, sum(v.nbytes for v in got)))
        del got
        r0 = r1
    return {t: Observed(*observed[t]) for t in tensors}


def _max_abs(values: np.ndarray | Observed) -> float:
    return values.max_abs if isinstance(values, Observed) else max_abs(values)


def chain_formats(chain: Chain, overrides: dict[str, dict[str, int]],
                  recipe_path: str | None) -> tuple[int | None, list[int | None]]:
    """The recipe's fixed formats for a chain: (its input's in_frac, each link's out_frac).

    A layer's `in_frac` inside a chain is the previous layer's `out_frac` (the same
    activations); both given and different is an error naming the two layers.
    """
    names = chain.names
    q = [overrides.get(n) or {} for n in names]
    outs: list[int | None] = [f.get("out_frac") for f in q]
    for i in range(1, len(names)):
        given = q[i].get("in_frac")
        if given is None:
            continue
        if outs[i - 1] is not None and outs[i - 1] != given:
            raise RecipeError(recipe_path, f"layers: {names[i]}: q_format.in_frac {given} contradicts "
                              f"{names[i - 1]}'s q_format.out_frac {outs[i - 1]} ({names[i - 1]} writes "
                              f"{names[i]}'s input in the same segment)")
        outs[i - 1] = given
    return q[0].get("in_frac"), outs


def build_segment(name: str, chain: Chain, model: onnx.ModelProto, values: dict[str, np.ndarray],
                  indices: dict[str, np.ndarray], tiles: dict[str, list[SparseImage]],
                  target: Target, overrides: dict[str, dict[str, int]] | None = None,
                  recipe_path: str | None = None) -> tuple[Segment, dict[str, list[str]]]:
    """One chain as a segment: formats, quantised codebooks and biases, program.

    `overrides` maps layer names to a recipe's `q_format` ({in_frac, out_frac}). Also
    returns, per layer, what set its input and output formats: "recipe", "bound" (the
    worst-case bound: nothing the input format holds saturates it) or "calibration"
    (HEADROOM x the calibration range, smaller than the bound).
    """
    fixed_in, fixed_out = chain_formats(chain, overrides or {}, recipe_path)
    specs = []
    rules = {}
    in_frac = fixed_in if fixed_in is not None else choose_frac(
        _max_abs(values[chain.input]) * HEADROOM, target.act_bits)
    in_rule = "recipe" if fixed_in is not None else "calibration"
    a_lo, a_hi = int_range(target.act_bits)
    x_lo, x_hi = np.array(a_lo, np.int64), np.array(a_hi, np.int64)  # the input format's whole range
    for link, out_fixed in zip(chain.links, fixed_out):
        layer = link.layer
        dec = _decode_node(model, layer)
        codebook = get_initializer(model, dec.input[3]).astype(np.float32)
        w_indices = indices[layer.name]
        bias = get_initializer(model, layer.bias).astype(np.float32).ravel()
        x = values[layer.node.input[0]]
        y = values[link.output]
        w_frac = min(choose_frac(_max_abs(codebook), target.codebook_bits),  # codebook is exact: no headroom
                     _acc_frac_limit(w_indices, codebook, bias, in_frac, target) - in_frac)
        codebook_q = quantize(codebook, w_frac, target.codebook_bits)
        bias_acc = quantize(bias, in_frac + w_frac, target.acc_bits)
        conv = _conv_geometry(layer) if layer.kind == "conv" else None
        in_shape = tuple(int(d) for d in x.shape[1:])
        acc_lo, acc_hi = accumulator_interval(w_indices, codebook_q, bias_acc, x_lo, x_hi, in_shape, conv)
        reach = np.maximum(acc_hi, 0) if link.relu is not None else np.maximum(acc_hi, -acc_lo)
        bound = float(reach.max(initial=0)) * 2.0 ** -(in_frac + w_frac)
        seen = _max_abs(y) * HEADROOM
        if out_fixed is not None:
            out_frac, out_rule = out_fixed, "recipe"
        else:
            out_frac = choose_frac(min(bound, seen), target.act_bits)
            out_rule = "bound" if bound <= seen else "calibration"
        rules[layer.name] = [in_rule, out_rule]
        # the next layer's input interval: the write-back (round, saturate, ReLU) is monotone
        shift = in_frac + w_frac - out_frac
        x_lo, x_hi = (np.clip(round_shift(a, shift), a_lo, a_hi) for a in (acc_lo, acc_hi))
        if link.relu is not None:
            x_lo, x_hi = np.maximum(x_lo, 0), np.maximum(x_hi, 0)
        if conv is not None:  # one interval per output channel, the same at every position
            out_shape = tuple(int(d) for d in y.shape[1:])
            x_lo, x_hi = (np.broadcast_to(a[:, None, None], out_shape) for a in (x_lo, x_hi))
        nonzero = int(np.count_nonzero(w_indices))
        specs.append(LayerSpec(
            name=layer.name, kind=layer.kind, weight_shape=layer.shape,
            in_shape=in_shape, out_shape=tuple(int(d) for d in y.shape[1:]),
            relu=link.relu is not None, bits=int(np.log2(codebook.size)), density=nonzero / w_indices.size,
            in_frac=in_frac, w_frac=w_frac, out_frac=out_frac, codebook=codebook,
            codebook_q=codebook_q, bias=bias, bias_acc=bias_acc, tiles=tiles[layer.name], conv=conv))
        in_frac, in_rule = out_frac, out_rule
    resident = _fits_at_once(specs, target)
    seg = Segment(name, chain.input, chain.output, specs, [], target, resident)
    seg.program = emit_program(seg, in_len=int(np.prod(values[chain.input].shape[1:])))
    return seg, rules


def accumulator_interval(indices: np.ndarray, codebook_q: np.ndarray, bias_acc: np.ndarray,
                         x_lo: np.ndarray, x_hi: np.ndarray, in_shape: tuple[int, ...],
                         conv: ConvGeometry | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the least and greatest accumulator value (bias added) over every input
    with x_lo <= x <= x_hi elementwise (integer activations: scalars, or arrays of
    `in_shape`'s size, e.g. the previous conv's output before a flatten): b_i + sum_j min/max(w_ij x_lo_j, w_ij x_hi_j) over the quantised weights.

    Zero is added to every input interval (conv padding reads zeros). Exact: the terms
    are integers and the sums stay below 2^(acc_bits-1) <= 2^47 (`_acc_frac_limit`),
    where float64 is exact.
    """
    rows, cols = indices.shape
    def spread(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a, in_shape) if np.ndim(a) == 0 else np.reshape(a, in_shape)

    lo = np.minimum(spread(x_lo), 0).astype(np.float64)
    hi = np.maximum(spread(x_hi), 0).astype(np.float64)
    if conv is None:  # column j reads input element j
        lo_cols, hi_cols, group = lo.reshape(1, cols), hi.reshape(1, cols), 1
    else:  # column (c, kh, kw) of group g reads channel g * C/g + c at every position
        group, taps = conv.group, conv.kernel[0] * conv.kernel[1]
        lo_cols = np.repeat(lo.reshape(lo.shape[0], -1).min(axis=1), taps).reshape(group, cols)
        hi_cols = np.repeat(hi.reshape(hi.shape[0], -1).max(axis=1), taps).reshape(group, cols)
    r, c = np.nonzero(indices)
    w = np.asarray(codebook_q, np.float64)[indices[r, c]]
    g = r // (rows // group)
    at_lo, at_hi = w * lo_cols[g, c], w * hi_cols[g, c]
    base = np.asarray(bias_acc, np.float64)
    acc_lo = base + np.bincount(r, np.minimum(at_lo, at_hi), minlength=rows)
    acc_hi = base + np.bincount(r, np.maximum(at_lo, at_hi), minlength=rows)
    return acc_lo.astype(np.int64), acc_hi.astype(np.int64)


def _acc_frac_limit(indices: np.ndarray, codebook: np.ndarray, bias: np.ndarray, in_frac: int,
                    target: Target) -> int:
    """Largest accumulator fraction for which no partial sum can saturate, for any input.

    A row's running sum never exceeds sum_j |w_ij| * x_max (+ |b_i| at write-back), with
    x_max the largest value the input format holds; keeping that below 2^(acc_bits-1)
    makes the accumulators exact, so the error bound holds at any compression level.
    """
    row_abs = np.zeros(indices.shape[0])
    for k in range(1, codebook.size):  # per code, not per weight: 2^bits passes over the matrix
        row_abs += np.count_nonzero(indices == k, axis=1) * abs(float(codebook[k]))
    x_max = 2.0 ** (target.act_bits - 1 - in_frac)
    acc_max = float(row_abs.max(initial=0.0)) * x_max + float(np.abs(bias).max(initial=0.0))
    if acc_max <= 0:
        return target.acc_bits - 1
    return target.acc_bits - 1 - int(np.ceil(np.log2(acc_max)))


def _fits_at_once(specs: list[LayerSpec], target: Target) -> bool:
    """Whether every tile of the segment fits the PEs' sparse-matrix SRAMs together."""
    lines = sum(t.lines_per_pe for l in specs for t in l.tiles)
    return bool(np.max(lines) * LINE_BYTES <= target.spmat_sram_bytes)


def _indices_of(model: onnx.ModelProto, layer: Layer) -> np.ndarray:
    """The index matrix an IR3 layer's EIEDecode streams encode."""
    dec = _decode_node(model, layer)
    attrs = {a.name: helper.get_attribute_value(a) for a in dec.attribute}
    rows = layer.shape[0]
    img = image_from_streams(get_initializer(model, dec.input[0]), get_initializer(model, dec.input[1]),
                             get_initializer(model, dec.input[2]), rows, int(attrs["pes"]),
                             int(attrs["weight_bits"]), int(attrs["rel_bits"]))
    return decode_image(img)


def _conv_geometry(layer: Layer) -> ConvGeometry:
    pads = tuple(int(p) for p in layer.attr("pads", [0, 0, 0, 0]))
    return ConvGeometry(
        kernel=tuple(int(k) for k in layer.attr("kernel_shape", layer.shape[2:])),
        pads=(pads[0], pads[1], pads[2], pads[3]),
        strides=tuple(int(s) for s in layer.attr("strides", [1, 1])),
        dilations=tuple(int(d) for d in layer.attr("dilations", [1, 1])),
        group=int(layer.attr("group", 1)))


def pe_matrix(layer: Layer, indices: np.ndarray) -> np.ndarray:
    """The index matrix the PEs hold for a layer: a grouped conv's groups as diagonal blocks.

    One matrix, not one per group: a depthwise conv lowered per group runs each channel's
    single row on one PE (1/64 of the PEs busy) behind its own pipeline fill and its own
    64-PE pointer array; as one block-diagonal matrix the same broadcasts keep the
    pipeline full (docs/simulator.md, "Grouped and depthwise convs").
    """
    group = int(layer.attr("group", 1)) if layer.kind == "conv" else 1
    matrix = indices.reshape(indices.shape[0], -1)
    return block_diagonal(matrix, group) if group > 1 else matrix


def emit_program(seg: Segment, in_len: int) -> list[isa.Instr]:
    """The CCU's instruction stream: load each layer's images, run its tiles, ping-pong buffers."""
    F = isa.Flag
    prog = [isa.load_act(0, in_len)]
    src = 0
    for li, l in enumerate(seg.layers):
        dst = 1 - src
        prog.append(isa.load_cb(li))
        col_tiles = {}
        for t in l.tiles:
            col_tiles.setdefault(t.row_lo, []).append(t)
        for ti, t in enumerate(l.tiles):
            same_rows = col_tiles[t.row_lo]
            flags = F.BIAS | (F.RELU if l.relu else 0) | (F.CONV if l.kind == "conv" else 0)
            flags |= (F.FIRST if t is same_rows[0] else 0) | (F.LAST if t is same_rows[-1] else 0)
            cols = (t.col_lo, t.col_lo + t.cols)
            prog += [isa.load_ptr(li, ti, *cols), isa.load_spmat(li, ti, t.lines),
                     isa.run(li, ti, src, dst, (t.row_lo, t.row_lo + t.rows), cols, flags)]
        src = dst
    out_len = int(np.prod(seg.layers[-1].out_shape))
    prog += [isa.store(src, out_len), isa.end()]
    return prog


def _replace_chain(model: onnx.ModelProto, chain: Chain, seg: Segment) -> None:
    """Swap the chain's nodes (and their decode nodes and weights) for one EIESegment node."""
    decode_nodes = [_decode_node(model, l.layer) for l in chain.links]
    dead = {n.name for n in chain.nodes() + decode_nodes}
    dead_inits = {t for n in decode_nodes for t in n.input} | {l.layer.bias for l in chain.links}
    blob = seg.to_blob()
    node = helper.make_node("EIESegment", [chain.input, blob_name(seg.name)], [chain.output], name=seg.name,
                            domain=EIE_DOMAIN, digest=hashlib.sha256(blob).hexdigest())
    first = chain.nodes()[0].name
    new_nodes = []
    for n in model.graph.node:  # the segment takes the place of the chain's first node
        if n.name == first:
            new_nodes.append(node)
        elif n.name not in dead:
            new_nodes.append(n)
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    still_used = {t for n in model.graph.node for t in n.input}
    for t in dead_inits - still_used:
        remove_initializer(model, t)
    model.graph.initializer.append(numpy_helper.from_array(np.frombuffer(blob, np.uint8), blob_name(seg.name)))
    internal = {l.layer.node.output[0] for l in chain.links} | {l.output for l in chain.links[:-1]}
    internal |= {l.relabel.output[0] for l in chain.links if l.relabel is not None}
    keep_vi = [v for v in model.graph.value_info if v.name not in internal - {chain.output}]
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(keep_vi)


def _host_layers(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Weighted ops the lowering left on the host (dense), so inspect can list them."""
    consts = {t.name for t in model.graph.initializer}
    return [{"name": n.name, "op": n.op_type,
             **({"why": ACTIVATION_PRODUCT} if n.op_type in ("MatMul", "Gemm") and n.input[1] not in consts else {})}
            for n in model.graph.node if n.op_type in HOST_LAYER_OPS.get(n.domain or "", ())]
