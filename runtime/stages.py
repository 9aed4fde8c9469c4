"""The host graph cut at its segments: host ops in onnxruntime, each segment once on all rows.

Run whole, onnxruntime calls every `EIESegment` node once per chunk of rows it feeds
(per row for a model with a fixed batch of 1, as torch.onnx.export writes it), and the
onnxruntime-extensions op hands each result back as a Python list. Cut instead, each
stage's host ops (those that feed the next segment and are not run yet) are one small
onnxruntime session, run on every chunk exactly as the whole graph would run them; the
segment then runs once on the rows of all chunks (the simulator treats rows
independently, so its outputs, cycles and report are those of one call per chunk) and
its output is fed back, chunk by chunk, as a plain input.

The stages are cut from the graph as onnxruntime optimised it whole (`optimized_host`)
and run unoptimised, so every host result is the whole graph's, bit for bit. Every host
node runs exactly once, in the stage that first needs it; a tensor a later stage reads
is an output of the stage that makes it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime

from eiec.ortrun import node_reads, producers, upstream_nodes

from .ops import make_session, session_options

SEGMENT_OP = "EIESegment"


@dataclass
class Stage:
    """Host nodes run on each chunk (`sess`, None when there are none), then `segment`
    (an EIESegment node; None for the last stage) on the rows of all chunks."""

    sess: Any
    feeds: list[str]  # what `sess` reads: graph inputs and earlier stages' tensors
    fetches: list[str]  # what it makes that a later stage, a segment or the caller reads
    segment: onnx.NodeProto | None


def plan_stages(model: onnx.ModelProto) -> list[Stage] | None:
    """The stages of `model` as onnxruntime optimises it (`optimized_host`), or None when it
    cannot be cut: an EIESegment inside a subgraph, called by several nodes or reading a
    constant, a graph that is not sorted, or a tensor crossing a cut whose type is not declared."""
    model = optimized_host(model)
    g = model.graph
    if any(_has_segment(n) for n in g.node):
        return None
    segments = [n for n in g.node if n.op_type == SEGMENT_OP]
    if len({n.input[1] for n in segments}) < len(segments):
        # a segment several nodes call (an unrolled recurrent layer): run whole, its calls
        # stay in chunk order, which the joined report's float means follow to the last bit
        return None
    inits = {t.name: t for t in g.initializer}
    if any(n.input[0] in inits for n in segments):
        return None  # a segment input onnxruntime folded to a constant: not a chunk's rows
    types = {vi.name: vi for vi in (*g.input, *g.value_info, *g.output)}
    produced = producers(g)
    reads = [node_reads(n) for n in g.node]
    outputs = [o.name for o in g.output]
    done: set[int] = set()
    groups: list[tuple[list[int], onnx.NodeProto | None]] = []
    for i, n in enumerate(g.node):
        if n.op_type != SEGMENT_OP:
            continue
        nodes = _ancestors([n.input[0]], g, produced, reads, done)
        if nodes is None or any(j > i for j in nodes):
            return None
        done.update(nodes)
        done.add(i)
        groups.append((sorted(nodes), n))
    if not groups:
        return None
    last = _ancestors(outputs, g, produced, reads, done)
    if last is None:
        return None
    groups.append((sorted(last), None))
    # which stage reads each tensor: a stage's nodes (and its segment) after the cut
    readers: dict[str, set[int]] = {}
    for s, (nodes, seg) in enumerate(groups):
        for j in nodes:
            for name in reads[j]:
                readers.setdefault(name, set()).add(s)
        if seg is not None:
            readers.setdefault(seg.input[0], set()).add(-s - 1)  # the segment after stage s
    stages = []
    for s, (nodes, seg) in enumerate(groups):
        made = {o for j in nodes for o in g.node[j].output}
        read = set().union(*(reads[j] for j in nodes)) if nodes else set()
        feeds = sorted(read - made - set(inits) - {""})
        fetches = sorted(t for t in made if t in outputs or any(r != s for r in readers.get(t, ())))
        if any(t not in types for t in (*feeds, *fetches)):
            return None
        sess = None
        if nodes:
            graph = onnx.helper.make_graph(
                [g.node[j] for j in nodes], f"{g.name}_stage{s}", [types[t] for t in feeds],
                [types[t] for t in fetches], [inits[t] for t in sorted(read & set(inits))],
                value_info=[vi for vi in g.value_info if vi.name in made and vi.name not in fetches])
            stage_model = onnx.helper.make_model(graph, opset_imports=model.opset_import,
                                                 ir_version=model.ir_version)
            stage_model.functions.extend(model.functions)
            sess = make_session(stage_model, _stage_options())
        stages.append(Stage(sess, feeds, fetches, seg))
    return stages


def _stage_options() -> onnxruntime.SessionOptions:
    """No optimisation: the stages are cut from the graph onnxruntime has optimised already.
    Nor spinning: onnxruntime's threads would spin after each stage's few host ops, on the
    core the simulator's second thread uses (what they compute does not change)."""
    options = session_options()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def optimized_host(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph onnxruntime runs for `model`: after its optimisations, which depend on the
    whole graph (its NCHWc layout transform rewrites a pooling behind a custom op but not
    behind a graph input, and the other way round), so that each stage cut from it runs
    the very kernels on the very tensors the whole graph would. The segments' blobs (only
    their nodes' inputs) are left out while optimising."""
    blobs = {n.input[1] for n in model.graph.node if n.op_type == SEGMENT_OP and len(n.input) > 1}
    g = model.graph
    light = onnx.GraphProto(name=g.name, node=g.node, input=g.input, output=g.output, value_info=g.value_info,
                            sparse_initializer=g.sparse_initializer)
    light.initializer.extend(onnx.numpy_helper.from_array(np.zeros(1, np.uint8), t.name) if t.name in blobs else t
                             for t in g.initializer)
    host = onnx.helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version)
    host.functions.extend(model.functions)
    with tempfile.TemporaryDirectory(prefix="eiec-host-") as folder:
        options = session_options()
        options.optimized_model_filepath = os.path.join(folder, "host.onnx")
        make_session(host, options)
        return onnx.load(options.optimized_model_filepath)


def _has_segment(node: onnx.NodeProto) -> bool:
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
            if any(n.op_type == SEGMENT_OP or _has_segment(n) for n in sub.node):
                return True
    return False


def _ancestors(tensors: list[str], g: onnx.GraphProto, produced: dict[str, int], reads: list[set[str]],
               done: set[int]) -> set[int] | None:
    """The nodes not yet run that `tensors` need (stopping at nodes already run); None when
    they need a segment not yet run."""
    found = upstream_nodes(tensors, produced, reads, done=done)
    return None if any(g.node[j].op_type == SEGMENT_OP for j in found) else found


def run_stages(stages: list[Stage], names: list[str], feeds: list[dict[str, Any]],
               run_segment: Callable[[onnx.NodeProto, list[np.ndarray]], list[np.ndarray]],
               run_options: Any = None) -> list[list[Any]]:
    """Each chunk's outputs `names` (`feeds`: each chunk's inputs). `run_segment(node, xs)`
    runs a segment on every chunk's input xs at once and returns each chunk's output."""
    values = [dict(f) for f in feeds]
    for stage in stages:
        if stage.sess is not None:
            for v in values:
                v.update(zip(stage.fetches, stage.sess.run(stage.fetches, {t: v[t] for t in stage.feeds},
                                                           run_options)))
        if stage.segment is not None:
            x, y = stage.segment.input[0], stage.segment.output[0]
            for v, out in zip(values, run_segment(stage.segment, [v[x] for v in values])):
                v[y] = out
    return [[v[n] for n in names] for v in values]
