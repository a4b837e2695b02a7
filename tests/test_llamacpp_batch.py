"""Continuous batching in the llama.cpp engine (velollm/plugins/llamacpp/batch.py), on real models.

Batched numerics differ from one-at-a-time numerics (other matmul kernels, other batch shapes), so
greedy outputs are never compared free-running: each batched sequence is replayed alone,
teacher-forced, and a token may differ from the reference argmax only where the reference's top-2
logit gap is below 0.25 (a near-tie).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from velollm.engine import GenerationRequest, LoadOptions
from velollm.errors import GenerationError
from velollm.plugins.llamacpp.agreement import NEAR_TIE
from velollm.plugins.llamacpp.backend import LlamaCppBackend
from velollm.plugins.llamacpp.batch import GreedyPicker, KvLedger, Sequence
from velollm.plugins.llamacpp.threads import ThreadTuner

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
]


def _load(path: Path, **options: Any) -> Any:
    return LlamaCppBackend("cpu").load(path, LoadOptions(n_threads=1, **options))


@pytest.fixture(scope="module")
def batched(gemma_path: Path) -> Iterator[Any]:
    engine = _load(gemma_path, n_ctx=2048, parallel=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def alone(gemma_path: Path) -> Iterator[Any]:
    engine = _load(gemma_path, n_ctx=2048)
    yield engine
    engine.close()


def _assert_teacher_forced(alone: Any, prompt: list[int], out: list[int]) -> None:
    """Every generated token is the reference argmax, or the reference is a near-tie there."""
    runner = alone._get_runner()
    runner.reset()
    runner.feed(prompt + out[:-1] if out else prompt, all_logits=True)
    for k, token in enumerate(out):
        row = runner.logits(len(prompt) - 1 + k)
        best = int(np.argmax(row))
        if token != best:
            top2 = np.sort(row)[-2:]
            gap = float(top2[1] - top2[0])
            assert gap < NEAR_TIE and row[token] >= top2[0], \
                f"token {k}: batch chose {token}, alone the argmax is {best} with a top-2 gap of {gap:.3f}"
    runner.reset()


def _drain(seq: Sequence) -> str:
    return "".join(chunk.text for chunk in seq.chunks())


def _run_threads(fns: list[Any]) -> list[Any]:
    """Run callables in threads; re-raise the first failure here (an assert in a thread fails nothing)."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # collected, re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    if errors:
        raise errors[0]
    return results


def test_engine_declares_its_concurrency(batched: Any, alone: Any) -> None:
    assert batched.max_concurrency == 4 and alone.max_concurrency == 1
    assert batched.context_length == 2048


def test_greedy_batch_matches_each_sequence_alone(batched: Any, alone: Any) -> None:
    prompts = [batched.tokenize(p) for p in PROMPTS]
    seqs = [batched._batch.submit(Sequence(p, GreedyPicker(), max_new=24)) for p in prompts]
    texts = _run_threads([lambda s=s: _drain(s) for s in seqs])
    for prompt, seq, text in zip(prompts, seqs, texts, strict=True):
        out = seq.tokens[len(prompt):]
        assert seq.n_out == 24 or batched.is_end_of_generation(seq.tokens[-1]) or len(out) < 24
        assert text == batched.detokenize(out)
        _assert_teacher_forced(alone, prompt, out)


def test_cancelling_one_sequence_frees_its_slot_and_spares_the_others(batched: Any, alone: Any) -> None:
    decoder = batched._batch
    prompts = [batched.tokenize(p) for p in PROMPTS[:3]]
    seqs = [decoder.submit(Sequence(p, GreedyPicker(), max_new=400 if i == 0 else 20))
            for i, p in enumerate(prompts)]
    victim = seqs[0].chunks()
    first = next(victim)
    assert first.finish_reason is None
    victim.close()
    texts = _run_threads([lambda s=s: _drain(s) for s in seqs[1:]])
    assert all(texts)
    assert seqs[0].cancelled and seqs[0].n_out < 400
    for prompt, seq in zip(prompts[1:], seqs[1:], strict=True):
        _assert_teacher_forced(alone, prompt, seq.tokens[len(prompt):])
    # the cancelled sequence left the running set (its slot is free for the next request)
    c = batched.generate(GenerationRequest(prompt="Hello", max_tokens=4, temperature=0))
    assert c.usage.completion_tokens >= 1
    assert all(s is not seqs[0] for s in decoder._running)


class _Exploding:
    """A picker that fails at its third token (a sampler bug, a broken constraint...)."""

    def __init__(self) -> None:
        self.n = 0

    def pick(self, ctx: Any, i: int, row: np.ndarray) -> int:
        self.n += 1
        if self.n == 3:
            raise RuntimeError("boom")
        return int(np.argmax(row))

    def close(self) -> None:
        pass


def test_a_failing_sequence_fails_alone(batched: Any, alone: Any) -> None:
    prompts = [batched.tokenize(p) for p in PROMPTS[:3]]
    bad = batched._batch.submit(Sequence(prompts[0], _Exploding(), max_new=30))
    good = [batched._batch.submit(Sequence(p, GreedyPicker(), max_new=20)) for p in prompts[1:]]

    def drain_bad() -> str:
        with pytest.raises(GenerationError, match="boom"):
            _drain(bad)
        return "failed"

    results = _run_threads([drain_bad] + [lambda s=s: _drain(s) for s in good])
    assert results[0] == "failed"
    for prompt, seq in zip(prompts[1:], good, strict=True):
        assert seq.done and seq.n_out > 0
        _assert_teacher_forced(alone, prompt, seq.tokens[len(prompt):])


def test_different_sampling_settings_in_one_batch_do_not_bleed(batched: Any, alone: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"],
              "additionalProperties": False}
    requests = [
        GenerationRequest(prompt=PROMPTS[0], max_tokens=16, temperature=0),  # greedy
        GenerationRequest(prompt=PROMPTS[2], max_tokens=16, temperature=1.5, seed=1),  # wild sampling
        GenerationRequest(prompt="A JSON object naming a city: ", max_tokens=60, temperature=0, json_schema=schema),
        GenerationRequest(prompt=PROMPTS[1], max_tokens=16, temperature=1.0, top_k=1, seed=5),  # top-k 1: argmax
        GenerationRequest(prompt=PROMPTS[3], max_tokens=16, temperature=0, presence_penalty=1.5),
    ]
    completions = _run_threads([lambda r=r: batched.generate(r) for r in requests])
    for k in (0, 3):  # the chain of a sampled neighbour never leaks into these: they stay argmax
        prompt = batched.tokenize(requests[k].prompt)
        out = batched.tokenize(completions[k].text, add_special=False)
        if batched.detokenize(out) == completions[k].text:  # re-tokenization round-trips
            _assert_teacher_forced(alone, prompt, out)
    assert "city" in json.loads(completions[2].text)  # the grammar constrains its own sequence only
    assert completions[1].usage.completion_tokens > 0
    assert all(c.finish_reason in ("stop", "length") for c in completions)


def test_a_full_context_queues_the_next_sequence(gemma_path: Path, alone: Any) -> None:
    engine = _load(gemma_path, n_ctx=256, parallel=2)
    try:
        decoder = engine._batch
        decoder.cache_slots = 0  # nothing cached: each sequence owns its cells
        p1 = engine.tokenize("Alpha beta gamma. " * 30)[:150]
        p2 = engine.tokenize("One two three four. " * 30)[:150]
        order: list[str] = []
        first = decoder.submit(Sequence(p1, GreedyPicker(), max_new=20))
        second = decoder.submit(Sequence(p2, GreedyPicker(), max_new=20))

        def drain(seq: Sequence, name: str) -> None:
            for chunk in seq.chunks():
                if chunk.text and f"{name} first" not in order:
                    order.append(f"{name} first")
            order.append(f"{name} done")

        _run_threads([lambda: drain(first, "a"), lambda: drain(second, "b")])
        assert first.n_out > 0 and second.n_out > 0
        # 150 + 150 prompt tokens do not fit 256 cells: the second starts only after the first is done
        assert order.index("a done") < order.index("b first")
        _assert_teacher_forced(alone, p2, second.tokens[len(p2):])
        assert decoder.ledger.used <= decoder.n_ctx
    finally:
        engine.close()


def test_running_sequences_that_outgrow_the_context_are_preempted_and_resume(gemma_path: Path, alone: Any) -> None:
    engine = _load(gemma_path, n_ctx=192, parallel=2)
    try:
        decoder = engine._batch
        decoder.cache_slots = 0
        p1 = engine.tokenize("Alpha beta gamma delta. " * 20)[:70]
        p2 = engine.tokenize("One two three four five. " * 20)[:70]
        seqs = [decoder.submit(Sequence(p, GreedyPicker(), max_new=80)) for p in (p1, p2)]
        _run_threads([lambda s=s: _drain(s) for s in seqs])
        assert decoder.stats["preempted"] >= 1  # 2 x (70 + 80) > 192 cells
        for prompt, seq in zip((p1, p2), seqs, strict=True):
            assert seq.n_out == 80 or engine.is_end_of_generation(seq.tokens[-1])
            _assert_teacher_forced(alone, prompt, seq.tokens[len(prompt):])
    finally:
        engine.close()


def test_prefix_cache_serves_a_shared_prompt_prefix(batched: Any) -> None:
    batched.reset_cache()
    prefix = "You are a careful assistant. Answer briefly. " * 8
    first = batched.generate(GenerationRequest(prompt=prefix + "Question one?", max_tokens=4, temperature=0))
    second = batched.generate(GenerationRequest(prompt=prefix + "Question two?", max_tokens=4, temperature=0))
    shared = len(batched.tokenize(prefix))
    assert first.usage.cached_tokens == 0
    assert shared - 2 <= second.usage.cached_tokens < second.usage.prompt_tokens


def test_the_ledger_counts_shared_cells_once() -> None:
    ledger = KvLedger(100)
    ledger.append(0, 0, 10)
    ledger.append(0, 10, 5)
    ledger.copy(0, 1, 0, 12)  # tags, no new cells
    assert ledger.used == 15
    ledger.append(1, 12, 3)
    assert ledger.used == 18
    ledger.remove(0)  # cells 0..11 live on in sequence 1; 12..14 of sequence 0 are freed
    assert ledger.used == 15
    ledger.remove(1, 6)
    assert ledger.used == 6 and ledger.length(1) == 6
    ledger.remove(1)
    assert ledger.used == 0 and ledger.free == 100


def test_the_thread_tuner_follows_the_cheaper_thread_count() -> None:
    tuner = ThreadTuner(2, explore_every=10, explore_steps=2)
    assert tuner.choices == [2, 1]
    cost = {2: 1.0, 1: 0.2}  # a busy machine: spinning threads make 2 threads slower than 1
    used = []
    for _ in range(60):
        threads = tuner.next()
        used.append(threads)
        tuner.record(threads, cost[threads] * 10, 6)
    assert tuner.best() == 1 and used[-10:].count(1) >= 8
    cost = {2: 0.1, 1: 0.2}  # the neighbour left: 2 threads pay off again, found at the next exploration
    for _ in range(60):
        threads = tuner.next()
        tuner.record(threads, cost[threads] * 10, 6)
    assert tuner.best() == 2


def test_placement_gives_parallel_sequences_the_trained_context_where_memory_allows(qwen_path: Path) -> None:
    from velollm.loading import prepare

    prepared = prepare(qwen_path, options=LoadOptions(parallel=4))
    plan = prepared.plan
    assert plan.parallel == 4 and prepared.load_options.parallel == 4
    n_ctx = next(d for d in plan.decisions if d.topic == "n_ctx")
    assert "parallel sequences share one KV cache" in n_ctx.reason
    assert plan.n_ctx == 32768 or "capped" in n_ctx.reason  # Qwen2.5-Coder was trained on 32k tokens
    assert any(d.topic == "parallel" for d in plan.decisions)
    single = prepare(qwen_path, options=LoadOptions(parallel=1))
    assert single.plan.parallel == 1 and single.load_options.parallel == 1 and single.plan.n_ctx == 4096


def test_placement_chooses_parallel_sequences_from_memory(qwen_path: Path) -> None:
    """No ``parallel``: the llama.cpp backend batches up to 4 sequences in the context placement picks
    anyway (KV per sequence x N must fit: 1024+ tokens each), and a real load declares that many."""
    from velollm.loading import load_prepared, prepare

    auto = prepare(qwen_path, options=LoadOptions())
    parallel = next(d for d in auto.plan.decisions if d.topic == "parallel")
    assert auto.plan.n_ctx == 4096 and auto.plan.parallel == 4 == auto.load_options.parallel
    assert "chosen from memory" in parallel.reason
    small = prepare(qwen_path, options=LoadOptions(n_ctx=1536))
    assert small.plan.parallel == 1 and small.load_options.parallel is None
    assert "one request at a time" in next(d for d in small.plan.decisions if d.topic == "parallel").reason
    embed = prepare(qwen_path, options=LoadOptions(extra={"embedding": True}))
    assert embed.plan.parallel == 1 and not any(d.topic == "parallel" for d in embed.plan.decisions)
    engine = load_prepared(prepare(qwen_path, options=LoadOptions(n_ctx=2048)))
    try:
        assert engine.max_concurrency == 2 and engine.context_length == 2048
    finally:
        engine.close()


def test_an_overflowing_prompt_names_the_knob(batched: Any) -> None:
    from velollm.errors import ContextOverflow

    with pytest.raises(ContextOverflow, match="n_ctx"):
        batched.generate(GenerationRequest(prompt="word " * 3000, max_tokens=4))


def test_the_pool_lets_parallel_requests_in_together(gemma_path: Path) -> None:
    from velollm.pool import ModelPool

    pool = ModelPool(keep_alive=0)
    try:
        lease = pool.acquire(str(gemma_path), n_ctx=1024, n_threads=1, parallel=2, timeout=30)
        request = GenerationRequest(prompt=PROMPTS[2], max_tokens=200, temperature=0)
        first = lease.engine.stream(request)
        assert next(first).text is not None
        second = lease.engine.stream(request)  # one slot would refuse this (same thread) or make it wait
        assert next(second).text is not None
        status = next(m for m in pool.status().models if m.path == str(gemma_path))
        assert status.slots == 2 and status.running == 2
        first.close()
        second.close()
        lease.release()
    finally:
        pool.close()


# --- speculation inside the batch: a lone sequence drafts, verifies in the step, steps aside when joined -----
FRUIT = "apples, bananas, cherries, dates, elderberries, figs, grapes, honeydew melons, kiwis, lemons, mangoes"
COPY = [{"role": "user", "content": f"Repeat this list exactly, nothing else:\n{FRUIT}"}]
COPY_SCHEMA = {"type": "object", "additionalProperties": False,
               "properties": {"fruits": {"type": "array", "items": {"type": "string"}}}, "required": ["fruits"]}


@pytest.fixture(scope="module")
def spec_batched(qwen_path: Path) -> Iterator[Any]:
    """Qwen 0.5B, 2 sequences, prompt lookup by default and a copy of itself as draft model."""
    engine = _load(qwen_path, n_ctx=2048, parallel=2, speculative="lookup", draft_model=str(qwen_path), n_draft=4)
    yield engine
    engine.close()


def _greedy(**fields: Any) -> GenerationRequest:
    return GenerationRequest.of(**{"temperature": 0.0, "max_tokens": 48, **fields})


def _idle(engine: Any) -> Any:
    """The decoder once its scheduler has nothing left to do (cancellations are reaped by a step)."""
    decoder = engine._batch
    for _ in range(500):
        if not decoder.busy:
            return decoder
        threading.Event().wait(0.01)
    raise AssertionError("the batch decoder stayed busy")


def _assert_cells_consistent(engine: Any) -> None:
    """llama.cpp's cells, the ledger and the prefix cache agree: no draft cell outlives its step."""
    decoder = _idle(engine)
    lib, memory = decoder._lib, decoder.memory
    for slot, tokens in decoder._cache.items():
        assert decoder.ledger.length(slot) == len(tokens) == lib.llama_memory_seq_pos_max(memory, slot) + 1
    for slot in decoder._free_ids:
        assert decoder.ledger.length(slot) == 0 and lib.llama_memory_seq_pos_max(memory, slot) == -1


def test_a_lone_request_speculates_inside_the_batch(spec_batched: Any) -> None:
    assert spec_batched.max_concurrency == 2 and spec_batched.speculation["mode"] == "lookup"
    off = spec_batched.generate(_greedy(messages=COPY, extra={"speculative": "off"}))
    assert "drafted" not in off.timings.extra and "figs" in off.text
    for mode in ("lookup", "draft"):
        spec = spec_batched.generate(_greedy(messages=COPY, extra={"speculative": mode}))
        assert (spec.text, spec.usage.completion_tokens, spec.finish_reason) == \
            (off.text, off.usage.completion_tokens, off.finish_reason), mode
        m = spec.timings.extra
        assert m["speculative"] == mode and m["batched"] and m["stepped_aside"] == 0
        assert m["drafted"] > 0 and 0 < m["accepted"] <= m["drafted"], m
        assert m["by_source"][mode]["accepted"] > 0
        assert sum(g * steps for _, g, steps in m["gamma_trace"]) == m["drafted"]
        assert m["steps"] + m["accepted"] + 1 >= spec.usage.completion_tokens
    assert m["draft_evaluated"] > 0
    default = spec_batched.generate(_greedy(messages=COPY))  # the engine's mode: lookup
    assert default.text == off.text and default.timings.extra["speculative"] == "lookup"
    _assert_cells_consistent(spec_batched)


def test_a_constrained_lone_request_speculates_along_its_grammar(spec_batched: Any) -> None:
    ask = [{"role": "user", "content": f"Put these fruits in a JSON list:\n{FRUIT}"}]
    off = spec_batched.generate(_greedy(messages=ask, json_schema=COPY_SCHEMA, max_tokens=80,
                                        extra={"speculative": "off"}))
    spec = spec_batched.generate(_greedy(messages=ask, json_schema=COPY_SCHEMA, max_tokens=80,
                                         extra={"speculative": "lookup"}))
    assert spec.text == off.text and spec.finish_reason == off.finish_reason
    assert "figs" in json.loads(spec.text)["fruits"]
    by_source = spec.timings.extra["by_source"]
    assert sum(s["accepted"] for s in by_source.values()) > 0, by_source
    _assert_cells_consistent(spec_batched)


def test_stops_max_tokens_and_logprobs_while_speculating_in_the_batch(spec_batched: Any) -> None:
    free = spec_batched.generate(_greedy(messages=COPY, extra={"speculative": "off"})).text
    stopped = spec_batched.generate(_greedy(messages=COPY, stop=["grapes"]))
    assert stopped.text == free[:free.index("grapes")] and stopped.finish_reason == "stop"
    for n in (1, 3, 7):
        c = spec_batched.generate(_greedy(messages=COPY, max_tokens=n, extra={"speculative": "draft"}))
        assert c.usage.completion_tokens == n and c.finish_reason == "length"
    logged = spec_batched.generate(_greedy(messages=COPY, max_tokens=6, logprobs=True))
    assert "drafted" not in logged.timings.extra and len(logged.logprobs or []) == 6
    _assert_cells_consistent(spec_batched)


def test_concurrent_requests_step_aside_and_keep_the_targets_output(spec_batched: Any) -> None:
    """Two requests together: no drafts while they share the step; the one left alone speculates.
    Each output is the target's own greedy one (teacher-forced, near-ties aside: batch numerics)."""
    requests = [_greedy(messages=COPY), _greedy(messages=[{"role": "user", "content": "Repeat exactly: "
                                                           + FRUIT.upper()}], max_tokens=64)]
    streams = [spec_batched.stream(r) for r in requests]  # both queued before either finishes
    texts = _run_threads([lambda s=s: list(s) for s in streams])
    stepped_aside = 0
    for request, stream, chunks in zip(requests, streams, texts, strict=True):
        final = chunks[-1]
        assert final.finish_reason in ("stop", "length") and final.usage.completion_tokens > 0
        prompt = spec_batched.prompt_tokens(request)
        out = stream._seq.tokens[len(prompt):]
        assert "".join(c.text for c in chunks) == spec_batched.detokenize(out)
        _assert_teacher_forced(spec_batched, prompt, out)
        stepped_aside += final.timings.extra["stepped_aside"]
    assert stepped_aside > 0
    _assert_cells_consistent(spec_batched)


def test_a_failing_or_cancelled_speculating_sequence_leaves_the_cells_consistent(spec_batched: Any) -> None:
    decoder = spec_batched._batch
    prompt = spec_batched.prompt_tokens(_greedy(messages=COPY))
    session = spec_batched._speculator.session(prompt, "lookup")
    bad = decoder.submit(Sequence(prompt, _Exploding(), max_new=30, session=session))
    with pytest.raises(GenerationError, match="boom"):
        _drain(bad)
    assert session.stats.steps > 0  # it failed while verifying a draft
    _assert_cells_consistent(spec_batched)
    long = spec_batched.stream(_greedy(messages=COPY, max_tokens=400))
    assert next(long).finish_reason is None
    long.close()
    _assert_cells_consistent(spec_batched)
    again = spec_batched.generate(_greedy(messages=COPY, max_tokens=8))
    assert again.usage.completion_tokens == 8 and again.usage.cached_tokens > 0
    _assert_cells_consistent(spec_batched)
    spec_batched.reset_cache()  # the draft model's cache is reset on the scheduler thread
    cold = spec_batched.generate(_greedy(messages=COPY, max_tokens=8, extra={"speculative": "draft"}))
    assert cold.usage.cached_tokens == 0 and cold.text == again.text
    _assert_cells_consistent(spec_batched)


def test_a_failing_drafter_leaves_the_sequence_decoding_plainly(spec_batched: Any) -> None:
    prompt = spec_batched.prompt_tokens(_greedy(messages=COPY))
    session = spec_batched._speculator.session(prompt, "lookup")

    def broken(seq: list[int], cap: int) -> list[int]:
        raise RuntimeError("drafter down")

    session.plan = broken  # type: ignore[method-assign]
    seq = spec_batched._batch.submit(Sequence(prompt, GreedyPicker(), max_new=12, session=session))
    text = _drain(seq)
    off = spec_batched.generate(_greedy(messages=COPY, max_tokens=12, extra={"speculative": "off"}))
    assert seq.session is None and text == off.text
    _assert_cells_consistent(spec_batched)
