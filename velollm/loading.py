"""Resolve a model reference, pick a backend and load an Engine: the path under the pool.

The pool adds sharing, placement and eviction on top; this module is the one-shot version the
CLI and tests use, and the place where backend choice lives.
"""

from __future__ import annotations

from pathlib import Path

from velollm.engine import Backend, Engine, LoadOptions
from velollm.errors import BackendUnavailable
from velollm.hardware import HardwareProbe
from velollm.host import Host, get_host

#: Preferred order when the user names no backend: GPU backends first, CPU last.
BACKEND_PRIORITY = ("llamacpp-cuda", "llamacpp-metal", "llamacpp-vulkan", "llamacpp-cpu", "native-cpu")


def backend_status(probe: HardwareProbe, host: Host | None = None) -> dict[str, tuple[bool, str]]:
    """Every registered backend with (usable here?, reason)."""
    host = host or get_host()
    status = {}
    for name, backend in host.backends().items():
        try:
            status[name] = backend.available(probe)
        except Exception as exc:  # a plugin's availability check must not break the probe
            status[name] = (False, f"availability check failed: {type(exc).__name__}: {exc}")
    return status


def choose_backend(probe: HardwareProbe, requested: str | None = None, host: Host | None = None) -> Backend:
    """The requested backend if usable, else the best usable one by :data:`BACKEND_PRIORITY`."""
    host = host or get_host()
    if requested:
        backend = host.backend(requested)
        ok, reason = backend.available(probe)
        if not ok:
            raise BackendUnavailable(f"backend {requested!r} cannot run here: {reason}")
        return backend
    status = backend_status(probe, host)
    ranked = sorted(status, key=lambda n: BACKEND_PRIORITY.index(n) if n in BACKEND_PRIORITY else len(BACKEND_PRIORITY))
    for name in ranked:
        if status[name][0] and not name.startswith("remote"):
            return host.backend(name)
    reasons = "; ".join(f"{n}: {r}" for n, (_, r) in status.items()) or "no backends registered"
    if host.failures:
        reasons += "; plugin failures: " + "; ".join(str(f) for f in host.failures)
    raise BackendUnavailable(f"no usable backend on this machine ({reasons})")


def load_engine(ref: str | Path, *, backend: str | None = None, options: LoadOptions | None = None,
                probe: HardwareProbe | None = None) -> Engine:
    """Resolve ``ref`` (path, catalogue name, hf: reference), then load it on a backend."""
    from velollm import hardware, models

    resolved = models.resolve(str(ref))
    probe = probe or hardware.probe()
    chosen = choose_backend(probe, backend)
    return chosen.load(resolved.path, options or LoadOptions())
