"""Cycle model of one sparse layer on EIE: broadcasts, per-PE activation queues, stalls.

The model and every choice the paper leaves open are in docs/simulator.md. Pure
functions over SparseImage tiles; the queue recurrence is solved in closed form over
blocks of broadcasts, vectorised over (broadcast, batch, pe).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from eiec.errors import FormatError
from eiec.fixedpoint import int_type
from eiec.image import LINE_BYTES, SparseImage
from eiec.runtime.simulator import blas_product, tile_cached
from eiec.target import Target

# Ours: the pointer-read stage handles one column per cycle and overlaps the previous
# column's entries, so a column costs max(entries, this) cycles in a PE.
POINTER_READ_CYCLES = 1
# Pointers sit in two banks (even / odd columns): two pointers written per cycle on reload.
POINTER_BANKS = 2

# _queue_span sizes: at most this many [broadcasts, batch, pes] elements per block;
# below the second figure per block numpy's per-call overhead dominates, so blocks grow
# past the queue depth (up to _MAX_BLOCK_ROUNDS times it) and are iterated. A chunk of
# blocks (about _CHUNK_ELEMS elements, at least one block) takes its work at once, into
# buffers that fit the core's own cache (128 KB each for Alex-6; 2^16 measured the same).
_BLOCK_ELEMS = 1 << 21
_SMALL_BLOCK_ELEMS = 1 << 16
_MAX_BLOCK_ROUNDS = 32
_CHUNK_ELEMS = 1 << 15
_WIDE_ELEMS = 1024  # B * pes from which _queue_span's blocks are at most `depth` broadcasts long
_INT16_TIMES = 1 << 13  # cycle times below this are solved in int16 (a conv's short broadcast lists)
_INT32_TIMES = 1 << 29  # ... below this in int32
_NEVER = -(1 << 40)  # an int64 time below any real one: never wins a max
_LANES_MIN_ELEMS = 1 << 12  # stalling vectors x PEs from which _queue_span_lanes is faster
_LANES_CHUNK = 64  # broadcasts whose columns _queue_span_lanes gathers at once


@dataclass
class LayerCycles:
    """Cycle and event counts of one layer, one value per input of the batch."""

    cycles: np.ndarray  # int64 [B]: total, fill + write-back + reloads included
    ideal_cycles: np.ndarray  # float [B]: entries of broadcast columns (padding incl.) / pes
    busy: np.ndarray  # int64 [B, pes]: cycles each PE spends on entries
    load_balance: np.ndarray  # float [B]: 1 - bubble PE-cycles / total PE-cycles
    nonzero_activations: np.ndarray  # int64 [B]: nonzero inputs of the layer
    broadcasts: np.ndarray  # int64 [B]: broadcasts over all tile passes
    entries_processed: np.ndarray  # int64 [B]: entries of broadcast columns, padding incl.
    padding_processed: np.ndarray  # int64 [B]: padding entries among them
    stall_cycles: np.ndarray  # int64 [B]: cycles the broadcast waited for a full act_queue
    reload_cycles: np.ndarray  # int64 [B]: cycles spent loading tiles (non-resident layer)
    reload_bytes: np.ndarray  # int64 [B]: bytes of tile images loaded (spmat + pointers)
    spmat_line_reads: np.ndarray  # int64 [B]: 64-bit sparse-matrix SRAM lines read
    ptr_reads: np.ndarray  # int64 [B]: pointer-pair reads (one per PE per broadcast)
    act_reads: np.ndarray  # int64 [B]
    act_writes: np.ndarray  # int64 [B]
    mults: np.ndarray  # int64 [B]
    adds: np.ndarray  # int64 [B]
    fill_cycles: np.ndarray  # int64 [B]: pipeline fill/drain per tile pass + write-back, within cycles
    spmat_line_writes: np.ndarray  # int64 [B]: sparse-matrix SRAM lines written by reloads (all PEs)
    ptr_writes: np.ndarray  # int64 [B]: pointers written by reloads (all PEs)
    rows: int  # output rows of the layer (all tiles)
    cols: int  # input columns of the layer (all tiles)

    @property
    def padding_overhead(self) -> np.ndarray:
        """Fraction of processed entries that were padding."""
        return self.padding_processed / np.maximum(self.entries_processed, 1)


def _column_tables(tile: SparseImage) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """entries [pes, cols] int64, work cycles [cols, pes] int32 (every entry of a column
    run advances a row, so a run is at most the tile's rows), padding entries [pes, cols] int64."""
    entries = tile.col_entries().astype(np.int64)
    work = np.maximum(entries, POINTER_READ_CYCLES)
    run = np.repeat(np.arange(entries.size), entries.ravel())  # storage order is PE-major
    padding = np.bincount(run[np.asarray(tile.code) == 0], minlength=entries.size)
    return entries, np.ascontiguousarray(work.T, np.int32), padding.reshape(entries.shape).astype(np.int64)


def _line_table(tile: SparseImage, per_line: int) -> np.ndarray:
    """int64 [pes, cols]: SRAM lines a PE's run of each column touches (lines aligned
    to the PE's first entry, as in SparseImage.packed)."""
    start = np.asarray(tile.col_ptr, np.int64)[:, :-1]
    end = np.asarray(tile.col_ptr, np.int64)[:, 1:]
    return np.where(end > start, (end - 1) // per_line - start // per_line + 1, 0)


def _event_table(tile: SparseImage, per_line: int) -> np.ndarray:
    """int64 [cols, 2 * pes + 2]: per column, each PE's entries, then the padding entries and
    the SRAM lines over all PEs (what one broadcast of the column costs in events), then each
    PE's work beyond one cycle (`work - 1`, the queue model's excess)."""
    entries, work, padding = tile_cached(tile, "column_tables", _column_tables)
    lines = _line_table(tile, per_line)
    return np.column_stack([entries.T, padding.sum(axis=0), lines.sum(axis=0), work.astype(np.int64) - 1])


def _table_part(tile: SparseImage, name: str, table: np.ndarray, part: slice) -> tuple[np.ndarray, int]:
    """The nonzero columns of table[:, part] (indices in the part) and its largest column sum."""
    return tile_cached(tile, f"{name}_{part.start}_{part.stop}", lambda t: (
        np.flatnonzero(table[:, part].any(axis=0)), int(table[:, part].sum(axis=0).max(initial=0))))


def _table_product(tile: SparseImage, name: str, table: np.ndarray, part: slice, weights: np.ndarray,
                   most: int) -> tuple[np.ndarray, np.ndarray]:
    """weights [n, cols] @ table[:, part], exact, for weights in [0, most]: (int64 [n, k] on the
    k nonzero columns of the part, their indices in the part). A BLAS product, in float32 when
    every sum stays below 2**24 (else float64: BLAS products of integers are then exact)."""
    used, reach = _table_part(tile, name, table, part)
    dtype = np.float32 if most * reach < 1 << 24 else np.float64
    compact = tile_cached(tile, f"{name}_{part.start}_{part.stop}_{dtype.__name__}",
                          lambda t: np.ascontiguousarray(table[:, part][:, used], dtype))
    return blas_product(weights.astype(dtype), compact).astype(np.int64), used


def _queue_pes(tile: SparseImage) -> np.ndarray:
    """The PEs the queue model needs: one of each set with equal work columns, and none
    whose work is at most another's in every column (its pops and finishes are then never
    later than that PE's, so it never sets a broadcast's issue time or the span)."""
    _, work, _ = tile_cached(tile, "column_tables", _column_tables)
    _, first = np.unique(work.T, axis=0, return_index=True)
    first = np.sort(first)
    w = work[:, first]
    keep = np.ones(first.size, bool)
    for i in range(first.size):  # per PE of the tile, once per tile: a loop over pes, not data
        others = keep.copy()
        others[i] = False
        if others.any() and (w[:, [i]] <= w[:, others]).all(axis=0).any():
            keep[i] = False
    return first[keep]


def _queue_work(tile: SparseImage) -> np.ndarray:
    """The queue model's work table [cols, its PEs (_queue_pes)], in the narrowest integer type
    that holds it: the recurrence gathers a row of it for every broadcast, and a small table
    stays in cache beside the arithmetic's stream of the weights on the other core (Alex-6's
    is 2.4 MB in int32, 0.6 MB in int8)."""
    work = tile_cached(tile, "column_tables", _column_tables)[1][:, _queue_pes(tile)]
    return np.ascontiguousarray(work, int_type(int(work.max(initial=0)).bit_length() + 1))  # + the sign bit


def _scan(op: np.ufunc, a: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """op.accumulate along the first axis of a [L, batch, pes] array, into `out` (may be `a`;
    `scratch`: a buffer of a's shape and dtype, overwritten), by whichever of three ways
    costs least for the shape (per-call and per-element costs measured with numpy 2 on
    int16 and int32 rows):
    - numpy's accumulate: ~1.9 ns an element, each waiting for the one before;
    - one call per step, an elementwise op on a contiguous row: ~0.4 us a call;
    - a log-step (Hillis-Steele) scan: ceil(log2 L) elementwise calls on the whole block,
      each ~1 us plus ~0.02 ns an element per byte, ping-ponged between `out` and `scratch`
      (an op whose output overlaps its input would make numpy copy it first)."""
    n, row = a.shape[0], a[0:1].size
    if n < 2:
        if out is not a:
            out[...] = a
        return out
    steps = (n - 1).bit_length()
    per_elem = 2e-5 * a.itemsize  # us
    costs = (1.9e-3 * n * row, (n - 1) * (0.4 + per_elem * row), steps * (1.0 + per_elem * n * row))
    way = costs.index(min(costs))
    if way == 0:
        return op.accumulate(a, axis=0, out=out)
    if way == 1:
        if out is not a:
            out[0] = a[0]
        for i in range(1, n):
            op(out[i - 1], a[i], out=out[i])
        return out
    # step i (shift 2**i) writes the buffer the previous one did not; the last writes `out`,
    # unless the first would then write `a` in place: then it lands in `scratch` and is copied
    first = out if steps % 2 and out is not a else scratch
    other = scratch if first is out else out
    src, dst, shift = a, first, 1
    while shift < n:
        dst[:shift] = src[:shift]
        op(src[shift:], src[:-shift], out=dst[shift:])
        src, dst, shift = dst, (other if dst is first else first), shift * 2
    if src is not out:
        out[...] = src
    return out


def _queue_span(work: np.ndarray, cols_k: np.ndarray, valid: np.ndarray,
                depth: int, trace: bool = False) -> tuple[np.ndarray, ...]:
    """Finish time of the last PE and broadcast stall cycles, [B] each; with `trace`
    also every broadcast's issue time b [K, B] and every PE's pop time s [K, B, pes].

    work [cols, pes] cycles per (column, PE); cols_k [K, B] the column of broadcast k
    of each input, valid [K, B]; invalid items (padding of shorter broadcast lists) sit
    at the end and do not advance time. Recurrence (docs/simulator.md):
    b_k = max(b_{k-1} + 1, max_p s[p, k-depth]); s = max(f_prev, b_k); f = s + work.

    Solved a block of L broadcasts at a time. With A the running sum of a PE's work from
    some item on (inclusive) and A' = A - work (exclusive), f_k - A_k = max(f_{k-1} -
    A'_k, b_k - A'_k) is a running max: given the issue times b of a block, f[k] = A[k] +
    max(f[k0-1] - A'[k0], max_{m<=k} (b_m - A'[m])), and s = f - work; given the pop times
    s, b has a closed form too, b_k = k + max(b_{k0-1} + 1 - k0, max_{m<=k} (g_m - m)) with
    g_m = max_p s[p, m-depth]. With L <= depth every g a block needs comes from earlier
    blocks, so one pass is exact. A longer block (used when B * pes is small, where
    per-call numpy overhead would dominate) iterates the two closed forms until b stops
    changing, from a lower bound on the block's g (each PE busy from its finish before the
    block: s[p, k] >= f[p, k-1]): each round fixes at least `depth` more broadcasts, and
    the iterates rise monotonically to the recurrence's unique solution, usually in two or
    three rounds. Arrays are [L, B, pes], in the narrowest integer the times fit; a chunk
    of blocks takes its work and running sums at once.
    """
    n_bcast, batch = cols_k.shape
    pes = work.shape[1]
    n_valid = valid.sum(axis=0)
    if n_bcast == 0:
        empty = (np.zeros((0, batch), np.int64), np.zeros((0, batch, pes), np.int64)) if trace else ()
        return (np.zeros(batch, np.int64), np.zeros(batch, np.int64)) + empty
    elems = batch * pes
    block = min(depth, max(1, _BLOCK_ELEMS // elems))
    if depth * elems < _SMALL_BLOCK_ELEMS and elems < _WIDE_ELEMS:
        block = min(max(depth, _SMALL_BLOCK_ELEMS // elems), _MAX_BLOCK_ROUNDS * depth)
    block = min(block, n_bcast)
    if block == 1:  # wide rows and depth 1: the plain recurrence has fewer numpy calls per step
        return _queue_span_stepwise(work, cols_k, valid, depth, trace)
    all_valid = int(n_valid.min(initial=0))  # broadcasts before this are valid for every input
    # every time is below n_bcast * (max work + 1): a narrower type moves fewer bytes. `never`
    # is below any b - A' (>= -1 - that bound) and stays in range when an A' is added to it
    dtype, never = np.int64, _NEVER
    longest = n_bcast * (int(work.max(initial=0)) + 1)
    if longest < _INT16_TIMES:
        dtype, never = np.int16, -2 * _INT16_TIMES
    elif longest < _INT32_TIMES:
        dtype, never = np.int32, -2 * _INT32_TIMES
    # broadcasts whose work and running sums are taken at once: several blocks' (buffers
    # reused: a fresh large array page-faults each call)
    chunk = max(1, max(_CHUNK_ELEMS, elems * block) // (elems * block)) * block
    work_buf, before_buf, scan_buf = np.empty((3, max(chunk, block), batch, pes), dtype)
    t_buf = np.empty((block, batch, pes), dtype)
    finish = np.zeros((batch, pes), dtype)  # f of the last broadcast solved
    issue = np.full(batch, -1, dtype)  # b of the last broadcast solved
    # smax[k + depth] = max_p s[p, k]; the first `depth` rows stand for "no item" (-1)
    smax = np.full((n_bcast + depth, batch), -1, dtype)
    issue_all = np.empty((n_bcast, batch), dtype)
    ks_all = np.arange(n_bcast, dtype=dtype)[:, None]
    starts = np.empty((n_bcast, batch, pes), dtype) if trace else None
    for c0 in range(0, n_bcast, chunk):
        c1 = min(n_bcast, c0 + chunk)
        w, before = work_buf[:c1 - c0], before_buf[:c1 - c0]  # [n, B, pes]
        if work.dtype == dtype:
            np.take(work, cols_k[c0:c1], axis=0, out=w, mode="clip")
        else:  # a narrower table (_queue_work), or a wider one whose values fit dtype (above)
            w[...] = work[cols_k[c0:c1]]
        if c1 > all_valid:
            w[~valid[c0:c1]] = 0  # an invalid item adds no work
        before[0] = 0  # A', the running sum of work before each item from the chunk's first
        _scan(np.add, w[:-1], before[1:], scan_buf[:c1 - c0 - 1])
        for k0 in range(c0, c1, block):
            k1 = min(c1, k0 + block)
            if k1 - k0 > depth:  # start from a lower bound on the block's own pops: each PE busy from its last finish
                a_before = before[k0 - c0:k1 - c0 - depth]
                lb = t_buf[:k1 - k0 - depth]
                np.add(finish - a_before[0], a_before, out=lb)
                np.maximum(smax[k0 + depth:k1], lb.max(axis=2), out=smax[k0 + depth:k1])
            lo, b = k0, None  # items before lo are solved: their b, s, f are the recurrence's
            while True:
                ks = ks_all[lo:k1]
                g = smax[lo:k1] - ks
                np.maximum.accumulate(g, axis=0, out=g)
                np.maximum(g, issue + 1 - lo, out=g)  # b_k >= b_{lo-1} + 1 + (k - lo)
                g += ks
                if b is not None:
                    moved = (g != b).any(axis=1)
                    j = int(moved.argmax())
                    if not moved[j]:
                        break
                    # b held before item lo + j: there the previous round's b was its own closed form
                    # (a fixed point), so b, s and f of items lo..lo+j-1 are solved; go on from there
                    issue_all[lo:lo + j] = b[:j]
                    finish, issue = t[j - 1] + w[lo + j - 1 - c0], b[j - 1]
                    lo, g = lo + j, g[j:]
                b = g
                a_before = before[lo - c0:k1 - c0]
                t = t_buf[lo - k0:k1 - k0]
                np.subtract(b[:, :, None], a_before, out=t)
                if k1 > all_valid:
                    t[~valid[lo:k1]] = never  # an invalid item issues nothing
                np.maximum(t[0], finish - a_before[0], out=t[0])  # f[lo-1] - A'[lo]
                _scan(np.maximum, t, t, scan_buf[:k1 - lo])  # now f - A
                t += a_before  # s = f - work
                t.max(axis=2, out=smax[lo + depth:k1 + depth])
                if k1 - lo <= depth:
                    break
            issue_all[lo:k1] = b
            if trace:
                starts[k0:k1] = t_buf[:k1 - k0]
            finish, issue = t[-1] + w[k1 - 1 - c0], b[-1]
    # valid items are a prefix: sum_k (b_k - b_{k-1} - 1) telescopes to b_last + 1 - n
    last = issue_all[np.maximum(n_valid - 1, 0), np.arange(batch)].astype(np.int64)
    stall = np.where(n_valid > 0, last + 1 - n_valid, 0)
    out = (finish.max(axis=1, initial=0).astype(np.int64), stall)
    if trace:
        out += (issue_all.astype(np.int64), starts.astype(np.int64))
    return out


def _queue_span_stepwise(work: np.ndarray, cols_k: np.ndarray, valid: np.ndarray,
                         depth: int, trace: bool = False) -> tuple[np.ndarray, ...]:
    """_queue_span one broadcast at a time, vectorised over (batch, pe)."""
    n_bcast, batch = cols_k.shape
    finish = np.zeros((batch, work.shape[1]), np.int64)
    issue = np.full(batch, -1, np.int64)
    slot_free = np.full((depth, batch), -1, np.int64)  # max_p start of item k - depth
    stall = np.zeros(batch, np.int64)
    issue_all = np.empty((n_bcast, batch), np.int64) if trace else None
    starts = np.empty((n_bcast, batch, work.shape[1]), np.int64) if trace else None
    for k in range(n_bcast):
        earliest = issue + 1
        b_k = np.maximum(earliest, slot_free[k % depth])
        stall += np.where(valid[k], b_k - earliest, 0)
        issue = np.where(valid[k], b_k, issue)
        start = np.maximum(finish, issue[:, None])
        finish = start + np.where(valid[k][:, None], work[cols_k[k]], 0)
        slot_free[k % depth] = start.max(axis=1)
        if trace:
            issue_all[k], starts[k] = b_k, start
    out = (finish.max(axis=1, initial=0), stall)
    return out + (issue_all, starts) if trace else out


def _queue_span_lanes(excess: np.ndarray, flat_cols: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                      depth: int) -> tuple[np.ndarray, np.ndarray] | None:
    """_queue_span for many vectors at once, one broadcast at a time over all of them: the
    finish time of the last PE and the stall cycles, [n] each, or None when the lags below
    may not fit 32-bit lanes.

    excess [cols, pes] = work - 1 (>= 0); vector v broadcasts flat_cols[starts[v]:starts[v]
    + counts[v]]. The recurrence in lags behind the stall-free clock (beta_k = b_k - k,
    sigma = s - k, phi = f - k - 1): beta_k = max(beta_{k-1}, max_p sigma[p, k-depth] - depth),
    sigma[p, k] = max(phi[p, k-1], beta_k), phi = sigma + excess. A PE's phi stays within
    (depth + 1) * (max excess + 1) of beta (it is at most depth items behind the slot it
    frees), and in practice far closer, so lags are held relative to a per-vector base as
    8-, 16- or 32-bit lanes, several PEs packed in one int64: a broadcast's column is then
    one gather of a few words per vector, and the max over PEs a reduction over rows. A
    lane type too narrow for a case is found before it overflows, and the next is tried."""
    most = int(excess.max(initial=0))
    reach = (depth + 1) * (most + 1)
    # 8 bits when a few items' excess fits, wider ones up to the first that the bound guarantees
    for dtype in (np.int8, np.int16, np.int32):
        if 4 * (most + 1) <= np.iinfo(dtype).max:
            solved = _lanes_solve(excess, flat_cols, starts, counts, depth, dtype)
            if solved is not None or 3 * reach <= np.iinfo(dtype).max:
                return solved
    return None


def _lanes_solve(excess: np.ndarray, flat_cols: np.ndarray, starts: np.ndarray, counts: np.ndarray, depth: int,
                 dtype: type) -> tuple[np.ndarray, np.ndarray] | None:
    """_queue_span_lanes in lanes of `dtype`; None if a lag would overflow them. Vectors run
    longest first, so the ones still broadcasting at step k are a prefix."""
    n, pes = counts.size, excess.shape[1]
    rise = int(excess.max(initial=0))
    top_lag = int(np.iinfo(dtype).max) - rise  # sigma above this could overflow phi
    lanes = 8 // np.dtype(dtype).itemsize
    groups = -(-pes // lanes)
    table = np.zeros((groups * lanes, excess.shape[0]), dtype)  # padding PEs: no excess, never bind
    table[:pes] = excess.T
    packed = np.ascontiguousarray(table.reshape(groups, lanes, -1).transpose(0, 2, 1)).view(np.int64)[..., 0].copy()
    spread = int(sum(1 << (8 * np.dtype(dtype).itemsize * i) for i in range(lanes)))  # one value to every lane
    order = np.argsort(-counts, kind="stable")
    counts_s, starts_s = counts[order], starts[order].astype(np.int64)
    n_bcast = int(counts_s[0]) if n else 0
    active = n - np.searchsorted(counts_s[::-1], np.arange(n_bcast + 1), side="right")  # vectors with count > k
    phi = np.zeros((groups, n * lanes), dtype)
    beta = np.zeros(n, np.int64)  # relative to base, like phi and ring
    base = np.zeros(n, np.int64)
    ring = np.full((depth, n), -(1 << 40), np.int64)  # max_p sigma - depth of the last depth items
    # each vector's columns, _LANES_CHUNK broadcasts at a time turned step-major (a gather of
    # short contiguous runs, not one scattered read per vector and step)
    small = np.int16 if excess.shape[0] <= 1 << 15 else np.int32  # column numbers: fewer bytes to move
    runs = np.lib.stride_tricks.sliding_window_view(
        np.concatenate([flat_cols.astype(small), np.zeros(_LANES_CHUNK, small)]), _LANES_CHUNK)
    top = np.empty(n * lanes, dtype)
    words = np.empty(groups * n, np.int64)
    span, stall = np.zeros(n, np.int64), np.zeros(n, np.int64)
    unchecked = 0  # steps since the last overflow check: lags rise at most max excess a step
    for k in range(n_bcast):
        m, m_next = int(active[k]), int(active[k + 1])
        if k % _LANES_CHUNK == 0:
            step_cols = runs[starts_s[:m] + k]  # [m, _LANES_CHUNK]: short contiguous runs, read column by column
        if k >= depth:
            np.maximum(beta[:m], ring[k % depth, :m], out=beta[:m])
        ph = phi[:, :m * lanes]
        np.maximum(ph, (beta[:m] * spread).view(dtype), out=ph)  # sigma
        most = np.maximum.reduce(ph, axis=0, out=top[:m * lanes])
        for _ in range(lanes.bit_length() - 1):  # fold the lanes of each vector: strided halves
            most = np.maximum(most[0::2], most[1::2])
        unchecked -= 1
        if unchecked < 0:
            hi = int(most.max())
            if hi > top_lag:  # rebase: lags relative to beta (sigma >= beta >= 0)
                shift = beta[:m].copy()
                ph -= (shift * spread).view(dtype)
                ring[:, :m] -= shift
                base[:m] += shift
                beta[:m] = 0
                most = most - shift
                hi = int(most.max())
                if hi > top_lag:
                    return None
            unchecked = (top_lag - hi) // max(rise, 1)
        np.subtract(most, depth, out=ring[k % depth, :m], dtype=np.int64)
        x = words[:groups * m].reshape(groups, m)
        np.take(packed, step_cols[:m, k % _LANES_CHUNK], axis=1, out=x, mode="clip")
        ph += x.view(dtype)  # phi
        if m_next < m:  # these vectors broadcast their last item
            done = phi.reshape(groups, n, lanes)[:, m_next:m].max(axis=(0, 2))
            span[m_next:m] = k + 1 + base[m_next:m] + done
            stall[m_next:m] = base[m_next:m] + beta[m_next:m]
    out_span, out_stall = np.empty(n, np.int64), np.empty(n, np.int64)
    out_span[order], out_stall[order] = span, stall
    return out_span, out_stall


def _broadcast_lists(nz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per input of nz [B, cols], its nonzero columns in ascending order as a broadcast list:
    cols_k [K, B], valid [K, B] (shorter lists padded at the end)."""
    count = np.count_nonzero(nz, axis=1)
    return _list_table(np.nonzero(nz)[1], np.cumsum(count) - count, count)


@dataclass
class PassCycles:
    """What one RUN (one tile pass) costs, one value per input (summed over its vectors)."""

    cycles: np.ndarray  # int64 [B]: fill + queue span (+ write-back when the RUN is LAST)
    busy: np.ndarray  # int64 [B, pes]: cycles each PE spends on entries
    padding: np.ndarray  # int64 [B]: padding entries among them
    lines: np.ndarray  # int64 [B]: sparse-matrix SRAM lines read
    broadcasts: np.ndarray  # int64 [B]
    stall: np.ndarray  # int64 [B]: cycles the broadcast waited for a full act_queue
    fill: np.ndarray  # int64 [B]: pipeline fill/drain (+ write-back), within cycles
    writeback_rows: np.ndarray  # int64 [B]: rows written back (0 unless LAST)


def pass_events(tile: SparseImage, x_nonzero: np.ndarray, target: Target,
                inputs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The counted events of one RUN (cycle_pass' vectors and inputs): int64 [inputs, pes + 2],
    each PE's entries, then the padding entries and the SRAM lines of the broadcast columns;
    and the broadcasts [inputs]. Linear in the broadcast mask: one product with the event table."""
    n = x_nonzero.shape[0]
    inputs = n if inputs is None else inputs
    per = n // inputs
    nz = x_nonzero[:, tile.col_lo:tile.col_lo + tile.cols]
    # an input's events are those of its vectors' broadcast columns, each counted over
    # them: a product of [inputs, cols] counts rather than of every vector
    counts = nz if per == 1 else np.add.reduce(nz.reshape(inputs, per, -1).view(np.uint8), axis=1,
                                                dtype=np.uint8 if per < 256 else np.int64)
    return counted_events(tile, counts, per, target)


def counted_events(tile: SparseImage, counts: np.ndarray, per: int, target: Target) -> tuple[np.ndarray, np.ndarray]:
    """pass_events from each input's column counts [inputs, tile cols] (how many of its `per`
    vectors broadcast each of the tile's columns)."""
    name, table = _events_of(tile, target)
    summed, used = _table_product(tile, name, table, slice(0, target.pes + 2), counts, per)
    events = np.zeros((counts.shape[0], target.pes + 2), np.int64)
    events[:, used] = summed
    return events, counts.sum(axis=1, dtype=np.int64)


def queues_idle(tile: SparseImage, target: Target) -> bool:
    """No PE of the tile has a column of two or more entries: its queues never hold a broadcast
    back (span = broadcasts, no stall), so a RUN's cycles need only its counted events."""
    name, table = _events_of(tile, target)
    return not _table_part(tile, name, table, slice(target.pes + 2, 2 * target.pes + 2))[0].size


def _events_of(tile: SparseImage, target: Target) -> tuple[str, np.ndarray]:
    """The tile's event table (_event_table) for the target's line width, and its cache name."""
    name = f"events{target.entries_per_line}"
    return name, tile_cached(tile, name, lambda tt: _event_table(tt, target.entries_per_line))


def cycle_pass(tile: SparseImage, x_nonzero: np.ndarray, target: Target, write_back: bool,
               inputs: int | None = None,
               counted: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None) -> PassCycles:
    """One RUN of `tile` on each vector of x_nonzero (bool [N, layer cols], the nonzero =
    broadcast activations): pipeline fill, the activation queues' span and, for a LAST
    RUN, the write-back of the tile's rows (one row per PE per cycle). The vectors are
    `inputs` runs of N / inputs consecutive ones (a conv's output positions of each input;
    default: one vector each), and each count is the sum over an input's vectors. The
    events are counted after the queues are solved, in one product with the PEs' excess
    when the queues need that; else by `counted` (default: pass_events on these arguments),
    which another thread may have called first."""
    if tile.pes != target.pes:
        raise FormatError(None, f"tile built for {tile.pes} PEs, target has {target.pes}")
    if tile.col_lo + tile.cols > x_nonzero.shape[1]:
        raise ValueError(f"tile columns end at {tile.col_lo + tile.cols}, input has {x_nonzero.shape[1]}")
    n, pes = x_nonzero.shape[0], target.pes
    inputs = n if inputs is None else inputs
    per = n // inputs
    name, table = _events_of(tile, target)
    nz = x_nonzero[:, tile.col_lo:tile.col_lo + tile.cols]
    if counted is None:
        counted = functools.partial(pass_events, tile, x_nonzero, target, inputs)
    if queues_idle(tile, target):
        return counted_pass(tile, counted(), per, target, write_back)
    counts = None
    if per == 1:
        count = np.count_nonzero(nz, axis=1).astype(np.int64)
        excess = None  # every vector surely stalls: the queues need no excess
        if not _surely_stall(tile, nz, count, target.queue_depth):  # one product for the events and the excess
            summed, used = _table_product(tile, name, table, slice(0, 2 * pes + 2), nz, 1)
            events = np.zeros((inputs, pes + 2), np.int64)
            events[:, used[used < pes + 2]] = summed[:, used < pes + 2]
            counts = events, count
            excess = summed[:, used >= pes + 2]
        span, stall = _spans(tile, nz, count, excess, target.queue_depth)
    else:  # a conv's positions repeat few patterns (a zero border, all-nonzero patches): each once
        first, inverse = _unique_rows(nz)
        patterns = nz[first]
        excess = _table_product(tile, name, table, slice(pes + 2, 2 * pes + 2), patterns, 1)[0]
        span, stall = _spans(tile, patterns, np.count_nonzero(patterns, axis=1).astype(np.int64), excess,
                             target.queue_depth, distinct=True)
        span, stall = span[inverse].reshape(inputs, per).sum(axis=1), stall[inverse].reshape(inputs, per).sum(axis=1)
    if counts is None:
        counts = counted()
    return counted_pass(tile, counts, per, target, write_back, span, stall)


def counted_pass(tile: SparseImage, counted: tuple[np.ndarray, np.ndarray], per: int, target: Target,
              write_back: bool, span: np.ndarray | None = None, stall: np.ndarray | None = None) -> PassCycles:
    """A RUN's PassCycles (cycle_pass') from its counted events (pass_events) and its queues'
    span and stall per input; by default those of idle queues (`queues_idle`): span =
    broadcasts, no stall."""
    events, broadcasts = counted
    inputs, pes = broadcasts.size, target.pes
    span = broadcasts if span is None else span
    stall = np.zeros(inputs, np.int64) if stall is None else stall
    write = -(-tile.rows // pes) if write_back else 0
    fill = np.full(inputs, per * (target.pipeline_depth + write), np.int64)
    return PassCycles(cycles=span + fill, busy=events[:, :pes], padding=events[:, pes], lines=events[:, pes + 1],
                      broadcasts=broadcasts, stall=stall, fill=fill,
                      writeback_rows=np.full(inputs, per * tile.rows if write_back else 0, np.int64))


def _spans(tile: SparseImage, nz: np.ndarray, count: np.ndarray, excess: np.ndarray,
           depth: int, distinct: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The queue span and stall cycles of each vector of nz [N, tile cols], given its
    broadcast count and the summed excess work (work - 1 over its broadcasts) of each PE
    with some excess (`_excess_rows`' PEs). `distinct`: no two rows of nz are equal (a conv's
    patterns), so none is looked for.

    Every work is at least one cycle and broadcasts come at most one a cycle, so until the
    first stall each PE pops item k at k + (its excess over items 0..k-1), and item k
    waits for a slot only when some PE's excess over items 0..k-1-depth exceeds depth
    (docs/simulator.md). A vector none of whose PEs exceeds depth over all but its last
    depth + 1 broadcasts never stalls: span = K + max_p excess_p. Only the other vectors
    run the queue recurrence, each distinct broadcast pattern once, on the PEs that can
    set its times (_queue_pes): many vectors at once broadcast by broadcast
    (_queue_span_lanes), few in blocks of broadcasts (_queue_span). excess None: every
    vector is known to stall (_surely_stall)."""
    stall = np.zeros(count.size, np.int64)
    if excess is None:
        span, maybe = count.copy(), np.arange(count.size)
    else:
        most = excess.max(axis=1, initial=0)
        span = count + most
        maybe = np.flatnonzero(most > depth)
        if not maybe.size:
            return span, stall
    first, inverse = (np.arange(maybe.size),) * 2 if distinct else _unique_rows(nz[maybe])  # each pattern once
    _, j_idx = np.nonzero(nz[maybe[first]])  # row-major: each pattern's columns ascending
    n_u = count[maybe[first]]
    starts = np.cumsum(n_u) - n_u
    if excess is None:
        stalls = np.arange(first.size)
    else:  # the excess of each pattern's last depth + 1 broadcasts: a gather of their table rows
        back = starts[:, None] + n_u[:, None] - 1 - np.arange(depth + 1)  # [U, depth + 1]
        over = tile_cached(tile, "excess_rows", _excess_rows)
        tail_cols = np.where(back >= starts[:, None], j_idx[np.maximum(back, 0)], over.shape[0] - 1)
        head = excess[maybe[first]] - over[tail_cols].sum(axis=1, dtype=np.int64)
        stalls = np.flatnonzero(head.max(axis=1, initial=0) > depth)
    if stalls.size:
        work = tile_cached(tile, "queue_work", _queue_work)
        s_u, st_u = span[maybe[first]], np.zeros(first.size, np.int64)
        solved = None
        if stalls.size * work.shape[1] >= _LANES_MIN_ELEMS:
            solved = _queue_span_lanes(work - 1, j_idx, starts[stalls], n_u[stalls], depth)
        if solved is None:
            cols_k, valid = _list_table(j_idx, starts[stalls], n_u[stalls])
            solved = _queue_span(work, cols_k, valid, depth)
        s_u[stalls], st_u[stalls] = solved
        span[maybe], stall[maybe] = s_u[inverse], st_u[inverse]
    return span, stall


def _surely_stall(tile: SparseImage, nz: np.ndarray, count: np.ndarray, depth: int) -> bool:
    """Whether every vector of nz [N, tile cols] stalls the broadcast (_spans' test passes
    whatever the per-PE excess): the excess over all PEs of all but its last depth + 1
    broadcasts exceeds depth * pes, so some PE's exceeds depth. One product with a column's
    summed excess instead of one with each PE's: a vector of a dense layer (Alex-6) then
    needs the event counts only."""
    summed = tile_cached(tile, "excess_sums", lambda t: (
        tile_cached(t, "column_tables", _column_tables)[1].sum(axis=1, dtype=np.int64) - t.pes).astype(np.float64))
    after = np.cumsum(nz, axis=1, dtype=np.int16 if nz.shape[1] < 1 << 15 else np.int64)
    tail = nz & (count[:, None] - after <= depth)  # its last depth + 1 broadcasts
    head = blas_product((nz & ~tail).astype(np.float64), summed[:, None])[:, 0]  # exact: integers below 2**53
    return bool((head > depth * tile.pes).all())


def _excess_rows(tile: SparseImage) -> np.ndarray:
    """int32 [cols + 1, e]: each column's work beyond one cycle in each of the e PEs with
    some (in PE order), and a zero row."""
    work = tile_cached(tile, "column_tables", _column_tables)[1]
    work = work[:, (work > 1).any(axis=0)]
    return np.vstack([work - 1, np.zeros((1, work.shape[1]), work.dtype)])


def _list_table(flat_cols: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Broadcast lists flat_cols[starts[v]:starts[v] + counts[v]] as cols_k, valid [K, n]
    (shorter lists padded at the end)."""
    n_bcast = int(counts.max(initial=0))
    ks = np.arange(n_bcast)[:, None]
    valid = ks < counts[None, :]
    cols_k = np.where(valid, flat_cols[np.where(valid, starts[None, :] + ks, 0)], 0)
    return cols_k, valid


def _unique_rows(nz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For bool nz [N, cols]: (the first row of each distinct row, for each row of nz the
    index of its distinct row among those)."""
    if nz.shape[0] < 2:
        return np.arange(nz.shape[0]), np.zeros(nz.shape[0], np.int64)
    packed = np.packbits(nz, axis=1)
    if packed.shape[1] <= 8:  # up to 64 columns: one integer per row (integer sorts are quicker)
        keys = np.zeros((nz.shape[0], 8), np.uint8)
        keys[:, :packed.shape[1]] = packed
        keys = keys.view(np.uint64).ravel()
    else:
        packed = np.ascontiguousarray(packed)
        keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first, inverse.ravel()


@dataclass
class LoadCost:
    """What loads cost: cycles, bytes moved from DRAM, SRAM words written (ints for one
    load, or [B] arrays summed over a layer's loads per input)."""

    cycles: int | np.ndarray
    bytes: int | np.ndarray
    line_writes: int | np.ndarray = 0  # sparse-matrix SRAM lines (all PEs)
    ptr_writes: int | np.ndarray = 0  # pointers (all PEs)


def load_ptr_cost(col_lo: int, col_hi: int, target: Target) -> LoadCost:
    """LOAD_PTR of columns col_lo..col_hi: every PE's cols + 1 pointers, two banks written per cycle."""
    ptrs = col_hi - col_lo + 1
    return LoadCost(cycles=-(-ptrs // POINTER_BANKS), bytes=target.pes * ptrs * target.ptr_bits // 8,
                    ptr_writes=target.pes * ptrs)


def load_spmat_cost(lines: int, tile: SparseImage) -> LoadCost:
    """LOAD_SPMAT of `lines` 64-bit lines (all PEs): the PEs' SRAMs are written in parallel,
    a line a cycle each, so the fullest PE of the loaded image sets the cycles."""
    return LoadCost(cycles=int(np.max(tile.lines_per_pe, initial=0)), bytes=lines * LINE_BYTES, line_writes=lines)


class Timeline:
    """The CCU's clock, one time per input of a batch (docs/simulator.md, "The program's
    timeline"). A load starts when the instruction before the load group ended and its
    memory is free, so loads into different memories (pointer and sparse-matrix SRAMs)
    overlap; any other instruction starts when every load before it has ended."""

    def __init__(self, batch: int):
        self.now = np.zeros(batch, np.int64)  # end of the last non-load instruction
        self.ready = np.zeros(batch, np.int64)  # end of every load issued so far
        self._free: dict[str, np.ndarray] = {}  # memory -> when its last load ends

    def load(self, memory: str, cycles: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = np.maximum(self.now, self._free.get(memory, self.now))
        end = start + cycles
        self._free[memory] = end
        self.ready = np.maximum(self.ready, end)
        return start, end

    def waiting(self) -> np.ndarray:
        """Cycles the next non-load instruction waits for the loads before it."""
        return np.maximum(self.ready - self.now, 0)

    def step(self, cycles: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = np.maximum(self.now, self.ready)
        self.now = self.ready = start + cycles
        return start, self.now


def layer_cycles(passes: Sequence[PassCycles], loads: LoadCost, nonzero_activations: np.ndarray,
                 rows: int, cols: int, target: Target) -> LayerCycles:
    """A layer's LayerCycles from its RUNs' passes and its loads, one value per input each.
    loads.cycles: what the loads added to the layer's time (after overlapping)."""
    batch = nonzero_activations.shape[0]

    def total(name: str, shape=(batch,)) -> np.ndarray:
        out = np.zeros(shape, np.int64)
        for p in passes:
            out += getattr(p, name)
        return out

    def per_input(v: int | np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.asarray(v, np.int64), (batch,)).copy()

    busy = total("busy", (batch, target.pes))
    padding, writeback_rows, broadcasts = total("padding"), total("writeback_rows"), total("broadcasts")
    reload = per_input(loads.cycles)
    cycles = total("cycles") + reload
    entries = busy.sum(axis=1)
    real = entries - padding
    return LayerCycles(
        cycles=cycles,
        ideal_cycles=entries / target.pes,
        busy=busy,
        load_balance=np.where(cycles > 0, entries / (target.pes * np.maximum(cycles, 1)), 1.0),
        nonzero_activations=nonzero_activations,
        broadcasts=broadcasts,
        entries_processed=entries,
        padding_processed=padding,
        stall_cycles=total("stall"),
        reload_cycles=reload,
        reload_bytes=per_input(loads.bytes),
        spmat_line_reads=total("lines"),
        ptr_reads=broadcasts * target.pes,
        # source read per broadcast; accumulator read+write per real entry; write-back
        act_reads=broadcasts + real + writeback_rows,
        act_writes=real + writeback_rows,
        mults=real,
        adds=real + writeback_rows,  # bias add at write-back
        fill_cycles=total("fill"),
        spmat_line_writes=per_input(loads.line_writes),
        ptr_writes=per_input(loads.ptr_writes),
        rows=rows,
        cols=cols,
    )


def cycle_layer(tiles: Sequence[SparseImage], x_nonzero: np.ndarray, target: Target,
                resident: bool | None = None) -> LayerCycles:
    """Cycles and events of one layer run alone, for each vector of x_nonzero (bool [B, cols],
    which input activations are nonzero = broadcast): the tiles in the order given, as a
    program runs them (a row block writes back after its last tile in that order).

    resident: the tiles stay in the PEs' SRAMs between vectors; default: only when the
    layer is one tile. A non-resident layer loads every tile (LOAD_PTR and LOAD_SPMAT,
    overlapping) per vector. A segment's layers are costed by their program instead
    (eiec.runtime.executor).
    """
    x_nonzero = np.atleast_2d(np.asarray(x_nonzero, bool))
    batch = x_nonzero.shape[0]
    if resident is None:
        resident = len(tiles) == 1
    clock = Timeline(batch)
    passes, moved = [], LoadCost(0, 0)
    for n, t in enumerate(tiles):
        if not resident:
            for memory, cost in (("ptr", load_ptr_cost(t.col_lo, t.col_lo + t.cols, target)),
                                 ("spmat", load_spmat_cost(t.lines, t))):
                clock.load(memory, cost.cycles)
                moved = LoadCost(0, moved.bytes + cost.bytes, moved.line_writes + cost.line_writes,
                                 moved.ptr_writes + cost.ptr_writes)
        last = n + 1 == len(tiles) or (tiles[n + 1].row_lo, tiles[n + 1].rows) != (t.row_lo, t.rows)
        passes.append(cycle_pass(t, x_nonzero, target, write_back=last))
        clock.step(passes[-1].cycles)
    moved.cycles = clock.now - sum((p.cycles for p in passes), np.zeros(batch, np.int64))
    return layer_cycles(passes, moved, x_nonzero.sum(axis=1).astype(np.int64),
                        rows=max((t.row_lo + t.rows for t in tiles), default=0) - min((t.row_lo for t in tiles), default=0),
                        cols=max((t.col_lo + t.cols for t in tiles), default=0) - min((t.col_lo for t in tiles), default=0),
                        target=target)


def queue_occupancy(tiles: Sequence[SparseImage], x_nonzero: np.ndarray, target: Target,
                    max_elems: int = 1 << 21) -> tuple[np.ndarray, int]:
    """Activation-queue occupancy of every PE, cycle by cycle: int32 [T, pes], and how
    many input vectors it covers.

    The first vectors of x_nonzero [B, cols] (as many as keep one pass's [K, n, pes]
    pop times and the [T, pes] timeline near max_elems) run one after another, each through every tile pass in
    the order given (the program's); a pass starts pipeline_depth cycles after the previous one ends
    (write-back and reloads are left out of this time axis). An item is in a PE's queue
    from its broadcast b_k until that PE pops it, s[p, k].
    """
    x_nonzero = np.atleast_2d(np.asarray(x_nonzero, bool))
    pes = target.pes
    widest = max((int(x_nonzero[:, t.col_lo:t.col_lo + t.cols].sum(axis=1).max(initial=0)) for t in tiles),
                 default=0)
    n = int(min(x_nonzero.shape[0], max(1, max_elems // max(1, widest * pes))))
    # and few enough that the [cycles, pes] timeline stays near max_elems: each broadcast
    # takes at most its column's longest run (+1), so that sum bounds a vector's span
    longest = sum(x_nonzero[:n, t.col_lo:t.col_lo + t.cols].astype(np.int64)
                  @ (tile_cached(t, "column_tables", _column_tables)[1].max(axis=1, initial=0).astype(np.int64) + 1)
                  + target.pipeline_depth for t in tiles)
    n = max(1, int(np.searchsorted(np.cumsum(longest) * pes, max_elems, side="right")))
    spans, pushes, pops = [], [], []  # per pass: [n] spans, and event times relative to the pass start
    for t in tiles:
        _, work, _ = tile_cached(t, "column_tables", _column_tables)
        cols_k, valid = _broadcast_lists(x_nonzero[:n, t.col_lo:t.col_lo + t.cols])
        span, _, issue, start = _queue_span(work, cols_k, valid, target.queue_depth, trace=True)
        spans.append(span)
        pushes.append((issue, valid))
        pops.append(start)
    # pass p of vector v starts after every earlier (vector, pass): vector-major order
    lengths = np.stack(spans, axis=1) + target.pipeline_depth  # [n, passes]
    offsets = (np.cumsum(lengths.ravel()) - lengths.ravel()).reshape(lengths.shape) + target.pipeline_depth
    total = int(lengths.sum())
    size = (total + 1) * pes
    delta = np.zeros(size, np.int64)
    for p, ((issue, valid), start) in enumerate(zip(pushes, pops)):
        when = issue + offsets[:, p][None, :]  # [K, n]
        push_t = np.broadcast_to(when[:, :, None], start.shape)[valid]  # [items, pes]
        pop_t = (start + offsets[:, p][None, :, None])[valid]
        pe = np.arange(pes)
        delta += np.bincount((push_t * pes + pe).ravel(), minlength=size)
        delta -= np.bincount((pop_t * pes + pe).ravel(), minlength=size)
    return np.cumsum(delta.reshape(total + 1, pes)[:total], axis=0).astype(np.int32), n


def latency_us(cycles: np.ndarray | int, target: Target) -> np.ndarray:
    """Cycles at the target's clock, in microseconds."""
    return np.asarray(cycles, np.float64) / target.clock_mhz
