"""The llama.cpp backend on real models: generation, streaming, stops, usage, grammars, threads."""

from __future__ import annotations

import json
import threading

import pytest

from velollm.engine import Chunk, Engine, GenerationRequest
from velollm.errors import ContextOverflow, EngineClosed, GrammarError, InvalidRequest
from velollm.hardware import HardwareProbe
from velollm.plugins.llamacpp import KINDS, LlamaCppBackend
from velollm.plugins.llamacpp.registry import GgmlDevice, GgmlRegistry

GREEDY = dict(temperature=0.0, max_tokens=24)


def req(**fields) -> GenerationRequest:
    return GenerationRequest.of(**{**GREEDY, **fields})


def stream_text(engine: Engine, request: GenerationRequest) -> tuple[list[Chunk], str]:
    chunks = list(engine.stream(request))
    return chunks, "".join(c.text for c in chunks)


@pytest.fixture(params=["gemma", "qwen"])
def engine(request: pytest.FixtureRequest) -> Engine:
    return request.getfixturevalue(f"{request.param}_engine")


def test_greedy_generation_is_deterministic_and_stream_matches(engine: Engine) -> None:
    r = req(prompt="def fibonacci(n):")
    first, second = engine.generate(r), engine.generate(r)
    assert first.text == second.text and first.text.strip()
    chunks, streamed = stream_text(engine, r)
    assert streamed == first.text
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == first.finish_reason and chunks[-1].usage == first.usage


def test_usage_counts_are_the_tokenizer_counts(engine: Engine) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    completion = engine.generate(req(prompt=prompt, max_tokens=7))
    assert completion.usage.prompt_tokens == len(engine.tokenize(prompt, parse_special=True))
    assert completion.finish_reason == "length" and completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7
    t = completion.timings
    assert 0 < t.ttft_s <= t.total_s and t.decode_tokens_per_s > 0


def test_max_tokens_bounds_the_completion(engine: Engine) -> None:
    for n in (1, 5):
        c = engine.generate(req(prompt="Count: 1, 2, 3,", max_tokens=n))
        assert c.usage.completion_tokens == n and c.finish_reason == "length"


def test_stop_sequence_truncates_and_is_not_emitted(qwen_engine: Engine) -> None:
    r = req(prompt="Count: 1, 2, 3, 4, 5, 6, 7, 8, 9", max_tokens=32)
    free = qwen_engine.generate(r).text
    assert ", 12" in free  # the unconstrained continuation passes the stop point
    chunks, text = stream_text(qwen_engine, r.model_copy(update={"stop": [", 12"]}))
    assert text == free[: free.index(", 12")]
    assert chunks[-1].finish_reason == "stop"
    # the stop spans several tokens (", 1" then "2"): the prefix was held back, never half-emitted
    assert not text.endswith(",") and ", 12" not in text


def test_chat_uses_the_models_template(qwen_engine: Engine) -> None:
    assert qwen_engine.template.name == "gguf"
    r = req(messages=[{"role": "system", "content": "Answer with one word."},
                      {"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
    out = qwen_engine.generate(r)
    assert "paris" in out.text.lower() and out.finish_reason == "stop"  # ended by <|im_end|>
    prompt = qwen_engine.template.render([m.model_dump() for m in r.messages])
    assert out.usage.prompt_tokens == len(qwen_engine.tokenize(prompt, parse_special=True))


def test_gemma_without_template_gets_gemma_turns_not_llama2(gemma_engine: Engine) -> None:
    assert gemma_engine.template.name == "gemma"
    prompt = gemma_engine.template.render([{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"}])
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert "[INST]" not in prompt
    ids = gemma_engine.prompt_tokens(req(messages=[{"role": "user", "content": "Hi"}]))
    bos = gemma_engine.tokenize("", add_special=True)
    assert ids[:1] == bos and ids[1] != bos[0]  # exactly one BOS
    assert gemma_engine.generate(req(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)).usage


def test_streaming_never_splits_utf8(qwen_engine: Engine) -> None:
    r = req(messages=[{"role": "user", "content": "Reply with exactly these characters: 日本語のテキスト 🎉🎉 café"}],
            max_tokens=40)
    chunks, text = stream_text(qwen_engine, r)
    assert "\ufffd" not in text
    for chunk in chunks:
        chunk.text.encode("utf-8")  # every chunk is whole characters
    assert any(ord(ch) > 0x3000 for ch in text)


def test_seeded_sampling_is_reproducible(gemma_engine: Engine) -> None:
    r = req(prompt="My favourite colour is", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=16, seed=7)
    a, b = gemma_engine.generate(r).text, gemma_engine.generate(r).text
    assert a == b
    others = {gemma_engine.generate(r.model_copy(update={"seed": s})).text for s in range(1, 6)}
    assert len(others) > 1  # different seeds do sample differently


def test_json_schema_constrains_output(gemma_engine: Engine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["city", "year"]}
    out = gemma_engine.generate(req(prompt="A famous city and a year:", json_schema=schema, max_tokens=48))
    data = json.loads(out.text)  # a base model that follows no format still emits valid JSON
    assert set(data) == {"city", "year"} and isinstance(data["year"], int)


def test_invalid_grammar_is_an_error_not_a_segfault(gemma_engine: Engine) -> None:
    with pytest.raises(GrammarError, match="expecting"):
        gemma_engine.generate(req(prompt="x", grammar='root ::= "a" ( "b"'))
    with pytest.raises(GrammarError):
        gemma_engine.generate(req(prompt="x", grammar="root ::= undefined-rule"))
    ok = gemma_engine.generate(req(prompt="Answer:", grammar='root ::= "yes" | "no"', max_tokens=4))
    assert ok.text in ("yes", "no")


def test_bad_requests_fail_before_touching_the_model(gemma_engine: Engine) -> None:
    with pytest.raises(ContextOverflow, match="context window"):
        gemma_engine.generate(req(prompt="word " * 5000))
    with pytest.raises(InvalidRequest):
        GenerationRequest.of(prompt="x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(InvalidRequest, match="max_tokens"):
        GenerationRequest.of(prompt="x", max_tokens=0)
    with pytest.raises(InvalidRequest, match="empty"):
        GenerationRequest.of(messages=[])
    with pytest.raises(InvalidRequest, match="empty stop"):
        GenerationRequest.of(prompt="x", stop=[""])
    # the engine is still healthy afterwards
    assert gemma_engine.generate(req(prompt="Hello", max_tokens=2)).usage.completion_tokens == 2


def test_empty_prompt_without_bos_is_refused(qwen_engine: Engine, gemma_engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        qwen_engine.generate(req(prompt=""))  # Qwen adds no BOS: nothing to condition on
    # Gemma adds BOS, so an empty prompt is unconditional generation, as in llama.cpp
    assert gemma_engine.generate(req(prompt="", max_tokens=3)).usage.prompt_tokens == 1


def test_two_threads_are_serialised_and_agree(gemma_engine: Engine) -> None:
    r = req(prompt="The history of Rome", max_tokens=16)
    expected = gemma_engine.generate(r).text
    results: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(gemma_engine.generate(r).text)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and results == [expected] * 4


def test_same_thread_reentry_is_refused_not_deadlocked(gemma_engine: Engine) -> None:
    stream = gemma_engine.stream(req(prompt="Once", max_tokens=8))
    next(stream)
    with pytest.raises(InvalidRequest, match="already generating"):
        gemma_engine.generate(req(prompt="again"))
    stream.close()  # abandoning a stream frees the engine
    assert gemma_engine.generate(req(prompt="again", max_tokens=2)).usage.completion_tokens == 2


def test_closed_engine_raises(gemma_path) -> None:
    from velollm.engine import LoadOptions

    engine = LlamaCppBackend("cpu").load(gemma_path, LoadOptions(n_ctx=256))
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(EngineClosed):
        engine.generate(req(prompt="x"))


# --- availability from injected ggml registries -----------------------------------------------
def probe_with(registry: GgmlRegistry) -> HardwareProbe:
    return HardwareProbe(extras={"ggml": registry.model_dump()})


CPU = GgmlDevice(name="CPU", type="cpu", backend="CPU")


@pytest.mark.parametrize(
    ("registry", "usable"),
    [
        (GgmlRegistry(backends=["CPU"], devices=[CPU]), {"cpu"}),
        (GgmlRegistry(backends=["CPU", "CUDA"], devices=[
            CPU, GgmlDevice(name="CUDA0", description="NVIDIA GeForce RTX 4070", type="gpu", backend="CUDA",
                            total_bytes=12 << 30, free_bytes=11 << 30)]), {"cpu", "cuda"}),
        (GgmlRegistry(backends=["CPU", "CUDA"], devices=[CPU]), {"cpu"}),  # GPU build, no GPU
        (GgmlRegistry(backends=["CPU", "Vulkan"], devices=[
            CPU, GgmlDevice(name="Vulkan0", type="igpu", backend="Vulkan")]), {"cpu", "vulkan"}),
        (GgmlRegistry(backends=["CPU", "Metal"], devices=[
            CPU, GgmlDevice(name="Metal", description="Apple M2", type="gpu", backend="Metal")]), {"cpu", "metal"}),
        (GgmlRegistry(error="llama-cpp-python not importable"), set()),
    ],
)
def test_availability_follows_the_registry(registry: GgmlRegistry, usable: set[str]) -> None:
    probe = probe_with(registry)
    results = {kind: LlamaCppBackend(kind).available(probe) for kind in KINDS}
    assert {kind for kind, (ok, _) in results.items() if ok} == usable
    for kind, (ok, reason) in results.items():
        assert reason  # always a reason, usable or not
        if not ok and kind != "cpu" and not registry.error and not registry.has_backend(kind):
            assert "rebuild with" in reason and "CMAKE_ARGS" in reason


def test_gpu_build_without_device_says_so() -> None:
    ok, reason = LlamaCppBackend("cuda").available(probe_with(GgmlRegistry(backends=["CPU", "CUDA"], devices=[CPU])))
    assert not ok and "no CUDA device" in reason


def test_live_registry_here_is_cpu_only() -> None:
    from velollm.plugins.llamacpp.registry import read_registry

    registry = read_registry()
    assert registry.error is None and "CPU" in registry.backends
    assert LlamaCppBackend("cpu").available(probe_with(registry))[0]


def test_a_lone_engine_measures_its_thread_count_and_says_the_same(gemma_path) -> None:
    """With two threads configured, one-request-at-a-time decoding (parallel=1) tries both counts and
    keeps measuring (velollm.plugins.llamacpp.threads); which count runs never changes the tokens."""
    from velollm.engine import LoadOptions

    tuned = LlamaCppBackend("cpu").load(gemma_path, LoadOptions(n_ctx=512, n_threads=2, parallel=1))
    fixed = LlamaCppBackend("cpu").load(gemma_path, LoadOptions(n_ctx=512, n_threads=1, parallel=1))
    try:
        request = req(prompt="The three primary colors are", temperature=0.0, max_tokens=24, stop=[])
        text = tuned.generate(request).text
        tuner = tuned._get_runner().tuner
        assert tuner is not None and set(tuner.cost) == {1, 2}, tuner.cost  # both measured, in real decodes
        assert all(cost > 0 for cost in tuner.cost.values())
        assert fixed._get_runner().tuner is None  # one thread: nothing to choose
        assert fixed.generate(request).text == text  # a row's dot product is one thread's work either way
    finally:
        tuned.close()
        fixed.close()
