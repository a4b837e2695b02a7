"""Models by name from folders of GGUF files: ``$VELOLLM_MODELS_DIR`` (several, ``os.pathsep``-separated).

``velollm.LM("mistral-7b")`` finds ``<folder>/mistral-7b.gguf``; ``velollm models`` lists the folder's
files. The "models" here are links to the real Gemma 270M file under the names a user would give.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from velollm.engine import GenerationRequest
from velollm.errors import ModelNotFound
from velollm.models import MODELS_DIR_ENV, FolderSource, models_dirs


@pytest.fixture
def folders(tmp_path: Path, gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    (second / "vendor").mkdir(parents=True)
    first.mkdir()
    (first / "mistral-7b.gguf").symlink_to(gemma_path)
    (second / "mistral-7b.gguf").symlink_to(gemma_path)  # shadowed by the first folder
    (second / "vendor" / "Tiny-Coder.gguf").symlink_to(gemma_path)  # one level down, mixed case
    (second / "notes.txt").write_text("not a model")
    monkeypatch.setenv(MODELS_DIR_ENV, os.pathsep.join([str(first), str(tmp_path / "missing"), str(second)]))
    return first, second


def test_folders_come_from_the_environment(folders: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = folders
    assert models_dirs() == [first, tmp_path / "missing", second]


def test_a_name_resolves_to_the_first_folder_holding_it(folders: tuple[Path, Path]) -> None:
    from velollm.loading import resolve

    first, second = folders
    found = resolve("mistral-7b")
    assert (found.source, found.name, found.path) == ("folder", "mistral-7b", (first / "mistral-7b.gguf").resolve())
    assert resolve("tiny-coder").path == (second / "vendor" / "Tiny-Coder.gguf").resolve()  # case-insensitive
    with pytest.raises(ModelNotFound, match="models folders"):
        resolve("no-such-model-here")


def test_folder_models_are_listed_once(folders: tuple[Path, Path]) -> None:
    first, _ = folders
    listed = {m.name: m.path for m in FolderSource().list()}
    assert listed == {"mistral-7b": first / "mistral-7b.gguf",
                      "Tiny-Coder": folders[1] / "vendor" / "Tiny-Coder.gguf"}


def test_lm_and_the_pool_load_a_folder_model(folders: tuple[Path, Path]) -> None:
    import velollm
    from velollm.pool import ModelPool

    lm = velollm.LM("mistral-7b", n_ctx=256, n_threads=1)
    assert lm.ref == "mistral-7b"
    pool = ModelPool()
    try:
        lease = pool.acquire("mistral-7b", n_ctx=256, n_threads=1)
        completion = lease.engine.generate(GenerationRequest.of(prompt="The sky is", max_tokens=2, temperature=0))
        assert completion.usage.completion_tokens >= 1
        lease.engine.close()
    finally:
        pool.close()


def test_velollm_models_lists_the_folders(folders: tuple[Path, Path]) -> None:
    result = subprocess.run([sys.executable, "-m", "velollm.cli", "models"], capture_output=True, text=True,
                            timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines()}
    assert rows["mistral-7b"][2:] == ["local", str(folders[0] / "mistral-7b.gguf"), "folder"]
    assert "Tiny-Coder" in rows and "gemma3-270m" in rows


def test_without_the_variable_no_folder_source_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)
    assert models_dirs() == [] and not FolderSource().handles("mistral-7b") and FolderSource().list() == []
