"""Prometheus metrics for ``velollm serve`` (``GET /metrics``), through prometheus-client.

Two sources: each finished request's :class:`~velollm.server.access.RequestRecord` (requests,
tokens, queue wait, time to first token, generation speed, duration), and the pool, read at
scrape time (loads, unloads, evictions, memory per model, running and queued requests) so the
numbers are never stale. Each app has its own registry, so several servers in one process (tests)
do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from velollm.server.access import RequestRecord

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_SPEED_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)
#: Routes whose requests are not worth a series of their own label values (scrapes, probes).
_QUIET_ROUTES = frozenset({"/metrics", "/health"})


class PoolCollector:
    """Reads the pool's status at scrape time; ``names`` maps a pool reference to its public id."""

    def __init__(self, pool: Any, names: Callable[[], dict[str, str]]) -> None:
        self.pool, self.names = pool, names

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the families come from the pool when scraped

    def collect(self) -> Iterator[Metric]:
        status = getattr(self.pool, "status", None)
        if not callable(status):
            return
        state = status()
        for name, help_text in (("loads", "models loaded"), ("load_failures", "model loads that failed"),
                                ("unloads", "models unloaded (keep_alive, unload requests, shutdown)"),
                                ("evictions", "idle models unloaded to make room for another")):
            family = CounterMetricFamily(f"velollm_model_{name}", f"Pool: {help_text}.")
            family.add_metric([], float(getattr(state, name, 0)))
            yield family
        used = GaugeMetricFamily("velollm_pool_memory_used_bytes", "Estimated memory of the loaded models.")
        used.add_metric([], float(state.memory_used))
        yield used
        if state.memory_budget is not None:
            budget = GaugeMetricFamily("velollm_pool_memory_budget_bytes", "What the pool may keep loaded.")
            budget.add_metric([], float(state.memory_budget))
            yield budget
        names = self.names()
        memory = GaugeMetricFamily("velollm_model_memory_bytes", "Estimated memory of a loaded model, per device.",
                                   labels=["model", "device"])
        loaded = GaugeMetricFamily("velollm_model_loaded", "1 while a model is loaded (0 while loading).",
                                   labels=["model"])
        running = GaugeMetricFamily("velollm_model_running_requests", "Requests generating now.", labels=["model"])
        queued = GaugeMetricFamily("velollm_model_queued_requests", "Requests waiting for a turn.", labels=["model"])
        for model in state.models:
            label = names.get(model.ref, model.ref)
            for device, size in (model.memory_by_device or {"ram": model.memory_bytes}).items():
                memory.add_metric([label, device], float(size))
            loaded.add_metric([label], 1.0 if model.state == "ready" else 0.0)
            running.add_metric([label], float(model.running))
            queued.add_metric([label], float(model.queued))
        yield from (memory, loaded, running, queued)


class Metrics:
    """The server's metrics; :meth:`observe` is the access middleware's ``on_done``."""

    def __init__(self, pool: Any = None, names: Callable[[], dict[str, str]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("velollm_requests", "HTTP requests by model, route and status.",
                                ["model", "route", "status"], registry=r)
        self.prompt_tokens = Counter("velollm_prompt_tokens", "Prompt tokens of answered requests.", ["model"],
                                     registry=r)
        self.completion_tokens = Counter("velollm_completion_tokens", "Generated tokens.", ["model"], registry=r)
        self.queue_wait = Histogram("velollm_queue_wait_seconds", "Wait for a turn on the model.", ["model"],
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.load_wait = Histogram("velollm_load_wait_seconds", "Time to get the model (its load, if needed).",
                                   ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("velollm_time_to_first_token_seconds", "From the request to its first token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.speed = Histogram("velollm_generation_tokens_per_second", "Decode speed after the first token.",
                               ["model"], buckets=_SPEED_BUCKETS, registry=r)
        self.duration = Histogram("velollm_request_duration_seconds", "Whole requests, by route.",
                                  ["model", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        if pool is not None:
            r.register(PoolCollector(pool, names or dict))

    def observe(self, record: RequestRecord) -> None:
        model = record.model or ""
        self.requests.labels(model, record.route, str(record.status)).inc()
        if record.route in _QUIET_ROUTES:
            return
        self.duration.labels(model, record.route).observe(record.duration_s)
        if not record.model:
            return
        if record.prompt_tokens:
            self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.completion_tokens.labels(model).inc(record.completion_tokens)
        if record.queue_wait_s is not None:
            self.queue_wait.labels(model).observe(record.queue_wait_s)
        if record.load_s is not None:
            self.load_wait.labels(model).observe(record.load_s)
        if record.ttft_s is not None:
            self.ttft.labels(model).observe(record.ttft_s)
        if record.tokens_per_s is not None:
            self.speed.labels(model).observe(record.tokens_per_s)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
