"""velollm.constraints (llguidance): same greedy tokens as llama.cpp's GBNF sampler, answers that
always close within max_tokens, loops that end, legitimate repetition spared, bounded input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from velollm.adapters.dspy.retry import repeats_itself
from velollm.constraints import TokenClasses, compile_constraint, find_loop
from velollm.constraints.grammars import grammar_depth
from velollm.engine import Engine, GenerationRequest
from velollm.errors import GrammarError
from velollm.plugins.llamacpp.engine import schema_to_gbnf
from velollm.plugins.llamacpp.grammar import GrammarSampler

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "skills": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "skills"]}
MANY = {"type": "object", "additionalProperties": False,
        "properties": {**{f"field_{i}": {"type": "string"} for i in range(8)},
                       "count": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
                       "ok": {"type": "boolean"}},
        "required": [*(f"field_{i}" for i in range(8)), "count", "tags", "ok"]}


def classes(engine: Engine) -> TokenClasses:
    return TokenClasses(lambda t: engine._piece(t))


def tokens(engine: Engine, text: str) -> list[int]:
    return engine.tokenize(text, add_special=False)


# --- loops (real tokenizer, pure detector) ----------------------------------------------------------
def test_a_counting_loop_and_an_exact_loop_are_caught(qwen_engine: Engine) -> None:
    tag = "".join(f"\\tag{{{i}}}\n " for i in range(1, 60))
    at = find_loop(tokens(qwen_engine, tag), classes(qwen_engine))
    assert at is not None and at < 0.75 * len(tokens(qwen_engine, tag))  # by \tag{40} or so, of 59
    echo = "Here is the code:\n" + "echo\n" * 80
    assert find_loop(tokens(qwen_engine, echo), classes(qwen_engine)) is not None


def test_a_paragraph_written_over_and_over_is_caught(qwen_engine: Engine) -> None:
    """A ChainOfThought reasoning that starts itself over (seen on Qwen 0.5B): a ~110-token unit,
    far beyond the short-period detector; caught in its third copy, not at max_tokens."""
    unit = ("To determine the number of eggs in 4 boxes, we need to divide the total number of eggs by the "
            "number of boxes. Here's the step-by-step process:\n\n1. Identify the total number of eggs: 6 eggs."
            "\n2. Identify the number of boxes: 4 boxes.\n3. Divide the total number of eggs by the number of "
            "boxes: 6 ÷ 4 = 1.5.\nTherefore, the number of eggs in 4 boxes is 2.\n\nAnswer: 2\nReasoning: ")
    size = len(tokens(qwen_engine, unit))
    assert size > 40  # beyond the short-period detector
    looping = tokens(qwen_engine, unit * 4)
    at = find_loop(looping, classes(qwen_engine))
    assert at is not None and 2 * size < at <= 3 * size + 2
    twice = "def area(w, h):\n    \"\"\"Area of a w x h rectangle, in square units.\"\"\"\n    return w * h\n\n"
    assert find_loop(tokens(qwen_engine, unit * 2 + "So the answer is 2."), classes(qwen_engine)) is None
    assert find_loop(tokens(qwen_engine, twice * 2), classes(qwen_engine)) is None


@pytest.mark.parametrize("text", [
    ", ".join(str(i) for i in range(1, 51)),
    "[" + ", ".join(str(i) for i in range(1, 51)) + "]",
    "| name | status | team |\n|---|---|---|\n" + "".join(f"| user{i} | active | backend |\n" for i in range(12)),
    "def reset(grid):\n" + "    grid.append(0)\n" * 10 + "    return grid\n",
    "\n".join(f"Step {i}: add {i} to the total, giving {i * (i + 1) // 2}." for i in range(1, 15)),
], ids=["list-1-50", "json-list", "table", "code-lines", "steps"])
def test_legitimate_repetition_is_spared(qwen_engine: Engine, text: str) -> None:
    assert find_loop(tokens(qwen_engine, text), classes(qwen_engine)) is None


# --- grammar input is bounded and checked ---------------------------------------------------------------
def test_deep_or_broken_grammars_are_typed_errors_not_crashes(gemma_engine: Engine) -> None:
    vocab = gemma_engine.constraint_cache().vocab
    deep = "root ::= " + "(" * 30_000 + '"a"' + ")" * 30_000
    assert grammar_depth(deep) == 30_000
    with pytest.raises(GrammarError):
        compile_constraint(grammar=deep, tokenizer=vocab)
    nested: dict = {"type": "string"}
    for _ in range(10_000):
        nested = {"type": "array", "items": nested}
    with pytest.raises(GrammarError):
        compile_constraint(json_schema=nested, tokenizer=vocab)
    with pytest.raises(GrammarError):
        compile_constraint(grammar="root ::= (", tokenizer=vocab)
    with pytest.raises(GrammarError):
        compile_constraint(json_schema={"type": "object"}, grammar='root ::= "a"', tokenizer=vocab)


def test_gbnf_through_the_engine_and_lark_through_the_state(gemma_engine: Engine) -> None:
    c = gemma_engine.generate(GenerationRequest.of(prompt="The capital of France is", temperature=0, max_tokens=8,
                                                   grammar='root ::= " zebra" (" crossing" | " stripes")'))
    assert c.text in (" zebra crossing", " zebra stripes")
    state = gemma_engine.constraint_cache().get(grammar='start: " zebra" (" crossing" | " stripes")').start()
    while not state.done:
        forced = state.forced()
        token = forced[0] if forced else int(np.flatnonzero(state.allowed())[0])
        state.advance(token)
    assert state.accepting


def test_mask_and_allows_agree(qwen_engine: Engine) -> None:
    state = qwen_engine.constraint_cache().get(json_schema=PERSON).start()
    row = np.zeros(qwen_engine._llama.n_vocab(), dtype=np.float32)
    state.mask(row)
    allowed = np.flatnonzero(np.isfinite(row))
    assert len(allowed) >= 1 and all(state.allows(int(t)) for t in allowed[:50])
    assert not state.allows(tokens(qwen_engine, "hello")[0])
    assert qwen_engine.detokenize(state.forced() or [int(allowed[0])]).startswith("{")


# --- same tokens as the llama.cpp GBNF path where no guard fires ----------------------------------------
@pytest.mark.parametrize("engine_name", ["gemma_engine", "qwen_engine"])
def test_greedy_tokens_match_the_llamacpp_grammar_path(engine_name: str, request: pytest.FixtureRequest) -> None:
    """Both decide on the very same logits rows (one runner, teacher-forced by the shared output)."""
    engine = request.getfixturevalue(engine_name)
    runner, vocab = engine._get_runner(), engine._vocab
    prompt = engine.prompt_tokens(GenerationRequest.of(
        messages=[{"role": "user", "content": "Invent a chef and give name, age and skills as JSON."}]))
    old = GrammarSampler(vocab, runner.n_vocab, schema_to_gbnf(PERSON))
    new = engine.constraint_cache().get(json_schema=PERSON).start(None, loops=False)
    try:
        runner.refresh()
        runner.sync(prompt)
        for _ in range(40):
            row = runner.logits(-1)
            expected = old.pick(row)
            got = new.pick_greedy(row)
            assert got == expected, (engine.detokenize([got]), engine.detokenize([expected]))
            new.advance(got)
            if engine.is_end_of_generation(got):
                break
            runner.feed([got])
    finally:
        old.close()
        engine.reset_cache()


# --- budgets: a constrained answer always closes ------------------------------------------------------------
@pytest.mark.parametrize("engine_name", ["gemma_engine", "qwen_engine"])
def test_tiny_max_tokens_on_a_many_field_schema_still_parses(engine_name: str, request: pytest.FixtureRequest) -> None:
    engine = request.getfixturevalue(engine_name)
    minimum = engine.constraint_cache().get(json_schema=MANY).minimum_tokens
    max_tokens = minimum + 12
    c = engine.generate(GenerationRequest.of(
        messages=[{"role": "user", "content": "Write a long, detailed essay about the history of Rome, as JSON."}],
        json_schema=MANY, temperature=0, max_tokens=max_tokens))
    data = json.loads(c.text)
    assert list(data) == list(MANY["properties"]) and c.usage.completion_tokens <= max_tokens


def test_a_normal_budget_leaves_a_fitting_answer_alone(qwen_engine: Engine) -> None:
    def run(guards: bool) -> str:
        qwen_engine.reset_cache()
        return qwen_engine.generate(GenerationRequest.of(
            messages=[{"role": "user", "content": "Invent a chef and give name, age and skills as JSON."}],
            json_schema=PERSON, temperature=0, max_tokens=120, extra={"guards": guards})).text
    guarded = run(True)
    assert json.loads(guarded) and guarded == run(False)


def test_budget_closes_a_long_string_without_cutting_the_json(gemma_engine: Engine) -> None:
    schema = {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}},
              "required": ["reasoning", "answer"], "additionalProperties": False}
    c = gemma_engine.generate(GenerationRequest.of(
        prompt="Explain at great length, step by step, why the sky is blue. JSON: ", json_schema=schema,
        temperature=0, max_tokens=30))
    data = json.loads(c.text)
    assert isinstance(data["answer"], int) and data["reasoning"] and c.usage.completion_tokens <= 30


def test_a_looping_string_is_closed_early(qwen_engine: Engine) -> None:
    schema = {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}},
              "required": ["reasoning", "answer"], "additionalProperties": False}
    c = qwen_engine.generate(GenerationRequest.of(
        messages=[{"role": "user", "content": "Write the word 'echo' 200 times, separated by spaces."}],
        json_schema=schema, temperature=0, max_tokens=400))
    data = json.loads(c.text)
    assert repeats_itself(data["reasoning"], min_count=10)  # it did loop...
    assert c.usage.completion_tokens < 250  # ...and the loop was closed, far before max_tokens


# --- unconstrained text stops on the same detector ------------------------------------------------------------
def test_unconstrained_loops_stop_and_counting_goes_on(gemma_engine: Engine) -> None:
    def run(prompt: str, **extra: object):
        gemma_engine.reset_cache()
        return gemma_engine.generate(GenerationRequest.of(prompt=prompt, temperature=0, max_tokens=240, extra=extra))
    echo = "echo " * 12
    stopped, unguarded = run(echo), run(echo, guards=False)
    assert unguarded.usage.completion_tokens == 240  # without the guard it runs to max_tokens...
    assert stopped.usage.completion_tokens < 160 and unguarded.text.startswith(stopped.text)  # ...with it, not
    counting = run(", ".join(str(i) for i in range(1, 21)) + ",")
    assert counting.usage.completion_tokens == 240  # a count is not a loop


def test_a_walked_draft_follows_the_grammar_and_leaves_the_state_as_it_was(qwen_engine: Engine) -> None:
    """Speculation drafts along the constraint: forced keys marked forced, a proposal cut at the first
    token the grammar refuses, and the state unchanged afterwards (the matcher is rolled back)."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
              "required": ["name", "city"], "additionalProperties": False}
    state = qwen_engine.constraint_cache().get(json_schema=schema).start()
    for token in tokens(qwen_engine, '{"name": "'):
        state.advance(token)
    copy = tokens(qwen_engine, 'Ada Lovelace", "city": "London"}')
    walked, forced = state.walk(lambda ahead: copy[len(ahead):] if ahead == copy[:len(ahead)] else [], 32)
    assert qwen_engine.detokenize(walked) == qwen_engine.detokenize(copy[:len(walked)])
    assert len(walked) == len(copy) and not any(forced)  # every token of the copy obeys the schema
    bad = tokens(qwen_engine, 'Ada"} trailing')
    walked, forced = state.walk(lambda ahead: bad if not ahead else [], 32)
    assert qwen_engine.detokenize(walked) == "Ada"  # cut at '"}': the required city is missing
    assert state.n == len(tokens(qwen_engine, '{"name": "')) and not state.done
    first = tokens(qwen_engine, "Ada")
    for token in first:
        state.advance(token)  # the state still takes the answer it would have taken before walking
    walked, forced = state.walk(lambda ahead: tokens(qwen_engine, '", "') if not ahead else [], 32)
    text = qwen_engine.detokenize(walked)
    assert text.startswith('", "') and "city" in text and any(forced), (text, forced)
