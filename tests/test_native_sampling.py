"""The native sampling pipeline, one stage at a time, on hand-built logits with known answers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from velollm.engine import GenerationRequest
from velollm.errors import InvalidRequest
from velollm.plugins.native import sampling as S


def cands(values: list[float]) -> S.Candidates:
    return S.Candidates.from_logits(np.array(values, dtype=np.float32))


def logits_of(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def test_penalties_repeat_frequency_presence() -> None:
    c = S.penalties(cands([2.0, -1.0, 0.5, 3.0]), history=[0, 0, 1], repeat=2.0, frequency=0.1, presence=0.5)
    # token 0: positive -> divided by 2, then 2 * 0.1 + 0.5; token 1: negative -> multiplied by 2, then 0.1 + 0.5
    np.testing.assert_allclose(c.logits, [2.0 / 2 - 0.7, -1.0 * 2 - 0.6, 0.5, 3.0], rtol=1e-6)


def test_penalties_off_or_empty_history_change_nothing() -> None:
    base = cands([1.0, 2.0])
    assert S.penalties(base, [0, 1], 1.0, 0.0, 0.0) is base
    assert S.penalties(base, [], 1.3, 0.2, 0.2) is base


def test_penalties_on_a_subset_find_tokens_by_id() -> None:
    subset = S.top_k(cands([0.0, 5.0, 1.0, 4.0]), 2)  # ids [1, 3]
    out = S.penalties(subset, [3], repeat=2.0, frequency=0.0, presence=0.0)
    assert dict(zip(out.ids.tolist(), out.logits.tolist(), strict=True)) == {1: 5.0, 3: 2.0}


def test_top_k_keeps_the_k_best_sorted() -> None:
    c = S.top_k(cands([0.1, 3.0, -2.0, 2.5, 1.0]), 3)
    assert c.ids.tolist() == [1, 3, 4] and c.sorted
    assert len(S.top_k(cands([1.0, 2.0]), 0)) == 2  # 0 disables
    assert S.top_k(cands([1.0, 2.0]), 10).ids.tolist() == [1, 0]


def test_top_p_keeps_the_smallest_head_with_enough_mass() -> None:
    probs = [0.05, 0.5, 0.15, 0.3]
    assert S.top_p(cands(logits_of(probs)), 0.75).ids.tolist() == [1, 3]
    assert S.top_p(cands(logits_of(probs)), 0.85).ids.tolist() == [1, 3, 2]
    assert len(S.top_p(cands(logits_of(probs)), 1.0)) == 4  # 1.0 disables


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    assert sorted(S.min_p(cands(logits_of(probs)), 0.2).ids.tolist()) == [0, 1, 2]  # keeps p >= 0.1
    assert sorted(S.min_p(cands(logits_of(probs)), 0.7).ids.tolist()) == [0]
    assert len(S.min_p(cands(logits_of(probs)), 0.0)) == 4


def test_typical_keeps_tokens_closest_to_the_entropy() -> None:
    # H = 1.2799 nats; |-ln p - H| = [0.364, 0.076, 0.330, 1.023] -> order 1, 2, 0, 3
    c = S.typical(cands(logits_of([0.4, 0.3, 0.2, 0.1])), 0.45)
    assert c.ids.tolist() == [1, 2]
    assert len(S.typical(cands(logits_of([0.4, 0.3, 0.2, 0.1])), 1.0)) == 4


def test_temperature_scales_and_zero_keeps_argmax() -> None:
    np.testing.assert_allclose(S.temperature(cands([2.0, -4.0]), 2.0).logits, [1.0, -2.0])
    hot = S.temperature(cands([1.0, 3.0, 2.0]), 0.0)
    assert np.isfinite(hot.logits).tolist() == [False, True, False]


def test_greedy_takes_the_first_of_equal_maxima() -> None:
    assert S.greedy(cands([1.0, 5.0, 5.0, 2.0])) == 1


def test_softmax_sorts_and_normalises() -> None:
    c = S.softmax(cands(logits_of([0.2, 0.5, 0.3])))
    assert c.ids.tolist() == [1, 2, 0]
    np.testing.assert_allclose(c.probs, [0.5, 0.3, 0.2], rtol=1e-5)


def test_pick_follows_the_distribution_and_the_seed() -> None:
    probs = [0.7, 0.2, 0.1]
    draws = [S.pick(cands(logits_of(probs)), rng) for rng in [np.random.default_rng(7)] for _ in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.03)
    again = [S.pick(cands(logits_of(probs)), rng) for rng in [np.random.default_rng(7)] for _ in range(4000)]
    assert again == draws


def test_min_p_looks_at_logits_before_temperature() -> None:
    """llama.cpp's order: min-p then temperature, so a high temperature cannot revive cut tokens."""
    params = S.SamplingParams(temperature=100.0, top_k=0, top_p=1.0, min_p=0.1, seed=3)
    sampler = S.Sampler(params)
    seen = {sampler.sample(np.array([0.0, -1.0, -5.0], np.float32)) for _ in range(300)}
    assert seen == {0, 1}


def test_seeded_sampler_is_reproducible() -> None:
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    params = S.SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.0, seed=1234)
    run_a, run_b = S.Sampler(params), S.Sampler(params)
    a = [run_a.sample(logits) for _ in range(50)]
    b = [run_b.sample(logits) for _ in range(50)]
    assert a == b
    assert len(set(a)) > 1  # it does sample, not argmax
    other = S.Sampler(S.SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.0, seed=4321))
    assert [other.sample(logits) for _ in range(50)] != a


def test_sampler_repeat_penalty_window() -> None:
    """With a repeat penalty the sampler avoids what it just produced, even greedily."""
    params = S.SamplingParams(temperature=0.0, repeat_penalty=10.0, penalty_last_n=1)
    sampler = S.Sampler(params)
    logits = np.array([2.0, 1.5, 0.0], np.float32)
    assert [sampler.sample(logits) for _ in range(4)] == [0, 1, 0, 1]


def test_mirostat_v2_truncates_by_surprise_and_updates_mu() -> None:
    params = S.SamplingParams(temperature=1.0, mirostat=2, mirostat_tau=0.5, mirostat_eta=0.1, seed=0)
    sampler = S.Sampler(params)
    assert sampler.mu == 1.0
    # only the top token (p = 0.7, surprise 0.51 bits) is below mu = 1 bit
    token = sampler.sample(np.array(logits_of([0.7, 0.2, 0.1]), np.float32))
    assert token == 0
    assert sampler.mu == pytest.approx(1.0 - 0.1 * (0.0 - 0.5))


def test_mirostat_v1_keeps_k_tokens_from_the_zipf_estimate_and_updates_mu() -> None:
    # a Zipf distribution with exponent 1.5 over 1000 tokens: s_hat recovers 1.5 from the top tokens
    zipf = np.array([1.0 / (i + 1) ** 1.5 for i in range(1000)])
    logits = np.log(zipf / zipf.sum()).astype(np.float32)
    low = S.Sampler(S.SamplingParams(temperature=1.0, mirostat=1, mirostat_tau=0.25, mirostat_eta=0.1, seed=0))
    assert low.mu == 0.5
    # k = (0.5 * 2^0.5 / (1 - 1000^-0.5))^(1/1.5) = 0.9 -> 1: only the top token survives
    assert {S.Sampler(low.params).sample(logits) for _ in range(20)} == {0}
    surprise = -math.log2(1.0)  # the one survivor is renormalised to p = 1
    assert low.sample(logits) == 0 and low.mu == pytest.approx(0.5 - 0.1 * (surprise - 0.25))
    high = S.SamplingParams(temperature=1.0, mirostat=1, mirostat_tau=8.0, seed=0)
    assert len({S.Sampler(dataclasses.replace(high, seed=s)).sample(logits) for s in range(40)}) > 5


def test_sampling_params_from_request_fields_and_validation() -> None:
    req = GenerationRequest(prompt="x", temperature=0.5, typical_p=0.9, mirostat_mode=1, penalty_last_n=8,
                            mirostat_tau=3.0, mirostat_eta=0.2)
    params = S.SamplingParams.from_request(req)
    assert (params.temperature, params.typical_p, params.mirostat, params.penalty_last_n) == (0.5, 0.9, 1, 8)
    assert (params.mirostat_tau, params.mirostat_eta) == (3.0, 0.2)
    lifted = S.SamplingParams.from_request(GenerationRequest(prompt="x", extra={"typical_p": 0.8, "mirostat": 2}))
    assert (lifted.typical_p, lifted.mirostat) == (0.8, 2)  # the old extra spelling still works
    for bad in ({"typical_p": "high"}, {"mirostat": 3}, {"typical_p": 0.0}, {"mirostat_tau": -1.0}):
        with pytest.raises(InvalidRequest):
            GenerationRequest.of(prompt="x", extra=bad)
