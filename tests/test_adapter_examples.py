"""Smoke test: every DSPy example runs end to end on the default model and prints its result.

The examples run in this process (one model load for all) with the test load options and the
DSPy cache off; each example's ``main()`` returns what it printed so the test can check it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy_support import N_CTX, N_THREADS

import velollm

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the example's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    real_lm = velollm.LM

    def test_lm(*args: Any, **kwargs: Any) -> velollm.LM:
        return real_lm(*args, **{**kwargs, "n_ctx": N_CTX, "n_threads": N_THREADS, "cache": False})

    monkeypatch.setattr(velollm, "LM", test_lm)
    saved = {key: dspy.settings.get(key) for key in ("lm", "adapter", "track_usage")}

    def runner(name: str) -> tuple[Any, str]:
        try:
            result = _load(name).main()
        finally:
            dspy.configure(**saved)
        return result, capsys.readouterr().out

    return runner


def test_quickstart(run: Any) -> None:
    prediction, out = run("quickstart")
    assert "paris" in prediction.answer.lower()
    assert "A: " in out and "prompt +" in out


def test_qa(run: Any) -> None:
    (fact, count), out = run("qa")
    assert "mars" in fact.answer.lower() and count.answer == 7
    assert "(int)" in out


def test_classification(run: Any) -> None:
    labels, out = run("classification")
    assert labels == ["positive", "negative"] and "negative" in out


def test_extraction(run: Any) -> None:
    contact, out = run("extraction")
    assert contact.name == "Jane Doe" and contact.email == "jane.doe@acme-robotics.com"
    assert "Contact(" in out


def test_chain_of_thought(run: Any) -> None:
    prediction, out = run("chain_of_thought")
    assert prediction.answer == 18 and prediction.reasoning
    assert "reasoning:" in out


def test_bootstrap_fewshot(run: Any) -> None:
    compiled, out = run("bootstrap_fewshot")
    assert 1 <= len(compiled.demos) <= 2
    assert "Germany -> Berlin" in out


def test_streaming(run: Any) -> None:
    prediction, out = run("streaming")
    assert prediction.answer and prediction.answer in out
