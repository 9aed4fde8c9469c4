"""Convolution as a matrix product: output sizes and im2col patches.

The accelerator runs a conv layer's matrix (out-channels x in-channels/group*kh*kw) on
every output position's patch; calibration captures the same patches as layer inputs.
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv_output_hw(hw: tuple[int, int], kernel, pads, strides, dilations) -> tuple[int, int]:
    """Output height and width of a 2-D conv (ONNX pads order: top, left, bottom, right)."""
    return tuple(
        (hw[a] + pads[a] + pads[a + 2] - ((kernel[a] - 1) * dilations[a] + 1)) // strides[a] + 1 for a in range(2)
    )


def im2col(
    x: np.ndarray,
    kernel: tuple[int, int],
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    strides: tuple[int, int] = (1, 1),
    dilations: tuple[int, int] = (1, 1),
    group: int = 1,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Patches of x [N, C, H, W] as [group, N*Ho*Wo, C/group*kh*kw].

    Rows are output positions in (n, ho, wo) order, columns (c, ki, kj) order, so
    for W [out, C/g, kh, kw] and group i: im2col(...)[i] @ W_i.reshape(out/g, -1).T
    is the conv output (without bias) of that group's channels. `rows` (flat
    position indices) picks a subset without materialising the rest.
    """
    N, C, H, Wd = x.shape
    kh, kw = kernel
    if C % group:
        raise ValueError(f"{C} channels do not split into {group} groups")
    Ho, Wo = conv_output_hw((H, Wd), kernel, pads, strides, dilations)
    if rows is not None:
        n_i, rem = np.divmod(np.asarray(rows), Ho * Wo)
        h_i, w_i = np.divmod(rem, Wo)
    if rows is not None and kh * kw > 1:
        # only the chosen positions' patches are copied, from one zero-padded channels-last copy of x
        # (`windows_nhwc`: each patch runs of C, not C x kh x kw strided windows of x; 0.5-0.8x the
        # time on ResNet-50's 3x3 layers, 1.8x on its 3-channel stem, 0.01 s); a 1x1 kernel gathers
        # from x itself, without the copy
        patches = windows_nhwc(x.transpose(0, 2, 3, 1), kernel, pads, strides, dilations, x.dtype)[n_i, h_i, w_i]
    else:
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3]))) if any(pads) else x  # np.pad copies
        span = ((kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1)
        win = sliding_window_view(xp, span, axis=(2, 3))  # [N, C, Hp-sh+1, Wp-sw+1, span_h, span_w], a view
        win = win[:, :, : (Ho - 1) * strides[0] + 1 : strides[0], : (Wo - 1) * strides[1] + 1 : strides[1],
                  :: dilations[0], :: dilations[1]]
        # [N, Ho, Wo, C, kh, kw], or [rows, C, kh, kw]: only the chosen positions are copied
        patches = win.transpose(0, 2, 3, 1, 4, 5) if rows is None else win[n_i, :, h_i, w_i]
    p = patches.reshape(-1, group, C // group * kh * kw)
    return np.ascontiguousarray(p.transpose(1, 0, 2))


@functools.lru_cache(maxsize=256)
def patch_index(shape: tuple[int, ...], kernel, pads, strides, dilations) -> np.ndarray:
    """int [positions, cols]: where im2col's patch element of one input [C, H, W] comes from
    in the input flattened with a zero appended (its index, C * H * W, = the padding); made
    once per geometry and shared (read-only)."""
    size = int(np.prod(shape))
    where = np.arange(size, dtype=np.float64).reshape(1, *shape)
    marked = np.pad(where + 1, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))  # 0: padding
    index = im2col(marked, kernel, (0, 0, 0, 0), strides, dilations)[0].astype(np.int64) - 1
    index[index < 0] = size
    index = index.astype(np.int32 if size < 1 << 31 else np.int64)
    index.setflags(write=False)  # shared by every call with this geometry
    return index


def windows_nhwc(x: np.ndarray, kernel: tuple[int, int], pads: tuple[int, int, int, int],
                 strides: tuple[int, int], dilations: tuple[int, int], dtype: type) -> np.ndarray:
    """Each output position's patch of x [N, H, W, C] (channels last), zero-padded, as a strided
    view [N, Ho, Wo, C, kh, kw] of one padded copy in `dtype`: the patches without gathering them."""
    batch, height, width, channels = x.shape
    top, left, bottom, right = pads
    (sh, sw), (dh, dw), (kh, kw) = strides, dilations, kernel
    out_h, out_w = conv_output_hw((height, width), kernel, pads, strides, dilations)
    padded = np.zeros((batch, height + top + bottom, width + left + right, channels), dtype)
    padded[:, top:top + height, left:left + width] = x
    win = sliding_window_view(padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
    return win[:, :sh * (out_h - 1) + 1:sh, :sw * (out_w - 1) + 1:sw, :, ::dh, ::dw]


def block_diagonal(matrix: np.ndarray, group: int) -> np.ndarray:
    """A grouped conv's matrices [out, cols/group-per-group] as one [out, group * cols] matrix.

    Group g's rows (out/group of them) hold its matrix in column block g and zeros
    elsewhere, so the im2col patch of all input channels (group=1 order) multiplies it:
    the accelerator runs the whole layer as one matrix with one pointer array.
    """
    rows, cols = matrix.shape
    per = rows // group
    out = np.zeros((group, per, group, cols), matrix.dtype)
    g = np.arange(group)
    out[g, :, g, :] = matrix.reshape(group, per, cols)
    return out.reshape(rows, group * cols)


def diagonal_blocks(matrix: np.ndarray, group: int) -> np.ndarray:
    """The inverse of `block_diagonal`; ValueError if a nonzero lies outside the diagonal blocks."""
    rows, cols = matrix.shape
    per, width = rows // group, cols // group
    if per * group != rows or width * group != cols:
        raise ValueError(f"a {rows} x {cols} matrix does not split into {group} diagonal blocks")
    if outside_blocks(*np.nonzero(matrix), rows, cols, group):
        raise ValueError(f"entries outside the {group} diagonal blocks of a grouped conv")
    g = np.arange(group)
    return matrix.reshape(group, per, group, width)[g, :, g, :].reshape(rows, width)


def outside_blocks(r: np.ndarray, c: np.ndarray, rows: int, cols: int, group: int) -> bool:
    """Whether any (row r, col c) of a rows x cols block-diagonal matrix lies off its blocks."""
    return bool(np.any(r // (rows // group) != c // (cols // group)))
