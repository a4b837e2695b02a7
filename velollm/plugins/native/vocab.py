"""The vocabulary of a GGUF model, with the token attributes llama.cpp derives from it.

Tokenization parity with llama.cpp depends on more than the token list: llama.cpp turns the
GGUF token types into attribute bits, then patches them by token text (end-of-turn markers
become CONTROL, control tokens named "unused" become UNUSED...) and builds its end-of-generation
set the same way. This module repeats those rules (llama.cpp ``llama_vocab::impl::load``), so
the native tokenizer splits special tokens, renders pieces and stops exactly where llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from velollm.errors import InvalidModelFile, UnsupportedArchitecture
from velollm.gguf.header import ArrayRef, GGUFHeader, read_string_array

# llama_token_attr bits (llama.h)
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_NORMALIZED = 1 << 6
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# GGUF token types -> attribute bits
_TYPE_TO_ATTR = {0: ATTR_UNDEFINED, 1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL, 4: ATTR_USER_DEFINED,
                 5: ATTR_UNUSED, 6: ATTR_BYTE}

_EOT_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"}
_EOM_TEXTS = {"<|eom_id|>"}
_FIM_TEXTS = {
    "fim_pre": {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"},
    "fim_suf": {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"},
    "fim_mid": {"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"},
    "fim_pad": {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"},
    "fim_rep": {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"},
    "fim_sep": {"<|file_sep|>"},
}
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~["}
_ALWAYS_USER_DEFINED = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}

#: pre-tokenizer names (tokenizer.ggml.pre) -> the split rule family the native tokenizer implements
PRE_TOKENIZERS: dict[str, str] = {
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo"), "qwen2"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"), "llama3"),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"), "gpt2"),
}
_IGNORE_MERGES = {"llama3"}  # llama.cpp skips merges for words already in the vocabulary
_ADD_BOS_BY_DEFAULT = {"llama3"}


@dataclass
class Vocab:
    """Token texts, scores and attributes plus the tokenizer flags llama.cpp reads from GGUF."""

    kind: str  # "spm" or "bpe"
    pre: str  # split rule family for BPE ("qwen2", "llama3", "gpt2"), "" for SPM
    tokens: list[str]
    scores: np.ndarray
    attrs: np.ndarray  # int32 llama_token_attr bits per token
    token_to_id: dict[str, int]
    merges: dict[tuple[str, str], int] = field(default_factory=dict)
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    ignore_merges: bool = False
    eog_ids: frozenset[int] = frozenset()
    special_ids: list[int] = field(default_factory=list)  # CONTROL | USER_DEFINED | UNKNOWN, longest first

    @property
    def size(self) -> int:
        return len(self.tokens)

    def attr(self, token: int) -> int:
        return int(self.attrs[token])

    def is_eog(self, token: int) -> bool:
        return token in self.eog_ids

    def byte_token(self, byte: int) -> int:
        """The token for one raw byte (SPM's ``<0xXX>`` fallback, or byte-level BPE's mapped character)."""
        if self.kind == "spm":
            found = self.token_to_id.get(f"<0x{byte:02X}>")
            if found is not None:
                return found
            return self.token_to_id[chr(byte)]
        from velollm.plugins.native.pretokenize import BYTE_TO_UNICODE

        return self.token_to_id[BYTE_TO_UNICODE[byte]]


def _array(path: Path, meta: dict[str, Any], key: str, dtype: str) -> np.ndarray | None:
    ref = meta.get(key)
    if ref is None:
        return None
    if isinstance(ref, list):
        return np.asarray(ref, dtype=dtype)
    if not isinstance(ref, ArrayRef):
        raise InvalidModelFile(f"{path.name}: {key} is not an array")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    size = np.dtype(dtype).itemsize * ref.count
    if ref.offset + size > mm.size:
        raise InvalidModelFile(f"{path.name}: {key} runs past the end of the file")
    return np.frombuffer(mm, dtype=dtype, count=ref.count, offset=ref.offset).copy()


def _strings(path: Path, meta: dict[str, Any], key: str) -> list[str] | None:
    ref = meta.get(key)
    if ref is None:
        return None
    if isinstance(ref, list):
        return [str(s) for s in ref]
    if not isinstance(ref, ArrayRef):
        raise InvalidModelFile(f"{path.name}: {key} is not an array")
    return read_string_array(path, ref)


def _opt_id(meta: dict[str, Any], key: str, default: int | None, n: int) -> int | None:
    if default is not None and default >= n:
        default = None
    value = meta.get(key)
    if isinstance(value, int) and 0 <= value < n:
        return value
    return default


def load_vocab(path: Path, header: GGUFHeader) -> Vocab:
    """Read the tokenizer from a GGUF header, applying llama.cpp's attribute and special-token rules."""
    meta = header.metadata
    model = meta.get("tokenizer.ggml.model")
    pre_name = str(meta.get("tokenizer.ggml.pre") or "default")
    if model == "llama":
        kind, pre = "spm", ""
        bos, eos, unk = 1, 2, 0
        add_space_prefix, add_bos = True, True
    elif model == "gpt2":
        kind = "bpe"
        if pre_name not in PRE_TOKENIZERS:
            known = ", ".join(sorted(PRE_TOKENIZERS))
            raise UnsupportedArchitecture(
                f"{path.name}: the native backend has no '{pre_name}' pre-tokenizer (it implements: {known})")
        pre = PRE_TOKENIZERS[pre_name]
        bos, eos, unk = 11, 11, None
        add_space_prefix, add_bos = False, pre in _ADD_BOS_BY_DEFAULT
    else:
        raise UnsupportedArchitecture(
            f"{path.name}: the native backend has no '{model}' tokenizer (it implements 'llama' and 'gpt2')")

    tokens = _strings(path, meta, "tokenizer.ggml.tokens")
    if not tokens:
        raise InvalidModelFile(f"{path.name} has no tokenizer.ggml.tokens")
    n = len(tokens)
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    scores = _array(path, meta, "tokenizer.ggml.scores", "<f4")
    scores = np.zeros(n, np.float32) if scores is None else scores[:n].astype(np.float32)
    types = _array(path, meta, "tokenizer.ggml.token_type", "<i4")
    if types is None:
        attrs = np.full(n, ATTR_NORMAL, np.int32)
    else:
        if types.size < n:
            raise InvalidModelFile(f"{path.name}: fewer token types than tokens")
        lookup = np.zeros(8, np.int32)
        for t, a in _TYPE_TO_ATTR.items():
            lookup[t] = a
        attrs = lookup[np.clip(types[:n], 0, 7)]
        attrs[(types[:n] < 0) | (types[:n] > 6)] = ATTR_UNDEFINED
    token_to_id: dict[str, int] = {}
    for i, text in enumerate(tokens):
        token_to_id[text] = i  # later duplicates win, as in older llama.cpp

    merges: dict[tuple[str, str], int] = {}
    if kind == "bpe":
        raw = _strings(path, meta, "tokenizer.ggml.merges")
        if raw is None:
            raise InvalidModelFile(f"{path.name}: a gpt2 tokenizer without tokenizer.ggml.merges")
        for rank, line in enumerate(raw):
            cut = line.find(" ", 1)
            pair = (line[:cut], line[cut + 1:]) if cut >= 0 else ("", "")
            merges.setdefault(pair, rank)

    if isinstance(meta.get("tokenizer.ggml.add_space_prefix"), bool):
        add_space_prefix = meta["tokenizer.ggml.add_space_prefix"]
    vocab = Vocab(kind=kind, pre=pre, tokens=tokens, scores=scores, attrs=attrs, token_to_id=token_to_id,
                  merges=merges, add_space_prefix=add_space_prefix, ignore_merges=pre in _IGNORE_MERGES)
    vocab.bos_id = _opt_id(meta, "tokenizer.ggml.bos_token_id", bos, n)
    vocab.eos_id = _opt_id(meta, "tokenizer.ggml.eos_token_id", eos, n)
    vocab.eot_id = _opt_id(meta, "tokenizer.ggml.eot_token_id", None, n)
    vocab.eom_id = _opt_id(meta, "tokenizer.ggml.eom_token_id", None, n)
    vocab.unk_id = _opt_id(meta, "tokenizer.ggml.unknown_token_id", unk, n)
    vocab.pad_id = _opt_id(meta, "tokenizer.ggml.padding_token_id", None, n)
    vocab.add_bos = meta["tokenizer.ggml.add_bos_token"] if isinstance(
        meta.get("tokenizer.ggml.add_bos_token"), bool) else add_bos
    vocab.add_eos = meta["tokenizer.ggml.add_eos_token"] if isinstance(
        meta.get("tokenizer.ggml.add_eos_token"), bool) else False
    if vocab.add_bos and vocab.bos_id is None:
        raise InvalidModelFile(f"{path.name}: add_bos_token is true but there is no BOS token")
    _derive_special(vocab, meta)
    return vocab


def _derive_special(vocab: Vocab, meta: dict[str, Any]) -> None:
    """llama.cpp's text-based patching of special tokens, attributes and the EOG set."""
    attrs, t2i = vocab.attrs, vocab.token_to_id
    fim = {name: _opt_id(meta, f"tokenizer.ggml.{name}_token_id", None, vocab.size) for name in _FIM_TEXTS}

    def mark_control(token_id: int) -> None:
        attrs[token_id] |= ATTR_CONTROL

    for text, tid in t2i.items():
        if vocab.eot_id is None and text in _EOT_TEXTS:
            vocab.eot_id = tid
            mark_control(tid)
        if vocab.eom_id is None and text in _EOM_TEXTS:
            vocab.eom_id = tid
            mark_control(tid)
        for name, texts in _FIM_TEXTS.items():
            if fim[name] is None and text in texts:
                fim[name] = tid
                mark_control(tid)
    for text, tid in t2i.items():
        if attrs[tid] & ATTR_CONTROL and not attrs[tid] & ATTR_UNUSED and "unused" in text:
            attrs[tid] |= ATTR_UNUSED
    eog: set[int] = {fim[k] for k in ("fim_pad", "fim_rep", "fim_sep") if fim[k] is not None}  # type: ignore[misc]
    for text, tid in t2i.items():
        if text in _EOG_TEXTS:
            eog.add(tid)
            mark_control(tid)
    for text in _ALWAYS_USER_DEFINED & t2i.keys():
        attrs[t2i[text]] = ATTR_USER_DEFINED
    for tid in (vocab.eos_id, vocab.eot_id, vocab.eom_id):
        if tid is not None:
            eog.add(tid)
    texts = {vocab.tokens[t] for t in eog}
    if ({"<|return|>", "<|call|>", "<|end|>"} <= texts) or ({"<|calls|>", "<|flush|>", "<|end|>"} <= texts):
        end = t2i["<|end|>"]
        eog.discard(end)
        attrs[end] = ATTR_USER_DEFINED
    if {"<|tool_response>", "</s>"} <= texts:
        s_id = t2i["</s>"]
        eog.discard(s_id)
        attrs[s_id] = ATTR_NORMAL
    vocab.eog_ids = frozenset(eog)
    special = np.nonzero(attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0].tolist()
    special.sort(key=lambda t: -len(vocab.tokens[t].encode("utf-8")))
    vocab.special_ids = special
