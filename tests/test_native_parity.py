"""Teacher-forced and logit parity of the native engine with llama.cpp: 3 prompts x 3 models.

For every prompt llama.cpp's first 32 greedy tokens are fed to both sides (teacher forcing), and
at every position the native argmax must be llama.cpp's, unless llama.cpp's own top-2 logit gap
there is below 0.25 (:mod:`parity_support`): free-running greedy sequences are never compared,
because llama.cpp's AVX2 and AVX-512 kernels sum in different orders and a near-tie flips a token
and everything after it (this test demanded 32 identical greedy tokens and failed on an AVX2-only
EPYC at tokens 9 and 12). Logits must also be close (max abs difference and cosine similarity are
printed; run with ``-s`` to see them). Both sides compute in float32 from the same quantized
weights, but llama.cpp quantizes activations to 8 bits and keeps the KV cache in float16; the
native engine's default ``ggml`` numerics repeat those roundings. What remains is summation order
inside the matrix products, which flips an 8-bit rounding now and then: llama.cpp's own logits for
one sequence differ by about as much between batched and token-by-token evaluation (Gemma 270M, the
1969 prompt, generated position 11: cosine 0.98 between llama.cpp's two ways). So closeness is
checked against bounds of that size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from parity_support import compare

from velollm.engine import LoadOptions
from velollm.plugins.native import NativeBackend

pytestmark = pytest.mark.slow

N_TOKENS = 32
PROMPTS = {
    "gemma": ["def quicksort(arr):", "The three primary colors are", "In 1969, Neil Armstrong"],
    "qwen": ["def quicksort(arr):", "The three primary colors are",
             "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n"],
    "qwen15": ["def quicksort(arr):", "The three primary colors are",
               "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n"],
}


def _last_logits(llama: object) -> np.ndarray:
    """Logits of the last token llama.cpp evaluated (read from the context: without logits_all,
    llama-cpp-python does not copy them into ``scores``)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llama.ctx, -1)  # type: ignore[attr-defined]
    return np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),)).astype(np.float32)  # type: ignore[attr-defined]


def _llama_logits(llama: object, ids: list[int]) -> np.ndarray:
    llama.reset()  # type: ignore[attr-defined]
    llama.eval(ids)  # type: ignore[attr-defined]
    return _last_logits(llama)


def _llama_steps(llama: object, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's ``n`` greedy tokens after ``ids``, one decode per token, and its logits row before each."""
    from velollm.plugins.llamacpp.runner import LlamaRunner

    runner = LlamaRunner(llama)
    runner.reset()
    runner.feed(ids)
    tokens, rows = [], []
    for _ in range(n):
        rows.append(runner.logits(-1).copy())
        tokens.append(int(np.argmax(rows[-1])))
        runner.feed(tokens[-1:])
    runner.reset()
    return tokens, np.stack(rows)


def _native_steps(native: object, ids: list[int], fed: list[int]) -> np.ndarray:
    """The native engine's logits row before each of ``fed`` (the prompt at once, then one token per step)."""
    from velollm.plugins.native.model import KVCache

    cache = KVCache(native.config, native.cache.n_ctx)  # type: ignore[attr-defined]
    model = native.model  # type: ignore[attr-defined]
    rows = [model.forward(list(ids), cache, logits="last")[-1]]
    for token in fed[:-1]:
        rows.append(model.forward([token], cache, logits="last")[-1])
    return np.stack(rows).astype(np.float32)


def _check_model(path: Path, prompts: list[str], label: str, n_ctx: int = 256,
                 long_prompt: bool = False) -> None:
    from llama_cpp import Llama, llama_vocab_is_eog

    native = NativeBackend().load(path, LoadOptions(n_ctx=n_ctx, n_threads=1))
    llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False)
    vocab = llama._model.vocab
    try:
        if long_prompt:
            _check_long_prompt(native, llama, label)
        for prompt in prompts:
            ids = list(llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
            assert native.tokenize(prompt, add_special=True, parse_special=True) == ids
            theirs = _llama_logits(llama, ids)
            mine = native.logits(ids)  # type: ignore[attr-defined]
            diff = float(np.abs(mine - theirs).max())
            cosine = float(mine @ theirs / (np.linalg.norm(mine) * np.linalg.norm(theirs)))
            print(f"\n[{label}] {prompt[:40]!r}: last-position logits max|diff| {diff:.4f}, cosine {cosine:.6f}")
            assert cosine > 0.998 and diff < 2.5
            # teacher-forced, token by token on both sides: llama.cpp's greedy tokens are fed to both
            expected, reference = _llama_steps(llama, ids, N_TOKENS)
            eog = next((i for i, t in enumerate(expected) if llama_vocab_is_eog(vocab, t)), None)
            assert eog is None, f"pick prompts that run {N_TOKENS} tokens without an end-of-turn (eog at {eog})"
            report = compare(reference, _native_steps(native, ids, expected))
            print(f"[{label}] {prompt[:40]!r}: teacher-forced {report.summary()}")
            assert not report.failures, report.summary()
            assert report.decisive >= report.positions // 2, report.summary()  # the check has teeth
            assert report.min_cosine > 0.97 and report.max_abs_diff < 5.0, report.summary()
    finally:
        native.close()
        llama.close()


def _check_long_prompt(native: object, llama: object, label: str) -> None:
    """Past 512 tokens Gemma 3's sliding-window layers stop seeing the start: logits agree only if
    the window (and which layers have one) is right; without it cosine drops to ~0.8-0.9."""
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue', 'black'][i % 4]} box holds {i * 7 % 13} stones."
                    for i in range(60))
    ids = native.tokenize(text)[:640]  # type: ignore[attr-defined]
    positions = [300, 560, len(ids) - 1]
    picked = native.logits(ids, positions=positions)  # type: ignore[attr-defined]
    llama.reset()  # type: ignore[attr-defined]
    done = 0
    for pos, mine in zip(positions, picked, strict=True):
        llama.eval(ids[done:pos + 1])  # type: ignore[attr-defined]  # logits of the last token only
        done = pos + 1
        theirs = _last_logits(llama)
        cosine = float(mine @ theirs / (np.linalg.norm(mine) * np.linalg.norm(theirs)))
        print(f"\n[{label}] long prompt, position {pos}: max|diff| {np.abs(mine - theirs).max():.4f}, "
              f"cosine {cosine:.6f}")
        assert cosine > 0.998


def test_gemma_parity(gemma_path: Path) -> None:
    _check_model(gemma_path, PROMPTS["gemma"], "gemma3-270m", n_ctx=1024, long_prompt=True)


def test_qwen_parity(qwen_path: Path) -> None:
    _check_model(qwen_path, PROMPTS["qwen"], "qwen2.5-coder-0.5b")


def test_qwen15_parity(qwen15_path: Path) -> None:
    _check_model(qwen15_path, PROMPTS["qwen15"], "qwen2.5-coder-1.5b")
