"""The ModelPool: pool logic on a fake backend, the acceptance cases on real models.

Fake backend: load counts, gates and failures under the test's control (host/pool logic only).
Real models (Gemma 270M, Qwen 0.5B on llama.cpp): single-flight loading, eviction under a budget,
keep_alive 0, 32 concurrent generations, corrupt files, models too big for the machine.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from velollm.engine import Capabilities, Chunk, Completion, Engine, GenerationRequest, LoadOptions, Usage
from velollm.errors import (
    EngineClosed,
    InsufficientMemory,
    InvalidModelFile,
    InvalidRequest,
    ModelNotFound,
    PoolBusy,
    QueueFull,
    QueueTimeout,
    TruncatedModelFile,
)
from velollm.hardware import CpuInfo, HardwareProbe, MemoryInfo
from velollm.hookspecs import hookimpl
from velollm.host import Host
from velollm.placement import MemoryNeeds
from velollm.pool import ModelPool
from velollm.pool.status import parse_keep_alive

MiB, GiB = 1 << 20, 1 << 30


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def fake_machine(ram_free: int = 16 * GiB) -> HardwareProbe:
    cpu = {"name": "CPU", "type": "cpu", "backend": "CPU", "free_bytes": ram_free, "total_bytes": ram_free + GiB}
    return HardwareProbe(cpu=CpuInfo(physical_cores=2, logical_cores=2),
                         memory=MemoryInfo(total_bytes=ram_free + GiB, available_bytes=ram_free),
                         extras={"ggml": {"backends": ["CPU"], "devices": [cpu], "error": None}})


# --- a fake backend for pool logic --------------------------------------------------------------
class FakeEngine:
    def __init__(self, path: Path, options: LoadOptions, backend: FakeBackend) -> None:
        self.name, self.model_path, self.options, self.backend = path.stem, path, options, backend
        self.capabilities = Capabilities()
        self.closed = False
        self.active = 0
        self.max_active = 0
        self.order: list[str] = []
        self._count = threading.Lock()

    @property
    def context_length(self) -> int:
        return self.options.n_ctx or 2048

    def _enter(self, label: str) -> None:
        if self.closed:
            raise EngineClosed("fake engine closed")
        with self._count:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.order.append(label)
        gate = self.backend.gate
        if gate is not None:
            assert gate.wait(10), "test gate never opened"

    def _leave(self) -> None:
        with self._count:
            self.active -= 1

    def generate(self, request: GenerationRequest) -> Completion:
        self._enter(request.prompt or "")
        try:
            return Completion(text=(request.prompt or "")[::-1], finish_reason="stop", usage=Usage())
        finally:
            self._leave()

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        def chunks() -> Iterator[Chunk]:
            self._enter(request.prompt or "")
            try:
                for ch in request.prompt or "":
                    yield Chunk(text=ch)
                yield Chunk(finish_reason="stop", usage=Usage())
            finally:
                self._leave()

        return chunks()

    def embed(self, texts: list[str]) -> list[list[float]]:  # a method beyond the Engine protocol
        self._enter("embed")
        try:
            return [[float(len(t))] for t in texts]
        finally:
            self._leave()

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    """Loads FakeEngines; states its memory needs (the third-party placement protocol)."""

    name = "fake"

    def __init__(self, *, size: int = 100 * MiB, load_delay: float = 0.0, fail_first: int = 0,
                 concurrency: int | None = None) -> None:
        self.size, self.load_delay, self.fail_first, self.concurrency = size, load_delay, fail_first, concurrency
        self.loads = 0
        self.attempts = 0
        self.engines: list[FakeEngine] = []
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def available(self, probe: HardwareProbe) -> tuple[bool, str]:
        return True, "fake"

    def memory_needs(self, info: Any, n_ctx: int, options: Any) -> MemoryNeeds:
        return MemoryNeeds(layer_bytes=[self.size], kv_layer_bytes=[0])

    def load(self, model_file: Path, options: LoadOptions) -> FakeEngine:
        with self._lock:
            self.attempts += 1
            attempt = self.attempts
        time.sleep(self.load_delay)
        if attempt <= self.fail_first:
            raise InvalidModelFile(f"fake load failure #{attempt}")
        engine = FakeEngine(model_file, options, self)
        if self.concurrency:
            engine.max_concurrency = self.concurrency  # type: ignore[attr-defined]
        with self._lock:
            self.loads += 1
            self.engines.append(engine)
        return engine


class FakePlugin:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    @hookimpl
    def register_backends(self, register: Any) -> None:
        register(self.backend)


@pytest.fixture
def fake(isolated_host: Host) -> FakeBackend:
    backend = FakeBackend()
    assert isolated_host.register(FakePlugin(backend), name="fake-plugin")
    return backend


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ModelPool]]:
    pools: list[ModelPool] = []

    def make(**kwargs: Any) -> ModelPool:
        kwargs.setdefault("probe", fake_machine())
        pool = ModelPool(**kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def req(prompt: str = "hello") -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=4, temperature=0)


# --- pool logic -------------------------------------------------------------------------------------
def test_lease_api_and_status(fake: FakeBackend, make_pool: Callable[..., ModelPool], gemma_path: Path) -> None:
    pool = make_pool()
    with pool.engine(str(gemma_path), backend="fake", n_ctx=1024) as engine:
        assert isinstance(engine, Engine)
        assert engine.generate(req("abc")).text == "cba"
        assert engine.tokenize("hi") == [104, 105] and engine.context_length == 1024
        assert engine.options.n_ctx == 1024  # other attributes pass through to the backend's engine
        (model,) = pool.status().models
        assert model.leases == 1 and model.backend == "fake" and model.state == "ready"
        assert model.memory_bytes == 100 * MiB and model.plan is not None and model.plan.backend == "fake"
    status = pool.status()
    (model,) = status.models
    assert model.leases == 0 and model.requests == 1 and model.expires_in_s == pytest.approx(300, abs=5)
    assert status.loads == 1 and status.memory_used == 100 * MiB
    lease = pool.acquire(str(gemma_path), backend="fake", n_ctx=1024)
    assert fake.loads == 1  # same model and options: the loaded engine is shared
    lease.release()
    lease.release()  # idempotent
    assert pool.status().models[0].leases == 0


def test_failed_load_reaches_every_waiter_and_is_forgotten(isolated_host: Host, make_pool: Callable[..., ModelPool],
                                                           gemma_path: Path) -> None:
    backend = FakeBackend(load_delay=0.3, fail_first=1)
    isolated_host.register(FakePlugin(backend), name="fake-plugin")
    pool = make_pool()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            pool.acquire(str(gemma_path), backend="fake").release()
        except InvalidModelFile as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.attempts == 1  # one load for all eight
    assert len(errors) == 8 and all("fake load failure #1" in str(e) for e in errors)
    assert pool.status().models == [] and pool.status().load_failures == 1
    with pool.engine(str(gemma_path), backend="fake") as engine:  # not poisoned: the next request loads
        assert engine.generate(req("ok")).text == "ko"
    assert backend.attempts == 2 and backend.loads == 1


def test_requests_take_fifo_turns_with_a_bounded_queue(fake: FakeBackend, make_pool: Callable[..., ModelPool],
                                                       gemma_path: Path) -> None:
    pool = make_pool(queue_size=3)
    lease = pool.acquire(str(gemma_path), backend="fake")
    fake.gate = threading.Event()
    results: dict[str, Any] = {}

    def run(label: str, engine: Any) -> None:
        try:
            results[label] = engine.generate(req(label)).text
        except Exception as exc:
            results[label] = exc

    threads = []
    for i, label in enumerate(["a", "b", "c", "d"]):
        t = threading.Thread(target=run, args=(label, lease.engine))
        t.start()
        threads.append(t)
        wait_until(lambda i=i: pool.status().models[0].queued == i)  # "a" runs; b, c, d queue in order
    with pytest.raises(QueueFull, match="3 requests are already waiting"):
        lease.engine.generate(req("e"))
    short = pool.acquire(str(gemma_path), backend="fake", timeout=0.2)
    started = time.monotonic()
    with pytest.raises(QueueFull):  # the queue is still full: no waiting at all
        short.engine.generate(req("f"))
    assert time.monotonic() - started < 0.2
    fake.gate.set()
    for t in threads:
        t.join()
    engine = fake.engines[0]
    assert engine.order == ["a", "b", "c", "d"] and engine.max_active == 1
    assert results == {"a": "a", "b": "b", "c": "c", "d": "d"}
    fake.gate = threading.Event()
    blocker = threading.Thread(target=run, args=("g", lease.engine))
    blocker.start()
    wait_until(lambda: pool.status().models[0].running == 1)
    with pytest.raises(QueueTimeout, match="waited 0.2 s for a turn"):
        short.engine.generate(req("h"))
    fake.gate.set()
    blocker.join()
    short.release()
    lease.release()


def test_streams_hold_their_turn_until_closed_or_dropped(fake: FakeBackend, make_pool: Callable[..., ModelPool],
                                                         gemma_path: Path) -> None:
    pool = make_pool(queue_timeout=0.2)
    with pool.engine(str(gemma_path), backend="fake") as engine:
        stream = engine.stream(req("xyz"))
        assert next(stream).text == "x"
        with pytest.raises(InvalidRequest, match="already generating"):  # would wait for itself forever
            engine.generate(req("again"))
        outcome: list[BaseException | str] = []

        def late() -> None:  # an assertion inside a thread cannot fail the test: record, check below
            try:
                engine.generate(req("late"))
                outcome.append("generated while another stream held the turn")
            except BaseException as exc:
                outcome.append(exc)

        other = threading.Thread(target=late)
        other.start()
        other.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], QueueTimeout), outcome
        stream.close()
        assert engine.generate(req("next")).text == "txen"
        text = "".join(c.text for c in engine.stream(req("full")))  # exhausting a stream ends its turn
        assert text == "full" and pool.status().models[0].running == 0
        dropped = engine.stream(req("dropped"))
        next(dropped)
        del dropped
        gc.collect()
        wait_until(lambda: pool.status().models[0].running == 0)
        assert engine.generate(req("after")).text == "retfa"


def test_other_engine_methods_take_turns_too(fake: FakeBackend, make_pool: Callable[..., ModelPool],
                                             gemma_path: Path) -> None:
    pool = make_pool()
    fake.gate = threading.Event()
    with pool.engine(str(gemma_path), backend="fake") as engine:
        threads = [threading.Thread(target=engine.embed, args=(["a", "bb"],)) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: pool.status().models[0].running == 1 and pool.status().models[0].queued == 2)
        assert engine.tokenize("ok") == [111, 107]  # tokenizing does not wait for a turn
        fake.gate.set()
        for t in threads:
            t.join()
        assert engine.embed(["abc"]) == [[3.0]]
    assert fake.engines[0].max_active == 1 and pool.status().models[0].requests == 4


def test_engine_concurrency_lets_several_requests_in(isolated_host: Host, make_pool: Callable[..., ModelPool],
                                                     gemma_path: Path) -> None:
    backend = FakeBackend(concurrency=3)  # e.g. a remote server that batches requests
    isolated_host.register(FakePlugin(backend), name="fake-plugin")
    pool = make_pool()
    backend.gate = threading.Event()
    with pool.engine(str(gemma_path), backend="fake") as engine:
        threads = [threading.Thread(target=engine.generate, args=(req(str(i)),)) for i in range(5)]
        for t in threads:
            t.start()
        wait_until(lambda: pool.status().models[0].running == 3 and pool.status().models[0].queued == 2)
        backend.gate.set()
        for t in threads:
            t.join()
    assert backend.engines[0].max_active == 3 and pool.status().models[0].slots == 3


def test_keep_alive_timer_zero_and_forever(fake: FakeBackend, make_pool: Callable[..., ModelPool],
                                           gemma_path: Path) -> None:
    pool = make_pool(keep_alive="200ms")
    pool.acquire(str(gemma_path), backend="fake", n_ctx=1024).release()
    assert pool.status().models and not fake.engines[0].closed
    wait_until(lambda: not pool.status().models, timeout=5)
    assert fake.engines[0].closed and pool.status().unloads == 1
    pool.acquire(str(gemma_path), backend="fake", n_ctx=1024, keep_alive=0).release()
    assert pool.status().models == [] and fake.engines[1].closed
    pool.acquire(str(gemma_path), backend="fake", n_ctx=1024, keep_alive=-1).release()
    time.sleep(0.4)
    (model,) = pool.status().models
    assert model.expires_in_s is None and not fake.engines[2].closed
    assert pool.unload() == 1 and fake.engines[2].closed


def test_max_loaded_evicts_the_least_recently_used_idle_model(fake: FakeBackend, make_pool: Callable[..., ModelPool],
                                                              gemma_path: Path) -> None:
    pool = make_pool(max_loaded=2)
    path = str(gemma_path)
    pool.acquire(path, backend="fake", n_ctx=1024).release()  # A
    pool.acquire(path, backend="fake", n_ctx=2048).release()  # B
    pool.acquire(path, backend="fake", n_ctx=1024).release()  # A again: now B is the least recently used
    pool.acquire(path, backend="fake", n_ctx=4096).release()  # C evicts B
    loaded = sorted(m.load_options["n_ctx"] for m in pool.status().models)
    assert loaded == [1024, 4096] and pool.status().evictions == 1
    assert [e.closed for e in fake.engines] == [False, True, False]


def test_models_in_use_are_never_evicted(fake: FakeBackend, make_pool: Callable[..., ModelPool],
                                         gemma_path: Path) -> None:
    pool = make_pool(memory_budget=150 * MiB)  # room for one 100 MiB model
    path = str(gemma_path)
    held = pool.acquire(path, backend="fake", n_ctx=1024)
    with pytest.raises(PoolBusy, match="held by models in use"):
        pool.acquire(path, backend="fake", n_ctx=2048, timeout=0.2)
    assert not fake.engines[0].closed and held.engine.generate(req("in use")).text == "esu ni"
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(path, backend="fake", n_ctx=2048, timeout=10)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive() and fake.loads == 1  # still waiting for room
    held.release()  # now idle: the waiting load evicts it
    waiter.join()
    assert fake.engines[0].closed and fake.loads == 2
    with pytest.raises(EngineClosed):
        held.engine.generate(req("stale"))
    got[0].release()
    with pytest.raises(InsufficientMemory, match="pool.s memory budget is 50 MiB"):
        ModelPool(memory_budget=50 * MiB, probe=fake_machine()).acquire(path, backend="fake")


def test_two_first_loads_racing_for_one_slot_take_turns(isolated_host: Host, make_pool: Callable[..., ModelPool],
                                                         gemma_path: Path) -> None:
    backend = FakeBackend(load_delay=0.2)
    isolated_host.register(FakePlugin(backend), name="fake-plugin")
    pool = make_pool(max_loaded=1)
    barrier = threading.Barrier(2)
    done: list[int] = []

    def use(n_ctx: int) -> None:
        barrier.wait()
        with pool.engine(str(gemma_path), backend="fake", n_ctx=n_ctx, timeout=10) as engine:
            engine.generate(req(str(n_ctx)))
            time.sleep(0.2)
        done.append(n_ctx)

    threads = [threading.Thread(target=use, args=(n,)) for n in (1024, 2048)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done) == [1024, 2048]  # neither waited for the other forever
    assert backend.loads == 2 and pool.status().evictions == 1 and len(pool.status().models) == 1


def test_close_frees_everything_and_the_pool_stays_usable(fake: FakeBackend, make_pool: Callable[..., ModelPool],
                                                          gemma_path: Path) -> None:
    pool = make_pool()
    lease = pool.acquire(str(gemma_path), backend="fake")
    pool.acquire(str(gemma_path), backend="fake", n_ctx=1024).release()
    pool.close()
    assert all(e.closed for e in fake.engines) and pool.status().models == []
    with pytest.raises(EngineClosed):
        lease.engine.generate(req())
    lease.release()  # releasing a lease on a closed engine is harmless
    with pool.engine(str(gemma_path), backend="fake") as engine:
        assert engine.generate(req("again")).text == "niaga"


def test_bad_input_gets_typed_errors(fake: FakeBackend, make_pool: Callable[..., ModelPool], gemma_path: Path,
                                     tmp_path: Path) -> None:
    pool = make_pool()
    with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'"):
        pool.acquire("no-such-model")
    with pytest.raises(ModelNotFound, match="model file not found"):
        pool.acquire(str(tmp_path / "missing.gguf"))
    with pytest.raises(InvalidRequest, match="invalid load options: n_ctx"):
        pool.acquire(str(gemma_path), backend="fake", n_ctx=-5)
    with pytest.raises(InvalidRequest, match="keep_alive"):
        pool.acquire(str(gemma_path), backend="fake", keep_alive="soon")
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("-1") == -1 and parse_keep_alive("1.5h") == 5400
    assert pool.status().models == []


def test_a_backend_with_its_own_file_format_is_not_placed(fake: FakeBackend, make_pool: Callable[..., ModelPool],
                                                          tmp_path: Path) -> None:
    spec = tmp_path / "model.json"
    spec.write_text('{"not": "gguf"}')
    pool = make_pool()
    with pool.engine(str(spec), backend="fake", n_ctx=512) as engine:
        assert engine.options.n_ctx == 512
        (model,) = pool.status().models
        assert model.plan is not None and not model.plan.accounted and model.memory_bytes == 0


# --- real models: the acceptance cases -------------------------------------------------------------
@pytest.fixture
def real_pool(isolated_host: Host) -> Iterator[ModelPool]:
    pool = ModelPool()
    yield pool
    pool.close()


def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every real llama.cpp load."""
    from velollm.plugins.llamacpp import LlamaCppBackend

    loads: list[str] = []
    original = LlamaCppBackend.load

    def counted(self: LlamaCppBackend, model_file: Path, options: LoadOptions) -> Any:
        loads.append(Path(model_file).name)
        return original(self, model_file, options)

    monkeypatch.setattr(LlamaCppBackend, "load", counted)
    return loads


def test_16_threads_acquiring_one_model_load_it_once(real_pool: ModelPool, gemma_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    loads = count_loads(monkeypatch)
    barrier = threading.Barrier(16)
    leases: list[Any] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        lease = real_pool.acquire("gemma3-270m", n_ctx=2048)
        with lock:
            leases.append(lease)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [gemma_path.name] and len(leases) == 16
    assert len({id(lease.engine.raw) for lease in leases}) == 1
    (model,) = real_pool.status().models
    assert model.leases == 16 and model.backend == "llamacpp-cpu"
    for lease in leases:
        lease.release()
    assert real_pool.status().models[0].leases == 0


def test_a_budget_for_one_model_evicts_the_idle_one_never_the_busy_one(
        isolated_host: Host, gemma_path: Path, qwen_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from velollm.loading import prepare

    sizes = {name: prepare(name, options=LoadOptions(n_ctx=2048)).plan.memory_bytes
             for name in ("gemma3-270m", "qwen2.5-coder-0.5b-instruct")}
    budget = max(sizes.values()) + 16 * MiB  # fits either model, not both
    assert budget < sum(sizes.values())
    loads = count_loads(monkeypatch)
    pool = ModelPool(memory_budget=budget)
    try:
        gemma = pool.acquire("gemma3-270m", n_ctx=2048)
        gemma_engine = gemma.engine.raw
        gemma.release()  # idle, kept alive (5 min default)
        with pool.engine("qwen2.5-coder-0.5b-instruct", n_ctx=2048) as qwen:
            assert [m.ref for m in pool.status().models] == ["qwen2.5-coder-0.5b-instruct"]
            assert pool.status().evictions == 1
            with pytest.raises(EngineClosed):  # the evicted engine really was closed
                gemma_engine.generate(req())
            # qwen is in use: asking for gemma waits for room, then gives up; qwen keeps working
            with pytest.raises(PoolBusy):
                pool.acquire("gemma3-270m", n_ctx=2048, timeout=0.3)
            assert qwen.generate(GenerationRequest(prompt="def add(a, b):", max_tokens=4, temperature=0)).text
        with pool.engine("gemma3-270m", n_ctx=2048):  # qwen is idle now: it goes, gemma comes back
            assert [m.ref for m in pool.status().models] == ["gemma3-270m"]
        assert loads == [gemma_path.name, qwen_path.name, gemma_path.name]
        assert pool.status().memory_used <= budget
    finally:
        pool.close()


def test_keep_alive_zero_unloads_when_the_lease_ends(real_pool: ModelPool) -> None:
    with real_pool.engine("gemma3-270m", n_ctx=2048, keep_alive=0) as engine:
        raw = engine.raw
        assert engine.generate(GenerationRequest(prompt="Hello", max_tokens=2, temperature=0)).usage.prompt_tokens
        assert len(real_pool.status().models) == 1
    assert real_pool.status().models == [] and real_pool.status().unloads == 1
    with pytest.raises(EngineClosed):
        raw.generate(req())


WORDS = ["Apples", "Rivers", "Music", "Winter", "Python", "Mountains", "Coffee", "Dogs", "Paris", "The ocean",
         "Gardens", "Trains", "Books", "Stars", "Bread", "Chess", "Rain", "Bicycles", "Honey", "Castles", "Maps",
         "Robots", "Volcanoes", "Bees", "Islands", "Clocks", "Forests", "Lamps", "Whales", "Deserts", "Ice", "Kites"]


@pytest.mark.slow
def test_32_threads_generating_on_one_model_match_single_threaded_greedy_runs(real_pool: ModelPool) -> None:
    prompts = [f"{word} are" for word in WORDS]
    assert len(set(prompts)) == 32

    def request(prompt: str) -> GenerationRequest:
        return GenerationRequest(prompt=prompt, max_tokens=2, temperature=0)  # prefill + a decode step

    # one llama.cpp thread: on a busy 2-core machine spinning worker threads slow everything down;
    # one sequence: this is about the pool's turns (batched sequences' numerics: test_llamacpp_batch.py)
    with real_pool.engine("gemma3-270m", n_ctx=2048, n_threads=1, parallel=1) as engine:
        engine.generate(request("Warm up"))
        expected = {p: engine.generate(request(p)).text for p in prompts}
    answers: dict[str, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)

    def worker(prompt: str) -> None:
        barrier.wait()
        try:
            with real_pool.engine("gemma3-270m", n_ctx=2048, n_threads=1, parallel=1) as shared:
                answers[prompt] = shared.generate(request(prompt)).text
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert answers == expected
    (model,) = real_pool.status().models
    assert model.requests == 1 + 32 + 32 and real_pool.status().loads == 1


def test_a_corrupt_file_fails_every_waiter_and_a_repaired_one_loads(real_pool: ModelPool, gemma_path: Path,
                                                                    tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    with gemma_path.open("rb") as src:
        model.write_bytes(src.read(4 * MiB))  # the header promises 250 MB of tensors
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker() -> None:
        barrier.wait()
        try:
            real_pool.acquire(str(model)).release()
        except TruncatedModelFile as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 6 and all("truncated" in str(e) and "re-download" in str(e) for e in errors)
    assert real_pool.status().load_failures == 1
    model.unlink()  # repaired (a hard link saves copying 250 MB): the failure was not cached
    try:
        os.link(gemma_path, model)
    except OSError:
        shutil.copyfile(gemma_path, model)
    with real_pool.engine(str(model), n_ctx=2048) as engine:
        assert engine.context_length == 2048 and engine.tokenize("Hi")


def test_a_model_larger_than_all_memory_gets_the_numbers(isolated_host: Host) -> None:
    tiny = fake_machine(ram_free=600 * MiB)  # less than Gemma 270M needs even with a 512-token context
    pool = ModelPool(probe=tiny)
    with pytest.raises(InsufficientMemory) as err:
        pool.acquire("gemma3-270m")
    message = str(err.value)
    assert "does not fit in memory" in message and "600 MiB is available" in message
    assert "weights 235 MiB" in message and "512-token context either" in message
    assert pool.status().models == [] and pool.status().loads == 0
