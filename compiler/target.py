"""The accelerator as a configuration: every hardware parameter in one dataclass.

Defaults are the EIE paper's design point (64 PEs, 800 MHz, queue depth 8, 4-bit
codebook and relative indices, 16-bit activations and weights, 45 nm). An entry is
weight_bits + rel_index_bits = 8 or 16 bits (e.g. 8 + 8 for Deep Compression's 8-bit conv
codebooks); the recipe checks that (compiler/recipe.py). The energy model's constants
are in `Energy`; runtime/energy.py derives per-access energies from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .image import LINE_BYTES


# Technology nodes: (switched capacitance relative to 45 nm, nominal supply in volts).
# Ours, first order and rough (docs/simulator.md "Technology nodes"): capacitance scales
# with the feature size, dynamic energy with C * V^2, area with the feature size squared.
NODES: dict[int, tuple[float, float]] = {45: (1.0, 0.9), 28: (28 / 45, 0.9), 16: (16 / 45, 0.8)}


@dataclass(frozen=True)
class Energy:
    """The structural energy model's constants, at 45 nm and 0.9 V (docs/simulator.md "Energy").

    Per-access energies are not constants: runtime/energy.py derives each SRAM's and
    register file's from its size, width and banks with the scaling law below, anchored
    at Horowitz's 45 nm figure (ISSCC 2014: one 64-bit read of an 8 KB SRAM ~ 10 pJ).
    """

    sram_ref_pj: float = 10.0  # one sram_ref_bits-wide read of an sram_ref_bytes SRAM (Horowitz, 45 nm)
    sram_ref_bytes: int = 8192
    sram_ref_bits: int = 64
    sram_size_exponent: float = 0.5  # energy per bit ~ (bank bytes)^0.5: bit/word lines grow as sqrt(area)
    mult_pj_per_bit2: float = 3.1 / (32 * 32)  # array multiplier ~ a_bits * b_bits (Horowitz: 32-bit int mult 3.1 pJ)
    add_pj_per_bit: float = 0.1 / 32  # ripple/prefix adder ~ bits (Horowitz: 32-bit int add 0.1 pJ)
    vdd: float = 0.9  # volts at 45 nm (Horowitz's figures are at 0.9 V)
    flop_clock_ff: float = 1.0  # clock-pin capacitance of one flip-flop, fF (45 nm standard-cell DFF)
    flop_data_ff: float = 2.0  # internal + output capacitance switched when a flop's data toggles, fF
    data_activity: float = 0.5  # fraction of written bits that toggle
    clock_tree_factor: float = 2.0  # clock wires and buffers load the tree about as much as the flop pins
    sram_bitcell_um2: float = 0.35  # 45 nm 6T bitcell
    sram_array_efficiency: float = 0.7  # bitcells / (bitcells + decoders, sense amps, wiring)
    flop_um2: float = 4.5  # one D flip-flop incl. its share of routing, 45 nm
    leak_mw_per_mm2: float = 0.2  # static power density, 45 nm general-purpose process (ours: order of magnitude)
    dram_byte: float = 160.0  # pJ; 1.3-2.6 nJ per 64-bit DRAM access -> ~160-320 pJ/byte; low end

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Target:
    """One EIE-style accelerator design point."""

    pes: int = 64
    clock_mhz: float = 800.0
    queue_depth: int = 8
    weight_bits: int = 4  # codebook index width (v): 2^weight_bits codebook registers, at most 256
    rel_index_bits: int = 4  # relative row index width (z)
    act_bits: int = 16  # fixed-point activations
    codebook_bits: int = 16  # fixed-point decoded weights
    acc_bits: int = 32  # saturating accumulators
    ptr_bits: int = 16  # column pointer width: bounds entries per PE per tile
    spmat_sram_bytes: int = 131072  # sparse-matrix SRAM per PE
    ptr_sram_bytes: int = 32768  # pointer SRAM per PE (two banks)
    act_regs: int = 64  # activation register file entries per PE
    act_sram_bytes: int = 2048  # activation SRAM per PE for longer vectors
    pipeline_depth: int = 4  # pointer read, spmat read, arithmetic, write-back
    spmat_banks: int = 1  # sparse-matrix SRAM banks; a line read touches one bank
    node_nm: int = 45  # technology node, one of NODES: scales every energy and the area
    energy: Energy = field(default_factory=Energy)

    @property
    def entry_bits(self) -> int:
        """Width of one sparse-matrix entry (codebook index + relative index): 8 or 16."""
        return self.weight_bits + self.rel_index_bits

    @property
    def entries_per_line(self) -> int:
        return LINE_BYTES * 8 // self.entry_bits

    @property
    def max_gap(self) -> int:
        """Largest relative index; a longer run of zeros needs a padding entry."""
        return (1 << self.rel_index_bits) - 1

    @property
    def max_entries_per_pe(self) -> int:
        """Entries one PE can hold for one tile: SRAM size and pointer range."""
        return min(self.spmat_sram_bytes * 8 // self.entry_bits, (1 << self.ptr_bits) - 1)

    @property
    def max_cols_per_tile(self) -> int:
        """Columns whose pointers fit the pointer SRAM (one pointer per column, plus one)."""
        return self.ptr_sram_bytes * 8 // self.ptr_bits - 1

    @property
    def max_rows_per_pe(self) -> int:
        """Output activations one PE can hold: registers plus activation SRAM."""
        return self.act_regs + self.act_sram_bytes * 8 // self.act_bits

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        d = dict(d)
        energy = Energy(**d.pop("energy", {}))
        return cls(energy=energy, **d)


TARGET_KEYS = tuple(f.name for f in dataclasses.fields(Target))
ENERGY_KEYS = tuple(f.name for f in dataclasses.fields(Energy))
