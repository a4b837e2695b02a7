"""Greedy and logit parity of the native engine with llama.cpp: 3 prompts x 3 models.

For every prompt the first 32 greedy tokens must be llama.cpp's, and the last-position logits
close (max abs difference and cosine similarity are printed; run with ``-s`` to see them).
Both sides compute in float32 from the same quantized weights, but llama.cpp quantizes
activations to 8 bits and keeps the KV cache in float16; the native engine's default ``ggml``
numerics repeat those roundings. What remains is summation order inside the matrix products,
which flips an 8-bit rounding now and then: llama.cpp's own logits for one prompt differ by
about as much between batched and token-by-token evaluation. So closeness is checked against
bounds of that size, and greedy agreement is checked on prompts whose continuations do not hinge
on a near-tie.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


def _llama_greedy(llama: object, ids: list[int], n: int) -> list[int]:
    from llama_cpp import llama_vocab_is_eog

    vocab = llama._model.vocab  # type: ignore[attr-defined]
    llama.reset()  # type: ignore[attr-defined]
    out: list[int] = []
    for token in llama.generate(ids, temp=0.0):  # type: ignore[attr-defined]
        if llama_vocab_is_eog(vocab, token) or len(out) == n:
            break
        out.append(token)
        if len(out) == n:
            break
    return out


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


def _check_model(path: Path, prompts: list[str], label: str, n_ctx: int = 256,
                 long_prompt: bool = False) -> None:
    from llama_cpp import Llama

    native = NativeBackend().load(path, LoadOptions(n_ctx=n_ctx, n_threads=1))
    # llama.cpp keeps the logits of each evaluation's last token (enough here; logits for every
    # position would cost a vocabulary-sized product per prompt token)
    llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False)
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
            assert int(np.argmax(mine)) == int(np.argmax(theirs))
            assert cosine > 0.998 and diff < 2.5
            expected = _llama_greedy(llama, ids, N_TOKENS)
            assert len(expected) == N_TOKENS, "pick prompts that run 32 tokens without an end-of-turn"
            got = native.generate_ids(ids, max_tokens=N_TOKENS)  # type: ignore[attr-defined]
            first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
            assert got == expected, f"first difference at token {first}"
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
