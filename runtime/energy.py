"""Structural energy model: per-module energy of one layer from the cycle model's events.

Each PE's storages (sparse-matrix SRAM, pointer SRAM, activation register files and
SRAM, activation queue, codebook) cost an energy per access derived from their size,
width and banks by one scaling law anchored at Horowitz's 45 nm figures; the arithmetic
unit from its operand widths; pipeline latches from their bits; the clock network from
the flip-flops it drives every cycle; leakage from the PE's area. All constants are in
`Target.energy`; `access_energies` turns a Target into per-event picojoules, scaled to
`Target.node_nm`. docs/simulator.md "Energy" derives every figure. An estimate from
event counts, not a power model of a layout.
"""

from __future__ import annotations

import functools

import numpy as np

from eiec.runtime.cycles import POINTER_BANKS, LayerCycles
from eiec.target import NODES, Energy, Target

_PJ_PER_UJ = 1e6
_FJ_PER_PJ = 1e3

# The EIE paper's PE modules, then the whole-chip parts of the model.
MODULES = ("SpmatRead", "PtrRead", "ArithmUnit", "ActRW", "ActQueue", "clock", "leakage", "dram")


def sram_access_pj(capacity_bytes: float, width_bits: float, banks: int, e: Energy) -> float:
    """Energy of one `width_bits` access to one bank of a `capacity_bytes` SRAM (or register
    file), at 45 nm: per bit, Horowitz's reference figure scaled by (bank size /
    reference size) ** sram_size_exponent (bit and word lines grow as the square root of
    the array's area)."""
    bank = capacity_bytes / banks
    per_bit = e.sram_ref_pj / e.sram_ref_bits * (bank / e.sram_ref_bytes) ** e.sram_size_exponent
    return per_bit * width_bits


def spmat_line_bits(target: Target) -> int:
    """Width of one sparse-matrix SRAM line: entries_per_line entries of entry_bits each."""
    return target.entries_per_line * target.entry_bits


def pipeline_bits(target: Target) -> int:
    """Pipeline latch bits of one PE (ours): each stage carries the activation, the
    accumulator-wide partial result and a row address."""
    return target.pipeline_depth * (target.act_bits + target.acc_bits + target.ptr_bits)


def clocked_bits(target: Target) -> int:
    """Flip-flops on one PE's clock tree (no clock gating, ours): pipeline latches, the
    activation queue, the codebook and the source and destination activation register
    files."""
    queue = target.queue_depth * (target.act_bits + target.ptr_bits)
    codebook = (1 << target.weight_bits) * target.codebook_bits
    act_rfs = target.act_regs * (target.act_bits + target.acc_bits)
    return pipeline_bits(target) + queue + codebook + act_rfs


def pe_area_mm2(target: Target) -> float:
    """One PE's area at target.node_nm: SRAM bitcells over the array efficiency, plus flip-flops."""
    e = target.energy
    sram_bits = 8 * (target.spmat_sram_bytes + target.ptr_sram_bytes + target.act_sram_bytes)
    um2 = sram_bits * e.sram_bitcell_um2 / e.sram_array_efficiency + clocked_bits(target) * e.flop_um2
    return um2 * 1e-6 * NODES[target.node_nm][0] ** 2


def access_energies(target: Target) -> dict[str, float]:
    """Picojoules per event at target.node_nm (per PE where the event is per PE)."""
    return dict(_access_energies(target))


@functools.lru_cache(maxsize=64)  # a pure function of the (frozen) target, used on every layer run
def _access_energies(target: Target) -> dict[str, float]:
    e = target.energy
    cap, volts = NODES[target.node_nm]
    scale = cap * (volts / NODES[45][1]) ** 2  # dynamic energy ~ C V^2
    queue_bits = target.act_bits + target.ptr_bits  # a queue entry: the activation and its column
    act_src_rf = target.act_regs * target.act_bits / 8
    act_acc_rf = target.act_regs * target.acc_bits / 8
    fj = e.vdd ** 2  # fJ per fF switched
    dyn = {
        "spmat_line": sram_access_pj(target.spmat_sram_bytes, spmat_line_bits(target), target.spmat_banks, e),
        "ptr_pair": POINTER_BANKS * sram_access_pj(target.ptr_sram_bytes, target.ptr_bits, POINTER_BANKS, e),
        "ptr_write": sram_access_pj(target.ptr_sram_bytes, target.ptr_bits, POINTER_BANKS, e),
        "act_rf": sram_access_pj(act_src_rf, target.act_bits, 1, e),
        "act_sram": sram_access_pj(target.act_sram_bytes, target.act_bits, 1, e),
        "acc_rf": sram_access_pj(act_acc_rf, target.acc_bits, 1, e),
        "acc_sram": sram_access_pj(target.act_sram_bytes, target.acc_bits, 1, e),
        "queue": sram_access_pj(target.queue_depth * queue_bits / 8, queue_bits, 1, e),
        "codebook": sram_access_pj((1 << target.weight_bits) * target.codebook_bits / 8, target.codebook_bits, 1, e),
        "mult": e.mult_pj_per_bit2 * target.act_bits * target.codebook_bits,
        "add": e.add_pj_per_bit * target.acc_bits,
        "latch_entry": pipeline_bits(target) * e.data_activity * e.flop_data_ff * fj / _FJ_PER_PJ,
        "clock_cycle": e.clock_tree_factor * clocked_bits(target) * e.flop_clock_ff * fj / _FJ_PER_PJ,
    }
    out = {k: v * scale for k, v in dyn.items()}
    # mW / MHz = nJ per cycle
    out["leakage_cycle"] = pe_area_mm2(target) * e.leak_mw_per_mm2 / target.clock_mhz * 1e3
    out["dram_byte"] = e.dram_byte
    return out


def _spilled(n_per_pe: int, regs: int) -> float:
    """Fraction of a PE's activations that live in the activation SRAM, not the registers."""
    return 0.0 if n_per_pe <= regs else 1.0 - regs / n_per_pe


def layer_energy(cycles: LayerCycles, dram_bytes: float | np.ndarray,
                 target: Target) -> dict[str, np.ndarray]:
    """Energy in microjoules per module of MODULES and "total", float64 [B] each.

    dram_bytes: bytes moved to or from DRAM per input (scalar or [B]), e.g. the
    reload_bytes of a non-resident layer plus any activations spilled to the host.
    Clock and leakage are paid by every PE for every cycle of the layer, idle or not.
    """
    pj = _access_energies(target)  # read only: no copy
    pes = target.pes
    src_spill = _spilled(-(-cycles.cols // pes), target.act_regs)
    acc_spill = _spilled(-(-cycles.rows // pes), target.act_regs)
    e_src = (1 - src_spill) * pj["act_rf"] + src_spill * pj["act_sram"]
    e_acc = (1 - acc_spill) * pj["acc_rf"] + acc_spill * pj["acc_sram"]
    acc_accesses = (cycles.act_reads - cycles.broadcasts) + cycles.act_writes
    pe_cycles = cycles.cycles * pes
    out = {
        "SpmatRead": (cycles.spmat_line_reads + cycles.spmat_line_writes) * pj["spmat_line"],
        "PtrRead": cycles.ptr_reads * pj["ptr_pair"] + cycles.ptr_writes * pj["ptr_write"],
        "ArithmUnit": cycles.mults * (pj["codebook"] + pj["mult"]) + cycles.adds * pj["add"]
        + cycles.entries_processed * pj["latch_entry"],
        "ActRW": cycles.broadcasts * e_src + acc_accesses * e_acc,
        "ActQueue": cycles.broadcasts * pes * 2 * pj["queue"],  # a push and a pop per PE per broadcast
        "clock": pe_cycles * pj["clock_cycle"],
        "leakage": pe_cycles * pj["leakage_cycle"],
        "dram": np.asarray(dram_bytes, np.float64) * pj["dram_byte"],
    }
    shape = cycles.cycles.shape
    res = {k: np.broadcast_to(np.asarray(v, np.float64) / _PJ_PER_UJ, shape).copy() for k, v in out.items()}
    res["total"] = sum(res[k] for k in MODULES)
    return res
