"""Energy estimate of one layer: event counts of the cycle model times per-event energies.

The per-event figures are Target.energy (pJ, 45 nm, after Horowitz ISSCC 2014); the
result is an estimate, not a power model of a real layout.
"""

from __future__ import annotations

import numpy as np

from eiec.runtime.cycles import LayerCycles
from eiec.target import Target

_PJ_PER_UJ = 1e6

COMPONENTS = ("spmat_sram", "ptr_sram", "act_rf", "arithmetic", "dram")


def layer_energy(cycles: LayerCycles, dram_bytes: float | np.ndarray,
                 target: Target) -> dict[str, np.ndarray]:
    """Energy in microjoules per component and "total", float64 [B] each.

    dram_bytes: bytes moved to or from DRAM per input (scalar or [B]), e.g. the
    reload_bytes of a non-resident layer plus any activations spilled to the host.
    """
    e = target.energy
    pj = {
        "spmat_sram": cycles.spmat_line_reads * e.spmat_read,
        "ptr_sram": cycles.ptr_reads * e.ptr_read,
        "act_rf": cycles.act_reads * e.act_read + cycles.act_writes * e.act_write,
        "arithmetic": cycles.mults * e.mult + cycles.adds * e.add,
        "dram": np.broadcast_to(np.asarray(dram_bytes, np.float64) * e.dram_byte,
                                cycles.cycles.shape),
    }
    out = {k: np.asarray(v, np.float64) / _PJ_PER_UJ for k, v in pj.items()}
    out["total"] = sum(out[k] for k in COMPONENTS)
    return out
