"""eiec: compile ONNX models for an EIE-style sparse accelerator.

The flow is import -> prune -> cluster -> encode -> lower -> emit; see DESIGN in
the README. The public entry points are `eiec.compile_model` and the `eiec` CLI.
"""

__version__ = "0.1.0"
