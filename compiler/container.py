"""The .eie container: a checksummed JSON manifest plus named binary members.

Writing is deterministic and atomic (temp file + fsync + rename); reading validates
every byte and executes nothing (JSON and raw bytes only). Since format version 2 the
manifest, and each member where that saves bytes, are zlib-deflated; version 1 files
(plain manifest, raw members) still read. docs/format.md is the spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__
from .errors import FormatError
from .fileio import atomic_writer
from .tensorfile import align, check_layout, load_strict_json, unpack_arrays

MAGIC = b"EIE\0"
FORMAT_VERSION = 2
HEADER = struct.Struct("<4sHHQ32s")  # magic, format_version, reserved, manifest length, sha256
MAX_FILE_BYTES = 1 << 32  # 4 GiB: far beyond any model the simulator can run
MAX_MANIFEST_BYTES = 64 << 20
RESERVED_KEYS = ("format_version", "eiec_version", "members")
_MEMBER_KEYS = {1: frozenset(["name", "offset", "size", "sha256"]),
                2: frozenset(["name", "offset", "size", "sha256", "codec", "raw_size"])}
CODECS = ("raw", "deflate")
MAX_DEFLATE_RATIO = 1032  # deflate's own limit: no stream inflates by more, so a bomb is refused unread


@dataclass
class EieFile:
    """A validated .eie file: its manifest and its members' bytes, by name."""

    manifest: dict[str, Any]
    members: dict[str, bytes]  # as the reader uses them: inflated
    path: str
    layout: dict[str, int]  # bytes of the file by part: "header", "manifest", "padding", "member:NAME" (stored)

    def member(self, name: str) -> bytes:
        """A member's bytes; FormatError naming the file if it has no such member."""
        if name not in self.members:
            raise FormatError(self.path, f"missing member {name}")
        return self.members[name]

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """A member that is a tensor archive (`eiec.tensorfile`), unpacked read-only."""
        return unpack_arrays(self.member(name), f"{self.path}:{name}")


def write_eie(path: str | os.PathLike, manifest: dict[str, Any], members: dict[str, bytes],
              raw: frozenset[str] | set[str] = frozenset()) -> None:
    """Write `manifest` (JSON-able; numpy scalars/arrays allowed) and `members` to `path`.

    The manifest gains "format_version", "eiec_version" and "members" (the caller must
    not set them). Members are stored deflated when that saves a sixteenth of their bytes,
    except those named in `raw` (kept readable in place). The same arguments always give
    the same bytes. Either the complete file appears at `path` or nothing changes there.
    """
    clash = [k for k in RESERVED_KEYS if k in manifest]
    if clash:
        raise ValueError(f"manifest keys {clash} are set by write_eie")
    _write(path, manifest, members, __version__, raw)


def read_eie(path: str | os.PathLike) -> EieFile:
    """Read and validate `path`; FormatError(path, one-line reason) if anything is off."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise FormatError(where, f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit")
            data = f.read(size + 1)  # read(n) allocates n bytes up front: ask for what is there
    except OSError as exc:
        raise FormatError(where, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise FormatError(where, f"file is over the {MAX_FILE_BYTES}-byte limit")
    return _parse(data, where)


def resign(
    path_in: str | os.PathLike, path_out: str | os.PathLike, member_name: str, new_bytes: bytes
) -> None:
    """Copy `path_in` to `path_out` with one member replaced and every checksum recomputed.

    Tests use it to build files that are damaged inside a member yet correctly signed.
    """
    eie = read_eie(path_in)
    if member_name not in eie.members:
        raise KeyError(f"{os.fspath(path_in)} has no member {member_name!r}")
    members = dict(eie.members)
    members[member_name] = bytes(new_bytes)
    manifest = {k: v for k, v in eie.manifest.items() if k not in RESERVED_KEYS}
    raw = {e["name"] for e in eie.manifest["members"] if e.get("codec", "raw") == "raw"}
    _write(path_out, manifest, members, eie.manifest["eiec_version"], raw)


def _deflate(data: bytes | memoryview) -> bytes:
    return zlib.compress(data, 9)


def _write(path: str | os.PathLike, manifest: dict[str, Any], members: dict[str, bytes], eiec_version: str,
           raw: frozenset[str] | set[str]) -> None:
    path = os.fspath(path)
    names = sorted(members)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError("member names must be non-empty strings")
    payloads, codecs, raw_sizes = [], [], []
    for n in names:
        data = memoryview(members[n]).cast("B")
        packed = _deflate(data) if n not in raw and len(data) else b""
        small = n not in raw and len(data) and len(packed) <= len(data) - len(data) // 16
        payloads.append(memoryview(packed) if small else data)
        codecs.append("deflate" if small else "raw")
        raw_sizes.append(len(data))
    table, offset = [], 0
    for name, payload, codec, raw_size in zip(names, payloads, codecs, raw_sizes):
        offset = align(offset)
        table.append({"name": name, "offset": offset, "size": len(payload), "codec": codec, "raw_size": raw_size,
                      "sha256": hashlib.sha256(payload).hexdigest()})
        offset += len(payload)
    full = dict(manifest, format_version=FORMAT_VERSION, eiec_version=eiec_version, members=table)
    text = _deflate(json.dumps(
        full, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_json_default
    ).encode("ascii"))
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(text), hashlib.sha256(text).digest())

    with atomic_writer(path) as f:
        head = len(header) + len(text)
        _write_chunk(f, header + text + bytes(align(head) - head))
        pos = 0  # offsets count from the (aligned) start of the payload area
        for entry, payload in zip(table, payloads):
            _write_chunk(f, bytes(entry["offset"] - pos))
            _write_chunk(f, payload)
            pos = entry["offset"] + len(payload)


def _write_chunk(f, chunk: bytes | memoryview) -> None:
    # One place every byte goes through, so tests can fail a write half way.
    f.write(chunk)


def _inflate(data: bytes, limit: int, where: str, what: str) -> bytes:
    """`data` inflated (at most `limit` bytes are ever allocated); FormatError unless it is one
    whole deflate stream of at most `limit` bytes."""
    z = zlib.decompressobj()
    try:
        out = z.decompress(data, limit + 1)
    except zlib.error:
        raise FormatError(where, f"{what}: damaged deflate stream") from None
    if len(out) > limit:
        raise FormatError(where, f"{what}: inflates to over {limit} bytes")
    if not z.eof or z.unused_data or z.unconsumed_tail:
        raise FormatError(where, f"{what}: damaged deflate stream")
    return out


def _parse(data: bytes, where: str) -> EieFile:
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise FormatError(where, "not an .eie file")
    if len(data) < HEADER.size:
        raise FormatError(where, f"truncated header ({len(data)} of {HEADER.size} bytes)")
    _, version, reserved, manifest_len, digest = HEADER.unpack_from(data)
    if version > FORMAT_VERSION:
        raise FormatError(where, f"format version {version} is newer than this eiec supports ({FORMAT_VERSION})")
    if version < 1:
        raise FormatError(where, f"format version {version} is not valid")
    if reserved:
        raise FormatError(where, "reserved header field is not zero")
    if manifest_len > MAX_MANIFEST_BYTES:
        raise FormatError(where, f"manifest is {manifest_len} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    manifest_end = HEADER.size + manifest_len
    if manifest_end > len(data):
        raise FormatError(where, f"truncated manifest ({len(data) - HEADER.size} of {manifest_len} bytes)")
    text = data[HEADER.size : manifest_end]
    if hashlib.sha256(text).digest() != digest:
        raise FormatError(where, "manifest checksum mismatch")
    if version >= 2:  # a version 1 manifest is plain JSON
        text = _inflate(text, MAX_MANIFEST_BYTES, where, "manifest")
    manifest = load_strict_json(text, where, "manifest")
    if not isinstance(manifest, dict):
        raise FormatError(where, "manifest is not a JSON object")
    if manifest.get("format_version") != version or type(manifest.get("format_version")) is not int:
        raise FormatError(where, f"manifest format_version {manifest.get('format_version')!r} differs from the header's {version}")
    if not isinstance(manifest.get("eiec_version"), str):
        raise FormatError(where, "manifest has no eiec_version string")

    table = manifest.get("members")
    if not isinstance(table, list):
        raise FormatError(where, "manifest has no members list")
    spans, seen = [], set()
    keys = _MEMBER_KEYS[version]
    for k, entry in enumerate(table):
        if not isinstance(entry, dict) or set(entry) != keys:
            raise FormatError(where, f"members[{k}] must have exactly {sorted(keys)}")
        name, offset, size, sha = entry["name"], entry["offset"], entry["size"], entry["sha256"]
        if not isinstance(name, str) or not name:
            raise FormatError(where, f"members[{k}]: name must be a non-empty string")
        if name in seen:
            raise FormatError(where, f"member {name}: listed twice")
        seen.add(name)
        if type(offset) is not int or type(size) is not int or offset < 0 or size < 0:
            raise FormatError(where, f"member {name}: offset and size must be non-negative ints")
        if not isinstance(sha, str) or len(sha) != 64 or sha.strip("0123456789abcdef"):
            raise FormatError(where, f"member {name}: sha256 must be 64 lowercase hex digits")
        codec, raw_size = entry.get("codec", "raw"), entry.get("raw_size", size)
        if codec not in CODECS or type(raw_size) is not int or (codec == "raw" and raw_size != size):
            raise FormatError(where, f"member {name}: codec must be one of {list(CODECS)}, raw_size its inflated size")
        spans.append((name, offset, size))
    payload_start = align(manifest_end)
    if payload_start > len(data):
        raise FormatError(where, "truncated after the manifest")
    area = memoryview(data)[payload_start:]
    if bytes(data[manifest_end:payload_start]).count(0) != payload_start - manifest_end:
        raise FormatError(where, "nonzero padding after the manifest")
    check_layout(spans, area, where, kind="member")

    members = {}
    layout = {"header": HEADER.size, "manifest": manifest_len}
    for entry in table:
        blob = data[payload_start + entry["offset"] : payload_start + entry["offset"] + entry["size"]]
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise FormatError(where, f"member {entry['name']}: checksum mismatch")
        if entry.get("codec") == "deflate":
            if entry["raw_size"] > MAX_DEFLATE_RATIO * len(blob) + 64:
                raise FormatError(where, f"member {entry['name']}: {entry['raw_size']} bytes cannot inflate "
                                         f"from {len(blob)}")
            blob = _inflate(blob, entry["raw_size"], where, f"member {entry['name']}")
            if len(blob) != entry["raw_size"]:
                raise FormatError(where, f"member {entry['name']}: inflates to {len(blob)} bytes, "
                                         f"not its raw_size {entry['raw_size']}")
        members[entry["name"]] = blob
        layout[f"member:{entry['name']}"] = entry["size"]
    layout["padding"] = len(data) - sum(layout.values())
    return EieFile(manifest, members, where, layout)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    raise TypeError(f"manifest value of type {type(x).__name__} is not JSON-able")
