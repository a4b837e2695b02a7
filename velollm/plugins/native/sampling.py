"""The sampling pipeline, stage by stage, with llama.cpp's semantics and order.

The llama.cpp engine builds this chain for every generation (:mod:`velollm.plugins.llamacpp.sampling`):
penalties -> top-k -> typical -> top-p -> min-p -> temperature -> random pick; temperature 0
swaps the tail for greedy argmax (after the penalties), and mirostat (v1 or v2) replaces
everything after the temperature, as in llama.cpp's ``common_sampler``. Each stage here takes
and returns a :class:`Candidates` set, so stages can be tested on hand-built logits and composed freely.

Note the order: top-p and min-p look at the distribution *before* temperature, as in llama.cpp.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from velollm.errors import InvalidRequest

#: llama.cpp's mirostat v1 estimates the Zipf exponent from this many top tokens (its default)
MIROSTAT_M = 100


@dataclass
class Candidates:
    """Token ids with logits (and probabilities once a stage computes them); ``sorted`` means
    descending by logit, as llama.cpp's ``llama_token_data_array.sorted``."""

    ids: np.ndarray
    logits: np.ndarray
    probs: np.ndarray | None = None
    sorted: bool = False
    dense: bool = False  # ids are exactly 0..n-1 in order, so a token id is its own index

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> Candidates:
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        return cls(np.arange(logits.size, dtype=np.int64), logits.copy(), dense=True)

    def take(self, index: np.ndarray | slice, *, sorted: bool | None = None) -> Candidates:
        return Candidates(self.ids[index], self.logits[index], None if self.probs is None else self.probs[index],
                          self.sorted if sorted is None else sorted)

    def __len__(self) -> int:
        return int(self.ids.size)


def sort(c: Candidates) -> Candidates:
    if c.sorted:
        return c
    order = np.argsort(-c.logits, kind="stable")
    return c.take(order, sorted=True)


def softmax(c: Candidates) -> Candidates:
    """Sort descending and set probabilities (llama_sampler_softmax_impl)."""
    c = sort(c)
    finite = c.logits - c.logits[0]
    e = np.exp(finite.astype(np.float64))
    c.probs = (e / e.sum()).astype(np.float32)
    return c


def penalties(c: Candidates, history: list[int], repeat: float, frequency: float, presence: float) -> Candidates:
    """Repeat (divide positive / multiply negative logits), frequency (count-weighted) and presence
    penalties for tokens in ``history`` (the last ``penalty_last_n`` sampled tokens)."""
    if not history or (repeat == 1.0 and frequency == 0.0 and presence == 0.0):
        return c
    counts = Counter(history)
    position = None if c.dense else {int(t): i for i, t in enumerate(c.ids)}
    logits = c.logits.copy()
    for token, count in counts.items():
        i = token if position is None else position.get(token)
        if i is None or not 0 <= i < logits.size:
            continue
        value = logits[i]
        value = value * repeat if value <= 0 else value / repeat
        logits[i] = value - np.float32(count * frequency + (count > 0) * presence)
    return Candidates(c.ids, logits, None, False, c.dense)


def top_k(c: Candidates, k: int) -> Candidates:
    """Keep the ``k`` highest logits; ``k <= 0`` disables."""
    if k <= 0 or k >= len(c):
        return sort(c) if k > 0 else c
    part = np.argpartition(-c.logits, k - 1)[:k]
    order = part[np.argsort(-c.logits[part], kind="stable")]
    return c.take(order, sorted=True)


def typical(c: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy, up to mass p."""
    if p >= 1.0:
        return c
    c = softmax(c)
    probs = c.probs.astype(np.float64)  # type: ignore[union-attr]
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(probs)
        entropy = -np.nansum(probs * logp)
        shifted = np.abs(-logp - entropy)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(probs[order])
    last = len(order)
    for i, value in enumerate(cum):
        if value > p and (min_keep == 0 or i >= min_keep - 1):
            last = i + 1
            break
    return c.take(order[:last], sorted=False)


def top_p(c: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Nucleus: the smallest head of the sorted distribution with mass >= p."""
    if p >= 1.0:
        return c
    c = softmax(c)
    cum = np.cumsum(c.probs.astype(np.float64))  # type: ignore[union-attr]
    hits = np.nonzero((cum >= p) & (np.arange(1, cum.size + 1) >= min_keep))[0]
    last = int(hits[0]) + 1 if hits.size else len(c)
    return c.take(slice(0, last))


def min_p(c: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Drop tokens with probability below ``p`` times the top token's (compared as logits)."""
    if p <= 0.0 or not len(c):
        return c
    floor = np.float32(c.logits.max() + np.float32(math.log(p)))
    if not c.sorted:
        keep = np.nonzero(c.logits >= floor)[0]
        if keep.size and keep.size >= min_keep:
            return c.take(keep)
    c = sort(c)
    n = 1
    while n < len(c) and not (c.logits[n] < floor and n >= min_keep):
        n += 1
    return c.take(slice(0, n))


def temperature(c: Candidates, temp: float) -> Candidates:
    """Divide logits by ``temp``; ``temp <= 0`` keeps only the argmax."""
    if temp <= 0.0:
        best = int(np.argmax(c.logits))
        logits = np.full_like(c.logits, -np.inf)
        logits[best] = c.logits[best]
        return Candidates(c.ids, logits, None, c.sorted, c.dense)
    return Candidates(c.ids, (c.logits / np.float32(temp)).astype(np.float32), None, c.sorted, c.dense)


def greedy(c: Candidates) -> int:
    """The id with the highest logit (the first one on ties, as llama.cpp's greedy sampler)."""
    return int(c.ids[int(np.argmax(c.logits))])


def pick(c: Candidates, rng: np.random.Generator) -> int:
    """Draw one id from the softmax of the candidates."""
    c = softmax(c)
    probs = c.probs.astype(np.float64)  # type: ignore[union-attr]
    cum = np.cumsum(probs)
    index = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(c.ids[min(index, len(c) - 1)])


@dataclass
class SamplingParams:
    """The request's sampling settings (names as in :class:`velollm.engine.GenerationRequest`)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None

    @classmethod
    def from_request(cls, request: object) -> SamplingParams:
        """Read a :class:`~velollm.engine.GenerationRequest` (which validated the ranges already)."""
        r: Any = request
        params = cls(
            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p, typical_p=r.typical_p,
            repeat_penalty=r.repeat_penalty, frequency_penalty=r.frequency_penalty,
            presence_penalty=r.presence_penalty, penalty_last_n=r.penalty_last_n, mirostat=r.mirostat_mode,
            mirostat_tau=r.mirostat_tau, mirostat_eta=r.mirostat_eta, seed=r.seed,
        )
        if params.mirostat not in (0, 1, 2):
            raise InvalidRequest(f"mirostat_mode={params.mirostat}: 0 (off), 1 or 2")
        if not 0.0 < params.typical_p <= 1.0:
            raise InvalidRequest(f"typical_p must be in (0, 1], not {params.typical_p}")
        if params.penalty_last_n < -1:
            raise InvalidRequest("penalty_last_n must be -1 (whole history), 0 (off) or positive")
        if params.mirostat_tau <= 0 or params.mirostat_eta <= 0:
            raise InvalidRequest("mirostat_tau and mirostat_eta must be positive")
        return params


class Sampler:
    """One generation's sampler: the pipeline plus its state (RNG, penalty window, mirostat mu)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % (2**32))
        self.rng = np.random.default_rng(seed)
        window = params.penalty_last_n
        self.history: deque[int] = deque(maxlen=None if window < 0 else max(window, 0))
        self.mu = 2.0 * params.mirostat_tau

    def sample(self, logits: np.ndarray) -> int:
        p = self.params
        c = Candidates.from_logits(logits)
        if p.penalty_last_n != 0:
            c = penalties(c, list(self.history), p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
        if p.temperature == 0.0:
            token = greedy(c)
        elif p.mirostat == 1:
            token = self._mirostat_v1(temperature(c, p.temperature), len(logits))
        elif p.mirostat == 2:
            token = self._mirostat_v2(temperature(c, p.temperature))
        else:
            c = top_k(c, p.top_k)
            c = typical(c, p.typical_p)
            c = top_p(c, p.top_p)
            c = min_p(c, p.min_p)
            c = temperature(c, p.temperature)
            token = pick(c, self.rng)
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        if self.history.maxlen != 0:
            self.history.append(token)

    def _draw(self, c: Candidates) -> int:
        """Sample an index of the (softmaxed, sorted) candidates; mu moves toward tau by the surprise seen."""
        p = self.params
        cum = np.cumsum(c.probs.astype(np.float64))  # type: ignore[union-attr]
        index = min(int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right")), len(c) - 1)
        observed = -math.log2(max(float(c.probs[index]), 1e-30))  # type: ignore[index]
        self.mu -= p.mirostat_eta * (observed - p.mirostat_tau)
        return index

    def _mirostat_v1(self, c: Candidates, n_vocab: int) -> int:
        """Mirostat 1.0 (llama.cpp's): estimate the Zipf exponent s from the top tokens, keep the k
        tokens that make the expected surprise mu, sample, steer mu toward tau."""
        c = softmax(c)
        probs = c.probs.astype(np.float64)  # type: ignore[union-attr]
        m = min(MIROSTAT_M - 1, len(c) - 1)
        s_hat = 1.0
        if m > 0:
            i = np.arange(m, dtype=np.float64)
            t = np.log((i + 2) / (i + 1))
            with np.errstate(divide="ignore", invalid="ignore"):
                b = np.log(probs[:m] / probs[1:m + 1])
            ok = np.isfinite(b)
            if ok.any() and (t[ok] ** 2).sum() > 0:
                s_hat = float((t[ok] * b[ok]).sum() / (t[ok] ** 2).sum())
        eps = s_hat - 1.0
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            k = ((eps * 2.0 ** self.mu) / (1.0 - float(n_vocab) ** -eps)) ** (1.0 / s_hat)
        keep = len(c) if not np.isfinite(k) else min(max(int(k), 1), len(c))  # inf (s_hat = 1): keep all
        c = softmax(c.take(slice(0, keep)))
        return int(c.ids[self._draw(c)])

    def _mirostat_v2(self, c: Candidates) -> int:
        """Mirostat 2.0: cut tokens more surprising than mu, sample, steer mu toward tau."""
        c = softmax(c)
        with np.errstate(divide="ignore"):
            surprise = -np.log2(c.probs.astype(np.float64))  # type: ignore[union-attr]
        over = np.nonzero(surprise > self.mu)[0]
        c = c.take(slice(0, max(int(over[0]) if over.size else len(c), 1)))
        c = softmax(c)
        return int(c.ids[self._draw(c)])
