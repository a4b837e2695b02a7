"""Everything llama.cpp, as one built-in plugin: backends, engine, runner, constraints, embeddings,
log capture, the ggml registry, quantizer, speculative decoding and the ``bench``/``quantize`` commands.

Nothing outside this package touches a private member of its engine.
"""

from __future__ import annotations

from typing import Any

from velollm.hookspecs import hookimpl
from velollm.plugins.llamacpp import (
    openmp,  # noqa: F401  (first: the wait policy must precede libgomp)
    preload,  # noqa: F401  (before llama_cpp: libstdc++ must be global first)
)
from velollm.plugins.llamacpp.backend import KINDS, LlamaCppBackend, registry_from_probe, supported_architectures
from velollm.plugins.llamacpp.engine import LlamaCppEngine, default_threads, schema_to_gbnf
from velollm.plugins.llamacpp.registry import read_registry

__all__ = ["KINDS", "LlamaCppBackend", "LlamaCppEngine", "default_threads", "registry_from_probe",
           "schema_to_gbnf", "supported_architectures"]


@hookimpl
def register_backends(register: Any) -> None:
    for kind in KINDS:
        register(LlamaCppBackend(kind))


@hookimpl
def collect_hardware_facts() -> dict[str, Any]:
    return {"ggml": read_registry().model_dump()}


@hookimpl
def register_commands(cli: Any) -> None:
    from velollm.plugins.llamacpp.commands import register

    register(cli)
