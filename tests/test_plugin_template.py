"""examples/plugin-template installed the way a stranger would, then used through velollm and DSPy.

Also: broken third-party plugins are reported by `velollm plugins` and skipped, and velollm works.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from velollm.engine import PLUGIN_API_VERSION

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "examples" / "plugin-template"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install` the template (a real wheel build) into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                    "--target", str(target), str(TEMPLATE)], check=True, capture_output=True, timeout=600)
    assert (target / "velollm_diskcache.py").exists()
    return target


def run(site: Path, *args: str, cache: Path | None = None, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"}
    env.pop("VELOLLM_LOAD_PLUGINS", None)
    if cache is not None:
        env["VELOLLM_DISKCACHE_PATH"] = str(cache)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_velollm_plugins_lists_the_installed_plugin(site: Path) -> None:
    result = run(site, "-m", "velollm.cli", "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugin = next(p for p in json.loads(result.stdout) if p["name"] == "diskcache")
    assert (plugin["distribution"], plugin["version"], plugin["builtin"]) == ("velollm-diskcache", "0.1.0", False)
    assert plugin["hooks"] == ["register_backends"] and plugin["failures"] == []
    assert plugin["api"] == PLUGIN_API_VERSION  # declared by the template, and the one this velollm provides
    assert "cached-llamacpp-cpu" in plugin["backends"]


def test_velollm_probe_shows_its_backend(site: Path) -> None:
    backends = json.loads(run(site, "-m", "velollm.cli", "probe", "--json").stdout)["backends"]
    assert backends["cached-llamacpp-cpu"]["usable"] is True
    assert "wraps llamacpp-cpu" in backends["cached-llamacpp-cpu"]["reason"]
    # usable exactly where the backend it wraps is (a GPU build on a GPU machine: yes)
    assert backends["cached-llamacpp-cuda"]["usable"] is backends["llamacpp-cuda"]["usable"]


def test_dspy_predict_runs_through_the_plugin(site: Path, qwen_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    program = textwrap.dedent("""
        import dspy, velollm
        lm = velollm.LM("qwen2.5-coder-0.5b-instruct", backend="cached-llamacpp-cpu", cache=False)
        dspy.configure(lm=lm, adapter=velollm.Adapter())
        qa = dspy.Predict("question -> answer")
        print(qa(question="What is the capital of France? Answer with the city name.").answer)
    """)
    first = run(site, "-c", program, cache=cache)
    assert first.returncode == 0, first.stderr
    assert "paris" in first.stdout.lower()
    with sqlite3.connect(cache) as db:  # the answer went through the plugin's engine
        assert db.execute("SELECT COUNT(*) FROM completions").fetchone()[0] >= 1
    second = run(site, "-c", program, cache=cache)
    assert second.stdout == first.stdout


def test_the_templates_own_tests_pass(site: Path, gemma_path: Path, tmp_path: Path) -> None:
    result = run(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TEMPLATE / "tests"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "13 passed" in result.stdout  # its own 2 tests and the 11 rules of the contract kit (velollm.testing)


BROKEN = {
    "velobroken_import": "raise ImportError('needs libfrob, which is not installed')\n",
    "velobroken_duplicate": textwrap.dedent("""
        from velollm.hookspecs import hookimpl
        class Dup:
            name = "llamacpp-cpu"
            def available(self, probe):
                return True, "impostor"
        @hookimpl
        def register_backends(register):
            register(Dup())
    """),
    "velobroken_hook": textwrap.dedent("""
        from velollm.hookspecs import hookimpl
        @hookimpl
        def register_backends(register):
            raise KeyError("missing configuration 'FROB_HOME'")
    """),
}


def test_broken_plugins_are_reported_and_skipped(tmp_path: Path, gemma_path: Path) -> None:
    for module, source in BROKEN.items():
        (tmp_path / f"{module}.py").write_text(source)
        info = tmp_path / f"{module}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.0.1\n")
        (info / "entry_points.txt").write_text(f"[velollm]\n{module} = {module}\n")
    listed = run(tmp_path, "-m", "velollm.cli", "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    failures = {p["name"]: " ".join(p["failures"]) for p in json.loads(listed.stdout)}
    assert "ImportError: needs libfrob" in failures["velobroken_import"]
    assert "'llamacpp-cpu' is already registered by plugin 'llamacpp'" in failures["velobroken_duplicate"]
    assert "missing configuration 'FROB_HOME'" in failures["velobroken_hook"]
    table = run(tmp_path, "-m", "velollm.cli", "plugins")
    assert "velobroken_import" in table.stdout and "ImportError" in table.stdout
    # velollm keeps working: the real llama.cpp backend answers
    result = run(tmp_path, "-m", "velollm.cli", "generate", "gemma3-270m", "-p", "Hello", "-n", "4", "--temp", "0")
    assert result.returncode == 0 and "llamacpp-cpu" in result.stderr and "impostor" not in result.stderr
