"""Every sampling option changes the output distribution the way it says, on BOTH local engines.

Each test runs on the llama.cpp engine and on the native engine (Gemma 270M) and samples over
seeds. Bounds are generous (sets of allowed tokens are computed with a margin from the native
engine's reference distribution, counts compare two settings with a wide gap), so the tests hold
on AVX2 and AVX-512 CPUs alike; they fail when an option is ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from velollm.engine import Engine, GenerationRequest, LoadOptions
from velollm.errors import InvalidRequest, UnsupportedFeature
from velollm.plugins.native import sampling as ns

PROMPT = "My favourite animal is the"
REPEAT = "the the the the the the the the the the the the"
FLAT = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}  # no truncation: only the option under test shapes the draw
N = 16  # seeds per setting


@pytest.fixture(scope="module")
def native(gemma_path: Path) -> Iterator[Engine]:
    from velollm.plugins.native import NativeBackend

    engine = NativeBackend().load(gemma_path, LoadOptions(n_ctx=256, n_threads=1, extra={"prefix_cache": True}))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def llamacpp(gemma_path: Path) -> Iterator[Engine]:
    from velollm.plugins.llamacpp import LlamaCppBackend

    engine = LlamaCppBackend("cpu").load(gemma_path, LoadOptions(n_ctx=256, n_threads=1))
    yield engine
    engine.close()


@pytest.fixture(params=["llamacpp", "native"])
def engine(request: pytest.FixtureRequest) -> Engine:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def reference(native: Engine) -> dict[str, object]:
    """The first token's distribution after PROMPT (temperature 1), from the native engine's logits."""
    logits = np.asarray(native.logits(native.tokenize(PROMPT)), dtype=np.float64).reshape(-1)
    return {"logits": logits.astype(np.float32), "text": lambda ids: [native.detokenize([int(i)]) for i in ids]}


def _texts(ref: dict[str, object], candidates: ns.Candidates) -> set[str]:
    return set(ref["text"](candidates.ids))  # type: ignore[operator]


def _near(ref: dict[str, object], candidates: ns.Candidates, slack: float = 0.5) -> set[str]:
    """The candidates' tokens plus every token within ``slack`` of the weakest one's logit: the first
    token after PROMPT is a near tie (dog / elephant / giraffe within 0.1), which CPUs order differently."""
    logits: np.ndarray = ref["logits"]  # type: ignore[assignment]
    floor = float(logits[candidates.ids].min()) - slack
    return set(ref["text"](np.nonzero(logits >= floor)[0]))  # type: ignore[operator]


def first_tokens(engine: Engine, n: int = N, **fields: object) -> list[str]:
    """The first generated token (as text) for seeds 0..n-1."""
    out = []
    for seed in range(n):
        request = GenerationRequest.of(prompt=PROMPT, max_tokens=1, seed=seed, **fields)
        out.append(engine.generate(request).text)
    return out


def continuation(engine: Engine, prompt: str = REPEAT, n: int = 16, **fields: object) -> list[int]:
    text = engine.generate(GenerationRequest.of(prompt=prompt, max_tokens=n, **fields)).text
    return engine.tokenize(text, add_special=False)


# --- truncation and temperature --------------------------------------------------------------------
def test_temperature_sharpens_and_flattens(engine: Engine) -> None:
    cold = Counter(first_tokens(engine, temperature=0.3, **FLAT))
    hot = Counter(first_tokens(engine, temperature=1.5, **FLAT))
    assert len(cold) < len(hot), (cold, hot)
    assert cold.most_common(1)[0][1] > hot.most_common(1)[0][1], (cold, hot)


def test_temperature_zero_is_the_argmax(engine: Engine, reference: dict[str, object]) -> None:
    best = _near(reference, ns.top_k(ns.Candidates.from_logits(reference["logits"]), 1))
    drawn = set(first_tokens(engine, n=6, temperature=0.0, **FLAT))
    assert len(drawn) == 1 and drawn <= best, drawn


def test_top_k_keeps_only_the_k_best(engine: Engine, reference: dict[str, object]) -> None:
    assert len(set(first_tokens(engine, temperature=3.0, top_k=1, top_p=1.0, min_p=0.0))) == 1
    drawn = set(first_tokens(engine, temperature=3.0, top_k=3, top_p=1.0, min_p=0.0))
    allowed = _near(reference, ns.top_k(ns.Candidates.from_logits(reference["logits"]), 3))
    assert 1 < len(drawn) <= 3 and drawn <= allowed, (drawn, allowed)


def test_top_p_keeps_the_nucleus(engine: Engine, reference: dict[str, object]) -> None:
    allowed = _texts(reference, ns.top_p(ns.Candidates.from_logits(reference["logits"]), 0.7))
    drawn = set(first_tokens(engine, temperature=3.0, top_k=0, top_p=0.4, min_p=0.0))
    assert drawn <= allowed, drawn - allowed
    loose = set(first_tokens(engine, n=8, temperature=3.0, **FLAT))
    assert loose - allowed, "without top_p a hot draw leaves the nucleus"


def test_min_p_drops_unlikely_tokens(engine: Engine, reference: dict[str, object]) -> None:
    allowed = _texts(reference, ns.min_p(ns.Candidates.from_logits(reference["logits"]), 0.1))
    drawn = set(first_tokens(engine, temperature=3.0, top_k=0, top_p=1.0, min_p=0.2))
    assert drawn <= allowed, drawn - allowed
    loose = set(first_tokens(engine, n=8, temperature=3.0, **FLAT))
    assert loose - allowed


def test_typical_p_keeps_the_typical_set(engine: Engine, reference: dict[str, object]) -> None:
    allowed = _texts(reference, ns.typical(ns.Candidates.from_logits(reference["logits"]), 0.5))
    drawn = set(first_tokens(engine, temperature=3.0, typical_p=0.2, **FLAT))
    assert drawn <= allowed, drawn - allowed
    loose = set(first_tokens(engine, n=8, temperature=3.0, **FLAT))
    assert loose - allowed


# --- penalties ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("penalty", [{"repeat_penalty": 1.5}, {"frequency_penalty": 1.0},
                                     {"presence_penalty": 3.0}], ids=lambda p: next(iter(p)))
def test_penalties_break_repetition(engine: Engine, penalty: dict[str, float]) -> None:
    plain = continuation(engine, temperature=0.0)
    penalised = continuation(engine, temperature=0.0, **penalty)
    assert len(set(penalised)) > len(set(plain)) + 2, (plain, penalised)


def test_penalty_last_n_sets_the_window(engine: Engine) -> None:
    plain = continuation(engine, temperature=0.0)
    assert continuation(engine, temperature=0.0, repeat_penalty=1.5, penalty_last_n=0) == plain  # 0: off
    for window in (64, -1):  # -1: the whole context
        penalised = continuation(engine, temperature=0.0, repeat_penalty=1.5, penalty_last_n=window)
        assert len(set(penalised)) > len(set(plain)) + 2, (window, plain, penalised)


# --- mirostat ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_tau_sets_the_surprise(engine: Engine, mode: int) -> None:
    low = set(first_tokens(engine, temperature=1.0, mirostat_mode=mode, mirostat_tau=0.5))
    # mirostat replaces top-k/top-p/min-p: top_k=1 must not pin the draw
    high = set(first_tokens(engine, temperature=1.0, top_k=1, mirostat_mode=mode, mirostat_tau=10.0))
    assert len(low) <= 2 and len(high) >= 5, (low, high)


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_eta_changes_the_draw(engine: Engine, mode: int) -> None:
    def runs(eta: float) -> list[list[int]]:
        return [continuation(engine, PROMPT, n=8, temperature=1.0, seed=s, mirostat_mode=mode, mirostat_tau=3.0,
                             mirostat_eta=eta) for s in range(3)]

    assert runs(0.01) != runs(2.0)  # same seeds: only eta differs (test_seed_reproduces_and_varies)


# --- seed --------------------------------------------------------------------------------------------------
def test_seed_reproduces_and_varies(engine: Engine) -> None:
    def run(seed: int) -> list[int]:
        return continuation(engine, PROMPT, n=8, temperature=1.0, seed=seed)

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in range(4)}) >= 3


# --- refusals ------------------------------------------------------------------------------------------------
def test_unknown_extra_keys_are_refused(engine: Engine) -> None:
    with pytest.raises(UnsupportedFeature, match="no_such_knob"):
        engine.generate(GenerationRequest.of(prompt=PROMPT, max_tokens=1, extra={"no_such_knob": 1}))


def test_out_of_range_options_are_refused() -> None:
    for bad in ({"mirostat_mode": 3}, {"typical_p": 0.0}, {"mirostat_tau": 0.0}, {"penalty_last_n": -2}):
        with pytest.raises(InvalidRequest):
            GenerationRequest.of(prompt=PROMPT, **bad)


def test_sampling_extras_are_lifted_into_fields() -> None:
    request = GenerationRequest.of(prompt=PROMPT, extra={"typical_p": 0.5, "mirostat": 2})
    assert (request.typical_p, request.mirostat_mode, request.extra) == (0.5, 2, {})


# --- the llama.cpp chain itself (no model: llama.cpp's samplers on hand-made logits) -------------------
def _chain(**fields: object):  # -> SequenceSampler
    from velollm.plugins.llamacpp.sampling import SequenceSampler

    request = GenerationRequest.of(prompt="x", **{"temperature": 0.0, **fields})
    return SequenceSampler(request, n_vocab=8, n_ctx=64)


def _row(**logits: float) -> np.ndarray:
    row = np.zeros(8, dtype=np.float32)
    for name, value in logits.items():
        row[int(name[1:])] = value
    return row


def test_chain_counts_a_sampled_token_once() -> None:
    with _chain(frequency_penalty=15.0) as chain:
        assert chain.sample_logits(_row(t1=10.0)) == 1
        chain.accept(1)  # the token sample_logits just drew: already in the history, not counted again
        assert chain.sample_logits(_row(t1=70.0, t2=50.0)) == 1  # 70 - 15 > 50; counted twice it would lose
        chain.accept(3)  # a token chosen elsewhere (forced) is recorded
        assert chain.sample_logits(_row(t3=16.0, t4=10.0)) == 4


def test_chain_penalty_window_is_per_request() -> None:
    for window, expected in ((1, 1), (2, 2)):
        with _chain(repeat_penalty=4.0, penalty_last_n=window) as chain:
            chain.accept(1)
            chain.accept(3)
            # token 1 left a 1-token window but not a 2-token one: 8 vs 6, or 8 / 4 = 2 vs 6
            assert chain.sample_logits(_row(t1=8.0, t2=6.0)) == expected


def test_chain_is_greedy_only_without_history_dependence() -> None:
    from velollm.plugins.llamacpp.sampling import is_greedy

    assert is_greedy(GenerationRequest.of(prompt="x", temperature=0.0))
    assert is_greedy(GenerationRequest.of(prompt="x", temperature=0.0, repeat_penalty=1.3, penalty_last_n=0))
    assert not is_greedy(GenerationRequest.of(prompt="x", temperature=0.0, repeat_penalty=1.3))
    assert not is_greedy(GenerationRequest.of(prompt="x", temperature=0.7))


# --- the same options through the OpenAI wire, litellm and DSPy ------------------------------------------
def test_wire_takes_llama_cpp_sampling_names() -> None:
    from velollm import openai_wire

    body = {"messages": [{"role": "user", "content": "hi"}], "typical_p": 0.5, "mirostat": 2, "mirostat_tau": 3.0,
            "mirostat_eta": 0.2, "repeat_last_n": 16}
    request = openai_wire.parse_chat(body).request  # strict, as the server parses: none is "unrecognized"
    assert (request.typical_p, request.mirostat_mode, request.mirostat_tau, request.mirostat_eta,
            request.penalty_last_n) == (0.5, 2, 3.0, 0.2, 16)
    with pytest.raises(InvalidRequest):
        openai_wire.parse_chat({**body, "mirostat": 3})
    # a remote server: llama.cpp's names go out again; an OpenAI-only server refuses them instead of dropping them
    _, sent = openai_wire.openai_body(request, "m")
    assert (sent["typical_p"], sent["mirostat"], sent["repeat_last_n"]) == (0.5, 2, 16)
    with pytest.raises(UnsupportedFeature, match="typical_p"):
        openai_wire.openai_body(request, "m", sampling_extras=False)
    openai_wire.openai_body(GenerationRequest.of(prompt="x", temperature=0.3), "m", sampling_extras=False)


def test_dspy_extensions_take_the_sampling_fields() -> None:
    from dspy import lm15

    from velollm.adapters.dspy.lm15 import to_generation_request

    def request(**extensions: object) -> object:
        return lm15.Request(model="m", messages=[lm15.Message.user("hi")],
                            config=lm15.Config(extensions=extensions))

    converted = to_generation_request(request(typical_p=0.5, mirostat_mode=1, penalty_last_n=8))
    assert (converted.typical_p, converted.mirostat_mode, converted.penalty_last_n) == (0.5, 1, 8)
    with pytest.raises(UnsupportedFeature):
        to_generation_request(request(no_such_knob=1))


def test_litellm_completion_reaches_mirostat(gemma_path: Path) -> None:
    import litellm

    import velollm

    velollm.register_litellm()
    messages = [{"role": "user", "content": PROMPT}]

    def draws(**params: object) -> set[str]:
        return {litellm.completion(model="velollm/gemma3-270m", messages=messages, max_tokens=1, temperature=1.0,
                                   seed=seed, **params).choices[0].message.content for seed in range(6)}

    assert len(draws(top_k=1)) == 1
    assert len(draws(top_k=1, mirostat=2, mirostat_tau=10.0)) >= 3  # mirostat replaced top-k: it arrived


def test_server_takes_the_options_and_answers_400_for_bad_ones(gemma_path: Path) -> None:
    from fastapi.testclient import TestClient

    from velollm.pool import ModelPool
    from velollm.server.app import ServerConfig, create_app

    pool = ModelPool()
    try:
        client = TestClient(create_app(ServerConfig(models={"gemma": "gemma3-270m"},
                                                    load_options={"n_ctx": 256, "n_threads": 1}), pool=pool))

        def draw(**params: object) -> set[str]:
            out = set()
            for seed in range(6):
                response = client.post("/v1/completions", json={"model": "gemma", "prompt": PROMPT, "max_tokens": 1,
                                                                 "temperature": 1.0, "seed": seed, **params})
                assert response.status_code == 200, response.text
                out.add(response.json()["choices"][0]["text"])
            return out

        assert len(draw(top_k=1)) == 1
        assert len(draw(top_k=1, mirostat=1, mirostat_tau=10.0)) >= 3  # mirostat arrived and replaced top-k
        for bad in ({"mirostat": 7}, {"typical_p": 0}, {"repeat_last_n": -5}):
            response = client.post("/v1/completions", json={"model": "gemma", "prompt": PROMPT, **bad})
            assert response.status_code == 400, (bad, response.text)
    finally:
        pool.close()
