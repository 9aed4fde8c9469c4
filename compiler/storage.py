"""The two forms a segment's weights take in a .eie, and what each layer costs in them.

*Huffman* (the default): per layer one record, Deep Compression's storage form — the
layer's whole index matrix as one CSC stream (code, rel and per-column counts, each
Huffman-coded), then its float32 codebook and bias. The reader decodes every stream of
a segment at once, tiles each matrix for the target exactly as the lower pass does and
rebuilds the PE images, the quantized codebook and the accumulator biases.
*Fixed*: the PE images themselves (`Segment.image_arrays`). docs/format.md is the spec.
"""

from __future__ import annotations

import math

import numpy as np

from . import huffman
from .codec import decode_image, storage_matrix, storage_streams
from .conv import block_diagonal, diagonal_blocks
from .errors import FormatError, ModelError
from .fixedpoint import quantize
from .image import LINE_BYTES
from .segment import MAX_FRAC, MAX_WEIGHT_ELEMENTS, LayerSpec, layer_arrays
from .target import Target
from .tiling import tile_layer  # the lower pass's own tiling: the images must be its images

STORAGE_FORMS = ("huffman", "fixed")
STREAMS = ("code", "rel", "col_count")  # a record's Huffman streams, in their order


def layer_indices(layer: LayerSpec) -> np.ndarray:
    """The layer's uint8 index matrix, put together from its tiles: [rows, prod(weight_shape[1:])],
    a grouped conv's groups side by side (its tiles hold them as diagonal blocks)."""
    out = np.zeros((layer.rows, layer.cols), np.uint8)
    for t in layer.tiles:
        out[t.row_lo:t.row_lo + t.rows, t.col_lo:t.col_lo + t.cols] = decode_image(t)
    group = layer.conv.group if layer.conv is not None else 1
    return diagonal_blocks(out, group) if group > 1 else out


def huffman_record(layer: LayerSpec, target: Target) -> dict[str, bytes]:
    """A layer's Huffman record, by part (code, rel, col_count streams, codebook, bias), in order."""
    streams = storage_streams(layer_indices(layer), target.weight_bits, target.rel_index_bits)
    parts = {k: streams[k].to_bytes() for k in STREAMS}
    parts["codebook"] = np.asarray(layer.codebook, "<f4").tobytes()
    parts["bias"] = np.asarray(layer.bias, "<f4").tobytes()
    return parts


def pe_memory_bytes(layer: LayerSpec, target: Target) -> dict[str, int]:
    """What the PE memories hold for the layer after lowering, by component: every tile's
    entries in whole SRAM lines per PE, every tile's per-PE column pointers (pes x (cols + 1)
    at ptr_bits), the codebook registers and the biases in the accumulator format."""
    spmat = sum(t.lines for t in layer.tiles) * LINE_BYTES
    col_ptr = sum(-(-t.pes * (t.cols + 1) * target.ptr_bits // 8) for t in layer.tiles)
    codebook = -(-layer.codebook.size * target.codebook_bits // 8)
    bias = -(-layer.rows * target.acc_bits // 8)
    return {"spmat": spmat, "col_ptr": col_ptr, "codebook": codebook, "bias": bias,
            "bytes_fixed": spmat + col_ptr + codebook + bias}


def derive_layers(metas: list[dict], data: bytes, target: Target, where: str) -> dict[str, np.ndarray]:
    """The fixed form's arrays (`Segment.image_arrays`) of a segment stored in Huffman form.

    `metas` are the segment's layer entries (shape, bits, Q-formats, conv group) and `data`
    the concatenated records. Every count a record declares is checked against the layer
    before anything is decoded, so a record cannot make the reader allocate more than its
    own bits and the layer's declared matrix. Raises FormatError(where, ...).
    """
    view, at = memoryview(data), 0
    records = []
    for i, m in enumerate(metas):
        rows, cols, bits = _layer_dims(i, m, target, where)
        streams = {}
        for k in STREAMS:
            try:
                size = huffman.stream_size(view[at:], where)
                streams[k] = huffman.HuffmanStream.from_bytes(bytes(view[at:at + size]), where)
            except FormatError as e:
                raise FormatError(where, f"layer {m['name']}: {k} stream: {e.reason}") from None
            at += size
        most = {"code": rows * cols, "rel": rows * cols, "col_count": cols * (rows // 255 + 1)}
        for k, s in streams.items():
            if s.n_symbols > most[k]:
                raise FormatError(where, f"layer {m['name']}: {k} stream holds {s.n_symbols} entries, "
                                         f"more than a {rows}x{cols} matrix has")
        if streams["code"].n_symbols != streams["rel"].n_symbols:
            raise FormatError(where, f"layer {m['name']}: code and rel streams hold different numbers of entries")
        floats = []
        for n in (1 << bits, rows):
            if at + 4 * n > len(view):
                raise FormatError(where, f"layer {m['name']}: record ends before its codebook and bias")
            floats.append(np.frombuffer(view, "<f4", n, at).astype(np.float32))
            at += 4 * n
        if not all(np.isfinite(f).all() for f in floats):
            raise FormatError(where, f"layer {m['name']}: codebook or bias holds NaN or Inf")
        records.append((streams, *floats))
    if at != len(view):
        raise FormatError(where, f"{len(view) - at} bytes after the last layer's record")

    symbols = iter(huffman.decode_many([s[k] for s, _, _ in records for k in STREAMS], where))
    arrays: dict[str, np.ndarray] = {}
    for i, (m, (_, codebook, bias)) in enumerate(zip(metas, records)):
        code, rel, counts = next(symbols), next(symbols), next(symbols)
        rows, cols, bits = _layer_dims(i, m, target, where)
        try:
            indices = storage_matrix(code, rel, counts, rows, target.weight_bits, target.rel_index_bits)
            if indices.shape[1] != cols or int(indices.max(initial=0)) >= codebook.size:
                raise FormatError(None, f"the streams do not describe a {rows}x{cols} matrix of {bits}-bit codes")
            group = int(m["conv"]["group"]) if "conv" in m else 1
            if group < 1 or rows % group:
                raise FormatError(None, f"conv group {group} does not divide {rows} rows")
            w_frac, in_frac = int(m["w_frac"]), int(m["in_frac"])
            if not (abs(w_frac) <= MAX_FRAC and abs(in_frac) <= MAX_FRAC):
                raise FormatError(None, f"a Q-format outside +-{MAX_FRAC} fraction bits")
            tiles = tile_layer(m["name"], block_diagonal(indices, group) if group > 1 else indices, target)
        except (FormatError, ModelError) as e:
            raise FormatError(where, f"layer {m['name']}: {e.reason}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(where, f"layer {m['name']}: metadata is inconsistent ({type(e).__name__}: {e})") from None
        arrays.update(layer_arrays(i, codebook, quantize(codebook, w_frac, target.codebook_bits), bias,
                                   quantize(bias, in_frac + w_frac, target.acc_bits), tiles, target))
        m["tiles"] = [{"row_lo": t.row_lo, "rows": t.rows, "col_lo": t.col_lo, "cols": t.cols} for t in tiles]
    return arrays


def _layer_dims(i: int, m: dict, target: Target, where: str) -> tuple[int, int, int]:
    """(rows, cols, bits) a segment's layer entry declares, checked like the fixed form's."""
    try:
        shape = [int(d) for d in m["weight_shape"]]
        bits = int(m["bits"])
        name = m["name"]
    except (KeyError, TypeError, ValueError):
        raise FormatError(where, f"segment layer {i} has no name, weight_shape or bits") from None
    if not 1 <= len(shape) <= 4 or min(shape) < 1 or math.prod(shape) > MAX_WEIGHT_ELEMENTS:
        raise FormatError(where, f"layer {i}: weight shape {shape} is not a matrix eiec could have compiled")
    if not 1 <= bits <= target.weight_bits:
        raise FormatError(where, f"layer {name}: bits {bits} outside 1..{target.weight_bits}")
    return shape[0], math.prod(shape[1:]), bits
