"""Shared helpers for the DSPy integration tests (velollm.LM / velollm.Adapter).

Every LM here uses the same load options, so the process-wide pool loads each model once for
all test modules. The DSPy response cache is off unless a test is about the cache.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

import velollm

QWEN = "qwen2.5-coder-0.5b-instruct"
GEMMA = "gemma3-270m"
N_CTX = 2048
#: One thread per model: with several processes sharing few cores, llama.cpp's worker threads wait
#: on each other at every barrier and a 270M model drops from ~70 to <1 token/s; one thread does not.
N_THREADS = 1

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def lm(model: str = QWEN, **kwargs: Any) -> velollm.LM:
    kwargs.setdefault("cache", False)
    kwargs.setdefault("max_tokens", 128)
    return velollm.LM(model, n_ctx=N_CTX, n_threads=N_THREADS, **kwargs)


def adapter_suite() -> Any:
    """``benchmarks/adapter_suite.py`` as a module (the comparison's cases are the test's cases)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import adapter_suite

    return adapter_suite


class LMCalls(BaseCallback):
    """Counts LM calls as DSPy starts them, failed ones included, with the messages sent."""

    def __init__(self) -> None:
        self.messages: list[list[dict[str, Any]]] = []

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.messages.append(list(inputs.get("messages") or []))

    @property
    def count(self) -> int:
        return len(self.messages)


def counting(**settings: Any) -> tuple[LMCalls, Any]:
    """``(counter, dspy.context(...))`` with the counter installed as a callback."""
    counter = LMCalls()
    return counter, dspy.context(callbacks=[counter], **settings)
