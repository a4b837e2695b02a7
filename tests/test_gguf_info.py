"""GGUF inspection of the real models, and a typed error naming the real cause for broken files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from velollm.engine import LoadOptions
from velollm.errors import (
    InvalidModelFile,
    ModelNotFound,
    NotAGGUFFile,
    TruncatedModelFile,
    UnsupportedArchitecture,
)
from velollm.gguf import info as gguf_info
from velollm.plugins.llamacpp import LlamaCppBackend


def test_gemma_summary(gemma_path: Path) -> None:
    info = gguf_info.inspect(gemma_path)
    assert info.architecture == "gemma3"
    assert info.file_type == "MOSTLY_Q4_K_M"
    assert info.block_count == 18 and len(info.layer_bytes) == 18
    assert info.vocab_size == 262_144
    assert info.tokenizer_model == "llama"
    assert not info.has_chat_template  # a base model
    assert 260e6 < info.parameter_count < 280e6
    assert info.context_length == 32_768
    assert info.add_bos_token is True
    # every tensor byte is accounted for exactly once, and fits in the file
    assert sum(info.layer_bytes) + info.non_layer_bytes == info.tensor_bytes < info.file_size
    assert {"Q4_K", "Q6_K", "F32"} <= set(info.quant_types)


def test_qwen_summaries(qwen_path: Path, qwen15_path: Path) -> None:
    small, big = gguf_info.inspect(qwen_path), gguf_info.inspect(qwen15_path)
    for info in (small, big):
        assert info.architecture == "qwen2"
        assert info.vocab_size == 151_936
        assert info.tokenizer_model == "gpt2"
        assert info.has_chat_template and "<|im_start|>" in (info.chat_template or "")
        assert info.head_count_kv < info.head_count  # grouped-query attention
        assert sum(info.layer_bytes) + info.non_layer_bytes == info.tensor_bytes
    assert (small.block_count, big.block_count) == (24, 28)
    assert 0.45e9 < small.parameter_count < 0.7e9 < 1.4e9 < big.parameter_count < 1.9e9
    # KV cache grows linearly with context and with the model's layers x KV heads
    assert small.kv_cache_bytes(2048) * 2 == small.kv_cache_bytes(4096)
    assert big.kv_cache_bytes(4096) > small.kv_cache_bytes(4096)


def test_inspection_is_cached_per_file_version(gemma_path: Path, tmp_path: Path) -> None:
    assert gguf_info.inspect(gemma_path) is gguf_info.inspect(gemma_path)
    copy = tmp_path / "copy.gguf"
    os.link(gemma_path, copy) if os.stat(gemma_path).st_dev == os.stat(tmp_path).st_dev else shutil.copy(gemma_path,
                                                                                                           copy)
    assert gguf_info.inspect(copy).path == copy


# --- broken files ---------------------------------------------------------------------------
def _prefix(src: Path, dst: Path, n: int) -> Path:
    with src.open("rb") as fh:
        dst.write_bytes(fh.read(n))
    return dst


@pytest.fixture
def broken_files(tmp_path: Path, gemma_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    files = {
        "empty": tmp_path / "empty.gguf",
        "random": tmp_path / "random.gguf",
        "magic_then_junk": tmp_path / "junk.gguf",
        "truncated_header": _prefix(gemma_path, tmp_path / "header.gguf", 100_000),
        "truncated_data": _prefix(gemma_path, tmp_path / "data.gguf", 50_000_000),
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(rng.bytes(4096))
    files["magic_then_junk"].write_bytes(b"GGUF" + (3).to_bytes(4, "little") + rng.bytes(4096))
    return files


@pytest.mark.parametrize(
    ("case", "error", "reason"),
    [
        ("empty", InvalidModelFile, "empty"),
        ("random", NotAGGUFFile, "not a GGUF file"),
        ("magic_then_junk", InvalidModelFile, "corrupt|truncated"),
        ("truncated_header", TruncatedModelFile, "truncated"),
        ("truncated_data", TruncatedModelFile, "missing"),
    ],
)
def test_broken_file_gives_typed_error(broken_files: dict[str, Path], case: str, error: type, reason: str) -> None:
    with pytest.raises(error, match=reason):
        gguf_info.inspect(broken_files[case])
    # the backend validates first, so llama.cpp never sees the file and the process survives
    with pytest.raises(error, match=reason):
        LlamaCppBackend("cpu").load(broken_files[case], LoadOptions(n_ctx=256))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="not found"):
        gguf_info.inspect(tmp_path / "nope.gguf")
    with pytest.raises(InvalidModelFile, match="not a regular file"):
        gguf_info.inspect(tmp_path)


def _write_gguf(path: Path, arch: str | None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch or "llama")
    if arch is None:  # a GGUF that is not a model: no architecture key at all
        writer.kv_data[0].pop("general.architecture")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_refused_before_loading(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "frob.gguf", "frobnet")
    info = gguf_info.inspect(path)
    assert info.architecture == "frobnet" and info.block_count == 1 and info.layer_bytes == [4 * 32 * 4]
    with pytest.raises(UnsupportedArchitecture, match="frobnet"):
        LlamaCppBackend("cpu").load(path, LoadOptions(n_ctx=256))


def test_gguf_without_architecture(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFile, match="general.architecture"):
        gguf_info.inspect(_write_gguf(tmp_path / "noarch.gguf", None))


def test_llama_cpp_load_failure_names_the_reason(tmp_path: Path) -> None:
    """A valid GGUF of a known architecture that llama.cpp still cannot load (missing tensors)."""
    path = _write_gguf(tmp_path / "hollow.gguf", "llama")
    # llama-cpp-python alone says only "Failed to load model from file"; velollm passes on llama.cpp's reason
    with pytest.raises(InvalidModelFile, match=r"could not load hollow.gguf .*key not found in model: llama\."):
        LlamaCppBackend("cpu").load(path, LoadOptions(n_ctx=256))
