"""eiec: compile ONNX models for an EIE-style sparse accelerator.

The flow is import -> auto -> reconstruct -> prune -> cluster -> encode -> lower -> emit;
see "The flow" in the README. The public entry points are the `eiec` CLI (`eiec.cli:main`),
`eiec.driver.compile_model` and `eiec.runtime.InferenceSession`.
"""

__version__ = "0.1.0"
