"""Placement: which backend, how many layers on which GPU, how many threads, how much context.

A pure function of (model info, hardware probe, options, backends): no loading, no I/O, so every
decision can be unit-tested with probes of machines we do not have, and ``velollm place`` can
show the plan (and why) before anything is loaded.

The method is Ollama's: reserve a safety margin and the compute buffers on the main GPU, then
put the output head and then repeating layers (weights + their share of the KV cache) on the GPUs
from the last layer down — llama.cpp offloads the *last* ``n_gpu_layers`` layers and counts the
head as the very last — until the next one does not fit. The rest runs from system RAM. When even that
does not fit, the context is halved (the KV cache and attention buffers shrink with it) before
giving up with :class:`~velollm.errors.InsufficientMemory` and the numbers.

How a backend takes part (all members optional and declared in :mod:`velollm.engine`; the
llama.cpp plugin implements them, a third-party backend may too):

``devices(probe) -> list[Device]``
    The accelerators this backend can put layers on, with total and free memory as the backend
    sees them. Missing or empty: the backend runs from system RAM only.
``memory_needs(info, n_ctx, options) -> MemoryNeeds | None``
    What a model needs on this backend for ``n_ctx`` tokens. Missing: :func:`estimate_needs`
    (GGUF tensor sizes, KV cache, ggml-style compute buffers). A backend that stores weights
    differently (a numpy engine that dequantizes) returns its own figures; a backend that uses
    no memory here (a remote server) returns ``None`` and nothing is checked.
``priority: int``
    Lower is tried first when the user names no backend (default 100).
``auto_select: bool``
    ``False``: used only when named (default ``True``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from velollm.engine import (
    Device,
    LoadOptions,
    MemoryNeeds,
    backend_auto_select,
    backend_max_parallel,
    backend_priority,
)
from velollm.errors import BackendNotFound, BackendUnavailable, InsufficientMemory
from velollm.gguf.info import ModelInfo

if TYPE_CHECKING:
    from velollm.engine import Backend
    from velollm.hardware import HardwareProbe

MiB = 1 << 20
GiB = 1 << 30

#: Bytes per cached K/V element for the cache types llama.cpp offers (block sizes included).
KV_CACHE_TYPES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32,
                                    "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}


def fmt_bytes(n: float) -> str:
    """Human sizes for reasons and errors (binary units, like the tools users compare with)."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


class PlacementOptions(BaseModel):
    """What the user asked for; ``None`` lets placement decide (and say why)."""

    model_config = ConfigDict(extra="forbid")

    backend: str | None = None
    n_ctx: int | None = Field(default=None, ge=16)
    n_gpu_layers: int | None = None  # a user override; -1 = all
    n_threads: int | None = Field(default=None, ge=1)
    parallel: int | None = Field(default=None, ge=1)  # sequences decoded together (one shared KV cache); None: auto
    batch_ctx: int = Field(default=32768, ge=16)  # parallel > 1: the shared cache gets the trained length, up to this
    # parallel None on a backend that batches: up to this many sequences (llama.cpp's server: 4) share the
    # context placement chose anyway, each with at least seq_ctx tokens of it on average (KV per sequence x N
    # must fit), so memory and offload stay as for one sequence and a small context stays one sequence
    default_parallel: int = Field(default=4, ge=1)
    seq_ctx: int = Field(default=1024, ge=16)
    embedding: bool = False  # an embedding load: one sequence, the usual context
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    kv_cache_type: str = "f16"  # K cache element type (LoadOptions.type_k), and V's unless kv_cache_type_v says
    kv_cache_type_v: str | None = None  # LoadOptions.type_v when it differs
    n_batch: int = Field(default=512, ge=1)
    flash_attn: bool = False
    default_ctx: int = Field(default=4096, ge=16)  # Ollama's and llama-cpp-python's usual default
    min_ctx: int = Field(default=512, ge=16)  # never cap the context below this
    cap_ctx: bool = True  # shrink n_ctx rather than fail when memory is short
    gpu_margin_bytes: int = Field(default=512 * MiB, ge=0)  # driver context, fragmentation
    ram_margin_bytes: int | None = Field(default=None, ge=0)  # default: max(512 MiB, 10% of RAM)
    # a model loaded beside this one with the same context (a speculative draft), counted in RAM so
    # the fit and the pool's budget see both (on a GPU the draft follows the main model's offload,
    # so this over-counts RAM there)
    companion: ModelInfo | None = None

    def companion_at(self, n_ctx: int) -> int:
        """The companion model's memory with an ``n_ctx``-token context (0 without one)."""
        return estimate_needs(self.companion, n_ctx, self).total_bytes if self.companion is not None else 0

    @classmethod
    def from_load_options(cls, options: LoadOptions | None, backend: str | None = None,
                          **overrides: Any) -> PlacementOptions:
        """Only fields the caller set explicitly become constraints; the rest are placement's to choose."""
        fields: dict[str, Any] = {"backend": backend}
        if options is not None:
            explicit = options.model_fields_set
            for name in ("n_ctx", "n_threads", "parallel", "n_gpu_layers", "use_mmap", "use_mlock"):
                if name in explicit:
                    fields[name] = getattr(options, name)
            fields["n_batch"] = options.n_batch
            fields["embedding"] = bool(options.extra.get("embedding"))
            fields["flash_attn"] = options.flash_attn
            fields["kv_cache_type"] = options.type_k
            if options.type_v != options.type_k:
                fields["kv_cache_type_v"] = options.type_v
        fields.update(overrides)
        return cls(**fields)

    @property
    def kv_types(self) -> str:
        """``q8_0``, or ``q8_0/f16`` when K and V differ (for decisions)."""
        v = self.kv_cache_type_v or self.kv_cache_type
        return self.kv_cache_type if v == self.kv_cache_type else f"{self.kv_cache_type}/{v}"

    @property
    def kv_bytes_per_element(self) -> float:
        """Mean bytes per cached element of K and V (they hold as many elements each)."""
        sizes = []
        for kind in (self.kv_cache_type, self.kv_cache_type_v or self.kv_cache_type):
            if kind not in KV_CACHE_TYPES:
                from velollm.errors import InvalidRequest

                raise InvalidRequest(f"unknown KV cache type {kind!r}; known: {', '.join(KV_CACHE_TYPES)}")
            sizes.append(KV_CACHE_TYPES[kind])
        return sum(sizes) / 2


class Decision(BaseModel):
    """One choice and why it was made."""

    topic: str
    value: Any
    reason: str


class DeviceUse(BaseModel):
    """What a plan puts on one accelerator."""

    id: str
    name: str = ""
    layers: int = 0
    output_head: bool = False
    bytes: int = 0
    free_bytes: int = 0
    unified_memory: bool = False


class Plan(BaseModel):
    """How to load one model here; ``decisions`` explains every field."""

    model: str
    backend: str
    n_ctx: int
    n_gpu_layers: int
    n_threads: int
    use_mmap: bool
    use_mlock: bool
    block_count: int = 0
    gpu_layers: int = 0  # repeating layers on accelerators (the output head is counted apart)
    output_on_gpu: bool = False
    parallel: int = 1  # sequences decoded together; they share the n_ctx-token KV cache
    devices: list[DeviceUse] = Field(default_factory=list)
    # offloaded layers per device, in the backend's device order, when several share them (llama.cpp's tensor_split)
    tensor_split: list[float] | None = None
    ram_bytes: int = 0  # system RAM outside unified-memory devices
    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    accounted: bool = True  # False: the backend uses no memory here (remote), nothing was checked
    decisions: list[Decision] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)  # other backends and why not them

    @property
    def memory_bytes(self) -> int:
        """Everything the model holds here, RAM and accelerators together."""
        return self.ram_bytes + sum(d.bytes for d in self.devices)

    def memory_by_device(self) -> dict[str, int]:
        usage = {"ram": self.ram_bytes}
        for d in self.devices:
            usage[d.id] = usage.get(d.id, 0) + d.bytes
        return usage

    def load_options(self, base: LoadOptions | None = None) -> LoadOptions:
        """The backend's LoadOptions: the caller's other settings, with placement's choices."""
        base = base or LoadOptions()
        update: dict[str, Any] = dict(n_ctx=self.n_ctx, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers,
                                      use_mmap=self.use_mmap, use_mlock=self.use_mlock)
        if self.parallel > 1:
            update["parallel"] = self.parallel
        if self.tensor_split is not None and base.tensor_split is None:  # an explicit split wins
            update["tensor_split"] = list(self.tensor_split)
        return base.model_copy(update=update)

    def explain(self) -> list[str]:
        lines = [f"{d.topic}: {d.value} — {d.reason}" for d in self.decisions]
        lines += [f"not {name}: {why}" for name, why in self.rejected.items()]
        return lines


# --- what a model needs -------------------------------------------------------------------------
def estimate_needs(info: ModelInfo, n_ctx: int, options: PlacementOptions | None = None) -> MemoryNeeds:
    """GGUF tensor sizes, the KV cache for ``n_ctx`` and ggml's compute buffers.

    The compute-buffer formula is Ollama's: logits need 4·batch·(embd + vocab) bytes, the
    attention scores 4·batch·(1 + 4·embd + ctx·(1 + heads)) unless flash attention computes them
    in tiles. Checked against llama.cpp 0.3.36 on this machine: Qwen2.5 1.5B at 32k context
    estimates 844 MiB where llama.cpp allocates 848 MiB; Gemma 3 270M 513 vs 514.5 MiB.
    """
    options = options or PlacementOptions()
    n_layers = info.block_count or len(info.layer_bytes)
    layers = list(info.layer_bytes) or [0] * n_layers
    kv_total = info.kv_cache_bytes(n_ctx, options.kv_bytes_per_element) if n_layers else 0
    kv_layers = [kv_total // max(len(layers), 1)] * len(layers)
    tied = bool(info.tensors) and not any(t.name == "output.weight" for t in info.tensors)
    input_bytes = info.non_layer_bytes - (0 if tied else info.output_bytes)
    batch = min(options.n_batch, n_ctx)
    embd, vocab, heads = info.embedding_length, info.vocab_size, max(info.head_count, 1)
    logits = 4 * batch * (embd + vocab)
    graph = 4 * batch * (1 + 4 * embd + (0 if options.flash_attn else n_ctx * (1 + heads)))
    return MemoryNeeds(layer_bytes=layers, kv_layer_bytes=kv_layers, input_bytes=max(input_bytes, 0),
                       output_bytes=info.output_bytes, output_tied=tied, graph_bytes=graph, logits_bytes=logits)


# --- backends -------------------------------------------------------------------------------------
def availability(backend: Any, probe: HardwareProbe) -> tuple[bool, str]:
    """``backend.available(probe)``, with a raising check reported as a reason, not an error."""
    try:
        ok, reason = backend.available(probe)
        return bool(ok), str(reason)
    except Exception as exc:  # a plugin's availability check must not break placement
        return False, f"availability check failed: {type(exc).__name__}: {exc}"


def rank_backends(backends: Mapping[str, Backend], probe: HardwareProbe, requested: str | None = None
                  ) -> tuple[list[tuple[str, Backend, str]], dict[str, str]]:
    """Usable backends best first, with their availability reason; and why the others are out."""
    if requested:
        if requested not in backends:
            known = ", ".join(sorted(backends)) or "none"
            raise BackendNotFound(f"no backend named {requested!r} (registered: {known})")
        ok, reason = availability(backends[requested], probe)
        if not ok:
            raise BackendUnavailable(f"backend {requested!r} cannot run here: {reason}")
        return [(requested, backends[requested], reason)], {}
    usable, rejected = [], {}
    for name, backend in backends.items():
        ok, reason = availability(backend, probe)
        if not ok:
            rejected[name] = reason
        elif not backend_auto_select(backend):
            rejected[name] = "used only when named explicitly"
        else:
            usable.append((name, backend, reason))
    usable.sort(key=lambda item: (backend_priority(item[1]), item[0]))
    if not usable:
        reasons = "; ".join(f"{n}: {r}" for n, r in rejected.items()) or "no backends registered"
        raise BackendUnavailable(f"no usable backend on this machine ({reasons})")
    return usable, rejected


def backend_devices(backend: Any, probe: HardwareProbe) -> list[Device]:
    method = getattr(backend, "devices", None)
    if method is None:
        return []
    try:
        found = list(method(probe) or [])
    except Exception:  # a broken device query means "no offload", never a crash
        return []
    return [d if isinstance(d, Device) else Device.model_validate(d) for d in found]


def backend_needs(backend: Any, info: ModelInfo, n_ctx: int, options: PlacementOptions) -> MemoryNeeds | None:
    method = getattr(backend, "memory_needs", None)
    if method is None:
        return estimate_needs(info, n_ctx, options)
    return method(info, n_ctx, options)


# --- fitting --------------------------------------------------------------------------------------
class _Fit(BaseModel):
    fits: bool
    needs: MemoryNeeds
    n_ctx: int
    gpu_layers: int = 0
    output_on_gpu: bool = False
    head_device: int | None = None
    device_layers: list[int] = Field(default_factory=list)
    device_bytes: list[int] = Field(default_factory=list)
    device_budget: list[int] = Field(default_factory=list)
    ram_bytes: int = 0  # RAM outside unified devices
    ram_total: int = 0  # RAM including unified devices' share
    ram_budget: int | None = None
    overcommitted: list[str] = Field(default_factory=list)


def _fit(needs: MemoryNeeds, n_ctx: int, devices: Sequence[Device], ram_budget: int | None,
         options: PlacementOptions) -> _Fit:
    n = len(needs.layer_bytes)
    per_layer = [w + kv for w, kv in zip(needs.layer_bytes, needs.kv_layer_bytes, strict=False)]
    budget = [max(d.free_bytes - options.gpu_margin_bytes, 0) for d in devices]
    used = [0] * len(devices)
    layers = [0] * len(devices)
    if devices:
        used[0] = needs.compute_bytes  # llama.cpp's main GPU (0) runs the graph
    forced = options.n_gpu_layers
    want = n + 1 if forced is not None and (forced < 0 or forced > n) else forced

    def best_device() -> int:
        return max(range(len(devices)), key=lambda j: budget[j] - used[j])

    placed = 0
    head: int | None = None
    # llama.cpp counts the output head as the last layer: n_gpu_layers=k offloads it and the last
    # k - 1 repeating layers, so the head goes first and no layer goes without it; with a tensor
    # split it lands on the last device, with the highest layers
    if devices and want != 0:
        j = len(devices) - 1
        if want is not None or budget[j] - used[j] >= needs.output_bytes:
            used[j] += needs.output_bytes
            head = j
    if head is not None:
        for i in reversed(range(n)):
            if want is not None and placed >= want - 1:
                break
            j = best_device()
            if want is None and budget[j] - used[j] < per_layer[i]:
                break
            used[j] += per_layer[i]
            layers[j] += 1
            placed += 1
    output_on_gpu = head is not None
    if devices and not output_on_gpu:
        used[0] = 0
    cpu_layers = sum(per_layer[: n - placed])
    head_in_ram = 0 if (output_on_gpu or needs.output_tied) else needs.output_bytes
    ram_compute = 0 if output_on_gpu else needs.compute_bytes
    ram = needs.input_bytes + head_in_ram + cpu_layers + ram_compute
    ram_total = ram + sum(u for u, d in zip(used, devices, strict=False) if d.unified_memory)
    over = [f"{d.id} by {fmt_bytes(u - b)}" for d, u, b in zip(devices, used, budget, strict=False) if u > b]
    fits = ram_budget is None or ram_total <= ram_budget
    return _Fit(fits=fits, needs=needs, n_ctx=n_ctx, gpu_layers=placed, output_on_gpu=output_on_gpu,
                head_device=head, device_layers=layers, device_bytes=used, device_budget=budget, ram_bytes=ram,
                ram_total=ram_total, ram_budget=ram_budget, overcommitted=over)


class _NoFit(Exception):
    def __init__(self, message: str, skip_only: bool = False) -> None:
        super().__init__(message)
        self.message, self.skip_only = message, skip_only


def _ctx_steps(wanted: int, options: PlacementOptions) -> list[int]:
    steps = [wanted]
    while options.cap_ctx and steps[-1] // 2 >= options.min_ctx:
        steps.append(steps[-1] // 2)
    return steps


def _shortfall(model: str, fit: _Fit, devices: Sequence[Device], ram_free: int, ram_margin: int) -> str:
    needs = fit.needs
    gpu_free = ", ".join(f"{d.id} {fmt_bytes(d.free_bytes)}" for d in devices)
    return (f"{model} does not fit in memory: with a {fit.n_ctx}-token context it needs {fmt_bytes(needs.total_bytes)} "
            f"(weights {fmt_bytes(needs.weights_bytes)}, KV cache {fmt_bytes(needs.kv_bytes)}, compute "
            f"{fmt_bytes(needs.compute_bytes)}); {fmt_bytes(fit.ram_total)} of it would be in RAM, where "
            f"{fmt_bytes(ram_free)} is available and {fmt_bytes(ram_margin)} is kept free for the system"
            + (f"; free GPU memory: {gpu_free}" if devices else "; no GPU memory is usable"))


def place(info: ModelInfo, probe: HardwareProbe, options: PlacementOptions | None,
          backends: Mapping[str, Backend]) -> Plan:
    """Choose backend, offload, threads, mmap/mlock and context for ``info`` on ``probe``'s machine."""
    options = options or PlacementOptions()
    candidates, rejected = rank_backends(backends, probe, options.backend)
    failures: list[str] = []
    for rank, (name, backend, why) in enumerate(candidates):
        has_next = rank + 1 < len(candidates)
        try:
            plan = _place_on(name, backend, why, info, probe, options, skip_if_no_offload=has_next)
        except _NoFit as exc:
            rejected[name] = exc.message
            if not exc.skip_only:
                failures.append(exc.message)
            continue
        for other, _, _ in candidates[rank + 1:]:
            rejected.setdefault(other, f"usable, but {name} comes first")
        plan.rejected = rejected
        return plan
    raise InsufficientMemory(failures[0] if failures else f"{info.path.name}: no backend can hold it",
                             rejected=rejected)


def _threads(probe: HardwareProbe, options: PlacementOptions) -> Decision:
    if options.n_threads:
        return Decision(topic="n_threads", value=options.n_threads, reason="requested")
    if probe.cpu.performance_cores:
        return Decision(topic="n_threads", value=probe.cpu.performance_cores,
                        reason=f"{probe.cpu.performance_cores} performance cores: threads on efficiency cores "
                               "hold the others back at every synchronisation")
    cores = max(probe.cpu.physical_cores, 1)
    return Decision(topic="n_threads", value=cores,
                    reason=f"{cores} physical cores ({probe.cpu.logical_cores} logical): ggml's matrix kernels "
                           "saturate a core, so hyper-threads only add contention")


def _auto_parallel(backend: Any, options: PlacementOptions) -> int:
    """The most sequences placement may choose when the caller named none (1: it chooses nothing)."""
    if options.parallel is not None or options.embedding:
        return 1
    return min(options.default_parallel, backend_max_parallel(backend))


def _context(info: ModelInfo, options: PlacementOptions) -> tuple[int, str]:
    trained = info.context_length
    if options.n_ctx:
        if trained and options.n_ctx > trained:
            return trained, f"requested {options.n_ctx}, capped to the {trained} tokens the model was trained on"
        return options.n_ctx, "requested"
    if (options.parallel or 1) > 1:
        wanted = min(trained or options.default_ctx, options.batch_ctx)
        return wanted, (f"{options.parallel} parallel sequences share one KV cache, so it gets the model's trained "
                        f"context ({trained or 'unknown'} tokens, at most {options.batch_ctx}) where memory allows: "
                        "one long prompt (an optimizer's) fits, short ones share it")
    if trained and trained <= options.default_ctx:
        return trained, f"the model's full trained context ({trained} tokens)"
    return options.default_ctx, (f"default {options.default_ctx} (the model was trained on {trained or 'unknown'} "
                                 "tokens; a larger context costs KV cache memory: ask with n_ctx / --ctx)")


def _place_on(name: str, backend: Any, why: str, info: ModelInfo, probe: HardwareProbe, options: PlacementOptions,
              *, skip_if_no_offload: bool) -> Plan:
    model = info.path.name
    devices = backend_devices(backend, probe)
    threads = _threads(probe, options)
    auto_parallel = _auto_parallel(backend, options)
    wanted, ctx_reason = _context(info, options)
    total_ram, ram_free = probe.memory.total_bytes, probe.memory.available_bytes
    ram_margin = options.ram_margin_bytes if options.ram_margin_bytes is not None else max(512 * MiB, total_ram // 10)
    ram_budget = max(ram_free - ram_margin, 0) if ram_free else None
    decisions = [Decision(topic="backend", value=name,
                          reason=("requested" if options.backend else
                                  "the first usable backend by priority (lower first)")
                          + f": {why}")]

    first_try: _Fit | None = None
    fit: _Fit | None = None
    for ctx in _ctx_steps(wanted, options):
        needs = backend_needs(backend, info, ctx, options)
        if needs is None:  # the backend uses no memory here (remote)
            decisions += [Decision(topic="n_ctx", value=wanted, reason=ctx_reason),
                          Decision(topic="memory", value="not accounted",
                                   reason=f"{name} keeps the model elsewhere; nothing here to check")]
            return Plan(model=model, backend=name, n_ctx=wanted, n_gpu_layers=0, n_threads=threads.value,
                        use_mmap=True, use_mlock=False, block_count=info.block_count, accounted=False,
                        decisions=decisions + [threads])
        budget = None if ram_budget is None else max(ram_budget - options.companion_at(ctx), 0)
        attempt = _fit(needs, ctx, devices, budget, options)
        first_try = first_try or attempt
        if attempt.fits:
            fit = attempt
            break
    if fit is None:
        assert first_try is not None
        message = _shortfall(model, first_try, devices, ram_free, ram_margin)
        if first_try.n_ctx > options.min_ctx and options.cap_ctx:
            message += f"; it does not fit with a {options.min_ctx}-token context either"
        raise _NoFit(f"{message} (backend {name})")
    if devices and fit.gpu_layers == 0 and skip_if_no_offload and options.n_gpu_layers is None:
        layer = (fit.needs.layer_bytes[-1] + fit.needs.kv_layer_bytes[-1]) if fit.needs.layer_bytes else 0
        best = max(devices, key=lambda d: d.free_bytes)
        raise _NoFit(f"not one layer fits on {best.id} ({fmt_bytes(best.free_bytes)} free; a layer needs "
                     f"{fmt_bytes(layer)} plus {fmt_bytes(fit.needs.compute_bytes)} compute and a "
                     f"{fmt_bytes(options.gpu_margin_bytes)} margin)", skip_only=True)

    needs, n = fit.needs, len(fit.needs.layer_bytes)
    if fit.n_ctx < wanted:
        short = first_try.ram_total - (first_try.ram_budget or 0) if first_try else 0
        ctx_reason = (f"{ctx_reason}; capped from {wanted} to {fit.n_ctx}: with {wanted} tokens the model needs "
                      f"{fmt_bytes(short)} more RAM than is free")
    decisions.append(Decision(topic="n_ctx", value=fit.n_ctx, reason=ctx_reason))
    decisions.append(_offload_decision(name, fit, devices, probe, options, n))
    decisions.append(threads)
    parallel = options.parallel or max(1, min(auto_parallel, fit.n_ctx // options.seq_ctx))
    if options.parallel and options.parallel > 1:
        decisions.append(Decision(topic="parallel", value=options.parallel,
                                  reason=f"requested: up to {options.parallel} requests decode together, sharing the "
                                         f"{fit.n_ctx}-token KV cache (a prompt waits while the cache is full)"))
    elif auto_parallel > 1:
        decisions.append(Decision(topic="parallel", value=parallel, reason=(
            f"chosen from memory: up to {parallel} requests decode together in the {fit.n_ctx}-token KV cache, "
            f"{options.seq_ctx}+ tokens each on average, a lone one may use all of it (at most {auto_parallel}; "
            "ask with parallel / --parallel; a larger shared context with n_ctx / --ctx)"
            if parallel > 1 else
            f"chosen from memory: one request at a time: the {fit.n_ctx}-token context leaves no {options.seq_ctx} "
            "tokens each for a second sequence (ask with parallel / --parallel)")))
    use_mmap = True if options.use_mmap is None else options.use_mmap
    decisions.append(Decision(topic="use_mmap", value=use_mmap, reason="requested" if options.use_mmap is not None else
                              "weights are mapped from the file: fast loads, one copy in the page cache shared by "
                              "every process, pages the OS can drop instead of swapping"))
    decisions.append(_mlock_decision(fit, probe, options))
    decisions.append(Decision(topic="kv_cache", value=f"{options.kv_types}, {fmt_bytes(needs.kv_bytes)}",
                              reason=f"{fit.n_ctx} tokens × {info.block_count} layers at "
                                     f"{options.kv_bytes_per_element:g} bytes per element"))
    decisions.append(Decision(topic="memory", value=fmt_bytes(needs.total_bytes),
                              reason=f"weights {fmt_bytes(needs.weights_bytes)} + KV cache {fmt_bytes(needs.kv_bytes)} "
                                     f"+ compute {fmt_bytes(needs.compute_bytes)}; RAM: {fmt_bytes(fit.ram_total)} of "
                                     + (f"{fmt_bytes(fit.ram_budget)} usable ({fmt_bytes(ram_free)} available minus "
                                        f"a {fmt_bytes(ram_margin)} reserve)" if fit.ram_budget is not None
                                        else "an unknown amount (the probe could not read RAM)")))
    uses = [DeviceUse(id=d.id, name=d.name, layers=fit.device_layers[j],
                      output_head=j == fit.head_device, bytes=fit.device_bytes[j],
                      free_bytes=d.free_bytes, unified_memory=d.unified_memory)
            for j, d in enumerate(devices) if fit.device_bytes[j] > 0]
    n_gpu_layers = fit.gpu_layers + (1 if fit.output_on_gpu else 0)
    split: list[float] | None = None
    if len(devices) > 1 and fit.gpu_layers:
        split = [float(fit.device_layers[j] + (j == fit.head_device)) for j in range(len(devices))]
        decisions.append(Decision(topic="tensor_split", value=split,
                                  reason="llama.cpp splits the offloaded layers over "
                                         + ", ".join(d.id for d in devices) + " in these proportions, as planned "
                                         "(its default splits by free memory, ignoring the compute buffer on the "
                                         "first device, so its split could differ from the plan)"))
    companion = options.companion_at(fit.n_ctx)
    use_mlock = next(d.value for d in decisions if d.topic == "use_mlock")
    plan = Plan(model=model, backend=name, n_ctx=fit.n_ctx, parallel=parallel,
                n_gpu_layers=n_gpu_layers, n_threads=threads.value,
                use_mmap=use_mmap, use_mlock=use_mlock, block_count=n, gpu_layers=fit.gpu_layers,
                output_on_gpu=fit.output_on_gpu, devices=uses, tensor_split=split, ram_bytes=fit.ram_bytes + companion,
                weights_bytes=needs.weights_bytes, kv_bytes=needs.kv_bytes, compute_bytes=needs.compute_bytes,
                decisions=decisions)
    if companion:
        plan.decisions.append(Decision(
            topic="draft_model", value=fmt_bytes(companion),
            reason="a speculative draft model loads beside it with the same context: its weights, KV cache and "
                   "compute are counted in RAM on top of the memory above, and fitted with it"))
    return plan


def _offload_decision(name: str, fit: _Fit, devices: Sequence[Device], probe: HardwareProbe,
                      options: PlacementOptions, n: int) -> Decision:
    value = fit.gpu_layers + (1 if fit.output_on_gpu else 0)
    if not devices:
        reason = f"{name} runs on the CPU: all {n} layers in RAM"
        if probe.gpus:
            gpus = ", ".join(f"{g.name} ({fmt_bytes(g.total_bytes)})" for g in probe.gpus)
            reason += f"; this machine has {gpus}, but no usable backend drives it (see the rejected backends)"
        return Decision(topic="n_gpu_layers", value=value, reason=reason)
    layer = (fit.needs.layer_bytes[-1] + fit.needs.kv_layer_bytes[-1]) if n else 0
    where = "; ".join(f"{d.id} ({d.name or 'GPU'}): {fit.device_layers[j]} layers, {fmt_bytes(fit.device_bytes[j])} "
                      f"of {fmt_bytes(fit.device_budget[j])} usable ({fmt_bytes(d.free_bytes)} free"
                      f"{', unified with RAM' if d.unified_memory else ''})"
                      for j, d in enumerate(devices))
    if options.n_gpu_layers is not None:
        reason = f"requested {options.n_gpu_layers}: {where}"
        if fit.overcommitted:
            reason += f"; WARNING: over the free memory of {', '.join(fit.overcommitted)}"
        return Decision(topic="n_gpu_layers", value=value, reason=reason)
    margin = fmt_bytes(options.gpu_margin_bytes)
    if fit.gpu_layers == n and fit.output_on_gpu:
        head = f"all {n} layers and the output head fit"
    elif fit.gpu_layers:
        head = (f"the output head and {fit.gpu_layers} of {n} layers fit, filled from the last layer down (each "
                f"needs about {fmt_bytes(layer)}: weights + KV cache); the lower {n - fit.gpu_layers} run on the CPU")
    elif fit.output_on_gpu:
        head = (f"the output head fits but not one layer ({fmt_bytes(layer)}) beside it; the layers run on the "
                "CPU")
    else:
        head = (f"not even the output head ({fmt_bytes(fit.needs.output_bytes)}), which llama.cpp offloads "
                "first, fits; everything runs on the CPU")
    return Decision(topic="n_gpu_layers", value=value,
                    reason=f"{head}. {where}; a {margin} margin per device and {fmt_bytes(fit.needs.compute_bytes)} "
                           "of compute buffers on the first are kept free")


def _mlock_decision(fit: _Fit, probe: HardwareProbe, options: PlacementOptions) -> Decision:
    if not options.use_mlock:
        return Decision(topic="use_mlock", value=False,
                        reason="requested off" if options.use_mlock is False else
                        "off by default: pinning the weights in RAM is opt-in (use_mlock=True stops them being "
                        "paged out, at the cost of that RAM)")
    limit = probe.memory.mlock_limit_bytes
    locked = fit.ram_total - fit.needs.compute_bytes
    if limit is not None and limit < locked:
        return Decision(topic="use_mlock", value=False,
                        reason=f"requested, but RLIMIT_MEMLOCK is {fmt_bytes(limit)} and {fmt_bytes(locked)} would be "
                               "locked: mlock would fail (raise it with `ulimit -l`)")
    return Decision(topic="use_mlock", value=True, reason="requested; RLIMIT_MEMLOCK allows it")
