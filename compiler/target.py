"""The accelerator as a configuration: every hardware parameter in one dataclass.

Defaults are the EIE paper's design point (64 PEs, 800 MHz, queue depth 8, 4-bit
codebook and relative indices, 16-bit activations and weights). An entry is
weight_bits + rel_index_bits = 8 or 16 bits (e.g. 8 + 8 for Deep Compression's 8-bit conv
codebooks); the recipe checks that (compiler/recipe.py). Energies per event
are estimates in picojoules for 45 nm (Horowitz, ISSCC 2014).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Energy:
    """Energy per event in pJ (45 nm, Horowitz ISSCC 2014; SRAM per 64-bit access)."""

    spmat_read: float = 10.0  # one 64-bit line of the sparse-matrix SRAM (~8 KB-128 KB bank)
    ptr_read: float = 5.0  # one pointer pair (two 16-bit banks)
    act_read: float = 0.5  # one 16-bit activation register/SRAM read
    act_write: float = 0.5  # one 16-bit activation write
    mult: float = 1.0  # 16-bit fixed-point multiply (scaled from 32-bit int mult 3.1 pJ)
    add: float = 0.1  # 32-bit add
    dram_byte: float = 160.0  # 1.3-2.6 nJ per 64-bit DRAM access -> ~160-320 pJ/byte; low end

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
    energy: Energy = field(default_factory=Energy)

    @property
    def entry_bits(self) -> int:
        """Width of one sparse-matrix entry (codebook index + relative index): 8 or 16."""
        return self.weight_bits + self.rel_index_bits

    @property
    def entries_per_line(self) -> int:
        return 64 // self.entry_bits

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
