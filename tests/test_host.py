"""The plugin host: discovery through entry points, env-var filtering, failure isolation."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from velollm.errors import BackendNotFound
from velollm.hookspecs import hookimpl
from velollm.host import DEFAULT_PLUGINS, Host

PLUGIN_SOURCES = {
    "velotest_good": """
        from velollm.hookspecs import hookimpl

        class EchoBackend:
            name = "velotest-echo"
            def available(self, probe):
                return True, "always"
            def load(self, model_file, options):
                raise NotImplementedError("not needed by these tests")

        @hookimpl
        def register_backends(register):
            register(EchoBackend())
    """,
    "velotest_import_error": """
        raise RuntimeError("this plugin is broken at import time")
    """,
    "velotest_unknown_hook": """
        from velollm.hookspecs import hookimpl

        @hookimpl
        def register_frobnicators(register):
            pass
    """,
    "velotest_hook_raises": """
        from velollm.hookspecs import hookimpl

        class Half:
            name = "velotest-half"

        @hookimpl
        def register_backends(register):
            register(Half())
            raise ValueError("failed half way through registering")
    """,
    "velotest_duplicate": """
        from velollm.hookspecs import hookimpl

        class Dup:
            name = "llamacpp-cpu"

        @hookimpl
        def register_backends(register):
            register(Dup())
    """,
}


@pytest.fixture
def installed_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Install the plugins above as real distributions (dist-info + entry points) on sys.path."""
    for module, source in PLUGIN_SOURCES.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        dist = module.replace("_", "-")
        info = tmp_path / f"{module}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[velollm]\n{module} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield list(PLUGIN_SOURCES)
    for module in PLUGIN_SOURCES:
        sys.modules.pop(module, None)


def failures_of(host: Host, plugin: str) -> list[str]:
    return [f"{f.stage}: {f.error}" for f in host.failures if f.plugin == plugin]


def test_builtin_plugins_register_like_any_other() -> None:
    host = Host(entry_points=False, env={})
    assert set(DEFAULT_PLUGINS) <= set(host.plugin_names())
    assert {"llamacpp-cpu", "llamacpp-cuda", "llamacpp-vulkan", "llamacpp-metal"} <= set(host.backends())
    # remote: first, since its URLs contain "/" that the path source would claim; the models folder
    # ($VELOLLM_MODELS_DIR) before the hub and the catalogue, so a local file wins a name
    assert [s.name for s in host.model_sources()][:5] == ["remote", "path", "folder", "huggingface", "catalog"]
    records = {r.name: r for r in host.plugins()}
    assert records["llamacpp"].builtin and "register_backends" in records["llamacpp"].hooks
    assert "llamacpp-cpu" in records["llamacpp"].backends
    assert host.failures == []


def test_entry_point_plugins_are_discovered_and_failures_isolated(installed_plugins: list[str]) -> None:
    host = Host(env={})
    backends = host.backends()
    # the good plugin works, with its distribution's name and version
    assert "velotest-echo" in backends
    good = next(r for r in host.plugins() if r.name == "velotest_good")
    assert (good.distribution, good.version, good.backends) == ("velotest-good", "1.2.3", ["velotest-echo"])
    # each broken one is reported with the real reason and skipped
    assert "RuntimeError: this plugin is broken at import time" in " ".join(failures_of(host, "velotest_import_error"))
    assert failures_of(host, "velotest_unknown_hook")[0].startswith("validate:")
    assert "register_frobnicators" in failures_of(host, "velotest_unknown_hook")[0]
    assert "velotest_unknown_hook" not in host.plugin_names()
    assert "failed half way" in failures_of(host, "velotest_hook_raises")[0]
    assert "velotest-half" not in backends  # a hook that raised loses what it registered
    assert "already registered" in failures_of(host, "velotest_duplicate")[0]
    assert backends["llamacpp-cpu"].__class__.__name__ == "LlamaCppBackend"  # the original stays
    # the host still works for everything else
    assert "catalog" in [s.name for s in host.model_sources()]


def test_load_plugins_env_selects_third_party_plugins(installed_plugins: list[str]) -> None:
    none = Host(env={"VELOLLM_LOAD_PLUGINS": ""})
    assert not any(name.startswith("velotest") for name in none.plugin_names())
    assert "llamacpp" in none.plugin_names()  # built-ins are not third-party plugins
    by_entry_point = Host(env={"VELOLLM_LOAD_PLUGINS": "velotest_good"})
    assert [n for n in by_entry_point.plugin_names() if n.startswith("velotest")] == ["velotest_good"]
    by_distribution = Host(env={"VELOLLM_LOAD_PLUGINS": "velotest-good, velotest-duplicate"})
    assert sorted(n for n in by_distribution.plugin_names() if n.startswith("velotest")) == [
        "velotest_duplicate", "velotest_good"]


def test_disable_plugins_env_skips_builtins_and_third_party(installed_plugins: list[str]) -> None:
    host = Host(env={"VELOLLM_DISABLE_PLUGINS": "llamacpp,velotest_good,velotest-import-error,velotest_duplicate"})
    assert "llamacpp" not in host.plugin_names()
    assert not any(name.startswith("llamacpp") for name in host.backends())
    assert "velotest_good" not in host.plugin_names()
    assert failures_of(host, "velotest_import_error") == []  # disabled, so never imported
    with pytest.raises(BackendNotFound, match="llamacpp-cpu"):
        host.backend("llamacpp-cpu")


def test_plugin_registered_on_the_manager_in_a_test() -> None:
    class Plugin:
        class Backend:
            name = "in-test"

            def available(self, probe):
                return False, "only for this test"

        @hookimpl
        def register_backends(self, register):
            register(self.Backend())

    host = Host(entry_points=False, env={})
    assert host.register(Plugin(), name="in-test-plugin")
    assert host.backend("in-test").available(None) == (False, "only for this test")
    host.unregister("in-test-plugin")
    assert "in-test" not in host.backends()


def test_a_builtin_that_fails_to_import_is_reported_not_fatal() -> None:
    host = Host(entry_points=False, env={}, builtins={**DEFAULT_PLUGINS, "ghost": "velollm.plugins.does_not_exist"})
    assert "ModuleNotFoundError" in failures_of(host, "ghost")[0]
    assert "llamacpp-cpu" in host.backends()


def test_hardware_facts_hook_failure_is_isolated() -> None:
    class Broken:
        @hookimpl
        def collect_hardware_facts(self):
            raise OSError("sensor unplugged")

    host = Host(entry_points=False, env={})
    host.register(Broken(), name="broken-facts")
    facts = host.hardware_facts()
    assert "ggml" in facts  # the llama.cpp plugin's facts still arrive
    assert "sensor unplugged" in failures_of(host, "broken-facts")[0]
