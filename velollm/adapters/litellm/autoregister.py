"""Register the litellm provider when litellm gets imported — without importing it ourselves.

``import litellm`` takes seconds, so ``import velollm`` must not do it; yet users expect
``import velollm`` to be enough for ``litellm.completion(model="velollm/...")`` and
``dspy.LM("velollm/...")``. :func:`install` therefore registers at once when litellm is already
imported, and otherwise leaves a one-shot import hook that registers right after litellm's
module finishes executing. ``VELOLLM_LITELLM_AUTOREGISTER=0`` turns this off (then call
``velollm.register_litellm()`` yourself).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

_TARGET = "litellm"


def enabled() -> bool:
    return os.environ.get("VELOLLM_LITELLM_AUTOREGISTER", "1").strip().lower() not in ("0", "false", "no", "off")


def _register_quietly() -> None:
    provider = sys.modules.get("velollm.adapters.litellm.provider")
    if provider is not None and not hasattr(provider, "register_litellm"):
        return  # that module is importing litellm right now and registers when it is done
    try:
        from velollm.adapters.litellm.provider import register_litellm

        register_litellm()
    except Exception as exc:  # never break the user's import of litellm
        log.warning("velollm could not register its litellm provider: %s: %s", type(exc).__name__, exc)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds litellm with the other finders, then wraps its loader to register afterwards."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        spec = None
        for finder in list(sys.meta_path):  # the rest of the import system, as importlib would ask it
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _uninstall()  # stays until litellm really runs: some importers call find_spec more than once
            _register_quietly()

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


_hook = _AfterImport()


def _uninstall() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Register now if litellm is loaded, else once it is (idempotent, cheap)."""
    if not enabled():
        return
    if _TARGET in sys.modules:
        _register_quietly()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
