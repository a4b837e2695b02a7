"""Resolve a model reference, place it and load an Engine: the path under the pool.

This is where the plugin host meets the low layers: :func:`resolve` hands the host's model
sources to :mod:`velollm.models`, :func:`probe_machine` its hardware facts to :mod:`velollm.hardware`,
and :func:`prepare` its backends to :mod:`velollm.placement`. The pool adds sharing, eviction
and queues on top; :func:`load_engine` is the one-shot version. Backend choice is placement's:
the best usable backend that the model fits on, by declared priority, unless the caller or the
model source names one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from velollm.engine import Backend, Engine, LoadOptions
from velollm.errors import BackendUnavailable, NotAGGUFFile
from velollm.hardware import HardwareProbe
from velollm.host import Host, get_host
from velollm.placement import (
    Decision,
    PlacementOptions,
    Plan,
    availability,
    estimate_needs,
    place,
    rank_backends,
)

if TYPE_CHECKING:
    from velollm.gguf.info import ModelInfo
    from velollm.models import ModelSource, Progress, ResolvedModel

__all__ = ["Prepared", "backend_status", "choose_backend", "find_source", "load_engine", "load_prepared", "prepare",
           "probe_machine", "resolve"]


def resolve(ref: str | Path, *, download: bool = True, progress: Progress | None = None,
            host: Host | None = None) -> ResolvedModel:
    """A model reference to a local file through every registered model source (plugins' too)."""
    from velollm import models

    return models.resolve(str(ref), sources=(host or get_host()).model_sources(), download=download,
                          progress=progress)


def find_source(ref: str, host: Host | None = None) -> ModelSource:
    """The model source that understands ``ref`` (:class:`~velollm.errors.ModelNotFound` if none)."""
    from velollm import models

    return models.find_source(ref, (host or get_host()).model_sources())


def probe_machine(host: Host | None = None) -> HardwareProbe:
    """The hardware probe with the plugins' facts (compiled ggml backends and their devices)."""
    from velollm import hardware

    return hardware.probe(facts=(host or get_host()).hardware_facts())


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
    from velollm.gguf import info as gguf_info

    host = host or get_host()
    resolved = resolved or resolve(ref, host=host)
    backend = backend or resolved.backend
    machine = probe or probe_machine(host)
    backends = host.backends()
    if options is not None and options.draft_model and "companion" not in placement:
        # a speculative draft loads beside the model with its context: placement counts both
        placement["companion"] = gguf_info.inspect(resolve(options.draft_model, host=host).path)
    opts = PlacementOptions.from_load_options(options, backend, **placement)
    try:
        info: ModelInfo | None = gguf_info.inspect(resolved.path)
    except NotAGGUFFile:
        if backend is None:
            raise
        info = None
    if info is None:  # a backend named for a file in its own format: nothing to place
        assert backend is not None
        ranked, _ = rank_backends(backends, machine, backend)
        plan = Plan(model=resolved.path.name, backend=backend, n_ctx=(options or LoadOptions()).n_ctx or 0,
                    n_gpu_layers=0, n_threads=1, use_mmap=True, use_mlock=False, accounted=False,
                    decisions=[Decision(topic="backend", value=backend, reason=f"named for this model: {ranked[0][2]}"),
                               Decision(topic="memory", value="not accounted",
                                        reason="not a GGUF file: the backend reads its own format; "
                                               "load options are passed through unchanged")])
        return Prepared(resolved, None, plan, options or LoadOptions())
    plan = place(info, machine, opts, backends)
    return Prepared(resolved, info, plan, plan.load_options(options))


def draft_bytes(options: LoadOptions, n_ctx: int) -> int:
    """Memory the speculative draft model of ``options`` takes beside the main model at ``n_ctx``."""
    from velollm.gguf import info as gguf_info

    info = gguf_info.inspect(resolve(str(options.draft_model)).path)
    return estimate_needs(info, n_ctx, PlacementOptions(n_batch=options.n_batch, flash_attn=options.flash_attn)
                          ).total_bytes


def load_engine(ref: str | Path, *, backend: str | None = None, options: LoadOptions | None = None,
                probe: HardwareProbe | None = None) -> Engine:
    """Resolve ``ref`` (path, catalogue name, hf: reference), place it, then load it."""
    host = get_host()
    return load_prepared(prepare(ref, backend=backend, options=options, probe=probe, host=host), host)


def load_prepared(prepared: Prepared, host: Host | None = None) -> Engine:
    """Load what :func:`prepare` decided, on the backend it chose."""
    backend = (host or get_host()).backend(prepared.plan.backend)
    return backend.load(prepared.resolved.path, prepared.load_options)
