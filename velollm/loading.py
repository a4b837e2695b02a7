"""Resolve a model reference, place it and load an Engine: the path under the pool.

The pool adds sharing, eviction and queues on top; :func:`load_engine` is the one-shot version.
Backend choice is placement's (:mod:`velollm.pool.placement`): the best usable backend that the
model fits on, in :data:`BACKEND_PRIORITY` order, unless the caller or the model source names one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from velollm.engine import Backend, Engine, LoadOptions
from velollm.errors import BackendUnavailable, NotAGGUFFile
from velollm.hardware import HardwareProbe
from velollm.host import Host, get_host
from velollm.pool.placement import (
    BACKEND_PRIORITY,
    Decision,
    PlacementOptions,
    Plan,
    availability,
    estimate_needs,
    place,
    rank_backends,
)

if TYPE_CHECKING:
    from velollm.gguf_info import ModelInfo
    from velollm.models import ResolvedModel

__all__ = ["BACKEND_PRIORITY", "Prepared", "backend_status", "choose_backend", "load_engine", "prepare"]


def backend_status(probe: HardwareProbe, host: Host | None = None) -> dict[str, tuple[bool, str]]:
    """Every registered backend with (usable here?, reason)."""
    host = host or get_host()
    return {name: availability(backend, probe) for name, backend in host.backends().items()}


def choose_backend(probe: HardwareProbe, requested: str | None = None, host: Host | None = None) -> Backend:
    """The requested backend if usable, else the best usable one by priority (no memory check)."""
    host = host or get_host()
    try:
        ranked, _ = rank_backends(host.backends(), probe, requested)
    except BackendUnavailable as exc:
        if host.failures and not requested:
            raise BackendUnavailable(f"{exc}; plugin failures: " + "; ".join(str(f) for f in host.failures)) from None
        raise
    return ranked[0][1]


@dataclass(frozen=True)
class Prepared:
    """Everything decided before loading: the file, its metadata, the plan and the backend's options."""

    resolved: ResolvedModel
    info: ModelInfo | None  # None: not a GGUF file (a backend with its own format, e.g. a remote spec)
    plan: Plan
    load_options: LoadOptions


def prepare(ref: str | Path, *, backend: str | None = None, options: LoadOptions | None = None,
            probe: HardwareProbe | None = None, host: Host | None = None, resolved: ResolvedModel | None = None,
            **placement: object) -> Prepared:
    """Resolve ``ref``, inspect the file and place it; raises typed errors before anything loads.

    ``placement`` takes extra :class:`PlacementOptions` fields (``kv_cache_type``, margins...);
    ``resolved`` skips resolving again when the caller already did.
    """
    from velollm import gguf_info, hardware, models

    host = host or get_host()
    resolved = resolved or models.resolve(str(ref))
    backend = backend or resolved.backend
    probe = probe or hardware.probe()
    backends = host.backends()
    if options is not None and options.draft_model and "companion" not in placement:
        # a speculative draft loads beside the model with its context: placement counts both
        placement["companion"] = gguf_info.inspect(models.resolve(str(options.draft_model)).path)
    opts = PlacementOptions.from_load_options(options, backend, **placement)
    try:
        info: ModelInfo | None = gguf_info.inspect(resolved.path)
    except NotAGGUFFile:
        if backend is None:
            raise
        info = None
    if info is None:  # a backend named for a file in its own format: nothing to place
        assert backend is not None
        ranked, _ = rank_backends(backends, probe, backend)
        plan = Plan(model=resolved.path.name, backend=backend, n_ctx=(options or LoadOptions()).n_ctx or 0,
                    n_gpu_layers=0, n_threads=1, use_mmap=True, use_mlock=False, accounted=False,
                    decisions=[Decision(topic="backend", value=backend, reason=f"named for this model: {ranked[0][2]}"),
                               Decision(topic="memory", value="not accounted",
                                        reason="not a GGUF file: the backend reads its own format; "
                                               "load options are passed through unchanged")])
        return Prepared(resolved, None, plan, options or LoadOptions())
    plan = place(info, probe, opts, backends)
    return Prepared(resolved, info, plan, plan.load_options(options))


def draft_bytes(options: LoadOptions, n_ctx: int) -> int:
    """Memory the speculative draft model of ``options`` takes beside the main model at ``n_ctx``."""
    from velollm import gguf_info, models

    info = gguf_info.inspect(models.resolve(str(options.draft_model)).path)
    return estimate_needs(info, n_ctx, PlacementOptions(n_batch=options.n_batch, flash_attn=options.flash_attn)
                          ).total_bytes


def load_engine(ref: str | Path, *, backend: str | None = None, options: LoadOptions | None = None,
                probe: HardwareProbe | None = None) -> Engine:
    """Resolve ``ref`` (path, catalogue name, hf: reference), place it, then load it."""
    host = get_host()
    prepared = prepare(ref, backend=backend, options=options, probe=probe, host=host)
    return host.backend(prepared.plan.backend).load(prepared.resolved.path, prepared.load_options)
