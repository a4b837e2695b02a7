"""The cost model, acceptance estimates and prompt lookup: pure logic on given tables and sequences."""

from __future__ import annotations

import math

import pytest

from velollm.errors import IncompatibleDraftModel
from velollm.plugins.llamacpp.speculative.costmodel import (
    PLAIN,
    AcceptanceModel,
    CostTable,
    ceiling,
    choose_gamma,
    measure_batch_costs,
)
from velollm.plugins.llamacpp.speculative.draft import VocabSummary, check_compatible
from velollm.plugins.llamacpp.speculative.lookup import PromptLookup

# measured on this 2-core machine for Qwen2.5-Coder-1.5B (issue 8): decode is close to compute-bound
CPU = CostTable.from_ratios([1.0, 1.43, 1.96, 2.34, 2.9])
# a GPU: verifying a few tokens costs barely more than decoding one
GPU = CostTable.from_ratios([1.0, 1.02, 1.04, 1.06, 1.08, 1.10, 1.12, 1.15, 1.2])


def geometric(alpha: float, n: int) -> list[float]:
    return [alpha ** j for j in range(1, n + 1)]


def test_cpu_table_high_acceptance_picks_the_best_gamma_by_hand() -> None:
    # expected tokens per cost: γ=1 1.95/1.43=1.364, γ=2 2.8525/1.96=1.455, γ=3 3.7099/2.34=1.585, γ=4 4.524/2.9=1.56
    choice = choose_gamma(CPU, geometric(0.95, 4), max_gamma=4)
    assert choice.gamma == 3
    assert choice.rate == pytest.approx((1 + 0.95 + 0.95**2 + 0.95**3) / 2.34)
    assert choice.expected_tokens == pytest.approx(1 + 0.95 + 0.95**2 + 0.95**3)
    assert choice.cost == pytest.approx(2.34)


def test_cpu_table_moderate_acceptance_turns_speculation_off() -> None:
    # α = 0.4: γ=1 gives 1.4/1.43 < 1, longer drafts are worse
    assert choose_gamma(CPU, geometric(0.4, 4), max_gamma=4) == PLAIN


def test_gpu_table_drafts_long_even_at_moderate_acceptance() -> None:
    choice = choose_gamma(GPU, geometric(0.8, 8), max_gamma=8)
    assert choice.gamma >= 6 and choice.rate > 3.0


def test_a_draft_model_costing_069_can_never_pay_on_the_cpu_table() -> None:
    best = ceiling(CPU, draft_cost=0.69, max_gamma=4)  # even with every draft token accepted
    assert best.rate < 1.0
    assert choose_gamma(CPU, [1.0] * 4, draft_cost=0.69, max_gamma=4) == PLAIN
    # on the GPU table the same draft pays
    assert choose_gamma(GPU, geometric(0.8, 8), draft_cost=0.1, max_gamma=8).gamma > 0


def test_forced_mode_drafts_even_when_it_loses_and_min_gain_guards_marginal_wins() -> None:
    forced = choose_gamma(CPU, geometric(0.4, 4), max_gamma=4, force=True)
    assert forced.gamma >= 1 and forced.rate < 1.0
    marginal = choose_gamma(CPU, geometric(0.5, 4), max_gamma=4)  # γ=1: 1.5/1.43 = 1.049
    assert marginal.gamma == 1 and marginal.rate == pytest.approx(1.5 / 1.43)
    assert choose_gamma(CPU, geometric(0.5, 4), max_gamma=4, min_gain=1.1) == PLAIN


def test_a_table_where_four_tokens_are_cheaper_than_three_is_used_as_measured() -> None:
    odd = CostTable.from_ratios([1.0, 1.41, 1.81, 1.59, 1.97])  # measured here on Qwen 1.5B
    assert choose_gamma(odd, geometric(0.8, 4), max_gamma=4).gamma == 3
    assert choose_gamma(odd, geometric(0.8, 4), max_gamma=2).gamma == 2  # a cap is respected


def test_gamma_is_limited_by_the_table_and_the_survival_list() -> None:
    short = CostTable.from_ratios([1.0, 1.01])
    assert choose_gamma(short, [1.0] * 8, max_gamma=8).gamma == 1
    assert choose_gamma(GPU, [0.99, 0.99], max_gamma=8).gamma == 2
    assert choose_gamma(CostTable([0.01]), [1.0], max_gamma=4) == PLAIN


def test_cost_table_rejects_nonsense_and_reports_ratios() -> None:
    with pytest.raises(ValueError):
        CostTable([])
    with pytest.raises(ValueError):
        CostTable([0.02, 0.0])
    table = CostTable([0.04, 0.06, 0.08])
    assert table.ratios() == [1.0, 1.5, 2.0] and table.unit_s == 0.04 and table.max_batch == 3


def test_online_observations_move_the_table_slowly_and_converge() -> None:
    table = CostTable([0.04, 0.2])  # b=2 measured 5x too slow at load (the machine was busy)
    table.observe(2, 10.0)  # one huge outlier moves it by at most 5 %
    assert table.seconds[1] == pytest.approx(0.2 * math.exp(0.05))
    for _ in range(200):
        table.observe(2, 0.056)
    assert table.relative(2) == pytest.approx(1.4, rel=0.02)
    table.observe(7, 1.0)  # sizes outside the table are ignored
    assert table.max_batch == 2


def test_measure_batch_costs_keeps_each_sizes_median_round_and_clamps() -> None:
    true = {1: 0.040, 2: 0.056, 3: 0.030, 4: 0.5}  # b=3 below one token and b=4 above 4 tokens are impossible
    calls: list[int] = []
    slow = {2, 7}  # a slow spell hits the first round's b=1 and the second round's b=3

    def decode(b: int) -> float:
        calls.append(b)
        return true[b] * (3.0 if len(calls) in slow else 1.0)

    table = measure_batch_costs(decode, 4, repeats=3)
    assert calls == [1, 1, 2, 3, 4, 4, 3, 2, 1, 1, 2, 3, 4]  # a warm-up, then rounds up, down, up
    assert table.ratios() == [1.0, 1.4, 1.0, 4.0]
    assert table.unit_s == pytest.approx(0.040)


def test_acceptance_model_counts_censored_drafts_correctly() -> None:
    m = AcceptanceModel(max_len=4, prior=0.5, prior_weight=2.0, decay=1.0)
    assert m.survival() == pytest.approx([0.5, 0.25, 0.125, 0.0625])  # the prior alone
    m.observe(drafted=2, accepted=2)  # says L >= 2 only: no failure anywhere
    m.observe(drafted=4, accepted=1)  # position 1 ok, position 2 failed, 3-4 unobserved
    assert m.trials == [2.0, 2.0, 0.0, 0.0] and m.hits == [2.0, 1.0, 0.0, 0.0]
    assert m.rates() == pytest.approx([(2 + 1) / 4, (1 + 1) / 4, 0.5, 0.5])
    assert m.survival() == pytest.approx([0.75, 0.375, 0.1875, 0.09375])
    assert m.snapshot()["evidence"] == 4.0


def test_acceptance_model_follows_recent_behaviour() -> None:
    m = AcceptanceModel(max_len=2, prior=0.5, decay=0.9)
    for _ in range(50):
        m.observe(2, 2)
    assert m.rates()[0] > 0.9
    for _ in range(30):
        m.observe(2, 0)
    assert m.rates()[0] < 0.2  # the text moved from copying to free writing: the estimate followed
    m.forget(0.0)
    assert m.rates() == [0.5, 0.5]


# --- prompt lookup ----------------------------------------------------------------------------
def test_lookup_proposes_the_continuation_of_the_most_recent_longest_match() -> None:
    lk = PromptLookup(max_ngram=3)
    lk.reset([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    # tail (1,2,3) occurred at 0..2 -> continuation 4,5,9
    assert lk.propose(3) == ([4, 5, 9], 3)
    lk.extend([6])
    # tail (2,3,6), (3,6) and (6,) never occurred before
    assert lk.propose(3) == ([], 0)
    lk.extend([2, 3])
    # (6,2,3) no; (2,3) most recently at 11..12 -> continuation 6, 2, 3
    assert lk.propose(3) == ([6, 2, 3], 2)


def test_lookup_never_matches_the_tail_itself_and_incremental_equals_rebuild() -> None:
    lk = PromptLookup(max_ngram=2)
    lk.reset([5, 6])
    assert lk.propose(4) == ([], 0)
    seq = [1, 2, 3, 1, 2, 4, 1, 2]
    a, b = PromptLookup(), PromptLookup()
    a.reset(seq)
    b.reset(seq[:3])
    b.extend(seq[3:6])
    b.extend(seq[6:])
    assert a.propose(5) == b.propose(5) == ([4, 1, 2], 2)
    assert a.propose(0) == ([], 0)
    with pytest.raises(ValueError):
        PromptLookup(max_ngram=1, min_ngram=2)


# --- vocabulary compatibility ------------------------------------------------------------------
def vocab(name: str, **changes: object) -> VocabSummary:
    base = dict(name=name, vocab_type=2, n_vocab=151936, bos=151643, eos=151645,
                texts={0: b"!", 1000: b"atus", 151643: b"<|endoftext|>"})
    base.update(changes)
    return VocabSummary(**base)  # type: ignore[arg-type]


def test_compatible_vocabularies_pass_and_padding_differences_are_tolerated() -> None:
    check_compatible(vocab("main"), vocab("draft"))
    check_compatible(vocab("main"), vocab("draft", n_vocab=151936 + 64))


@pytest.mark.parametrize("change,needle", [
    (dict(vocab_type=1), "tokenizer type"),
    (dict(n_vocab=262144), "vocabulary size"),
    (dict(bos=2), "BOS"),
    (dict(eos=1), "EOS"),
    (dict(texts={0: b"!", 1000: b"put", 151643: b"<|endoftext|>"}), "token texts differ"),
])
def test_each_incompatibility_is_named(change: dict, needle: str) -> None:
    with pytest.raises(IncompatibleDraftModel) as info:
        check_compatible(vocab("qwen"), vocab("gemma", **change))
    assert needle in str(info.value) and "gemma cannot draft for qwen" in str(info.value)
