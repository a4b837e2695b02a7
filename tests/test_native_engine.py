"""The native engine behind the Engine contract: streaming, stops, usage, seeds, errors, memory
budget, research API, thread safety, plugin registration, and life without llama-cpp-python.

Runs on Gemma 3 270M (the smallest model); parity with llama.cpp is in test_native_parity.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from velollm.engine import Chunk, Engine, GenerationRequest, LoadOptions
from velollm.errors import (
    ContextOverflow,
    EngineClosed,
    GrammarError,
    InvalidRequest,
    NotAGGUFFile,
    UnsupportedArchitecture,
    UnsupportedFeature,
)
from velollm.plugins.native import NativeBackend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def native(gemma_path: Path) -> Engine:
    engine = NativeBackend().load(gemma_path, LoadOptions(n_ctx=512, n_threads=1))
    yield engine
    engine.close()


def greedy(prompt: str, **fields: object) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, temperature=0.0, **fields)  # type: ignore[arg-type]


def test_stream_equals_generate_with_usage_and_timings(native: Engine) -> None:
    assert isinstance(native, Engine) and native.capabilities.logits and native.capabilities.grammar
    request = greedy("def add(a, b):", max_tokens=6)
    chunks: list[Chunk] = list(native.stream(request))
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.usage is not None and last.timings is not None
    assert last.usage.prompt_tokens == len(native.prompt_tokens(request))  # type: ignore[attr-defined]
    assert 1 <= last.usage.completion_tokens <= 6
    assert last.finish_reason == ("length" if last.usage.completion_tokens == 6 else "stop")
    assert last.timings.total_s > 0 and last.timings.ttft_s > 0
    completion = native.generate(request)
    assert completion.text == "".join(c.text for c in chunks) and completion.text
    assert completion.usage == last.usage
    assert completion.timings.extra["prompt_tokens_reused"] == 0  # no prefix cache unless asked for


def test_prefix_cache_reuses_the_common_prefix(native: Engine) -> None:
    native.prefix_cache = True  # type: ignore[attr-defined]
    try:
        native.generate(greedy("A different prompt", max_tokens=2))
        first = native.generate(greedy("The capital of France is", max_tokens=3))
        again = native.generate(greedy("The capital of France is", max_tokens=3))
        longer = native.generate(greedy("The capital of France is Paris. The capital of Italy is", max_tokens=3))
        assert first.timings.extra["prompt_tokens_reused"] <= 1  # only what it shares with the other prompt
        assert again.timings.extra["prompt_tokens_reused"] == again.usage.prompt_tokens - 1
        assert longer.timings.extra["prompt_tokens_reused"] >= again.usage.prompt_tokens - 1
    finally:
        native.prefix_cache = False  # type: ignore[attr-defined]


def test_stop_sequence_cuts_the_text(native: Engine) -> None:
    free = native.generate(greedy("The days of the week are Monday,", max_tokens=10))
    assert len(free.text) > 12
    stop = free.text[6:9]
    cut = free.text.index(stop)
    stopped = native.generate(greedy("The days of the week are Monday,", max_tokens=10, stop=[stop]))
    assert stopped.text == free.text[:cut]
    assert stopped.finish_reason == "stop"


def test_max_tokens_and_chat_messages(native: Engine) -> None:
    out = native.generate(GenerationRequest(messages=[{"role": "user", "content": "Count to ten."}],
                                            temperature=0.0, max_tokens=3))
    assert out.usage.completion_tokens <= 3 and out.usage.prompt_tokens > 5


def test_seeded_sampling_is_reproducible(native: Engine) -> None:
    def run(seed: int) -> str:
        return native.generate(GenerationRequest(prompt="Once upon a time", temperature=1.0, top_k=0, top_p=1.0,
                                                 min_p=0.0, seed=seed, max_tokens=8)).text

    first = run(42)
    assert run(42) == first
    assert len({run(seed) for seed in (1, 2)} | {first}) > 1


def test_request_errors_are_typed(native: Engine) -> None:
    with pytest.raises(GrammarError):
        native.generate(GenerationRequest(prompt="x", grammar="root ::= ("))
    with pytest.raises(ContextOverflow):
        native.generate(GenerationRequest(prompt="word " * 600, max_tokens=2))
    with pytest.raises(UnsupportedFeature, match="no_such_knob"):  # unknown extras are refused, not dropped
        native.generate(GenerationRequest(prompt="x", extra={"no_such_knob": 1}))
    with pytest.raises(InvalidRequest):  # mirostat 1 and 2 are both implemented; 3 is not a mode
        GenerationRequest.of(prompt="x", mirostat_mode=3)
    with pytest.raises(InvalidRequest):
        native.logits([native.vocab.size + 5])  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest):
        native.tokenize("lone \ud800 surrogate")


def test_one_stream_per_thread(native: Engine) -> None:
    stream = native.stream(greedy("Hello", max_tokens=4))
    next(stream)
    with pytest.raises(InvalidRequest):
        native.generate(greedy("Hello", max_tokens=2))
    stream.close()


def test_concurrent_requests_are_serialised(native: Engine) -> None:
    prompts = ["The sun is", "Water boils at"]
    expected = [native.generate(greedy(p, max_tokens=4)).text for p in prompts]
    results: dict[int, str] = {}

    def work(i: int) -> None:
        results[i] = native.generate(greedy(prompts[i], max_tokens=4)).text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(len(prompts))] == expected


def test_research_api_logits_and_hidden_states(native: Engine) -> None:
    ids = native.tokenize("Paris is the capital of")
    every = native.logits(ids, all_positions=True)  # type: ignore[attr-defined]
    cfg = native.config  # type: ignore[attr-defined]
    assert every.shape == (len(ids), cfg.n_vocab)
    np.testing.assert_allclose(native.logits(ids), every[-1], atol=1e-3)  # type: ignore[attr-defined]
    picked = native.logits(ids, positions=[3, 0, 3])  # type: ignore[attr-defined]
    np.testing.assert_allclose(picked, every[[3, 0, 3]], atol=1e-3)
    with pytest.raises(InvalidRequest):
        native.logits(ids, positions=[len(ids)])  # type: ignore[attr-defined]
    hidden = native.hidden_states(ids)  # type: ignore[attr-defined]
    assert len(hidden) == cfg.n_layer + 1 and all(h.shape == (len(ids), cfg.n_embd) for h in hidden)
    greedy_ids = native.generate_ids(ids, max_tokens=4)  # type: ignore[attr-defined]
    assert greedy_ids[0] == int(np.argmax(every[-1]))


def test_memory_budget_streams_weights_with_the_same_result(gemma_path: Path) -> None:
    """With no room for float32 weights every product dequantizes on the fly: slow, bounded, equal.

    Exact numerics, so the comparison is not blurred by ggml-style rounding flips."""
    def load(**extra: object) -> Engine:
        options = LoadOptions(n_ctx=32, n_threads=1, extra={"numerics": "exact", **extra})
        return NativeBackend().load(gemma_path, options)

    streamed_engine, cached_engine = load(memory_budget_bytes=0), load()
    try:
        ids = cached_engine.tokenize("Memory is")
        streamed = streamed_engine.logits(ids)  # type: ignore[attr-defined]
        cached = cached_engine.logits(ids)  # type: ignore[attr-defined]
        assert streamed_engine.store.cached_bytes == 0 and len(streamed_engine.store.streamed) > 50  # type: ignore[attr-defined]
        assert cached_engine.store.cached_bytes > 500_000_000  # type: ignore[attr-defined]
        np.testing.assert_allclose(streamed, cached, atol=1e-3, rtol=0)
    finally:
        streamed_engine.close()
        cached_engine.close()


def test_closed_engine_refuses_work(gemma_path: Path) -> None:
    engine = NativeBackend().load(gemma_path, LoadOptions(n_ctx=64, n_threads=1))
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(EngineClosed):
        engine.tokenize("x")
    with pytest.raises(EngineClosed):
        engine.generate(greedy("x"))


def test_load_errors_are_typed(tmp_path: Path, gemma_path: Path) -> None:
    import gguf

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(NotAGGUFFile):
        NativeBackend().load(junk, LoadOptions())
    other = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(other), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitecture, match="bert"):
        NativeBackend().load(other, LoadOptions())
    with pytest.raises(InvalidRequest):
        NativeBackend().load(gemma_path, LoadOptions(extra={"numerics": "fast"}))


def test_plugin_registers_native_backend(isolated_host: object) -> None:
    from velollm.hardware import probe

    backend = isolated_host.backend("native-cpu")  # type: ignore[attr-defined]
    ok, reason = backend.available(probe())
    assert ok and "numpy" in reason


def test_works_without_llama_cpp(gemma_path: Path) -> None:
    """The plugin imports and generates with llama-cpp-python blocked from importing."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["llama_cpp"] = None  # any `import llama_cpp` now raises ImportError
        from velollm.host import Host
        from velollm.engine import GenerationRequest, LoadOptions
        host = Host(entry_points=False)
        backends = host.backends()
        assert "native-cpu" in backends, backends
        engine = backends["native-cpu"].load(__import__("pathlib").Path({str(gemma_path)!r}),
                                             LoadOptions(n_ctx=64, n_threads=1))
        out = engine.generate(GenerationRequest(prompt="Hello", temperature=0.0, max_tokens=2))
        assert out.usage.completion_tokens >= 1, out
        assert sys.modules["llama_cpp"] is None
        print("OK", repr(out.text))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("OK")


def test_constrained_decoding_on_the_native_engine(native: Engine) -> None:
    """Grammars and JSON schemas through velollm.constraints, as on the llama.cpp backend."""
    yes_no = native.generate(greedy("Is the sky blue? Answer:", grammar='root ::= " yes" | " no"', max_tokens=4))
    assert yes_no.text in (" yes", " no")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    person = native.generate(greedy("A person as JSON: ", json_schema=schema, max_tokens=24))
    data = json.loads(person.text)  # always complete: the budget closes the object within max_tokens
    assert set(data) == {"name", "age"} and isinstance(data["age"], int) and person.usage.completion_tokens <= 24
