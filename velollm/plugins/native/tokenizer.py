"""Text <-> token ids for GGUF vocabularies, following llama.cpp step by step.

``encode`` first cuts special tokens out of the text (llama.cpp ``tokenizer_st_partition``:
longest special token first; control tokens only when ``parse_special``; user-defined tokens
always), then runs the model's tokenizer on each remaining fragment:

* ``spm`` (SentencePiece-style, e.g. Gemma): spaces become ``▁``, then adjacent symbols merge by
  highest vocabulary score (ties: leftmost); leftovers fall back to ``<0xXX>`` byte tokens.
* ``bpe`` (GPT-2 style, e.g. Qwen2): the pre-tokenizer splits words, each word is byte-encoded
  and merged by lowest merge rank (ties: leftmost).

BOS/EOS are added from the GGUF's add_bos/add_eos flags, exactly when llama.cpp adds them.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from velollm.errors import InvalidRequest
from velollm.plugins.native.pretokenize import byte_decode, byte_encode, split_words
from velollm.plugins.native.vocab import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_LSTRIP,
    ATTR_NORMAL,
    ATTR_RSTRIP,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    Vocab,
)

_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale
_WORD_CACHE_SIZE = 20000


class Tokenizer:
    """Encoder/decoder for one vocabulary; stateless apart from caches, so safe to share."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}
        self._words: OrderedDict[str, list[int]] = OrderedDict()
        self._special_texts = [(tid, vocab.tokens[tid], vocab.attr(tid)) for tid in vocab.special_ids]

    # --- encoding ---------------------------------------------------------------------------
    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``, equal to llama.cpp's ``llama_tokenize`` for the same flags."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("the text is not valid Unicode (it contains a lone surrogate)") from None
        vocab = self.vocab
        fragments = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if vocab.kind == "spm":
            prev_special = True
            if add_special and vocab.add_bos:
                out.append(vocab.bos_id)  # type: ignore[arg-type]
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                piece = (" " if vocab.add_space_prefix and prev_special else "") + frag
                self._spm(piece.replace(" ", "\u2581"), out)
                prev_special = False
        else:
            if add_special and vocab.add_bos:
                out.append(vocab.bos_id)  # type: ignore[arg-type]
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    for word in split_words(frag, vocab.pre):
                        out.extend(self._bpe_word(word))
        if add_special and vocab.add_eos and vocab.eos_id is not None:
            out.append(vocab.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of ``text``: a list of raw-text fragments and token ids."""
        fragments: list[str | int] = [text]
        for tid, tok, attr in self._special_texts:
            if not parse_special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            if tok not in text:
                continue
            result: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or tok not in frag:
                    result.append(frag)
                    continue
                rest = frag
                while True:
                    at = rest.find(tok)
                    if at < 0:
                        if rest:
                            result.append(rest)
                        break
                    left = rest[:at]
                    if attr & ATTR_LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        result.append(left)
                    result.append(tid)
                    rest = rest[at + len(tok):]
                    if attr & ATTR_RSTRIP:
                        rest = rest.lstrip(_C_SPACE)
            fragments = result
        return fragments

    def _spm(self, text: str, out: list[int]) -> None:
        """llama.cpp's llm_tokenizer_spm_session.tokenize on one fragment (spaces already escaped)."""
        vocab = self.vocab
        t2i, scores = vocab.token_to_id, vocab.scores
        n = len(text)
        if n == 0:
            return
        start = list(range(n))
        size = [1] * n
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap: list[tuple[float, int, int, int]] = []
        rev_merge: dict[str, tuple[int, int]] = {}

        def add_bigram(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            piece = text[start[left]:start[left] + size[left] + size[right]]
            tid = t2i.get(piece)
            if tid is None:
                return
            heapq.heappush(heap, (-float(scores[tid]), left, right, size[left] + size[right]))
            rev_merge[piece] = (left, right)

        for i in range(1, n):
            add_bigram(i - 1, i)
        while heap:
            _, left, right, total = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
                continue
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, nxt[left])

        def resegment(sym: int) -> None:
            piece = text[start[sym]:start[sym] + size[sym]]
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
                return
            pair = rev_merge.get(piece)
            if pair is None:
                out.extend(vocab.byte_token(b) for b in piece.encode("utf-8"))
                return
            resegment(pair[0])
            resegment(pair[1])

        i = 0
        while i != -1:
            resegment(i)
            i = nxt[i]

    def _bpe_word(self, word: str) -> list[int]:
        cached = self._words.get(word)
        if cached is not None:
            self._words.move_to_end(word)
            return cached
        ids = self._bpe(byte_encode(word))
        self._words[word] = ids
        if len(self._words) > _WORD_CACHE_SIZE:
            self._words.popitem(last=False)
        return ids

    def _bpe(self, word: str) -> list[int]:
        """llama.cpp's llm_tokenizer_bpe_session on one byte-encoded word."""
        vocab = self.vocab
        t2i, merges = vocab.token_to_id, vocab.merges
        if vocab.ignore_merges and word in t2i:
            return [t2i[word]]
        syms = list(word)
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap: list[tuple[int, int, int, str]] = []

        def add_bigram(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            rank = merges.get((syms[left], syms[right]))
            if rank is not None:
                heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

        for i in range(1, n):
            add_bigram(i - 1, i)
        while heap:
            _, left, right, joined = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != joined:
                continue
            syms[left] = joined
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, nxt[left])
        ids: list[int] = []
        for sym in syms:
            if not sym:
                continue
            tid = t2i.get(sym)
            if tid is not None:
                ids.append(tid)
                continue
            for b in sym.encode("utf-8"):  # llama.cpp looks up each raw byte; only ASCII can hit
                hit = t2i.get(chr(b)) if b < 0x80 else None
                if hit is not None:
                    ids.append(hit)
        return ids

    # --- decoding ---------------------------------------------------------------------------
    def piece(self, token: int, *, special: bool = False) -> bytes:
        """Bytes of one token as llama.cpp's ``llama_token_to_piece`` renders them (no lstrip)."""
        cache = self._special_pieces if special else self._pieces
        found = cache.get(token)
        if found is not None:
            return found
        vocab = self.vocab
        if not 0 <= token < vocab.size:
            raise InvalidRequest(f"token id {token} is outside the vocabulary (0..{vocab.size - 1})")
        attr = vocab.attr(token)
        text = vocab.tokens[token]
        if not special and attr & (ATTR_UNKNOWN | ATTR_CONTROL):
            data = b""
        elif attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            data = text.encode("utf-8")
        elif attr & ATTR_NORMAL:
            data = text.replace("\u2581", " ").encode("utf-8") if vocab.kind == "spm" else byte_decode(text)
        elif attr & ATTR_BYTE:
            data = bytes([int(text[3:5], 16)]) if vocab.kind == "spm" else byte_decode(text)
        else:
            data = b""
        cache[token] = data
        return data

    def decode(self, tokens: list[int], *, special: bool = False) -> str:
        """Text of ``tokens``: pieces joined, then decoded (invalid UTF-8 becomes U+FFFD)."""
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        """A special token's own text (``<bos>``, ``<|im_end|>``), for chat templates."""
        return self.piece(token, special=True).decode("utf-8", errors="replace")
