"""The llama architecture (no released test model uses it) against llama.cpp on a tiny synthetic
model: random weights, grouped-query attention, adjacent-pair RoPE, an SPM vocabulary with byte
fallback and a leading-space rule. Both engines load the same GGUF; their tokens and logits must
agree (float32 weights, so llama.cpp does not quantize activations: agreement is tight)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from velollm.engine import LoadOptions
from velollm.plugins.native import NativeBackend

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER = 64, 4, 2, 128, 2
PIECES = ["▁", "a", "b", "c", "ab", "▁a", "▁ab", "▁b", "ba", "▁ba", "abc", "▁abc", "hello", "▁hello", "▁world", "!"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [float(len(p)) - i * 0.01 for i, p in enumerate(PIECES)]
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    path = tmp_path_factory.mktemp("llama") / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def mat(rows: int, cols: int, scale: float = 0.15) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(n_vocab, N_EMBD, 1.0))
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))
    w.add_tensor("output.weight", mat(n_vocab, N_EMBD))
    for il in range(N_LAYER):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))
        w.add_tensor(p + "attn_q.weight", mat(N_HEAD * head_dim, N_EMBD))
        w.add_tensor(p + "attn_k.weight", mat(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(p + "attn_v.weight", mat(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(p + "attn_output.weight", mat(N_EMBD, N_HEAD * head_dim))
        w.add_tensor(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", mat(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", mat(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_llama_matches_llama_cpp(tiny_llama: Path) -> None:
    from llama_cpp import Llama

    native = NativeBackend().load(tiny_llama, LoadOptions(n_ctx=64, n_threads=1))
    llama = Llama(model_path=str(tiny_llama), n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True,
                  verbose=False)
    try:
        for text in ["hello world!", "abc ab ba", " a  b\tc", "héllo ✓ 12", ""]:
            for add in (True, False):
                assert native.tokenize(text, add_special=add) == llama.tokenize(text.encode(), add_bos=add), text
        ids = native.tokenize("hello world! abc ab ba hello")
        assert len(ids) > 8
        llama.reset()
        llama.eval(ids)
        theirs = np.array(llama.scores[: len(ids)], dtype=np.float32)
        mine = native.logits(ids, all_positions=True)  # type: ignore[attr-defined]
        print(f"tiny llama: max|diff| {np.abs(mine - theirs).max():.2e}, logits up to {np.abs(theirs).max():.1f}")
        np.testing.assert_allclose(mine, theirs, atol=1e-3, rtol=0)
        assert (mine.argmax(-1) == theirs.argmax(-1)).all()
        greedy = native.generate_ids(ids, max_tokens=8)  # type: ignore[attr-defined]
        llama.reset()
        expected = []
        for token in llama.generate(ids, temp=0.0):
            if token == 2 or len(expected) == 8:
                break
            expected.append(token)
        assert greedy == expected
    finally:
        native.close()
        llama.close()
