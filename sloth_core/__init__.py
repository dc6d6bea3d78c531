"""sloth_core: verified Triton kernels swapped into Hugging Face causal LMs for faster, leaner LoRA/QLoRA.

    import sloth_core
    sloth_core.optimize(model)        # in place; returns the model
    sloth_core.report(model)          # what was replaced / skipped and why
    sloth_core.missing_patterns(model)  # what the architecture expects that the model did not get
    sloth_core.restore(model)         # back to the original forwards
    sloth_core.save_merged(model, "out")  # LoRA merged into a 16-bit checkpoint from_pretrained loads
    sloth_core.for_inference(model)   # generate without autograd bookkeeping (fused 4-bit GEMV when decoding)
    sloth_core.for_training(model)    # back to the training path

The package imports its kernels lazily (on first use of the API), so that ``TRITON_INTERPRET`` may still be set
after ``import sloth_core`` and before the first call (Triton reads it when a kernel is defined).
"""
from __future__ import annotations

from .version import __version__

# public name -> the module that defines it (imported on first use)
_API = {**{name: "api" for name in ("optimize", "restore", "report", "format_report", "is_optimized",
                                    "missing_patterns")},
        **{name: "inference" for name in ("for_inference", "for_training", "in_inference_mode")},
        "SlothCoreWarning": "warning", "save_merged": "export"}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'sloth_core' has no attribute {name!r}")
