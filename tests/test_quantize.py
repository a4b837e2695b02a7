"""`velollm quantize` and `velollm info --tensors` on the real Gemma 270M file.

Gemma's catalogue file is Q4_K_M, so making a Q8_0 from it is a requantization
(``--allow-requantize``); it is done once per session, through the command line as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from velollm.engine import GenerationRequest, LoadOptions
from velollm.errors import (
    ModelNotFound,
    NotAGGUFFile,
    OutputExists,
    QuantizeError,
    RequantizeRefused,
    TruncatedModelFile,
    UnknownQuantType,
)
from velollm.gguf import info as gguf_info
from velollm.plugins.llamacpp import quantize as q

VELOLLM = [sys.executable, "-m", "velollm.cli"]


def velollm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([*VELOLLM, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def q8(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("quantize") / "gemma-q8_0.gguf"
    result = velollm("quantize", str(gemma_path), str(out), "q8_0", "--allow-requantize", "--threads", "2", "--json")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout), result.stderr


def test_q8_0_has_the_asked_type_and_reports_sizes(q8: tuple[Path, dict[str, Any], str], gemma_path: Path) -> None:
    out, report, stderr = q8
    info = gguf_info.inspect(out)
    assert report["type"] == "Q8_0" and info.file_type == "MOSTLY_Q8_0"
    assert set(info.quant_types) == {"F32", "Q8_0"}  # every matrix is Q8_0; norms stay F32
    assert report["source_bytes"] == gemma_path.stat().st_size == 253_113_024
    assert report["output_bytes"] == out.stat().st_size
    # Q8_0 spends 8.5 bits per weight where Q4_K_M's matrices average fewer: larger, same tensors
    assert report["output_bytes"] > report["source_bytes"]
    assert len(info.tensors) == len(gguf_info.inspect(gemma_path).tensors)
    assert report["requantized"] is True and report["source_type"] == "Q4_K_M"
    assert "requantizing" in stderr
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_velollm_info_reads_the_output(q8: tuple[Path, dict[str, Any], str]) -> None:
    out, _, _ = q8
    result = velollm("info", str(out), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["architecture"] == "gemma3" and data["file_type"] == "MOSTLY_Q8_0"


def test_quantized_model_generates_text(q8: tuple[Path, dict[str, Any], str]) -> None:
    from velollm.plugins.llamacpp import LlamaCppBackend

    out, _, _ = q8
    engine = LlamaCppBackend("cpu").load(out, LoadOptions(n_ctx=256))
    try:
        done = engine.generate(GenerationRequest(prompt="The capital of France is", max_tokens=8, temperature=0))
    finally:
        engine.close()
    assert done.usage.completion_tokens > 0 and done.text.strip()
    assert "paris" in done.text.lower() or "capital" in done.text.lower()


def test_info_tensors_lists_each_tensor_with_layer_totals(gemma_path: Path) -> None:
    result = velollm("info", "gemma3-270m", "--tensors", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    info = gguf_info.inspect(gemma_path)
    assert data["n_tensors"] == len(data["tensors"]) == len(info.tensors) == 236
    first = {t["name"]: t for t in data["tensors"]}["token_embd.weight"]
    assert first["type"] == "Q8_0" and first["shape"] == [640, 262144] and first["n_bytes"] == 178_257_920
    assert [row["layer"] for row in data["layers"]] == list(range(info.block_count))
    assert [row["n_bytes"] for row in data["layers"]] == info.layer_bytes
    assert sum(row["n_bytes"] for row in data["layers"]) + data["non_layer"]["n_bytes"] == data["tensor_bytes"]
    assert sum(t["n_tensors"] for t in data["types"].values()) == 236
    table = velollm("info", "gemma3-270m", "--tensors")
    assert table.returncode == 0 and "blk.17.ffn_up.weight" in table.stdout and "per layer" in table.stdout


def test_force_overwrites_and_progress_reaches_the_end(gemma_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    with pytest.raises(OutputExists, match="--force"):
        q.quantize(gemma_path, out, "Q4_0", allow_requantize=True)
    assert out.read_bytes() == b"old"
    seen: list[tuple[int, int]] = []
    result = q.quantize(gemma_path, out, "Q4_0", allow_requantize=True, force=True, threads=2,
                        progress=lambda done, total: seen.append((done, total)))
    assert gguf_info.inspect(out).file_type == "MOSTLY_Q4_0" and result.output_bytes == out.stat().st_size
    total = gguf_info.inspect(gemma_path).tensor_bytes
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # never goes backwards


def test_refusals_are_typed_and_name_the_cause(gemma_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    with pytest.raises(RequantizeRefused, match="already quantized.*--allow-requantize"):
        q.quantize(gemma_path, out, "Q8_0")
    with pytest.raises(UnknownQuantType, match="Q4_K_M"):
        q.quantize(gemma_path, out, "Q9_9", allow_requantize=True)
    with pytest.raises(RequantizeRefused, match="importance matrix"):
        q.quantize(gemma_path, out, "IQ2_XS", allow_requantize=True)
    with pytest.raises(ModelNotFound):
        q.quantize(tmp_path / "missing.gguf", out, "Q8_0")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(NotAGGUFFile):
        q.quantize(text, out, "Q8_0")
    cut = tmp_path / "cut.gguf"
    with gemma_path.open("rb") as src:
        cut.write_bytes(src.read(4_000_000))
    with pytest.raises(TruncatedModelFile):
        q.quantize(cut, out, "Q8_0", allow_requantize=True)
    with pytest.raises(QuantizeError, match="does not exist"):
        q.quantize(gemma_path, tmp_path / "no" / "dir" / "x.gguf", "Q8_0", allow_requantize=True)
    with pytest.raises(OutputExists, match="source file itself"):
        q.quantize(gemma_path, gemma_path, "Q8_0", allow_requantize=True, force=True)
    assert not out.exists()


def test_a_failure_inside_llama_cpp_leaves_no_output(gemma_path: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Skip velollm's own requantize check so llama.cpp starts writing, then refuses at the first
    # quantized tensor: the error must carry its reason and no file may be left behind.
    monkeypatch.setattr(q, "quantized_tensor_types", lambda info: [])
    out = tmp_path / "partial.gguf"
    with pytest.raises(QuantizeError, match="requantizing from type"):
        q.quantize(gemma_path, out, "Q8_0", threads=2)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line_with_exit_code_1(gemma_path: Path, tmp_path: Path) -> None:
    result = velollm("quantize", str(gemma_path), str(tmp_path / "x.gguf"), "Q5_K_Q")
    assert result.returncode == 1 and "unknown quantization type 'Q5_K_Q'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.gguf").exists()
