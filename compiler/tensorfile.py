"""A deterministic, pickle-free archive of named numpy arrays (segment blobs, .eie members).

Layout (docs/format.md): magic, version, a length-prefixed JSON header naming each
array's dtype, shape, offset and size, then the raw little-endian bytes, 8-byte aligned.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from typing import Any, Iterable

import numpy as np

from .errors import FormatError
from .fileio import input_file_size

MAGIC = b"EIEA"
VERSION = 1
PREFIX = struct.Struct("<4sIQ")  # magic, version, header length
ALIGN = 8
DTYPES = frozenset(
    ["uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float32", "float64"]
)
MAX_NDIM = 32
# Bound on the element count a header may declare, counting zero-length axes as 1:
# an empty array with absurd dims would otherwise make numpy raise a non-FormatError.
MAX_ELEMENTS = 1 << 40
_ENTRY_KEYS = frozenset(["dtype", "shape", "offset", "nbytes"])
MAX_NPZ_BYTES = 1 << 31  # all arrays of a user's .npz together, as numpy would hold them
_ZIP_MAGIC = b"PK\x03\x04"


def align(n: int) -> int:
    """`n` rounded up to the archive's (and the container's) 8-byte alignment."""
    return -(-n // ALIGN) * ALIGN


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise `arrays` (name -> array). The same arrays always give the same bytes.

    Arrays are stored in name order, C-contiguous, little-endian. Only the dtypes in
    `DTYPES` are accepted (bool: store as uint8); anything else is a TypeError.
    """
    header: dict[str, dict] = {}
    blobs: list[tuple[int, bytes]] = []
    end = 0
    for name in sorted(arrays):
        if not isinstance(name, str):
            raise TypeError(f"array name {name!r} is not a str")
        arr = np.asarray(arrays[name])
        if arr.dtype.name not in DTYPES:
            raise TypeError(f"array {name!r}: dtype {arr.dtype} is not storable; use one of {sorted(DTYPES)}")
        raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        offset = align(end)
        header[name] = {"dtype": arr.dtype.name, "shape": list(arr.shape), "offset": offset, "nbytes": len(raw)}
        blobs.append((offset, raw))
        end = offset + len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    out = bytearray(PREFIX.pack(MAGIC, VERSION, len(text)))
    out += text
    out += bytes(align(len(out)) - len(out))
    data_start = len(out)
    out += bytes(end)
    for offset, raw in blobs:
        out[data_start + offset : data_start + offset + len(raw)] = raw
    return bytes(out)


def unpack_arrays(data: bytes | bytearray | memoryview, where: str) -> dict[str, np.ndarray]:
    """Read an archive made by `pack_arrays`; FormatError(where, reason) if it is damaged.

    Returned arrays are read-only: views into `data` when it is immutable (bytes or a
    read-only memoryview), otherwise views into a private copy. Empty arrays are fresh
    read-only zero-size arrays. Nothing larger than `data` is ever allocated.
    """
    view = memoryview(data).cast("B")
    buf = data if isinstance(data, bytes) else (view if view.readonly else bytes(view))
    size = len(view)
    if size < PREFIX.size:
        raise FormatError(where, f"not a tensor archive ({size} bytes, shorter than its {PREFIX.size}-byte prefix)")
    magic, version, header_len = PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise FormatError(where, "not a tensor archive (bad magic)")
    if version != VERSION:
        raise FormatError(where, f"tensor archive version {version} is not supported ({VERSION})")
    if header_len > size - PREFIX.size:
        raise FormatError(where, f"tensor archive header length {header_len} runs past the end ({size} bytes)")
    header_end = PREFIX.size + header_len
    header = _parse_header(bytes(view[PREFIX.size : header_end]), where)
    data_start = align(header_end)
    if data_start > size:
        raise FormatError(where, "tensor archive truncated after its header")
    if not _all_zero(view[header_end:data_start]):
        raise FormatError(where, "tensor archive: nonzero padding after the header")

    entries = {name: _check_entry(name, entry, where) for name, entry in header.items()}
    check_layout(
        [(name, off, nb) for name, (_, _, off, nb) in entries.items()],
        view[data_start:],
        where,
        kind="array",
    )
    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape, offset, nbytes) in entries.items():
        if nbytes == 0:
            arr = np.zeros(shape, dtype)
        else:
            count = nbytes // dtype.itemsize
            arr = np.frombuffer(buf, dtype, count, data_start + offset).reshape(shape)
        arr.flags.writeable = False
        out[name] = arr
    return out


def check_layout(
    spans: Iterable[tuple[str, int, int]], area: memoryview | bytes, where: str, kind: str
) -> None:
    """Check (name, offset, size) spans tile `area`: aligned, in bounds, disjoint, zero gaps,
    no trailing bytes. Shared by tensor archives and the .eie container."""
    ordered = sorted(spans, key=lambda s: (s[1], s[2]))
    pos = 0
    for name, offset, nbytes in ordered:
        if offset % ALIGN:
            raise FormatError(where, f"{kind} {name}: offset {offset} is not {ALIGN}-byte aligned")
        if offset + nbytes > len(area):
            raise FormatError(where, f"{kind} {name}: bytes {offset}..{offset + nbytes} run past the end ({len(area)})")
        if offset < pos:
            raise FormatError(where, f"{kind} {name}: overlaps the {kind} before it")
        if not _all_zero(area[pos:offset]):
            raise FormatError(where, f"{kind} {name}: nonzero padding before it")
        pos = offset + nbytes
    if pos != len(area):
        raise FormatError(where, f"{len(area) - pos} trailing bytes after the last {kind}")


def _parse_header(text: bytes, where: str) -> dict:
    header = load_strict_json(text, where, "tensor archive header")
    if not isinstance(header, dict):
        raise FormatError(where, "tensor archive header is not a JSON object")
    return header


def load_strict_json(text: bytes, where: str, what: str) -> Any:
    """Parse UTF-8 JSON from a file, rejecting duplicate keys and NaN/Infinity;
    FormatError(where, "<what> is not valid JSON: ...") on anything wrong."""
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise FormatError(where, f"{what} is not valid JSON: {reason}") from None


def _check_entry(name: str, entry: object, where: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise FormatError(where, f"array {name}: header entry must have exactly {sorted(_ENTRY_KEYS)}")
    dtype_name, shape, offset, nbytes = entry["dtype"], entry["shape"], entry["offset"], entry["nbytes"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise FormatError(where, f"array {name}: dtype {dtype_name!r} is not allowed")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_count(d) for d in shape):
        raise FormatError(where, f"array {name}: shape must be a list of at most {MAX_NDIM} non-negative ints")
    if not _is_count(offset) or not _is_count(nbytes):
        raise FormatError(where, f"array {name}: offset and nbytes must be non-negative ints")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise FormatError(where, f"array {name}: shape {shape} exceeds the element limit")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise FormatError(where, f"array {name}: shape {shape} of {dtype_name} is not {nbytes} bytes")
    return dtype, tuple(shape), offset, nbytes


def _all_zero(chunk: memoryview | bytes) -> bool:
    return bytes(chunk).count(0) == len(chunk)


def _is_count(x: object) -> bool:
    return type(x) is int and x >= 0


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def check_npz(path: str | os.PathLike, max_bytes: int = MAX_NPZ_BYTES) -> list[str]:
    """Check a user's .npz before numpy loads it; its array names, or FormatError(path, reason).

    Reads only .npy headers and streams the members once (bounded memory) to verify
    their CRCs: afterwards `np.load(path, allow_pickle=False)` reads every member
    without error and allocates no more than `max_bytes` in total. Refused: a file that
    is not a zip of .npy members, a truncated or corrupted one, object (pickled) arrays,
    repeated names, and shapes that disagree with the bytes stored.
    """
    path = os.fspath(path)
    input_file_size(path, FormatError, "an .npz archive")
    names: list[str] = []
    try:
        with open(path, "rb") as raw:
            if raw.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                raise FormatError(path, "not an .npz archive (np.savez output)")
            with zipfile.ZipFile(raw) as z:
                infos = z.infolist()
                declared = sum(i.file_size for i in infos)
                if declared > max_bytes:
                    raise FormatError(path, f"arrays take {declared} bytes, over the {max_bytes}-byte limit")
                for info in infos:
                    names.append(_check_npy_member(z, info, path))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError,
            RuntimeError, OSError) as e:  # what zipfile and numpy's header reader raise on bad bytes
        reason = " ".join(str(e).split()) or type(e).__name__
        raise FormatError(path, f"not a readable .npz archive (truncated or damaged: {reason})") from None
    if len(set(names)) != len(names):
        raise FormatError(path, "an array name appears twice")
    return names


def _check_npy_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> str:
    if not info.filename.endswith(".npy"):
        raise FormatError(path, f"member {info.filename!r} is not a .npy array")
    key = info.filename[: -len(".npy")]
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise FormatError(path, f"{key}: .npy format version {version} is not supported")
        if dtype.hasobject:
            raise FormatError(path, f"{key}: holds pickled Python objects (object arrays are refused)")
        header = f.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        if header + nbytes != info.file_size:
            raise FormatError(path, f"{key}: declares shape {tuple(shape)} of {dtype} ({nbytes} bytes) "
                                    f"but holds {info.file_size - header}")
        while f.read(1 << 20):  # zipfile checks the CRC when the member's last byte is read
            pass
    return key
