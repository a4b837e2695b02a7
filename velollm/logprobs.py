"""Token log-probabilities from the logits an engine already has.

An engine's decode loop calls :meth:`LogprobRecorder.on_logits` with the logits row it sampled
from and the token it chose (see /tmp/team/INTERFACES.md: ``on_logits(row, token)``); the engine
attaches :meth:`LogprobRecorder.take` to each chunk it yields. Log-probabilities are those of the
model's own distribution (a float64 log-softmax of the raw logits), before penalties, temperature
or a grammar reshape it, as OpenAI reports them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from velollm.engine import TokenLogprob, TopLogprob


def log_softmax(row: np.ndarray) -> np.ndarray:
    """``log p`` of every token, in float64 (float32 loses the small probabilities' digits)."""
    logits = np.asarray(row, dtype=np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def top_ids(logprobs: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most likely token ids, most likely first (ties by lower id)."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    k = min(k, logprobs.size)
    part = np.argpartition(-logprobs, k - 1)[:k]
    return part[np.lexsort((part, -logprobs[part]))]


class LogprobRecorder:
    """Collects one :class:`TokenLogprob` per generated token for one sequence."""

    def __init__(self, top: int, piece: Callable[[int], bytes]) -> None:
        self.top = top
        self._piece = piece
        self._pending: list[TokenLogprob] = []

    def _entry(self, token: int, logprob: float) -> dict[str, object]:
        raw = self._piece(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw), "id": token}

    def on_logits(self, row: np.ndarray, token: int) -> None:
        """Record ``token``, chosen at the step whose logits are ``row``."""
        logprobs = log_softmax(row)
        top = [TopLogprob(**self._entry(int(t), float(logprobs[t]))) for t in top_ids(logprobs, self.top)]
        self._pending.append(TokenLogprob(**self._entry(int(token), float(logprobs[token])), top_logprobs=top))

    def take(self) -> list[TokenLogprob]:
        """The tokens recorded since the last call (for the chunk about to be yielded)."""
        out, self._pending = self._pending, []
        return out


def recorder_for(request: object, piece: Callable[[int], bytes]) -> LogprobRecorder | None:
    """A recorder when the request asks for log-probabilities, else ``None``."""
    if not getattr(request, "logprobs", False):
        return None
    return LogprobRecorder(int(getattr(request, "top_logprobs", 0) or 0), piece)
