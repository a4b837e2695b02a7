"""What the pool reports and how long models stay: status models, keep-alive durations, the memory budget."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from velollm.errors import InvalidRequest
from velollm.hardware import HardwareProbe
from velollm.placement import Plan

#: Seconds an unused model stays loaded (Ollama's default: 5 minutes).
DEFAULT_KEEP_ALIVE = 300.0
#: Requests that may wait for one engine before new ones get QueueFull.
DEFAULT_QUEUE_SIZE = 64
#: Seconds a request may wait for its turn (or a load for memory) before QueueTimeout.
DEFAULT_QUEUE_TIMEOUT = 300.0

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_keep_alive(value: float | int | str | timedelta | None, default: float = DEFAULT_KEEP_ALIVE) -> float:
    """Seconds from a number, a timedelta or an Ollama-style duration ("5m", "1h", "30s", "-1")."""
    if value is None:
        return default
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool):
        raise InvalidRequest(f"keep_alive must be a duration, not {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise InvalidRequest(f"keep_alive {value!r} is not a duration (seconds, or like '30s', '5m', '1h', '-1')")
    return float(match.group(1)) * _UNITS[match.group(2)]


def default_budget(probe: HardwareProbe) -> int:
    """90% of RAM plus the memory of discrete GPUs: a ceiling on what the pool keeps loaded.

    Placement separately checks what is free at load time; the budget stops the pool from
    stacking up models that each fit alone.
    """
    ram = probe.memory.total_bytes * 9 // 10
    return ram + sum(g.total_bytes for g in probe.gpus if not g.unified_memory)


# --- status --------------------------------------------------------------------------------------
class ModelStatus(BaseModel):
    ref: str
    path: str
    backend: str
    state: str  # loading | ready
    leases: int
    running: int  # requests holding a turn now
    queued: int  # requests waiting for a turn
    slots: int  # requests the engine runs at once
    requests: int  # requests served since load
    keep_alive_s: float
    loaded_at: datetime | None = None
    last_used: datetime | None = None
    expires_in_s: float | None = None  # None: in use, or kept forever
    memory_bytes: int = 0
    memory_by_device: dict[str, int] = Field(default_factory=dict)
    load_options: dict[str, Any] = Field(default_factory=dict)
    plan: Plan | None = None


class PoolStatus(BaseModel):
    models: list[ModelStatus]
    memory_budget: int | None
    memory_used: int
    max_loaded: int | None
    keep_alive_s: float
    queue_size: int
    queue_timeout_s: float | None
    loads: int
    load_failures: int
    unloads: int
    evictions: int
