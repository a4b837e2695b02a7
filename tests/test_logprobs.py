"""Log-probabilities (velollm.logprobs): llama.cpp's against the native engine's log-softmax on the same
model and prefix (teacher-forced, with the near-tie rule), sum-to-one over the full distribution, and the
OpenAI / litellm / DSPy shapes they leave in."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from parity_support import NEAR_TIE

from velollm import logprobs as lp
from velollm import openai_wire
from velollm.engine import Capabilities, Engine, GenerationRequest, LoadOptions
from velollm.errors import InvalidRequest, UnsupportedFeature

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

PROMPT = "The three primary colors are"
N = 12
TOP = 5
#: the engines' logits differ by kernel rounding (the parity tests allow cosine 0.998): the chosen token's
#: log-probability may differ this much, any reported probability this much in absolute terms
#: (Qwen 0.5B measured: 0.04 and 0.02; Gemma 270M's larger logits differ more, up to 0.44 and 0.28)
TOLERANCE = 0.1
P_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def native(qwen_path: Path) -> Iterator[Engine]:
    from velollm.plugins.native import NativeBackend

    engine = NativeBackend().load(qwen_path, LoadOptions(n_ctx=512, n_threads=1))
    yield engine
    engine.close()


def test_log_softmax_sums_to_one_and_top_ids_are_ordered() -> None:
    row = np.random.default_rng(0).normal(size=1000).astype(np.float32) * 8
    logprobs = lp.log_softmax(row)
    assert math.isclose(float(np.exp(logprobs).sum()), 1.0, abs_tol=1e-9)
    top = lp.top_ids(logprobs, 5)
    assert list(top) == list(np.argsort(-row, kind="stable")[:5])
    assert lp.top_ids(logprobs, 0).size == 0


def test_llamacpp_logprobs_match_native_log_softmax(qwen_engine: Engine, native: Engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[tuple[np.ndarray, int]] = []
    record = lp.LogprobRecorder.on_logits

    def spy(self: lp.LogprobRecorder, row: np.ndarray, token: int) -> None:
        rows.append((np.array(row, dtype=np.float32), token))
        record(self, row, token)

    monkeypatch.setattr(lp.LogprobRecorder, "on_logits", spy)
    request = GenerationRequest(prompt=PROMPT, temperature=0, max_tokens=N, logprobs=True, top_logprobs=TOP)
    done = qwen_engine.generate(request)
    entries = done.logprobs
    assert entries is not None and len(entries) == done.usage.completion_tokens == N
    assert "".join(e.token for e in entries) == done.text

    # the full distribution llama.cpp's rows give sums to one, and the reported numbers are read from it
    for (row, token), entry in zip(rows, entries, strict=True):
        full = lp.log_softmax(row)
        assert math.isclose(float(np.exp(full).sum()), 1.0, abs_tol=1e-6)
        assert entry.id == token and math.isclose(entry.logprob, float(full[token]), abs_tol=1e-9)
        assert [t.id for t in entry.top_logprobs] == list(lp.top_ids(full, TOP))
        assert entry.top_logprobs[0].id == token  # greedy: the chosen token is the most likely one
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)

    # the native engine's log-softmax on the same prefix, teacher-forced with llama.cpp's tokens
    prompt_ids = qwen_engine.prompt_tokens(request)  # type: ignore[attr-defined]
    generated = [e.id for e in entries]
    positions = [len(prompt_ids) - 1 + i for i in range(N)]
    reference = native.logits(prompt_ids + generated[:-1], positions=positions)  # type: ignore[attr-defined]
    decisive = 0
    for step, (entry, row) in enumerate(zip(entries, reference, strict=True)):
        mine = lp.log_softmax(row)
        assert abs(entry.logprob - mine[entry.id]) < TOLERANCE, (step, entry.logprob, mine[entry.id])
        order = np.sort(mine)[::-1]
        for k, alt in enumerate(entry.top_logprobs):
            assert abs(math.exp(alt.logprob) - math.exp(mine[alt.id])) < P_TOLERANCE, (step, k, alt, mine[alt.id])
        theirs = {t.id for t in entry.top_logprobs}
        expected = set(lp.top_ids(mine, TOP).tolist())
        if theirs != expected:  # only where the native ranks TOP and TOP+1 are a near-tie
            assert order[TOP - 1] - order[TOP] < NEAR_TIE, (step, theirs ^ expected)
        decisive += order[0] - order[1] >= NEAR_TIE
    assert decisive >= N // 2  # the comparison had teeth


def test_native_engine_reports_the_same_shape(native: Engine) -> None:
    done = native.generate(GenerationRequest(prompt=PROMPT, temperature=0, max_tokens=4, logprobs=True,
                                             top_logprobs=2))
    assert done.logprobs is not None and len(done.logprobs) == done.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in done.logprobs)


def test_no_logprobs_unless_asked(gemma_engine: Engine) -> None:
    assert gemma_engine.generate(GenerationRequest(prompt=PROMPT, temperature=0, max_tokens=2)).logprobs is None


@pytest.mark.parametrize("params", [{"logprobs": 3}, {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}])
def test_bad_chat_logprobs_are_400s(params: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        openai_wire.parse_chat({"messages": [{"role": "user", "content": "hi"}], **params})


def test_wire_shapes(gemma_engine: Engine) -> None:
    chat = openai_wire.parse_chat({"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                   "top_logprobs": 3, "max_tokens": 3, "temperature": 0})
    assert (chat.request.logprobs, chat.request.top_logprobs) == (True, 3)
    completion = gemma_engine.generate(chat.request)
    body = openai_wire.chat_completion([completion], "gemma")
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == completion.usage.completion_tokens and len(content[0]["top_logprobs"]) == 3
    assert bytes(content[0]["bytes"]).decode("utf-8", errors="replace") == content[0]["token"]

    [legacy] = openai_wire.parse_completion({"prompt": PROMPT, "logprobs": 2, "max_tokens": 3, "temperature": 0})
    done = gemma_engine.generate(legacy.request)
    shaped = openai_wire.text_completion([done], "gemma")["choices"][0]["logprobs"]
    assert "".join(shaped["tokens"]) == done.text
    assert len(shaped["token_logprobs"]) == len(shaped["top_logprobs"]) == len(shaped["text_offset"])
    assert all(len(alts) == 2 for alts in shaped["top_logprobs"])
    assert shaped["text_offset"][0] == 0


def test_litellm_and_velollm_lm(gemma_path: Path) -> None:
    import litellm

    import velollm
    from velollm.adapters.litellm.provider import register_litellm
    from velollm.pool import ModelPool

    pool = ModelPool()
    register_litellm(pool)
    try:
        response = litellm.completion(model=f"velollm/{gemma_path}", messages=[{"role": "user", "content": "Hi"}],
                                      logprobs=True, top_logprobs=2, max_tokens=3, temperature=0)
        content = response.choices[0].logprobs.content
        assert len(content) == response.usage.completion_tokens
        assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
        with pytest.raises(litellm.UnsupportedParamsError):  # a stream has no place for them: refused
            list(litellm.completion(model=f"velollm/{gemma_path}", messages=[{"role": "user", "content": "Hi"}],
                                    logprobs=True, max_tokens=3, stream=True))
    finally:
        register_litellm(None)
        pool.close()

    lm = velollm.LM(str(gemma_path), cache=False, max_tokens=3)
    [output] = lm("Hi", logprobs=True, top_logprobs=2)
    tokens = output["logprobs"]["content"]
    assert tokens and len(tokens[0]["top_logprobs"]) == 2 and tokens[0]["logprob"] <= 0
    from dspy import lm15

    response = lm(lm15.Request(model=lm.model, messages=(lm15.Message.user("Hi"),),
                               config=lm15.Config(logprobs=3, max_tokens=3, temperature=0)))
    assert response.logprobs and len(response.logprobs[0].top) == 3
    assert response.logprobs[0].token_id == response.logprobs[0].top[0].token_id  # greedy


class _Plain:
    """An engine that declares no log-probabilities (a third-party backend, say)."""

    name = "plain"
    context_length = 0
    capabilities = Capabilities()


def test_engines_without_logprobs_refuse_them() -> None:
    with pytest.raises(UnsupportedFeature):
        openai_wire.check_for_engine(GenerationRequest(prompt="x", logprobs=True), _Plain())  # type: ignore[arg-type]
    openai_wire.check_for_engine(GenerationRequest(prompt="x"), _Plain())  # type: ignore[arg-type]
