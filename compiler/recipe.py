"""The YAML recipe: target hardware and per-layer compression choices.

Loaded with ``yaml.safe_load`` and validated strictly: an unknown key, a bad value
or a layer pattern that matches no layer is a `RecipeError` naming the key.
See docs/recipe.md for the format.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import RecipeError
from .image import MAX_WEIGHT_BITS
from .target import ENERGY_KEYS, NODES, TARGET_KEYS, Energy, Target

Q_FORMAT_KEYS = ("in_frac", "out_frac")
MAX_Q_FRAC = 32  # fraction bits a recipe may fix: ranges from 2^-17 to 2^47 at 16 bits


@dataclass(frozen=True)
class LayerRecipe:
    """The compression choices for one layer."""

    density: float | str = "auto"  # fraction of weights kept, "keep" or "auto"
    bits: int | str = "auto"  # codebook index bits, or "auto"
    skip: bool = False  # leave the layer dense and on the host
    refit: bool = True  # least-squares refit of codebook values on calibration data
    bias_correction: bool = True  # re-centre the layer's mean output on calibration data
    obs: bool = True  # second-order (OBS/SparseGPT-style) update while pruning
    gptq: bool = True  # GPTQ-style error-compensated assignment of weights to the codebook
    q_format: dict[str, int] | None = None  # fixed fraction bits {in_frac, out_frac}; else derived


LAYER_KEYS = tuple(f.name for f in dataclasses.fields(LayerRecipe))


@dataclass
class Recipe:
    target: Target = field(default_factory=Target)
    defaults: LayerRecipe = field(default_factory=LayerRecipe)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # pattern -> overrides
    path: str | None = None
    # budget for density/bits "auto": accuracy points with labels, else relative output error
    max_accuracy_drop: float = 0.5
    max_output_error: float = 0.05

    def for_layer(self, node_name: str, weight_name: str) -> LayerRecipe:
        """Defaults overridden by every pattern that matches, in file order."""
        values = dataclasses.asdict(self.defaults)
        for pattern, overrides in self.layers.items():
            if _matches(pattern, node_name) or _matches(pattern, weight_name):
                values.update(overrides)
        return LayerRecipe(**values)

    def check_patterns(self, names: list[tuple[str, str]]) -> None:
        """Every layer pattern must match at least one (node, weight) name."""
        for pattern in self.layers:
            if not any(_matches(pattern, n) or _matches(pattern, w) for n, w in names):
                known = ", ".join(n for n, _ in names) or "none"
                raise RecipeError(self.path, f"layers.{pattern}: matches no layer (layers: {known})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.as_dict(),
            "defaults": dataclasses.asdict(self.defaults),
            "layers": {k: dict(v) for k, v in self.layers.items()},
        }


def _matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def _check_density(where: str, v: Any, path: str | None) -> float | str:
    if v in ("keep", "auto"):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1):
        raise RecipeError(path, f"{where}: density must be a number in (0, 1], 'keep' or 'auto', got {v!r}")
    return float(v)


def _check_bits(where: str, v: Any, path: str | None, target: Target) -> int | str:
    if v == "auto":
        return v
    limit = target.weight_bits
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RecipeError(path, f"{where}: bits must be an integer in 1..{limit} (target.weight_bits) or 'auto', got {v!r}")
    if v > limit:
        raise RecipeError(path, f"{where}: {v}-bit codebooks need target.weight_bits >= {v}, but the target's "
                                f"entries hold {target.weight_bits}-bit codebook indices (e.g. target: "
                                f"{{weight_bits: 8, rel_index_bits: 8}})")
    return v


def _check_q_format(where: str, v: Any, path: str | None) -> dict[str, int] | None:
    if v is None:  # as dump_recipe writes a layer without one
        return None
    if not isinstance(v, dict) or not v:
        raise RecipeError(path, f"{where}: expected a mapping with in_frac and/or out_frac, got {v!r}")
    for k, frac in v.items():
        if k not in Q_FORMAT_KEYS:
            raise RecipeError(path, f"{where}.{k}: unknown key (known: {', '.join(Q_FORMAT_KEYS)})")
        if isinstance(frac, bool) or not isinstance(frac, int) or not -MAX_Q_FRAC <= frac <= MAX_Q_FRAC:
            raise RecipeError(path, f"{where}.{k}: fraction bits must be an integer in "
                              f"{-MAX_Q_FRAC}..{MAX_Q_FRAC}, got {frac!r}")
    return dict(v)


def _check_layer(where: str, d: Any, path: str | None, target: Target) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise RecipeError(path, f"{where}: expected a mapping of {', '.join(LAYER_KEYS)}, got {d!r}")
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{where}.{k}"
        if k not in LAYER_KEYS:
            raise RecipeError(path, f"{key}: unknown key (known: {', '.join(LAYER_KEYS)})")
        if k == "density":
            out[k] = _check_density(key, v, path)
        elif k == "bits":
            out[k] = _check_bits(key, v, path, target)
        elif k == "q_format":
            out[k] = _check_q_format(key, v, path)
        elif not isinstance(v, bool):
            raise RecipeError(path, f"{key}: must be true or false, got {v!r}")
        else:
            out[k] = v
    return out


_ENERGY_TYPES = {f.name: type(f.default) for f in dataclasses.fields(Energy)}


def _check_target(d: Any, path: str | None) -> Target:
    if not isinstance(d, dict):
        raise RecipeError(path, f"target: expected a mapping, got {d!r}")
    values: dict[str, Any] = {}
    for k, v in d.items():
        if k not in TARGET_KEYS:
            raise RecipeError(path, f"target.{k}: unknown key (known: {', '.join(TARGET_KEYS)})")
        if k == "energy":
            if not isinstance(v, dict):
                raise RecipeError(path, f"target.energy: expected a mapping, got {v!r}")
            for ek, ev in v.items():
                if ek not in ENERGY_KEYS:
                    raise RecipeError(path, f"target.energy.{ek}: unknown key (known: {', '.join(ENERGY_KEYS)})")
                if isinstance(ev, bool) or not isinstance(ev, (int, float)) or not 0 <= ev < math.inf:
                    raise RecipeError(path, f"target.energy.{ek}: must be a number >= 0, got {ev!r}")
                if _ENERGY_TYPES[ek] is int and ev != int(ev):
                    raise RecipeError(path, f"target.energy.{ek}: must be a whole number, got {ev!r}")
            # each at its field's type, so a target read back from a .eie is the target written
            values[k] = Energy(**{ek: _ENERGY_TYPES[ek](ev) for ek, ev in v.items()})
            continue
        if k == "clock_mhz":
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v <= 1e5
            v = float(v) if ok else v
        else:
            ok = not isinstance(v, bool) and isinstance(v, int) and 1 <= v <= (1 << 30)
        if not ok:
            raise RecipeError(path, f"target.{k}: must be a positive number, got {v!r}")
        values[k] = v
    t = Target(**values)
    if t.weight_bits > MAX_WEIGHT_BITS:  # wider indices defeat weight sharing; codes are bytes
        raise RecipeError(path, f"target.weight_bits: at most {MAX_WEIGHT_BITS} (codebooks of up to 256 entries), "
                                f"got {t.weight_bits}")
    if t.entry_bits not in (8, 16):
        raise RecipeError(path, f"target.weight_bits + target.rel_index_bits: must be 8 or 16 (one- or two-byte "
                                f"entries, 8 or 4 to a 64-bit line), got {t.weight_bits} + {t.rel_index_bits} "
                                f"= {t.entry_bits}")
    if t.node_nm not in NODES:
        raise RecipeError(path, f"target.node_nm: one of {', '.join(map(str, NODES))} (nm), got {t.node_nm}")
    if t.pes > 4096:
        raise RecipeError(path, f"target.pes: at most 4096, got {t.pes}")
    if not (8 <= t.act_bits <= 16 and 8 <= t.codebook_bits <= 16 and t.act_bits + t.codebook_bits <= t.acc_bits <= 48):
        raise RecipeError(path, "target: need 8 <= act_bits, codebook_bits <= 16 and act_bits + codebook_bits <= acc_bits <= 48")
    return t


def target_from_dict(d: Any, path: str | None) -> Target:
    """A `Target` from a mapping (a recipe's `target`, a .eie segment's), checked like a recipe's."""
    return _check_target(d, path)


_TOP_KEYS = ("target", "defaults", "layers", "budget")


def parse_recipe(data: Any, path: str | None = None, pes: int | None = None) -> Recipe:
    """Validate a parsed YAML document into a `Recipe`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, f"expected a mapping with keys {', '.join(_TOP_KEYS)}, got {type(data).__name__}")
    for k in data:
        if k not in _TOP_KEYS:
            raise RecipeError(path, f"{k}: unknown key (known: {', '.join(_TOP_KEYS)})")
    target = _check_target(data.get("target") or {}, path)
    if pes is not None:
        target = dataclasses.replace(target, pes=pes)
    defaults = LayerRecipe(**_check_layer("defaults", data.get("defaults") or {}, path, target))
    layers_in = data.get("layers") or {}
    if not isinstance(layers_in, dict):
        raise RecipeError(path, f"layers: expected a mapping of name pattern -> settings, got {layers_in!r}")
    layers = {str(p): _check_layer(f"layers.{p}", d, path, target) for p, d in layers_in.items()}
    recipe = Recipe(target=target, defaults=defaults, layers=layers, path=path)
    budget = data.get("budget") or {}
    if not isinstance(budget, dict):
        raise RecipeError(path, f"budget: expected a mapping, got {budget!r}")
    for k, v in budget.items():
        if k not in ("max_accuracy_drop", "max_output_error"):
            raise RecipeError(path, f"budget.{k}: unknown key (known: max_accuracy_drop, max_output_error)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise RecipeError(path, f"budget.{k}: must be a finite number >= 0, got {v!r}")
        setattr(recipe, k, float(v))
    return recipe


def load_recipe(path: str | os.PathLike | None, pes: int | None = None) -> Recipe:
    """Read and validate a recipe file; None gives the defaults."""
    if path is None:
        return parse_recipe({}, None, pes)
    return parse_recipe(read_recipe_document(path), os.fspath(path), pes)


def read_recipe_document(path: str | os.PathLike) -> Any:
    """A recipe file's YAML document, parsed but not yet validated (`parse_recipe` does that)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            text = f.read((1 << 20) + 1)
    except OSError as e:
        raise RecipeError(path, f"cannot read recipe: {e.strerror or e}") from None
    if len(text) > 1 << 20:
        raise RecipeError(path, "recipe larger than 1 MiB")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(path, f"recipe does not parse as YAML{where}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise RecipeError(path, "recipe is nested too deeply") from None


def dump_recipe(recipe: Recipe, per_layer: dict[str, LayerRecipe]) -> str:
    """A recipe YAML with every layer's resolved choices, for the user to edit and replay."""
    doc = {
        "target": recipe.target.as_dict(),
        "defaults": {"density": "keep", "bits": recipe.target.weight_bits},
        "layers": {name: {k: v for k, v in dataclasses.asdict(lr).items() if v is not None}  # no q_format: null
                   for name, lr in per_layer.items()},
        "budget": {"max_accuracy_drop": recipe.max_accuracy_drop, "max_output_error": recipe.max_output_error},
    }
    return yaml.safe_dump(doc, sort_keys=False)
