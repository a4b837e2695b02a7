"""The plugin's own tests: run them with `pytest` in this folder after `pip install -e .`."""

from __future__ import annotations

from pathlib import Path

import pytest

import velollm
from velollm.engine import GenerationRequest, LoadOptions


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VELOLLM_DISKCACHE_PATH", str(tmp_path / "cache.sqlite"))
    return velollm.get_host().backend("cached-llamacpp-cpu")


def test_registered_through_the_entry_point() -> None:
    plugin = next(p for p in velollm.get_host().plugins() if p.name == "diskcache")
    assert plugin.distribution == "velollm-diskcache" and "cached-llamacpp-cpu" in plugin.backends


def test_greedy_completions_come_back_from_disk(backend) -> None:
    path = velollm.resolve("gemma3-270m").path
    engine = backend.load(path, LoadOptions(n_ctx=512))
    request = GenerationRequest(prompt="The sky is", max_tokens=8, temperature=0)
    first = engine.generate(request)
    second = engine.generate(request)
    assert second == first and (engine.store.hits, engine.store.misses) == (1, 1)
    streamed = "".join(chunk.text for chunk in engine.stream(request))
    assert streamed == first.text and engine.store.hits == 2
    engine.close()
