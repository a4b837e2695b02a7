"""Is an answer the target's own greedy answer? Exactly, or up to a near tie.

Speculation and the batch decoder verify several tokens in one ``llama_decode``. llama.cpp's CPU
kernels round differently with the number of rows (the repacked K-quant matmul takes rows in blocks
of 4, the tiled one from 8 rows on; measured on Qwen2.5-Coder-1.5B Q4_K_M: a batch's logits differ
from one-token decoding's by up to ~0.5, while 2-3 rows match to the bit), and the KV cache keeps
what a batch wrote. So where greedy's top two tokens are nearly tied, a batched path may pick the
other one and the answers part from there: the same thing a different CPU (AVX2 instead of
AVX-512) or a GPU does to plain decoding. A drafted token accepted against a clear choice of the
target would be a real error. This replays greedy decoding one token at a time, from a cold cache
as a plain request runs, and tells the two apart by the reference's top-2 logit gap where the
texts first differ (the rule tests/parity_support.py applies to kernels, :data:`NEAR_TIE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from velollm.engine import GenerationRequest
from velollm.errors import UnsupportedFeature

#: A top-2 logit gap below this is a near tie (flips between AVX2 and AVX-512 builds sat at 0.01-0.17).
NEAR_TIE = 0.25


@dataclass(frozen=True)
class Step:
    """One token of the reference: its bytes, and by how much it beat the best other allowed token."""

    piece: bytes
    gap: float


@dataclass(frozen=True)
class Divergence:
    """Where ``other`` first differs from the greedy reference."""

    offset: int  # the first differing byte
    position: int  # the reference token that covers it
    gap: float  # the reference's top-2 gap at that token (among the tokens the constraint allows)
    reference: bytes  # that token's bytes
    other: bytes  # what ``other`` has there instead (as many bytes)

    @property
    def near_tie(self) -> bool:
        return self.gap < NEAR_TIE

    def describe(self) -> str:
        kind = "near tie" if self.near_tie else "DECISIVE"
        return (f"{kind}: parts at byte {self.offset} (token {self.position}): greedy {self.reference!r} "
                f"by {self.gap:.3f} logits, the other {self.other!r}")


def greedy_steps(engine: Any, request: GenerationRequest, max_bytes: int | None = None) -> list[Step]:
    """The greedy answer to ``request`` decoded one token at a time from a cold cache, with each
    token's margin. Under a JSON schema or grammar the constraint picks among the tokens it allows
    (budgets and loop closing included, as in plain constrained decoding). ``max_bytes``: stop once
    the answer is that long. Holds the engine for the whole replay. A llama.cpp engine without
    parallel decoding only: the batch decoder runs on a context of its own."""
    from velollm.plugins.llamacpp.engine import LlamaCppEngine

    if not isinstance(engine, LlamaCppEngine) or engine._batch is not None:
        raise UnsupportedFeature("greedy replay needs a llama.cpp engine loaded with parallel=1")
    engine.reset_cache()
    prompt = engine.prompt_tokens(request)
    budget = engine.context_length - len(prompt)
    max_new = min(request.max_tokens or budget, budget)
    state = engine.constraint_state(request, max_new)
    steps: list[Step] = []
    size = 0
    with engine._lock:
        runner = engine._get_runner()
        runner.refresh()
        runner.sync(prompt)
        for _ in range(max_new):
            row = runner.logits(-1)
            if state is None:
                token, ranked = int(np.argmax(row)), row
            else:
                token = state.pick_greedy(row)
                ranked = np.array(row, dtype=np.float32, copy=True)
                state.mask(ranked)
            top2 = np.partition(ranked, -2)[-2:]
            gap = float(top2[1] - top2[0]) if np.isfinite(top2[0]) else float("inf")
            if engine.is_end_of_generation(token):
                steps.append(Step(b"", gap))
                break
            piece = engine._piece(token)
            steps.append(Step(piece, gap))
            size += len(piece)
            if state is not None:
                state.advance(token)
                if state.done:
                    break
            if max_bytes is not None and size > max_bytes:
                break
            runner.feed([token])
    engine.reset_cache()
    return steps


def first_divergence(steps: list[Step], other: str) -> Divergence | None:
    """Where ``other`` parts from the reference ``steps`` (None: the same text). A text that stops
    where the reference goes on (or the reverse) parts at the token that ended the shorter one."""
    theirs = other.encode()
    at = 0
    for position, step in enumerate(steps):
        piece = step.piece or b"<end>"
        mine = theirs[at:at + len(step.piece)]
        if step.piece and mine == step.piece:
            at += len(step.piece)
            continue
        if not step.piece and at == len(theirs):
            return None  # both ended here
        differ = next((i for i, (a, b) in enumerate(zip(step.piece, mine, strict=False)) if a != b),
                      min(len(step.piece), len(mine)))
        return Divergence(at + differ, position, step.gap, piece, theirs[at:at + max(len(step.piece), 1)])
    if at == len(theirs):
        return None
    last = steps[-1] if steps else Step(b"", float("inf"))
    return Divergence(at, len(steps) - 1, last.gap, b"<end>", theirs[at:at + 8])


def agrees(engine: Any, request: GenerationRequest, text: str) -> Divergence | None:
    """None when ``text`` is the greedy answer, or where it parts from it (see :class:`Divergence`;
    callers accept a divergence whose ``near_tie`` is true)."""
    return first_divergence(greedy_steps(engine, request, max_bytes=len(text.encode()) + 64), text)
