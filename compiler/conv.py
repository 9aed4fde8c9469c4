"""Convolution as a matrix product: output sizes and im2col patches.

The accelerator runs a conv layer's matrix (out-channels x in-channels/group*kh*kw) on
every output position's patch; calibration captures the same patches as layer inputs.
"""

from __future__ import annotations

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
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = ((kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1)
    win = sliding_window_view(xp, span, axis=(2, 3))  # [N, C, Hp-sh+1, Wp-sw+1, span_h, span_w], a view
    win = win[:, :, : (Ho - 1) * strides[0] + 1 : strides[0], : (Wo - 1) * strides[1] + 1 : strides[1], :: dilations[0], :: dilations[1]]
    if rows is None:
        patches = win.transpose(0, 2, 3, 1, 4, 5)  # [N, Ho, Wo, C, kh, kw]
    else:
        n_i, rem = np.divmod(np.asarray(rows), Ho * Wo)
        h_i, w_i = np.divmod(rem, Wo)
        patches = win[n_i, :, h_i, w_i]  # [rows, C, kh, kw]: only the chosen positions are copied
    p = patches.reshape(-1, group, C // group * kh * kw)
    return np.ascontiguousarray(p.transpose(1, 0, 2))
