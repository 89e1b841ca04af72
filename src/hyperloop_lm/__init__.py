"""hyperloop-lm: parameter-efficient looped language models (Hyperloop Transformers)."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LM", "ModelConfig", "get_preset", "list_presets", "load", "__version__"]


def __getattr__(name: str):
    # Lazy so that `hyperloop-lm --help` and light submodules do not import torch up front.
    if name in ("ModelConfig", "get_preset", "list_presets"):
        from hyperloop_lm import config

        return getattr(config, name)
    if name == "LM":
        from hyperloop_lm.model.lm import LM

        return LM
    if name == "load":
        from hyperloop_lm.infer.api import load

        return load
    raise AttributeError(f"module 'hyperloop_lm' has no attribute {name!r}")
