"""User-facing errors: one type per kind of bad input.

The CLI turns any `EiecError` into one line on stderr and exit code 2. Each error
names the file it is about and what is wrong with it.
"""

from __future__ import annotations

import os


class EiecError(Exception):
    """A user mistake or bad input. Never a bug in eiec."""

    kind = "error"

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        super().__init__(self.line())

    def __reduce__(self):  # Exception pickles its args (the line); Dask ships errors from workers
        return type(self), (self.path, self.reason)

    def line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"eiec: {where}{self.reason}"


class ModelError(EiecError):
    """The ONNX model cannot be loaded, checked or compiled."""


class RecipeError(EiecError):
    """The YAML recipe does not parse or names unknown keys / bad values."""


class FormatError(EiecError):
    """A .eie container, .npz or IR dump is damaged, tampered or unsupported."""


class InputError(EiecError):
    """Run-time inputs (.npz) do not match the model."""
