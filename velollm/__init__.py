"""velollm: local GGUF models behind DSPy and litellm.

Heavy integrations (DSPy, litellm) are imported on first use, so ``import velollm`` and the
CLI stay fast.
"""

from __future__ import annotations

from typing import Any

from velollm import errors
from velollm.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "probe": ("velollm.loading", "probe_machine"),
    "resolve": ("velollm.loading", "resolve"),
    "pull": ("velollm.models", "pull"),
    "inspect": ("velollm.gguf.info", "inspect"),
    "get_host": ("velollm.host", "get_host"),
    "GenerationRequest": ("velollm.engine", "GenerationRequest"),
    "load_engine": ("velollm.loading", "load_engine"),
    "ModelPool": ("velollm.pool", "ModelPool"),
    "get_pool": ("velollm.pool", "get_pool"),
    "register_litellm": ("velollm.adapters.litellm.provider", "register_litellm"),
    "LM": ("velollm.adapters.dspy.lm", "LM"),
    "Adapter": ("velollm.adapters.dspy.adapter", "Adapter"),
    "Embedder": ("velollm.embeddings", "Embedder"),
    "embed": ("velollm.embeddings", "embed"),
}

__all__ = ["__version__", "errors", "hookimpl", *_LAZY]

# `velollm/<model>` becomes a litellm provider as soon as litellm is imported (never imported here:
# it takes seconds); VELOLLM_LITELLM_AUTOREGISTER=0 turns this off. See docs/litellm.md.
from velollm.adapters.litellm.autoregister import install as _install_litellm_hook  # noqa: E402

_install_litellm_hook()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'velollm' has no attribute {name!r}")
