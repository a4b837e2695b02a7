"""When the adapter tries again, and how long it waits.

Two failures heal on a second try: an answer that did not parse (the next attempt tells the
model what was wrong — no wait needed) and a transient backend failure (a full queue, a crashed
decode — wait with exponential backoff). Everything else (model missing, bad request, a bug)
is raised at once: repeating it would only repeat the error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


def should_retry(exc: BaseException) -> bool:
    return isinstance(exc, AdapterParseError) or is_transient(exc)


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

    def _options(self) -> dict:
        return dict(stop=stop_after_attempt(self.max_attempts), retry=retry_if_exception(should_retry),
                    wait=self._wait, reraise=True, before_sleep=before_sleep_log(logger, logging.INFO))

    def retrying(self) -> Retrying:
        return Retrying(**self._options())

    def aretrying(self) -> AsyncRetrying:
        return AsyncRetrying(**self._options())
