"""The EIE runtime: fixed-point simulator, cycle and energy model, ORT custom ops, validation.

`eiec.runtime.InferenceSession(path)` runs a .eie (or an IR dump) like onnxruntime does.
"""


def __getattr__(name: str):
    # imported lazily: the session pulls in onnxruntime and registers the custom ops
    if name == "InferenceSession":
        from .session import InferenceSession

        return InferenceSession
    raise AttributeError(name)
