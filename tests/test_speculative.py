"""Speculative decoding on real models: the target's output in every mode, metrics, refusals.

One Qwen2.5-Coder-0.5B engine with prompt lookup and a second copy of the same model as draft
(so drafts are mostly accepted and the verification path is exercised hard); short outputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from velollm.engine import Engine, GenerationRequest, LoadOptions
from velollm.errors import IncompatibleDraftModel, InvalidRequest, UnsupportedFeature
from velollm.plugins.llamacpp import LlamaCppBackend
from velollm.plugins.llamacpp.agreement import agrees

CODE = '''def compute_total(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
'''
EDIT = [{"role": "user", "content": "Rename compute_total to invoice_total. Reply with the code only.\n\n" + CODE}]


def req(**fields: object) -> GenerationRequest:
    return GenerationRequest.of(**{"temperature": 0.0, "max_tokens": 40, **fields})


def load(path: Path, **options: object) -> Engine:
    return LlamaCppBackend("cpu").load(path, LoadOptions(n_ctx=1024, **options))


@pytest.fixture(scope="module")
def spec_engine(qwen_path: Path) -> Iterator[Engine]:
    engine = load(qwen_path, prompt_lookup=True, draft_model=str(qwen_path), n_draft=4)
    yield engine
    engine.close()


def assert_greedy(engine: Engine, request: GenerationRequest, text: str) -> None:
    """``text`` is the target's one-token-at-a-time greedy answer, or parts from it only where greedy
    is a near tie (batched verification rounds differently; velollm.plugins.llamacpp.agreement)."""
    divergence = agrees(engine, request, text)
    assert divergence is None or divergence.near_tie, divergence.describe()


def test_every_mode_gives_the_targets_greedy_output(spec_engine: Engine) -> None:
    outputs = {}
    for mode in ("off", "auto", "lookup", "draft"):
        request = req(messages=EDIT, extra={"speculative": mode})
        c = spec_engine.generate(request)
        outputs[mode] = c.text
        assert_greedy(spec_engine, request, c.text)
    assert "invoice_total" in outputs["off"] and "subtotal += item.price" in outputs["off"]


def test_metrics_are_reported_and_consistent(spec_engine: Engine) -> None:
    for mode in ("lookup", "draft"):
        c = spec_engine.generate(req(messages=EDIT, extra={"speculative": mode}))
        m = c.timings.extra
        assert m["speculative"] == mode
        assert m["drafted"] > 0 and 0 < m["accepted"] <= m["drafted"]
        assert m["acceptance_rate"] == pytest.approx(m["accepted"] / m["drafted"])
        assert sum(steps for _, _, steps in m["gamma_trace"]) == m["steps"]
        assert sum(g * steps for _, g, steps in m["gamma_trace"]) == m["drafted"]
        assert {src for src, g, _ in m["gamma_trace"] if g} == {mode}
        # every step yields 1 + accepted tokens: the first token comes from the prompt
        assert m["steps"] + m["accepted"] + 1 >= c.usage.completion_tokens
        assert m["predicted_speedup"] > 0 and m["modelled_speedup"] > 0
        assert c.timings.ttft_s > 0 and c.timings.decode_tokens_per_s > 0
    assert c.timings.extra["by_source"]["draft"]["accepted"] > 0 and c.timings.extra["draft_evaluated"] > 0
    info = spec_engine.speculation
    assert info is not None and info["batch_cost"][0] == 1.0 and len(info["batch_cost"]) == 5
    assert info["draft_cost"] > 0 and info["max_gamma"] == 4


def test_vanilla_after_speculation_reuses_a_consistent_cache(spec_engine: Engine) -> None:
    prompt = "def fibonacci(n):"
    vanilla = spec_engine.generate(req(prompt=prompt, max_tokens=24, extra={"speculative": "off"})).text
    spec = spec_engine.generate(req(prompt=prompt, max_tokens=24, extra={"speculative": "draft"})).text
    again = spec_engine.generate(req(prompt=prompt, max_tokens=24, extra={"speculative": "off"})).text
    assert spec == vanilla == again


def test_stops_max_tokens_and_end_of_generation_in_speculative_mode(spec_engine: Engine) -> None:
    free = spec_engine.generate(req(messages=EDIT, extra={"speculative": "lookup"})).text
    cut = free.index("subtotal")
    stopped = spec_engine.generate(req(messages=EDIT, stop=["subtotal"], extra={"speculative": "lookup"}))
    assert stopped.text == free[:cut] and stopped.finish_reason == "stop"
    for n in (1, 3, 7):
        c = spec_engine.generate(req(messages=EDIT, max_tokens=n, extra={"speculative": "draft"}))
        assert c.usage.completion_tokens == n and c.finish_reason == "length"
    done = spec_engine.generate(req(messages=[{"role": "user", "content": "Say OK."}], max_tokens=30,
                                    extra={"speculative": "auto"}))
    assert done.finish_reason == "stop" and "<|im_end|>" not in done.text


def test_sampling_and_grammars_work_through_the_sampler_chain(spec_engine: Engine) -> None:
    sampled = spec_engine.generate(req(messages=EDIT, temperature=0.7, seed=3, extra={"speculative": "draft"}))
    assert sampled.usage.completion_tokens > 0 and sampled.text.strip()
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    c = spec_engine.generate(req(prompt="A person as JSON: ", json_schema=schema, max_tokens=40,
                                 extra={"speculative": "lookup"}))
    data = json.loads(c.text)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


def test_bad_speculative_requests_get_typed_errors(spec_engine: Engine, qwen_engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="must be one of"):
        spec_engine.generate(req(prompt="x", extra={"speculative": "turbo"}))
    with pytest.raises(UnsupportedFeature, match="without speculative decoding"):
        qwen_engine.generate(req(prompt="x", extra={"speculative": "lookup"}))
    plain = qwen_engine.generate(req(prompt="def f():", max_tokens=4, extra={"speculative": "auto"}))
    assert plain.usage.completion_tokens == 4 and "drafted" not in plain.timings.extra


def test_forced_draft_without_a_draft_model_is_refused(qwen_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="needs a draft_model"):
        load(qwen_path, speculative="draft")


def test_gemma_cannot_draft_for_qwen(qwen_path: Path, gemma_path: Path) -> None:
    with pytest.raises(IncompatibleDraftModel) as info:
        load(qwen_path, draft_model=str(gemma_path))
    message = str(info.value)
    assert "gemma-3-270m" in message and "cannot draft for" in message
    assert "vocabulary size" in message and "tokenizer type" in message


def test_a_constraint_verifies_drafts_and_drafts_its_forced_tokens(spec_engine: Engine) -> None:
    """Under a JSON schema, speculation gives the constrained non-speculative output, and prompt
    lookup drafts along the grammar: the keys and punctuation it forces ("forced"), joined with
    values copied from the prompt ("walk": ConstraintState.walk)."""
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"function_name": {"type": "string"}, "new_name": {"type": "string"},
                             "arguments": {"type": "array", "items": {"type": "string"}}},
              "required": ["function_name", "new_name", "arguments"]}
    ask = [{"role": "user", "content": "From this code, extract the function's name, the name it should get "
                                       "(invoice_total) and its arguments, as JSON.\n\n" + CODE}]
    plain = spec_engine.generate(req(messages=ask, json_schema=schema, max_tokens=60, extra={"speculative": "off"}))
    for mode in ("lookup", "draft"):
        request = req(messages=ask, json_schema=schema, max_tokens=60, extra={"speculative": mode})
        spec = spec_engine.generate(request)
        assert_greedy(spec_engine, request, spec.text)
        by_source = spec.timings.extra["by_source"]
        assert sum(source["accepted"] for source in by_source.values()) > 0, by_source
        if mode == "lookup":  # the cost model may prefer the draft model to forced-only walks in "draft"
            along = by_source.get("forced", {}).get("accepted", 0) + by_source.get("walk", {}).get("accepted", 0)
            assert along > 0, by_source
    assert json.loads(plain.text)["arguments"]


def test_a_copied_value_is_drafted_with_its_close_and_the_next_key(spec_engine: Engine) -> None:
    """A record's lines (``Name: ...``) hold one value each: the model closes each copied value where
    its line ends, the speculator learns that spelling (``","`` or ``", "``) and those places, and later
    walks draft the close and the next key along with the copy. The answer stays complete JSON."""
    record = ("Name: Margaret Okonkwo-Lindqvist\nEmail: m.okonkwo@harborlight-logistics.com\n"
              "Company: Harborlight Logistics B.V.\nCity: Rotterdam")
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "email", "company", "city"],
              "properties": {k: {"type": "string"} for k in ("name", "email", "company", "city")}}
    ask = [{"role": "user", "content": "Extract the fields of this record as JSON, copying the values.\n\n" + record}]
    plain = spec_engine.generate(req(messages=ask, json_schema=schema, max_tokens=80, extra={"speculative": "off"}))
    for _ in range(2):  # (token-for-token agreement is test_every_mode_gives_the_targets_greedy_output's)
        spec = spec_engine.generate(req(messages=ask, json_schema=schema, max_tokens=80,
                                        extra={"speculative": "lookup"}))
        assert set(json.loads(spec.text)) == set(schema["properties"])
    speculator = spec_engine._speculator  # what it learnt is what the walks draft from
    assert speculator.closes.get(b""), speculator.closes
    seen = speculator.value_ends.counts.get(b"\n:")
    assert seen is not None and seen[0] > seen[2], speculator.value_ends.counts  # closed more than went on
    assert json.loads(plain.text)["email"] == "m.okonkwo@harborlight-logistics.com"
