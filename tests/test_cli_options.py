"""Every load and sampling flag of ``generate``, ``chat``, ``serve`` and ``bench`` reaches the engine.

``generate`` and ``chat`` run in-process on a real Gemma engine; the pool is wrapped so the test
sees the load options it was asked for and the requests the engine got. ``serve`` and ``bench``
stop where they would start serving or benchmarking (nothing to measure there), after the flags
became load options.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from velollm import cli
from velollm.engine import GenerationRequest
from velollm.plugins.llamacpp import bench as benchmod


class _Recording:
    """A pool whose leases hand out a recording proxy of the real engine."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.acquired: list[dict[str, Any]] = []
        self.requests: list[GenerationRequest] = []
        self.engines: list[Any] = []

    def acquire(self, ref: str, **kwargs: Any) -> Any:
        self.acquired.append({"ref": ref, **kwargs})
        lease = self.pool.acquire(ref, **kwargs)
        recorder = self

        class Proxy:
            def __getattr__(self, name: str) -> Any:
                return getattr(lease.engine, name)

            def stream(self, request: GenerationRequest) -> Iterator[Any]:
                raw = lease.engine.raw  # read now: the command unloads it when done
                recorder.requests.append(request)
                recorder.engines.append(SimpleNamespace(context_length=raw.context_length, options=raw.options))
                return lease.engine.stream(request)

        return SimpleNamespace(engine=Proxy())


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Recording]:
    import velollm.pool
    from velollm.pool import ModelPool

    pool = ModelPool()
    rec = _Recording(pool)
    monkeypatch.setattr(velollm.pool, "get_pool", lambda: rec)
    yield rec
    pool.close()


def test_generate_load_and_sampling_flags_reach_the_engine(gemma_path: Path, recording: _Recording,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["generate", "gemma3-270m", "-p", "The sky is", "-n", "3", "-c", "256", "-t", "1", "-ngl", "0",
                   "--temp", "0.7", "--top-k", "7", "--top-p", "0.9", "--min-p", "0.02", "--typical", "0.8",
                   "--repeat-penalty", "1.1", "--repeat-last-n", "16", "--frequency-penalty", "0.2",
                   "--presence-penalty", "0.3", "--mirostat", "2", "--mirostat-lr", "0.2", "--mirostat-ent", "4",
                   "-s", "5"])
    assert rc == 0, capsys.readouterr().err
    (acquired,) = recording.acquired
    assert (acquired["n_ctx"], acquired["n_threads"], acquired["n_gpu_layers"]) == (256, 1, 0)
    (engine,) = recording.engines
    assert engine.context_length == 256 and engine.options.n_threads == 1 and engine.options.n_gpu_layers == 0
    (request,) = recording.requests
    assert (request.temperature, request.top_k, request.top_p, request.min_p, request.typical_p) == (
        0.7, 7, 0.9, 0.02, 0.8)
    assert (request.repeat_penalty, request.penalty_last_n, request.frequency_penalty,
            request.presence_penalty) == (1.1, 16, 0.2, 0.3)
    assert (request.mirostat_mode, request.mirostat_eta, request.mirostat_tau, request.seed) == (2, 0.2, 4.0, 5)
    assert request.max_tokens == 3


def test_long_spellings_work_too(gemma_path: Path, recording: _Recording) -> None:
    assert cli.main(["generate", "gemma3-270m", "-p", "x", "-n", "1", "--ctx-size", "512", "--threads", "1",
                     "--n-gpu-layers", "0"]) == 0
    assert recording.engines[0].context_length == 512


def test_chat_flags_reach_the_engine(gemma_path: Path, recording: _Recording,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n"))
    assert cli.main(["chat", "gemma3-270m", "-n", "2", "-c", "768", "-t", "1", "-ngl", "0", "-s", "3",
                     "--temp", "0.5"]) == 0
    assert recording.engines[0].context_length == 768 and recording.engines[0].options.n_threads == 1
    (request,) = recording.requests
    assert (request.seed, request.temperature, request.max_tokens) == (3, 0.5, 2)


def test_serve_flags_become_every_models_load_options(gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    import velollm.server.app as app

    seen: dict[str, Any] = {}

    def create_app(config: Any, pool: Any = None) -> object:
        seen["config"] = config
        return object()

    monkeypatch.setattr(app, "create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert cli.main(["serve", "-m", "gemma3-270m", "--ctx-size", "256", "-t", "1", "-ngl", "0"]) == 0
    assert seen["config"].model_options["gemma3-270m"] == {"n_ctx": 256, "n_threads": 1, "n_gpu_layers": 0}
    # -c is the context size, as in llama.cpp's server and velollm generate/chat (the config file is --config)
    assert cli.main(["serve", "-m", "gemma3-270m", "-c", "1234"]) == 0
    assert seen["config"].model_options["gemma3-270m"] == {"n_ctx": 1234}


def test_bench_short_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import velollm.loading

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    class Engine:
        def close(self) -> None:
            pass

    def load_engine(ref: str, *, options: Any) -> Engine:
        seen["ref"], seen["options"] = ref, options
        return Engine()

    def run(engine: Any, config: Any, **kwargs: Any) -> None:
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(velollm.loading, "load_engine", load_engine)
    monkeypatch.setattr(benchmod, "run", run)
    with pytest.raises(Stop):
        cli.main(["--debug", "bench", "-m", "qwen1.5b", "-d", "qwen0.5b", "-i", "3", "-p", "hi", "-c", "512",
                  "-t", "1", "-ngl", "0"])
    options, config = seen["options"], seen["config"]
    assert (options.draft_model, options.n_ctx, options.n_threads, options.n_gpu_layers) == ("qwen0.5b", 512, 1, 0)
    assert config.iterations == 3 and config.draft_model == "qwen0.5b"


# --- bench: paired uncertainty, total-time speedup and the cost model's verdict --------------------------
def _sample(it: int, mode: str, tps: float, total: float) -> benchmod.Sample:
    return benchmod.Sample(prompt="a", iteration=it, mode=mode, tokens_per_s=tps, ttft_s=0.1, total_s=total,
                           completion_tokens=10, finish_reason="length", text="t")


def test_paired_speedup_cancels_drift_the_propagated_one_carries() -> None:
    # the machine slows down over the run; each pair still shows the same 1.5x
    vanilla = [_sample(i, "vanilla", 20.0 / (i + 1), 2.0 * (i + 1)) for i in range(4)]
    spec = [_sample(i, "auto", 30.0 / (i + 1), 1.6 * (i + 1)) for i in range(4)]
    config = benchmod.BenchConfig(main_model="m", prompts=[benchmod.BenchPrompt(name="a", text="x")])
    summary = benchmod.summarize(config, vanilla + spec)
    assert summary.paired_speedup is not None and summary.paired_speedup.value == pytest.approx(1.5)
    assert summary.paired_speedup.se == pytest.approx(0.0, abs=1e-12) and summary.paired_speedup.n == 4
    assert summary.speedup is not None and summary.speedup.stddev > 0.5  # the sample spread swamps it
    assert summary.total_speedup is not None and summary.total_speedup.value == pytest.approx(2.0 / 1.6)


def test_paired_standard_error() -> None:
    p = benchmod.paired([1.0, 1.2, 1.4])
    assert p is not None and p.value == pytest.approx(1.2) and p.se == pytest.approx(0.2 / 3**0.5)
    assert benchmod.paired([]) is None


def test_verdict_reads_the_cost_model() -> None:
    spec = {"draft_model": "qwen0.5b", "draft_cost": 0.46, "lookup": True, "ceiling": {"draft": 1.35, "lookup": 1.8}}
    lines = benchmod.verdict(spec, benchmod.Paired(value=1.2, se=0.05, n=5))
    assert "costs 0.46 of the target per token" in lines[0] and "1.35×" in lines[0]
    assert "1.80×" in lines[1] and "67% of that ceiling" in lines[2]
    hopeless = benchmod.verdict({"draft_model": "d", "draft_cost": 1.2, "ceiling": {"draft": 0.8}})
    assert "cannot pay" in hopeless[0]
