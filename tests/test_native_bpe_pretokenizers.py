"""Byte-level BPE pre-tokenizers (llama3, gpt2, qwen2 families) against llama.cpp.

The released test models only exercise qwen2's split, so this builds small BPE vocabularies
(merges learnt here from the tokenizer-parity corpus, across word boundaries too, so a wrong
split shows up as different tokens), writes them into GGUF files and compares the native
tokenizer with llama.cpp's on that corpus, with and without special tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import pytest
from test_native_tokenizer import CORPUS

from velollm.gguf.header import read_header
from velollm.plugins.native.pretokenize import BYTE_TO_UNICODE, byte_encode
from velollm.plugins.native.tokenizer import Tokenizer
from velollm.plugins.native.vocab import load_vocab

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def learn_merges(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain byte-level BPE training on whole strings (no pre-split, so merges cross spaces)."""
    seqs = [list(byte_encode(t)) for t in texts if t]
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for seq in seqs:
            pairs.update(zip(seq, seq[1:], strict=False))
        pairs = Counter({p: c for p, c in pairs.items() if " " not in p[0] + p[1]})
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
    return merges


@pytest.fixture(scope="module")
def merges() -> list[tuple[str, str]]:
    return learn_merges(CORPUS, 300)


def write_vocab(path: Path, pre: str, merges: list[tuple[str, str]]) -> None:
    tokens = list(BYTE_TO_UNICODE)
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    types = [1] * len(tokens) + [3] * len(SPECIALS)
    tokens += SPECIALS
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 64), ("embedding_length", 8), ("block_count", 1),
                       ("feed_forward_length", 16), ("attention.head_count", 1)):
        w.add_uint32(f"llama.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2", "qwen2"])
def test_bpe_pretokenizer_matches_llama_cpp(pre: str, merges: list[tuple[str, str]], tmp_path: Path) -> None:
    from llama_cpp import Llama

    path = tmp_path / f"bpe-{pre}.gguf"
    write_vocab(path, pre, merges)
    native = Tokenizer(load_vocab(path, read_header(path)))
    llama = Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = CORPUS + ["".join(SPECIALS) + " hello<|eot_id|>world"]
    bad = []
    for text in texts:
        for add, special in ((True, True), (False, False)):
            mine = native.encode(text, add_special=add, parse_special=special)
            theirs = list(llama.tokenize(text.encode("utf-8"), add_bos=add, special=special))
            if mine != theirs:
                bad.append((text, add, special, mine[:12], theirs[:12]))
    assert not bad, bad[:5]
    assert any(len(native.encode(t, add_special=False)) < len(t.encode()) for t in CORPUS)  # merges do apply
