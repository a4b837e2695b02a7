"""The contract kit as a pytest plugin: `pytest_plugins = ["velollm.testing.plugin"]` or `-p velollm.testing.plugin`.

It adds what a plugin's tests need around :class:`velollm.testing.BackendContract`: a real small
model file (``VELOLLM_CONTRACT_MODEL``, default Gemma 270M, pulled once into the velollm cache), a
fresh plugin host, and a summary line naming the velollm version and plugin API the run checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from velollm.testing.contract import DEFAULT_MODEL


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name what the run checked against (a summary, not a header: a test module may load this plugin late)."""
    from velollm import __version__
    from velollm.engine import PLUGIN_API_VERSION

    line = f"velollm {__version__}, plugin API {PLUGIN_API_VERSION} (velollm.testing contract kit)"
    terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def velollm_model_file() -> Path:
    """A real model file: ``$VELOLLM_CONTRACT_MODEL`` (a catalogue name) or Gemma 270M."""
    from velollm.models import pull

    return pull(os.environ.get("VELOLLM_CONTRACT_MODEL") or DEFAULT_MODEL)


@pytest.fixture
def velollm_host() -> Iterator[object]:
    """A fresh process-wide host with the built-ins and installed plugins; the old one comes back after."""
    from velollm.host import Host, set_host

    host = Host()
    old = set_host(host)
    yield host
    set_host(old)
