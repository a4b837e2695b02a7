"""When the adapter tries again, how long it waits, and what it changes.

Two failures heal on a second try: an answer that did not parse (the next attempt tells the
model what was wrong — no wait needed) and a transient backend failure (a full queue, a crashed
decode — wait with exponential backoff). Everything else (model missing, bad request, a bug)
is raised at once: repeating it would only repeat the error.

One layer owns each kind of retry, so they never multiply: transient failures are the LM's
(``dspy.LM(num_retries=...)``) and the adapter retries them only when the LM does not
(``num_retries=0``); parse failures are the adapter's alone. A retry never resends the same
request: :func:`next_changes` says what changes (the error fed back, a larger ``max_tokens``
when the answer was cut, a frequency penalty when it repeated itself, the other output format),
and the adapter records it in the LM's history entry under ``"velollm_retry"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dspy.utils.exceptions import AdapterParseError, is_retryable_lm_error
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from velollm.adapters.dspy.lm15 import velollm_cause

logger = logging.getLogger("velollm.adapters")


def is_transient(exc: BaseException) -> bool:
    """A backend failure that may succeed later: velollm's ``retryable`` flag, else DSPy's view."""
    cause = velollm_cause(exc)
    if cause is not None:
        return cause.retryable
    return isinstance(exc, Exception) and is_retryable_lm_error(exc)


def should_retry(exc: BaseException, lm_retries: int = 0) -> bool:
    """Parse failures always; transient errors only when the LM does not retry them itself."""
    return isinstance(exc, AdapterParseError) or (lm_retries == 0 and is_transient(exc))


def repeats_itself(text: str, *, min_count: int = 5) -> bool:
    """A line (or a short phrase) that comes back again and again: the answer looped."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and max(lines.count(line) for line in set(lines)) >= min_count:
        return True
    words = text.split()
    grams = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
    return bool(grams) and max(grams.count(g) for g in set(grams)) >= 2 * min_count


def next_changes(attempt: int, *, answer: str, hit_max_tokens: bool, max_tokens: int | None,
                 can_switch_format: bool) -> dict[str, Any]:
    """What attempt ``attempt`` (2, 3, ...) changes after a parse failure, besides the fed-back error.

    Keys: ``max_tokens`` (doubled when the answer was cut), ``frequency_penalty`` (when it
    repeated itself), ``switch_format`` (from the third attempt, or when nothing else applies and
    the format can change).
    """
    changes: dict[str, Any] = {}
    if hit_max_tokens and max_tokens:
        changes["max_tokens"] = min(2 * max_tokens, 8192)
    if repeats_itself(answer):
        changes["frequency_penalty"] = 0.5
    if can_switch_format and attempt >= 3:
        changes["switch_format"] = True
    return changes


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` LM calls at most per prediction; backoff applies to transient errors only."""

    max_attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, AdapterParseError):
            return 0.0
        return wait_exponential(multiplier=self.backoff_s, max=self.max_backoff_s)(state)

    def _options(self, lm_retries: int) -> dict:
        return dict(stop=stop_after_attempt(self.max_attempts),
                    retry=retry_if_exception(lambda exc: should_retry(exc, lm_retries)),
                    wait=self._wait, reraise=True, before_sleep=before_sleep_log(logger, logging.INFO))

    def retrying(self, lm_retries: int = 0) -> Retrying:
        """``lm_retries``: the LM's own transient retries (then the adapter leaves those to it)."""
        return Retrying(**self._options(lm_retries))

    def aretrying(self, lm_retries: int = 0) -> AsyncRetrying:
        return AsyncRetrying(**self._options(lm_retries))
