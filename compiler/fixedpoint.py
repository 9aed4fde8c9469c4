"""Signed fixed-point arithmetic of the EIE datapath, array-at-a-time.

A value q with `frac` fractional bits stands for q * 2**-frac. Rounding is always
round-half-to-even; every narrowing saturates. Integers are carried in int64, except
quantized activations, which the simulator holds in the narrowest type of their width.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def int_range(bits: int) -> tuple[int, int]:
    """(lowest, highest) value of a signed `bits`-bit integer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def saturate(x: np.ndarray, bits: int) -> np.ndarray:
    """Clip integers to the signed `bits`-bit range (int64 out)."""
    lo, hi = int_range(bits)
    return np.clip(np.asarray(x, np.int64), lo, hi)


def _scaled(x: np.ndarray, frac: int) -> np.ndarray:
    # float64 holds x * 2**frac exactly for float32 inputs, so rint sees the true value
    return np.rint(np.asarray(x, np.float64) * math.ldexp(1.0, frac))


def _quantized(scaled: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = int_range(bits)
    return np.clip(np.nan_to_num(scaled, nan=0.0, posinf=hi, neginf=lo), lo, hi).astype(np.int64)


def _saturated(scaled: np.ndarray, bits: int) -> int:
    lo, hi = int_range(bits)
    return int(np.count_nonzero((scaled < lo) | (scaled > hi)))


def quantize(x: np.ndarray, frac: int, bits: int) -> np.ndarray:
    """round_half_even(x * 2**frac), saturated to signed `bits`; NaN -> 0, +-inf saturate."""
    return _quantized(_scaled(x, frac), bits)


def count_saturated(x: np.ndarray, frac: int, bits: int) -> int:
    """How many values of x `quantize(x, frac, bits)` saturates (+-inf included, NaN not)."""
    return _saturated(_scaled(x, frac), bits)


@functools.cache  # np.iinfo builds an object per call; the simulator asks on every write-back
def int_type(bits: int) -> type:
    """The narrowest numpy signed integer type that holds signed `bits`-bit values."""
    return next((t for t in (np.int8, np.int16, np.int32) if bits <= np.iinfo(t).bits), np.int64)


def quantize_counting(x: np.ndarray, frac: int, bits: int) -> tuple[np.ndarray, int]:
    """(quantize(x, frac, bits) in int_type(bits), count_saturated(x, frac, bits)), scaling x once."""
    x = np.asarray(x)
    lo, hi = int_range(bits)
    if x.dtype == np.float32 and -126 <= frac <= 127:
        # float32 holds x * 2**frac exactly but where it overflows (inf: saturates, as the exact
        # value would) or falls below 2**-126 (rounds to 0, as the exact value would); when every
        # rounded value is in range (no NaN, nothing to clip) that is the answer, in four passes
        with np.errstate(over="ignore"):
            scaled = np.multiply(x, np.float32(math.ldexp(1.0, frac)))
        np.rint(scaled, out=scaled)
        if not scaled.size or lo <= scaled.min() and scaled.max() <= hi:
            return scaled.astype(int_type(bits)), 0
    scaled = _scaled(x, frac)
    return _quantized(scaled, bits).astype(int_type(bits)), _saturated(scaled, bits)


def dequantize(q: np.ndarray, frac: int) -> np.ndarray:
    """q * 2**-frac as float32."""
    q = np.asarray(q)
    if q.dtype.kind == "i" and q.dtype.itemsize <= 2 and -112 <= frac <= 126:
        # |q| < 2**15 and 2**-frac scale exactly in float32 (no overflow, nothing subnormal):
        # one pass, the cast in the multiply's loop
        return np.multiply(q, np.float32(math.ldexp(1.0, -frac)), dtype=np.float32)
    return (np.asarray(q, np.float64) * math.ldexp(1.0, -frac)).astype(np.float32)


def round_shift(acc: np.ndarray, shift: int) -> np.ndarray:
    """acc / 2**shift rounded half to even; shift <= 0 is an exact left shift (no saturation)."""
    acc = np.asarray(acc, np.int64)
    shift = int(shift)
    if shift <= 0:
        return acc << -shift
    # floor((acc + half - 1 + odd) / 2**shift), odd the parity of floor(acc / 2**shift): the
    # remainder r rounds up when r > half, or r == half and the floor is odd (shifts floor
    # negatives too); a few whole-array passes, in place
    out = acc >> shift
    out &= 1
    out += acc
    out += (1 << (shift - 1)) - 1
    out >>= shift
    return out


def round_shift_int(v: int, shift: int) -> int:
    """round_shift of one Python int, without an array (the write-back's range check, per RUN)."""
    if shift <= 0:
        return v << -shift
    return (v + ((v >> shift) & 1) + (1 << (shift - 1)) - 1) >> shift


def choose_frac(max_abs: float, bits: int) -> int:
    """The largest frac with quantize(+-max_abs, frac, bits) not saturating.

    That is the largest frac such that round_half_even(max_abs * 2**frac) <=
    2**(bits-1) - 1 (the positive limit; the negative one is one larger). frac may be
    negative for large ranges. max_abs == 0 carries no range information: we return
    bits - 1 (the format [-1, 1)).
    """
    max_abs = float(max_abs)
    if not math.isfinite(max_abs) or max_abs < 0:
        raise ValueError(f"choose_frac: max_abs must be finite and >= 0, got {max_abs}")
    if max_abs == 0.0:
        return bits - 1
    hi = (1 << (bits - 1)) - 1

    def fits(frac: int) -> bool:
        return np.rint(math.ldexp(max_abs, frac)) <= hi

    frac = math.floor(math.log2(hi / max_abs))  # within one of the answer
    while not fits(frac):
        frac -= 1
    while fits(frac + 1):
        frac += 1
    return frac
