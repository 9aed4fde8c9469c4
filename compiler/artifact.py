"""The compiled model: IR4 + segments <-> the .eie container's manifest and members.

`save_eie` splits an IR4 model into the host graph and per-segment members
(program, PE images); `load_eie` checks and reassembles them into a runnable IR4.
The container's byte layout and checksums belong to eiec.container.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from . import isa
from .container import read_eie, write_eie
from .errors import FormatError
from .segment import Segment
from .tensorfile import pack_arrays, unpack_arrays

HOST_MEMBER = "host.onnx"


@dataclass
class CompiledModel:
    """A loaded .eie: its manifest, the runnable IR4 model and its segments by name."""

    path: str
    manifest: dict[str, Any]
    model: onnx.ModelProto  # IR4 with the segment blobs attached
    segments: dict[str, Segment]


def _blob_name(segment: str) -> str:
    return f"{segment}.blob"


def save_eie(path: str | os.PathLike, model: onnx.ModelProto, segments: list[Segment],
             manifest: dict[str, Any]) -> None:
    """Write IR4 as a .eie: host graph without blobs, each segment's program and images."""
    host = onnx.ModelProto()
    host.CopyFrom(model)
    blobs = {_blob_name(s.name) for s in segments}
    kept = [t for t in host.graph.initializer if t.name not in blobs]
    host.graph.ClearField("initializer")
    host.graph.initializer.extend(kept)
    members = {HOST_MEMBER: host.SerializeToString(deterministic=True)}
    for s in segments:
        members[f"{s.name}/program.isa"] = isa.encode(s.program)
        members[f"{s.name}/images.tensors"] = pack_arrays(s.image_arrays())
    manifest = dict(manifest, segments=[s.meta() for s in segments])
    write_eie(path, manifest, members)


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
    segments: dict[str, Segment] = {}
    seg_meta = manifest.get("segments")
    if not isinstance(seg_meta, list):
        raise FormatError(path, "manifest has no segment list")
    for meta in seg_meta:
        name = meta.get("name") if isinstance(meta, dict) else None
        program, images = f"{name}/program.isa", f"{name}/images.tensors"
        if not isinstance(name, str) or program not in members or images not in members:
            raise FormatError(path, f"segment {name!r}: program or images member missing")
        arrays = unpack_arrays(bytes(members[images]), f"{path}:{images}")
        seg = Segment.from_parts(meta, bytes(members[program]), arrays, f"{path}:{name}")
        segments[name] = seg
        model.graph.initializer.append(
            numpy_helper.from_array(np.frombuffer(seg.to_blob(), np.uint8), _blob_name(name)))
    used = {n.name for n in model.graph.node if n.op_type == "EIESegment"}
    if used != set(segments):
        raise FormatError(path, "the host graph's EIESegment nodes do not match the manifest's segments")
    return CompiledModel(path, manifest, model, segments)
