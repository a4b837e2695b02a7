"""The plugin API version: plugins declare the one they target, a mismatch is a clear plugin failure,
`velollm plugins` shows it; and the old import paths plugin authors used warn once, then work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from velollm import _moved, engine
from velollm.engine import PLUGIN_API_VERSION
from velollm.hookspecs import hookimpl
from velollm.host import Host


class _Backend:
    name = "apitest-cpu"

    def available(self, probe: Any) -> tuple[bool, str]:
        return True, "always"


def plugin_module(name: str, api: object | None) -> ModuleType:
    module = ModuleType(name)
    if api is not None:
        module.VELOLLM_PLUGIN_API = api  # type: ignore[attr-defined]

    @hookimpl
    def register_backends(register: Any) -> None:
        register(_Backend())

    module.register_backends = register_backends  # type: ignore[attr-defined]
    return module


def test_the_api_version_is_a_string() -> None:
    assert isinstance(PLUGIN_API_VERSION, str) and PLUGIN_API_VERSION.isdigit()


@pytest.mark.parametrize("declared", [PLUGIN_API_VERSION, int(PLUGIN_API_VERSION), None])
def test_a_plugin_for_this_api_or_none_declared_loads(declared: object) -> None:
    host = Host(builtins={}, entry_points=False)
    assert host.register(plugin_module("apitest", declared), name="apitest")
    assert "apitest-cpu" in host.backends() and host.failures == []
    record = next(r for r in host.plugins() if r.name == "apitest")
    assert record.api == (None if declared is None else PLUGIN_API_VERSION)


def test_a_plugin_for_another_api_is_a_failure_with_a_clear_message() -> None:
    host = Host(builtins={}, entry_points=False)
    assert not host.register(plugin_module("oldplugin", "1"), name="oldplugin")
    assert "apitest-cpu" not in host.backends()
    (failure,) = host.failures
    assert (failure.plugin, failure.stage) == ("oldplugin", "api")
    assert "targets velollm plugin API '1', but velollm" in failure.error
    assert f"provides plugin API '{PLUGIN_API_VERSION}'" in failure.error and failure.error.startswith("PluginError")
    record = next(r for r in host.plugins() if r.name == "oldplugin")
    assert record.api == "1" and record.failures == [str(failure)] and record.backends == []


def test_builtins_target_the_current_api() -> None:
    host = Host(entry_points=False)
    assert {r.name: r.api for r in host.plugins()}["llamacpp"] == PLUGIN_API_VERSION


def test_velollm_plugins_shows_the_api_and_a_mismatch(tmp_path: Path) -> None:
    """An installed plugin (entry point) written for another API, as `velollm plugins` reports it."""
    module = "velooldapi"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        from velollm.hookspecs import hookimpl
        VELOLLM_PLUGIN_API = "1"
        @hookimpl
        def register_backends(register):
            raise AssertionError("a plugin for another API must not be called")
    """))
    info = tmp_path / f"{module}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[velollm]\n{module} = {module}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "250"}
    env.pop("VELOLLM_LOAD_PLUGINS", None)

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "velollm.cli", "plugins", *args], capture_output=True,
                                text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    records = {r["name"]: r for r in json.loads(cli("--json"))}
    assert records[module]["api"] == "1" and records["llamacpp"]["api"] == PLUGIN_API_VERSION
    (failure,) = records[module]["failures"]
    assert "(api)" in failure and "targets velollm plugin API '1'" in failure
    assert "must not be called" not in " ".join(" ".join(r["failures"]) for r in records.values())
    table = cli()
    assert f"velollm plugin API {PLUGIN_API_VERSION}" in table and "PluginError: plugin" in table


# --- old import paths: a DeprecationWarning once per path, then the new object --------------------------
@pytest.mark.parametrize(("old_module", "name", "new"), [
    ("velollm.pool.placement", "Device", engine.Device),
    ("velollm.pool.placement", "MemoryNeeds", engine.MemoryNeeds),
    ("velollm.pool.placement", "place", None),
    ("velollm.speculative", "Speculator", None),
])
def test_old_paths_warn_once_and_give_the_new_object(old_module: str, name: str, new: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setattr(_moved, "_warned", set())
    old = importlib.import_module(old_module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = getattr(old, name)
        second = getattr(old, name)
    assert first is second and (new is None or first is new)
    (warning,) = caught
    assert warning.category is DeprecationWarning and f"{old_module}.{name} moved to" in str(warning.message)
    assert warning.filename == __file__  # points at the importer, not at the shim
    new_home = str(warning.message).split(" moved to ")[1].split(";")[0]
    module, _, attr = new_home.rpartition(".")
    assert getattr(importlib.import_module(module), attr) is first


def test_an_old_path_to_nothing_raises_without_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import velollm.pool.placement as old

    monkeypatch.setattr(_moved, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(AttributeError):
            old.no_such_name  # noqa: B018
    assert caught == []
