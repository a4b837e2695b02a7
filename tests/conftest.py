"""Shared fixtures: real models (pulled once per machine into the velollm cache) and engines.

Engines are session-scoped: loading is the slow part, and one engine per model serves every
test module. Tests that must not share state load their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# litellm fetches a price list from the internet on import; tests (and CI) have no internet.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from velollm.engine import Engine, LoadOptions
from velollm.host import Host, set_host

GEMMA = "gemma3-270m"
QWEN_05B = "qwen2.5-coder-0.5b-instruct"
QWEN_15B = "qwen2.5-coder-1.5b-instruct"


def _pulled(name: str) -> Path:
    from velollm.models import pull

    return pull(name)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return _pulled(GEMMA)


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return _pulled(QWEN_05B)


@pytest.fixture(scope="session")
def qwen15_path() -> Path:
    return _pulled(QWEN_15B)


def _load(path: Path, **options: object) -> Engine:
    from velollm.plugins.llamacpp import LlamaCppBackend

    return LlamaCppBackend("cpu").load(path, LoadOptions(**options))


@pytest.fixture(scope="session")
def gemma_engine(gemma_path: Path) -> Iterator[Engine]:
    engine = _load(gemma_path, n_ctx=2048)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def qwen_engine(qwen_path: Path) -> Iterator[Engine]:
    engine = _load(qwen_path, n_ctx=4096)
    yield engine
    engine.close()


@pytest.fixture
def isolated_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    """A fresh process-wide host with only the built-in plugins (no third-party entry points)."""
    monkeypatch.delenv("VELOLLM_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("VELOLLM_DISABLE_PLUGINS", raising=False)
    host = Host(entry_points=False)
    old = set_host(host)
    yield host
    set_host(old)


def pytest_report_header(config: pytest.Config) -> str:
    from velollm.models import velollm_home

    return f"velollm home: {velollm_home()} (CI={os.environ.get('CI', '')})"
