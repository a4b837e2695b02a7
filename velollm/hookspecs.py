"""Hook specifications: everything a velollm plugin can implement.

Plugins mark implementations with :data:`hookimpl`. Register-style hooks receive a ``register``
callback instead of returning values (the simonw/llm pattern): a plugin may register zero or
many things, and velollm can attribute each one to the plugin that registered it.
Every hook here is documented in ``docs/plugins.md``; a test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    import typer

    from velollm.engine import Backend
    from velollm.models import ModelSource

#: What ``register_backends`` receives: call it once per backend.
RegisterBackend = Callable[["Backend"], None]
#: What ``register_model_sources`` receives: call it once per model source.
RegisterModelSource = Callable[["ModelSource"], None]

PROJECT = "velollm"

hookspec = HookspecMarker(PROJECT)
hookimpl = HookimplMarker(PROJECT)


@hookspec
def register_backends(register: RegisterBackend) -> None:
    """Register backends: call ``register(backend)`` once per :class:`velollm.engine.Backend`.

    A backend's ``name`` must be unique across all plugins; a duplicate is reported and skipped.
    """


@hookspec
def register_model_sources(register: RegisterModelSource) -> None:
    """Register model sources: call ``register(source)`` once per
    :class:`velollm.models.ModelSource`, which turns a model reference into a local file.
    """


@hookspec
def collect_hardware_facts() -> dict[str, Any] | None:
    """Return extra facts about this machine for the hardware probe, or ``None``.

    The returned mapping is merged into ``HardwareProbe.extras``; backends read their own
    section back in ``Backend.available(probe)`` (e.g. the llama.cpp plugin reports the ggml
    backends and devices compiled into the installed build under ``"ggml"``).
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add sub-commands to the ``velollm`` command line; ``cli`` is the root ``typer.Typer``."""
