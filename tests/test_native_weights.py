"""Native weight store and numerics on synthetic GGUF files: every required tensor type reads back
as ``gguf``'s own dequantization, lazily, and the llama.cpp-style roundings behave as specified."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from velollm.gguf.header import read_header
from velollm.plugins.native.numerics import Numerics, activation_kind, rope_tables
from velollm.plugins.native.weights import WeightStore, can_dequantize

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
ROWS, COLS = 6, 512


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[Q, np.ndarray]]]:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    raws: dict[str, tuple[Q, np.ndarray]] = {}
    for qtype in TYPES:
        name = f"t.{qtype.name.lower()}"
        if qtype == Q.F32:
            raw = rng.standard_normal((ROWS, COLS)).astype(np.float32)
            writer.add_tensor(name, raw)
        elif qtype == Q.F16:
            raw = rng.standard_normal((ROWS, COLS)).astype(np.float16)
            writer.add_tensor(name, raw)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, (ROWS, COLS // block * size), dtype=np.uint8)
            if qtype != Q.BF16:  # keep fp16 scales finite: random bytes are fine elsewhere
                raw = raw & np.uint8(0x3F)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        raws[name] = (qtype, raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, raws


def test_every_required_type_reads_back_like_gguf(synthetic: tuple[Path, dict[str, tuple[Q, np.ndarray]]]) -> None:
    path, raws = synthetic
    store = WeightStore(path, read_header(path), budget_bytes=1 << 30, threads=2)
    try:
        assert store.cached_bytes == 0  # nothing expanded at open
        for name, (qtype, raw) in raws.items():
            assert can_dequantize(qtype)
            expected = gguf.quants.dequantize(raw.view(np.uint8) if qtype in (Q.F32, Q.F16) else raw, qtype)
            expected = np.asarray(expected, np.float32).reshape(ROWS, COLS)
            got = store.matrix((name,))
            assert got is not None and got.dtype == np.float32 and got.shape == (ROWS, COLS)
            np.testing.assert_array_equal(got, expected, err_msg=qtype.name)
            np.testing.assert_array_equal(store.rows(name, np.array([4, 1])), expected[[4, 1]])
        assert store.cached_bytes == len(raws) * ROWS * COLS * 4
    finally:
        store.close()


def test_budget_turns_caching_into_streaming(synthetic: tuple[Path, dict[str, tuple[Q, np.ndarray]]]) -> None:
    path, raws = synthetic
    store = WeightStore(path, read_header(path), budget_bytes=ROWS * COLS * 4, threads=1)
    try:
        first, second = "t.q4_k", "t.q8_0"
        assert store.matrix((first,)) is not None
        assert store.matrix((second,)) is None and second in store.streamed
        x = np.random.default_rng(1).standard_normal((3, COLS)).astype(np.float32)
        full = gguf.quants.dequantize(raws[second][1], Q.Q8_0).reshape(ROWS, COLS)
        streamed = store.streamed_matmul((second,), x, lambda tensor, a: a)
        np.testing.assert_allclose(streamed, x @ full.T, rtol=1e-5, atol=1e-4)
    finally:
        store.close()


def test_activation_rounding_like_ggml() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    x[0, 7] = 40.0  # an outlier sets the scale of its block
    ggml, exact = Numerics("ggml"), Numerics("exact")
    assert exact.activations("q8_0", x) is x and exact.half(x) is x
    q8 = ggml.activations("q8_0", x)
    block = x[0, :32]
    scale = np.float32(np.float16(np.abs(block).max() / 127))
    np.testing.assert_array_equal(q8[0, :32], np.rint(block * (127 / np.abs(block).max())) * scale)
    assert len(np.unique(np.round(q8[0, :32] / scale))) <= 255  # 8-bit levels
    k = ggml.activations("q8_K", x)
    assert np.abs(k - x).max() <= np.abs(x).max() / 127 / 2 + 1e-6
    assert activation_kind(Q.Q4_K) == "q8_K" and activation_kind(Q.Q5_0) == "q8_0" and activation_kind(Q.F32) == "f32"
    gelu = ggml.gelu(np.array([-20.0, -1.0, 0.0, 1.0, 20.0], np.float32))
    assert gelu[0] == 0 and gelu[-1] == 20 and abs(gelu[3] - 0.8412) < 1e-3


def test_rope_tables() -> None:
    cos, sin = rope_tables(64, 16, 10000.0, 1.0)
    assert cos.shape == (64, 8) and np.all(cos[0] == 1) and np.all(sin[0] == 0)
    np.testing.assert_allclose(cos**2 + sin**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.arctan2(sin[1, 0], cos[1, 0]), 1.0, atol=1e-6)  # pair 0 turns 1 rad per step
    half, _ = rope_tables(64, 16, 10000.0, 0.5)  # linear scaling halves the angles
    np.testing.assert_allclose(half[2], cos[1], atol=1e-6)
