"""Cycle model of one sparse layer on EIE: broadcasts, per-PE activation queues, stalls.

The model and every choice the paper leaves open are in docs/simulator.md. Pure
functions over SparseImage tiles; the queue recurrence loops over broadcasts and is
vectorised over (batch, pe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from eiec.errors import FormatError
from eiec.image import SparseImage
from eiec.runtime.simulator import tile_cached
from eiec.target import Target

# Ours: the pointer-read stage handles one column per cycle and overlaps the previous
# column's entries, so a column costs max(entries, this) cycles in a PE.
POINTER_READ_CYCLES = 1
# Pointers sit in two banks (even / odd columns): two pointers written per cycle on reload.
POINTER_BANKS = 2


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

    @property
    def padding_overhead(self) -> np.ndarray:
        """Fraction of processed entries that were padding."""
        return self.padding_processed / np.maximum(self.entries_processed, 1)


def _column_tables(tile: SparseImage) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """entries [pes, cols], work cycles [cols, pes], padding entries [pes, cols] (int64)."""
    entries = tile.col_entries().astype(np.int64)
    work = np.maximum(entries, POINTER_READ_CYCLES)
    run = np.repeat(np.arange(entries.size), entries.ravel())  # storage order is PE-major
    padding = np.bincount(run[np.asarray(tile.code) == 0], minlength=entries.size)
    return entries, np.ascontiguousarray(work.T), padding.reshape(entries.shape).astype(np.int64)


def _line_table(tile: SparseImage, per_line: int) -> np.ndarray:
    """int64 [pes, cols]: SRAM lines a PE's run of each column touches (lines aligned
    to the PE's first entry, as in SparseImage.packed)."""
    start = np.asarray(tile.col_ptr, np.int64)[:, :-1]
    end = np.asarray(tile.col_ptr, np.int64)[:, 1:]
    return np.where(end > start, (end - 1) // per_line - start // per_line + 1, 0)


def _queue_span(work: np.ndarray, cols_k: np.ndarray, valid: np.ndarray,
                depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Finish time of the last PE and broadcast stall cycles, [B] each.

    work [cols, pes] cycles per (column, PE); cols_k [K, B] the column of broadcast k
    of each input, valid [K, B]; invalid items (padding of shorter broadcast lists) sit
    at the end and do not advance time. Recurrence:
    b_k = max(b_{k-1} + 1, max_p s[p, k-depth]); s = max(f_prev, b_k); f = s + work.
    """
    n_bcast, batch = cols_k.shape
    finish = np.zeros((batch, work.shape[1]), np.int64)
    issue = np.full(batch, -1, np.int64)
    slot_free = np.full((depth, batch), -1, np.int64)  # max_p start of item k - depth
    stall = np.zeros(batch, np.int64)
    for k in range(n_bcast):
        earliest = issue + 1
        b_k = np.maximum(earliest, slot_free[k % depth])
        stall += np.where(valid[k], b_k - earliest, 0)
        issue = np.where(valid[k], b_k, issue)
        start = np.maximum(finish, issue[:, None])
        # gathered per broadcast: a [K, B, pes] table would not fit for conv position batches
        finish = start + np.where(valid[k][:, None], work[cols_k[k]], 0)
        slot_free[k % depth] = start.max(axis=1)
    return finish.max(axis=1, initial=0), stall


def cycle_layer(tiles: Sequence[SparseImage], x_nonzero: np.ndarray, target: Target,
                resident: bool | None = None) -> LayerCycles:
    """Cycles and events of one layer for each input of a batch.

    x_nonzero: bool [B, cols], which input activations are nonzero (= broadcast).
    resident: the layer's tiles stay in the PEs' SRAMs between inputs; default: only
    when the layer is one tile. A non-resident layer reloads every tile per input.
    """
    x_nonzero = np.atleast_2d(np.asarray(x_nonzero, bool))
    batch = x_nonzero.shape[0]
    pes = target.pes
    if resident is None:
        resident = len(tiles) == 1
    for t in tiles:
        if t.pes != pes:
            raise FormatError(None, f"tile built for {t.pes} PEs, target has {pes}")
        if t.col_lo + t.cols > x_nonzero.shape[1]:
            raise ValueError(f"tile columns end at {t.col_lo + t.cols}, input has {x_nonzero.shape[1]}")

    def zeros() -> np.ndarray:
        return np.zeros(batch, np.int64)

    cycles, stall, reload_cycles, reload_bytes = zeros(), zeros(), zeros(), zeros()
    broadcasts, padding, lines, writeback_rows = zeros(), zeros(), zeros(), zeros()
    busy = np.zeros((batch, pes), np.int64)

    # row blocks write back once, after their last column tile (ascending col_lo)
    order = sorted(range(len(tiles)), key=lambda i: (tiles[i].row_lo, tiles[i].rows, tiles[i].col_lo))
    for n, i in enumerate(order):
        t = tiles[i]
        col_entries, work, pad = tile_cached(t, "column_tables", _column_tables)
        line_tab = tile_cached(t, f"lines{target.entries_per_line}",
                               lambda tt: _line_table(tt, target.entries_per_line))
        nz = x_nonzero[:, t.col_lo:t.col_lo + t.cols]
        count = nz.sum(axis=1)
        n_bcast = int(count.max(initial=0))
        b_idx, j_idx = np.nonzero(nz)  # row-major: each input's columns ascending
        k_idx = np.arange(b_idx.size) - np.repeat(np.cumsum(count) - count, count)
        cols_k = np.zeros((n_bcast, batch), np.int64)
        valid = np.zeros((n_bcast, batch), bool)
        cols_k[k_idx, b_idx] = j_idx
        valid[k_idx, b_idx] = True
        span, pass_stall = _queue_span(work, cols_k, valid, target.queue_depth)

        nz_i = nz.astype(np.int64)
        busy += nz_i @ col_entries.T
        padding += nz_i @ pad.sum(axis=0)
        lines += nz_i @ line_tab.sum(axis=0)
        broadcasts += count
        stall += pass_stall
        cycles += target.pipeline_depth + span
        last_of_block = n + 1 == len(order) or (tiles[order[n + 1]].row_lo, tiles[order[n + 1]].rows) \
            != (t.row_lo, t.rows)
        if last_of_block:
            cycles += -(-t.rows // pes)
            writeback_rows += t.rows
        if not resident:
            spmat = int((-(-t.entries_per_pe // target.entries_per_line)).max(initial=0))
            ptrs = -(-(t.cols + 1) // POINTER_BANKS)
            reload_cycles += max(spmat, ptrs)
            reload_bytes += tile_cached(t, "packed_bytes", lambda tt: tt.packed().size) + pes * (t.cols + 1) * target.ptr_bits // 8

    cycles += reload_cycles
    entries = busy.sum(axis=1)
    real = entries - padding
    return LayerCycles(
        cycles=cycles,
        ideal_cycles=entries / pes,
        busy=busy,
        load_balance=np.where(cycles > 0, entries / (pes * np.maximum(cycles, 1)), 1.0),
        nonzero_activations=x_nonzero.sum(axis=1).astype(np.int64),
        broadcasts=broadcasts,
        entries_processed=entries,
        padding_processed=padding,
        stall_cycles=stall,
        reload_cycles=reload_cycles,
        reload_bytes=reload_bytes,
        spmat_line_reads=lines,
        ptr_reads=broadcasts * pes,
        # source read per broadcast; accumulator read+write per real entry; write-back
        act_reads=broadcasts + real + writeback_rows,
        act_writes=real + writeback_rows,
        mults=real,
        adds=real + writeback_rows,  # bias add at write-back
    )


def latency_us(cycles: np.ndarray | int, target: Target) -> np.ndarray:
    """Cycles at the target's clock, in microseconds."""
    return np.asarray(cycles, np.float64) / target.clock_mhz
