"""TensorRT backend: Python plugins with ahead-of-time kernels (plugins.py), the plan builder (engine.py) and a
CUDA-graph runner (runtime.py). See docs/tensorrt.md.

Importing this package never imports TensorRT; `import_tensorrt()` does, and turns its absence into a UserError.
"""
from __future__ import annotations

from ..errors import UserError

TRT_MISSING = ("TensorRT is not installed: pip install 'qwen-trt[tensorrt]' "
               "(needs an NVIDIA GPU and TensorRT 11.4 or newer)")


def import_tensorrt():
    """The `tensorrt` module, or UserError(TRT_MISSING) when it cannot be imported (absent, stub or broken)."""
    try:
        import tensorrt
    except (ImportError, OSError):
        raise UserError(TRT_MISSING) from None
    if not hasattr(tensorrt, "Builder"):  # PyPI's `tensorrt` stub imports but has no bindings
        raise UserError(TRT_MISSING)
    return tensorrt
