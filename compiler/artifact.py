"""The compiled model: IR4 + segments <-> the .eie container's manifest and members.

`save_eie` splits an IR4 model into the host graph and per-segment members (program,
weights in the Huffman or the fixed storage form) and measures every size the manifest
reports from those bytes; `load_eie` checks and reassembles them into a runnable IR4.
The container's byte layout and checksums belong to eiec.container, the storage forms
to eiec.storage.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from . import isa
from .container import read_eie, write_eie
from .errors import FormatError, ModelError, RecipeError
from .importer import check_tensors, check_strings
from .ir import copy_model
from .parallel import map_layers
from .recipe import target_from_dict
from .segment import Segment, blob_name
from .storage import STORAGE_FORMS, derive_layers, huffman_record, pe_memory_bytes
from .tensorfile import pack_arrays, unpack_arrays

HOST_MEMBER = "host.onnx"
# a segment's members, by storage form: the Huffman records of its layers, or its PE images
WEIGHTS_MEMBER = {"huffman": "weights.huffman", "fixed": "images.tensors"}


@dataclass
class CompiledModel:
    """A loaded .eie: its manifest, the runnable IR4 model and its segments by name."""

    path: str
    manifest: dict[str, Any]
    model: onnx.ModelProto  # IR4 with the segment blobs attached
    segments: dict[str, Segment]
    layout: dict[str, int]  # the file's bytes by part (eiec.container.EieFile.layout)


def save_eie(path: str | os.PathLike, model: onnx.ModelProto, segments: list[Segment],
             manifest: dict[str, Any], storage: str = "huffman") -> dict[str, Any]:
    """Write IR4 as a .eie: the host graph without blobs, each segment's program and its
    weights in `storage` form ("huffman" or "fixed"). Returns the manifest written, with
    every layer's sizes in both forms measured from the bytes each form takes."""
    if storage not in STORAGE_FORMS:
        raise ValueError(f"storage must be one of {STORAGE_FORMS}, got {storage!r}")
    host = copy_model(model)
    blobs = {blob_name(s.name) for s in segments}
    kept = [t for t in host.graph.initializer if t.name not in blobs]
    host.graph.ClearField("initializer")
    host.graph.initializer.extend(kept)
    for node in host.graph.node:  # load_eie derives each segment's digest attribute from its members
        if node.op_type == "EIESegment":
            del node.attribute[:]
    members = {HOST_MEMBER: host.SerializeToString(deterministic=True)}
    sizes: dict[str, dict[str, int]] = {}
    entries = []
    # every layer's Huffman record, the layers on all cores (each re-encodes its whole matrix)
    pairs = [(s, l) for s in segments for l in s.layers]
    made = map_layers(lambda pair: huffman_record(pair[1], pair[0].target), pairs)
    by_layer = {(s.name, l.name): rec for (s, l), rec in zip(pairs, made)}
    for s in segments:
        members[f"{s.name}/program.isa"] = isa.encode(s.program)
        records = [by_layer[s.name, l.name] for l in s.layers]
        for l, rec in zip(s.layers, records):
            sizes[l.name] = {**pe_memory_bytes(l, s.target), **{f"{k}_huffman": len(v) for k, v in rec.items()},
                             "bytes_huffman": sum(len(v) for v in rec.values()),
                             "bytes_dense": 4 * (math.prod(l.weight_shape) + l.rows)}
        meta = s.meta()
        del meta["target"]  # the manifest's own target
        if storage == "huffman":  # what the images derived on load must hash to
            meta["digest"] = hashlib.sha256(s.to_blob()).hexdigest()
            members[f"{s.name}/{WEIGHTS_MEMBER[storage]}"] = b"".join(v for rec in records for v in rec.values())
            for lm in meta["layers"]:  # derived on load
                for k in ("tiles", "entries", "padding_entries"):
                    del lm[k]
        else:
            members[f"{s.name}/{WEIGHTS_MEMBER[storage]}"] = pack_arrays(s.image_arrays())
        entries.append(meta)
    manifest = _with_sizes(dict(manifest, storage=storage, segments=entries), sizes)
    # PE images stay raw, so tools can read them in place; everything else deflates where that helps
    write_eie(path, manifest, members, raw={n for n in members if n.endswith("/" + WEIGHTS_MEMBER["fixed"])})
    return manifest


def _with_sizes(manifest: dict[str, Any], sizes: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The manifest with each lowered layer's sizes and the model's totals and ratios."""
    layers = [dict(l, **sizes[l["name"]]) if l["name"] in sizes else l for l in manifest["layers"]]
    host = manifest["host_bytes"]
    fixed = host + sum(s["bytes_fixed"] for s in sizes.values())
    huffman = host + sum(s["bytes_huffman"] for s in sizes.values())
    original = manifest["original_bytes"]
    return dict(manifest, layers=layers, compressed_bytes=fixed, compressed_bytes_huffman=huffman,
                compression_ratio=round(original / max(1, fixed), 4),
                compression_ratio_huffman=round(original / max(1, huffman), 4))


def load_eie(path: str | os.PathLike) -> CompiledModel:
    """Read and check a .eie, rebuilding the runnable IR4 model. Raises FormatError."""
    path = os.fspath(path)
    f = read_eie(path)
    manifest, members = f.manifest, f.members
    if HOST_MEMBER not in members:
        raise FormatError(path, f"member {HOST_MEMBER} is missing")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(members[HOST_MEMBER]))
    except Exception:  # protobuf raises DecodeError and others on damaged bytes
        raise FormatError(path, f"member {HOST_MEMBER} is not an ONNX model") from None
    try:  # self-contained: external data would make onnxruntime read files beside the user's cwd
        check_strings(model, path, HOST_MEMBER)
        check_tensors(model, path, base=None)
    except ModelError as e:
        raise FormatError(path, f"member {HOST_MEMBER}: {e.reason}") from None
    segments: dict[str, Segment] = {}
    digests: dict[str, str] = {}
    seg_meta = manifest.get("segments")
    if not isinstance(seg_meta, list):
        raise FormatError(path, "manifest has no segment list")
    version = manifest["format_version"]
    storage = manifest.get("storage") if version >= 2 else "fixed"  # version 1 stored the PE images
    if version == 1 and isinstance(manifest.get("target"), dict):
        # its per-event energies predate the structural energy model, whose defaults apply instead
        manifest = dict(manifest, target={k: v for k, v in manifest["target"].items() if k != "energy"})
    if storage not in STORAGE_FORMS:
        raise FormatError(path, f"manifest storage {storage!r} is not one of {list(STORAGE_FORMS)}")
    try:  # every segment runs on this machine
        target = target_from_dict(manifest.get("target"), path)
    except RecipeError as e:
        raise FormatError(path, f"manifest target: {e.reason}") from None
    for meta in seg_meta:
        name = meta.get("name") if isinstance(meta, dict) else None
        program, weights = f"{name}/program.isa", f"{name}/{WEIGHTS_MEMBER[storage]}"
        if not isinstance(name, str) or program not in members or weights not in members:
            raise FormatError(path, f"segment {name!r}: program or {WEIGHTS_MEMBER[storage]} member missing")
        where = f"{path}:{name}"
        meta = dict(meta, target=manifest.get("target"))  # version 1 repeated the file's target here
        if storage == "huffman":
            layers = meta.get("layers")
            if not isinstance(layers, list) or not all(isinstance(l, dict) for l in layers):
                raise FormatError(where, "segment layers must be a list of objects")
            meta["layers"] = [dict(l) for l in layers]
            arrays = derive_layers(meta["layers"], bytes(members[weights]), target, f"{path}:{weights}")
        else:
            arrays = unpack_arrays(bytes(members[weights]), f"{path}:{weights}")
        seg = Segment.from_parts(meta, bytes(members[program]), arrays, where, derived=storage == "huffman")
        segments[name] = seg
        blob = seg.to_blob()
        digest = hashlib.sha256(blob).hexdigest()
        if storage == "huffman" and meta.get("digest") != digest:
            raise FormatError(where, "the PE images derived from its Huffman records do not match the "
                                     "manifest's digest")
        model.graph.initializer.append(numpy_helper.from_array(np.frombuffer(blob, np.uint8), blob_name(name)))
        digests[name] = digest
    # the runtime's cache key, derived here: the members are what is checked. A node runs the
    # segment whose blob it reads (a recurrent layer's segment has one node per time step)
    by_blob = {blob_name(name): name for name in digests}
    for node in model.graph.node:
        if node.op_type == "EIESegment" and len(node.input) > 1 and node.input[1] in by_blob:
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("digest", digests[by_blob[node.input[1]]]))
    used = {by_blob.get(n.input[1]) if len(n.input) > 1 else None
            for n in model.graph.node if n.op_type == "EIESegment"}
    if used != set(segments):
        raise FormatError(path, "the host graph's EIESegment nodes do not match the manifest's segments")
    _check_host_ops(model.graph, path)
    try:  # the host graph onnxruntime will run: refuse what it would refuse, before any run
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise FormatError(path, f"member {HOST_MEMBER} is not a valid graph: {first}") from None
    _check_summary(manifest, path)
    return CompiledModel(path, manifest, model, segments, f.layout)


EIE_OPS = frozenset({"EIESegment", "EIEDecode"})  # eiec's own ops in ai.onnx.contrib
HOST_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def _check_host_ops(graph: onnx.GraphProto, path: str) -> None:
    """Standard ONNX ops plus eiec's own: the extension library's other custom ops
    (tokenizers, decoders, ...) have no business in a compiled model."""
    for node in graph.node:
        if node.domain not in HOST_DOMAINS and not (node.domain == "ai.onnx.contrib" and node.op_type in EIE_OPS):
            raise FormatError(path, f"member {HOST_MEMBER}: node {node.name or node.op_type!r} uses "
                                    f"{node.domain}::{node.op_type}, which a compiled model never contains")
        for a in node.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                _check_host_ops(g, path)


_SUMMARY_COUNTS = ("original_bytes", "compressed_bytes", "compressed_bytes_huffman", "host_bytes")
_SUMMARY_RATIOS = ("compression_ratio", "compression_ratio_huffman")
_LAYER_COUNTS = ("bits", "entries", "padding_entries", "bytes_dense", "bytes_fixed", "bytes_huffman")


def _check_summary(m: dict[str, Any], path: str) -> None:
    """The manifest fields `eiec inspect` and the runtime read have their documented types,
    so a signed-but-edited manifest is a FormatError here, not a crash in a report."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise FormatError(path, f"manifest {what}")

    def count(x: Any) -> bool:
        return type(x) is int and x >= 0

    def number(x: Any) -> bool:
        return type(x) in (int, float) and math.isfinite(x)

    try:
        target_from_dict(m.get("target"), path)
    except RecipeError as e:
        raise FormatError(path, f"manifest target: {e.reason}") from None
    for k in _SUMMARY_COUNTS:
        need(count(m.get(k)), f"{k} must be a non-negative integer")
    for k in _SUMMARY_RATIOS:
        need(number(m.get(k)), f"{k} must be a number")
    layers = m.get("layers")
    need(isinstance(layers, list), "layers must be a list")
    for i, l in enumerate(layers):
        need(isinstance(l, dict) and isinstance(l.get("name"), str) and isinstance(l.get("kind"), str)
             and isinstance(l.get("shape"), list) and all(count(d) for d in l["shape"]),
             f"layers[{i}] needs a name, kind and shape")
        if not l.get("on_host"):
            need(number(l.get("density")) and all(count(l.get(k)) for k in _LAYER_COUNTS),
                 f"layers[{i}] ({l['name']}) needs a density and integer {', '.join(_LAYER_COUNTS)}")
    host_ops = m.get("host_ops", [])
    need(isinstance(host_ops, list) and all(isinstance(h, dict) and isinstance(h.get("name"), str)
                                            and isinstance(h.get("op"), str) for h in host_ops),
         "host_ops must be a list of {name, op}")
    sens = m.get("sensitivity")
    if sens:
        need(isinstance(sens, dict) and all(
            isinstance(s, dict) and all(isinstance(s.get(kind, {}), dict) and all(number(e) for e in s.get(kind, {}).values())
                                        for kind in ("density", "bits")) for s in sens.values()),
             "sensitivity must map layers to {density|bits: {value: error}}")
