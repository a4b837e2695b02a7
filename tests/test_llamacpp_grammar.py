"""Constrained greedy decoding that checks the argmax only: same tokens as llama-cpp-python's
whole-vocabulary grammar sampler, on real models."""

from __future__ import annotations

import json

import pytest

from velollm.engine import Engine, GenerationRequest
from velollm.errors import GrammarError
from velollm.plugins.llamacpp.grammar import GrammarSampler

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
VERDICT = {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                            "confidence": {"type": "number"}},
           "required": ["label", "confidence"]}


def constrained(engine: Engine, check: str, **fields: object):
    engine.reset_cache()  # both paths from a cold cache: a reused prefix changes batch numerics (near-ties flip)
    # guards off: budgets and loop closing change answers on purpose (tests/test_constraints.py)
    request = GenerationRequest.of(**{"temperature": 0.0, "max_tokens": 48, **fields,
                                      "extra": {"grammar_check": check, "guards": False}})
    return engine.generate(request)


@pytest.mark.parametrize("engine_name", ["qwen_engine", "gemma_engine"])
@pytest.mark.parametrize("case", [
    {"prompt": "A person as JSON: ", "json_schema": PERSON},
    {"messages": [{"role": "user", "content": "Classify the sentiment of 'I loved this film'. Answer in JSON."}],
     "json_schema": VERDICT},
    {"prompt": "Is the sky green? Answer: ", "grammar": 'root ::= ("yes" | "no") "." '},
], ids=["person", "verdict", "gbnf"])
def test_fast_path_gives_the_same_tokens_as_the_whole_vocabulary_sampler(engine_name: str, case: dict,
                                                                          request: pytest.FixtureRequest) -> None:
    engine = request.getfixturevalue(engine_name)
    full = constrained(engine, "full", **case)
    fast = constrained(engine, "fast", **case)
    assert (fast.text, fast.usage.completion_tokens, fast.finish_reason) == \
        (full.text, full.usage.completion_tokens, full.finish_reason)
    if "json_schema" in case and fast.finish_reason == "stop":
        data = json.loads(fast.text)
        assert set(case["json_schema"]["required"]) <= set(data)


def test_a_grammar_the_model_would_never_choose_is_still_followed(gemma_engine: Engine) -> None:
    # Gemma's argmax after this prompt is not "zebra": the fast path must fall back to masking
    c = constrained(gemma_engine, "fast", prompt="The capital of France is", grammar='root ::= " zebra crossing"')
    assert c.text == " zebra crossing" and c.finish_reason == "stop"


def test_max_tokens_inside_the_grammar_and_the_cache_stays_consistent(qwen_engine: Engine) -> None:
    plain = GenerationRequest.of(prompt="def add(a, b):", temperature=0.0, max_tokens=12)
    before = qwen_engine.generate(plain).text
    cut = constrained(qwen_engine, "fast", prompt="A person as JSON: ", json_schema=PERSON, max_tokens=5)
    assert cut.usage.completion_tokens == 5 and cut.finish_reason == "length"
    assert qwen_engine.generate(plain).text == before


def test_fallback_counting_and_a_refused_grammar(qwen_engine: Engine) -> None:
    llama = qwen_engine._llama
    grammar = GrammarSampler(llama._model.vocab, llama.n_vocab(), 'root ::= "ab"')
    try:
        a, b = (qwen_engine.tokenize(t, add_special=False) for t in ("a", "b"))
        logits = __import__("numpy").zeros(llama.n_vocab(), dtype="float32")
        logits[b[0]], logits[a[0]] = 5.0, 1.0  # the argmax "b" is refused; "a" is the best allowed
        assert grammar.pick(logits) == a[0] and grammar.fallbacks == 1
    finally:
        grammar.close()
    with pytest.raises(GrammarError):
        GrammarSampler(llama._model.vocab, llama.n_vocab(), "root ::= (")


def test_sampling_under_a_grammar_draws_from_the_masked_distribution(gemma_engine: Engine) -> None:
    """Without truncation (top-k 0, top-p 1, min-p 0) the fast path's draws follow the same
    distribution as masking first: compare letter frequencies over many seeds."""
    counts: dict[str, dict[str, int]] = {"full": {}, "fast": {}}
    for check in ("full", "fast"):
        for seed in range(100):
            c = gemma_engine.generate(GenerationRequest.of(
                prompt="My favourite letter of the alphabet is", grammar='root ::= " a" | " b" | " c" | " d"',
                temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=2,
                extra={"grammar_check": check}))
            counts[check][c.text] = counts[check].get(c.text, 0) + 1
    assert set(counts["fast"]) <= {" a", " b", " c", " d"} and len(counts["fast"]) >= 2
    letters = set(counts["full"]) | set(counts["fast"])
    distance = sum(abs(counts["full"].get(x, 0) - counts["fast"].get(x, 0)) for x in letters) / 2 / 100
    assert distance < 0.2, counts  # total variation; ~0.07 expected from sampling noise alone (fixed seeds)


def test_sampled_json_is_valid_and_reproducible_with_a_seed(qwen_engine: Engine) -> None:
    def sample(seed: int):
        qwen_engine.reset_cache()  # a reused prompt prefix changes batch numerics, and so the draws
        return qwen_engine.generate(GenerationRequest.of(
            prompt="A person as JSON: ", json_schema=PERSON, temperature=0.9, seed=seed, max_tokens=40,
            repeat_penalty=1.1))
    texts = set()
    for seed in (1, 2, 3):
        first, again = sample(seed), sample(seed)
        assert first.text == again.text
        texts.add(first.text)
        if first.finish_reason == "stop":
            assert set(PERSON["required"]) <= set(json.loads(first.text))
    assert len(texts) >= 2  # it really samples
