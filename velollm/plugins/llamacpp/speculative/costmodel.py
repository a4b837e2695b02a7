"""Deciding how many tokens to draft (γ; 0 = do not speculate) from measured costs and observed acceptance.

On a GPU, verifying five tokens costs about as much as decoding one, so almost any draft pays. On a
compute-bound CPU, verifying b tokens costs nearly b times one token and a fixed draft length loses.
So nothing here assumes either: a step that drafts γ tokens and verifies them in one batch of γ+1
yields ``1 + min(L, γ)`` tokens, where L is how many leading draft tokens the target agrees with,
and costs ``C(γ+1) + d·γ`` single-token decodes (C: the measured batch-cost table, d: the drafter's
cost per token). γ = 0 yields one token for cost 1. We pick the γ with the most expected tokens per
unit time, and only speculate when that beats plain decoding by a margin.

The table is not smooth, so γ is chosen from it, never from a formula. On the 2-core AVX-512 machine
(Qwen2.5-Coder-1.5B Q4_K_M, medians of interleaved rounds) b = 1..12 cost 1, 1.69, 2.24, 2.67, 3.28,
3.91, 4.37, **6.08**, 6.49, 6.81, 7.13, 7.36 tokens: llama.cpp's repacked Q4_K kernels take rows in
blocks of 4 (a leftover row is a whole extra pass), and from 8 rows on its tiled K-quant matmul takes
the weights it does not repack (Q6_K: the output head, half of ffn_down and attn_v), slower than the
stock kernels at 8-12 rows on this CPU (``GGML_CPU_TILED_MM=0``: 8 rows 5.5 instead of 6.1; it is
read once per process and speeds long prompts up ~18 %, so velollm leaves it on). A verified token
costs ~0.55-0.65 of a decoded one however it is batched: even a draft that is always accepted gains
at most ~1.5x here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class CostTable:
    """Seconds to evaluate a batch of b tokens, b = 1..len(seconds), on one model.

    Ratios to b = 1 are what matters; absolute seconds only let online observations refine it.
    """

    seconds: list[float]

    def __post_init__(self) -> None:
        if not self.seconds or any(s <= 0 for s in self.seconds):
            raise ValueError("a cost table needs positive timings for b = 1..N")

    @classmethod
    def from_ratios(cls, ratios: Sequence[float], unit_s: float = 1.0) -> CostTable:
        return cls([r * unit_s for r in ratios])

    @property
    def max_batch(self) -> int:
        return len(self.seconds)

    @property
    def unit_s(self) -> float:
        return self.seconds[0]

    def relative(self, b: int) -> float:
        """Cost of a batch of ``b`` tokens in single-token decodes."""
        return self.seconds[b - 1] / self.seconds[0]

    def ratios(self) -> list[float]:
        return [round(self.relative(b), 3) for b in range(1, self.max_batch + 1)]

    def observe(self, b: int, seconds: float, weight: float = 0.1, max_step: float = 0.05) -> None:
        """Fold a timing seen during generation in: an EMA in log space whose steps are capped at ±5 %,
        so one slow spell (another process took the CPU) barely moves it, yet a table measured
        badly at load converges within a few dozen steps."""
        if not 1 <= b <= self.max_batch or seconds <= 0:
            return
        current = math.log(self.seconds[b - 1])
        step = max(-max_step, min(max_step, weight * (math.log(seconds) - current)))
        self.seconds[b - 1] = math.exp(current + step)


def paired_ratio(reference: Callable[[], float], candidate: Callable[[], float], repeats: int) -> float:
    """Median of candidate/reference timings taken back to back: a slow spell on a shared machine
    hits both halves of a pair alike, so ratios stay sound where absolute timings do not."""
    ratios = []
    for _ in range(max(repeats, 1)):
        ref = reference()
        ratios.append(candidate() / ref)
    return statistics.median(ratios)


def measure_batch_costs(decode: Callable[[int], float], max_batch: int, repeats: int = 5) -> CostTable:
    """Time ``decode(b)`` (which returns the seconds one batch of b tokens took) for b = 1..max_batch.

    ``repeats`` rounds, each timing every size once (in ascending order, then descending, so drift
    spreads over all sizes alike); each size keeps its median. A slow spell that hits one size in one
    round moves nothing (a median of three back-to-back pairs moved by up to 30 %), and the fastest
    time is no better: a single token has a fast tail that made every ratio ~10 % too high. Ratios
    are held to [1, b] (a batch never costs less than one token, nor more than b of them); the
    online refinement (:meth:`CostTable.observe`) takes them on from there.
    """
    decode(1)  # warm the compute graph and caches
    times: list[list[float]] = [[] for _ in range(max_batch)]
    for r in range(max(repeats, 1)):
        order = range(1, max_batch + 1) if r % 2 == 0 else range(max_batch, 0, -1)
        for b in order:
            times[b - 1].append(decode(b))
    typical = [statistics.median(t) for t in times]
    unit = typical[0]
    ratios = [min(max(t / unit, 1.0), float(b)) for b, t in enumerate(typical, start=1)]
    return CostTable.from_ratios(ratios, unit)


@dataclass
class AcceptanceModel:
    """How far the target tends to agree with one drafting source: P(L ≥ j) for j = 1..max_len.

    Kept as per-position acceptance counts (a Kaplan–Meier estimate), so a draft of γ tokens that was
    fully accepted, which says only L ≥ γ, counts correctly. Counts decay so recent behaviour wins:
    the model re-decides as the text moves between copying and free writing. ``prior`` is the
    per-position acceptance assumed before any evidence, worth ``prior_weight`` observations.
    """

    max_len: int
    prior: float = 0.5
    prior_weight: float = 2.0
    decay: float = 0.95
    hits: list[float] = field(default_factory=list)
    trials: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hits = self.hits or [0.0] * self.max_len
        self.trials = self.trials or [0.0] * self.max_len

    def observe(self, drafted: int, accepted: int) -> None:
        """One verified (or counterfactually checked) draft: ``accepted`` of ``drafted`` leading tokens agreed."""
        drafted = min(drafted, self.max_len)
        accepted = min(accepted, drafted)
        for j in range(min(accepted + 1, drafted)):
            self.hits[j] *= self.decay
            self.trials[j] = self.trials[j] * self.decay + 1.0
            if j < accepted:
                self.hits[j] += 1.0

    def forget(self, factor: float = 0.5) -> None:
        """Move back toward the prior (used when a source went unobserved for a while)."""
        self.hits = [h * factor for h in self.hits]
        self.trials = [t * factor for t in self.trials]

    def rates(self) -> list[float]:
        w = self.prior_weight
        return [(h + self.prior * w) / (t + w) for h, t in zip(self.hits, self.trials, strict=True)]

    def survival(self) -> list[float]:
        """P(L ≥ j) for j = 1..max_len."""
        out, p = [], 1.0
        for rate in self.rates():
            p *= rate
            out.append(p)
        return out

    def snapshot(self) -> dict[str, object]:
        return {"rates": [round(r, 3) for r in self.rates()], "evidence": round(sum(self.trials), 1)}


@dataclass(frozen=True)
class Choice:
    """What the cost model decided for one step."""

    gamma: int
    rate: float  # expected tokens per single-token decode time; 1.0 = plain decoding
    expected_tokens: float
    cost: float  # in single-token decodes


PLAIN = Choice(gamma=0, rate=1.0, expected_tokens=1.0, cost=1.0)


def expected_tokens(survival: Sequence[float], gamma: int) -> float:
    return 1.0 + sum(survival[:gamma])


def step_cost(table: CostTable, gamma: int, draft_cost: float) -> float:
    return table.relative(gamma + 1) + draft_cost * gamma


def choose_gamma(table: CostTable, survival: Sequence[float], *, draft_cost: float = 0.0, max_gamma: int,
                 min_gain: float = 1.0, force: bool = False) -> Choice:
    """The γ with the most expected tokens per unit time.

    Without ``force`` the answer is γ = 0 unless the best γ beats plain decoding by ``min_gain``;
    with ``force`` (a forced mode) the best γ ≥ 1 is returned even when it loses.
    """
    limit = min(max_gamma, table.max_batch - 1, len(survival))
    best: Choice | None = None
    for gamma in range(1, limit + 1):
        tokens = expected_tokens(survival, gamma)
        cost = step_cost(table, gamma, draft_cost)
        if best is None or tokens / cost > best.rate:
            best = Choice(gamma, tokens / cost, tokens, cost)
    if best is None:
        return PLAIN
    if force or best.rate >= min_gain:
        return best
    return PLAIN


def ceiling(table: CostTable, *, draft_cost: float = 0.0, max_gamma: int) -> Choice:
    """The best case: every drafted token accepted. If this cannot beat 1.0, the source can never pay."""
    return choose_gamma(table, [1.0] * max_gamma, draft_cost=draft_cost, max_gamma=max_gamma, force=True)
