"""Teacher-forced parity between two implementations of one model, with the near-tie rule.

Free-running greedy sequences must never be compared across implementations, CPUs or devices:
kernels sum in different orders, and a near-tie flips one token and everything after it. So the
reference's tokens are fed to both sides, and at every position the other side's argmax must be
the reference's, unless the reference's own top-2 logit gap there is below :data:`NEAR_TIE`
(flips seen between AVX2 and AVX-512 builds sat at gaps of 0.01-0.17). The report also counts
the decisive positions, so a caller can insist there were enough to make the check mean something.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from velollm.plugins.llamacpp.agreement import NEAR_TIE


@dataclass
class Parity:
    """What a teacher-forced comparison found."""

    positions: int = 0
    decisive: int = 0  # positions whose reference top-2 gap is at least NEAR_TIE
    agreed: int = 0
    tolerated: list[tuple[int, float]] = field(default_factory=list)  # (position, gap) of near-tie flips
    failures: list[tuple[int, int, int, float]] = field(default_factory=list)  # (pos, ref, other, gap)
    max_abs_diff: float = 0.0
    min_cosine: float = 1.0

    def merge(self, other: Parity) -> Parity:
        return Parity(self.positions + other.positions, self.decisive + other.decisive, self.agreed + other.agreed,
                      self.tolerated + other.tolerated, self.failures + other.failures,
                      max(self.max_abs_diff, other.max_abs_diff), min(self.min_cosine, other.min_cosine))

    def summary(self) -> str:
        return (f"{self.agreed}/{self.positions} argmaxes agree ({self.decisive} decisive), "
                f"{len(self.tolerated)} near-tie flips tolerated, {len(self.failures)} failures "
                f"{self.failures[:3]}; logits max|diff| {self.max_abs_diff:.4f}, min cosine {self.min_cosine:.6f}")


def compare(reference: np.ndarray, other: np.ndarray) -> Parity:
    """Compare per-position logits (positions x vocab) of the reference and the other side."""
    reference, other = np.asarray(reference, np.float32), np.asarray(other, np.float32)
    assert reference.shape == other.shape, (reference.shape, other.shape)
    out = Parity(positions=len(reference))
    for pos, (ref, mine) in enumerate(zip(reference, other, strict=True)):
        top2 = np.partition(ref, -2)[-2:]
        gap = float(top2[1] - top2[0])
        want, got = int(np.argmax(ref)), int(np.argmax(mine))
        out.decisive += gap >= NEAR_TIE
        if want == got:
            out.agreed += 1
        elif gap < NEAR_TIE:
            out.tolerated.append((pos, gap))
        else:
            out.failures.append((pos, want, got, gap))
        cosine = float(ref @ mine / (np.linalg.norm(ref) * np.linalg.norm(mine)))
        out.max_abs_diff = max(out.max_abs_diff, float(np.abs(ref - mine).max()))
        out.min_cosine = min(out.min_cosine, cosine)
    return out


def llama_greedy(llama: Any, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt``, one decode per token, straight from llama.cpp's logits."""
    from velollm.plugins.llamacpp.runner import LlamaRunner

    runner = LlamaRunner(llama)
    runner.reset()
    runner.feed(prompt)
    out: list[int] = []
    for _ in range(n):
        out.append(runner.argmax(-1))
        runner.feed(out[-1:])
    runner.reset()
    return out


def llama_logits(llama: Any, tokens: list[int]) -> np.ndarray:
    """Logits at every position of ``tokens`` (one batch, fresh cache): positions x vocab, copied."""
    from velollm.plugins.llamacpp.runner import LlamaRunner

    runner = LlamaRunner(llama)
    runner.reset()
    runner.feed(tokens, all_logits=True)
    rows = np.stack([runner.logits(i).copy() for i in range(len(tokens))])
    runner.reset()
    return rows
