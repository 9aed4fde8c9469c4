"""Fixtures shared across test modules: what is costly to make and read-only once made."""

from __future__ import annotations

import pytest

from eiec.driver import compile_model
from helpers import MODELS

# the recipe the digits models are compiled with once per session
DIGITS_RECIPE = "defaults: {density: 0.3, bits: 4}\n"


@pytest.fixture(scope="session")
def digits_compiled(tmp_path_factory):
    """compiled(name) -> a folder holding m.eie (models/<name>.onnx at DIGITS_RECIPE, calibrated
    on digits_calib.npz, Huffman storage) and ir/ (its --dump-ir), made once per session.
    Tests read it and write elsewhere."""
    made = {}

    def compiled(name: str):
        if name not in made:
            out = tmp_path_factory.mktemp(f"{name}_compiled")
            (out / "recipe.yaml").write_text(DIGITS_RECIPE)
            compile_model(str(MODELS / f"{name}.onnx"), str(out / "m.eie"), str(out / "recipe.yaml"),
                          str(MODELS / "digits_calib.npz"), str(out / "ir"))
            made[name] = out
        return made[name]

    return compiled
