"""Decoding under a grammar that asks about one token, not the whole vocabulary.

llama-cpp-python puts the grammar sampler in its chain, so every token runs the grammar over all
150k vocabulary entries (Qwen 0.5B: 65 -> 97 ms per token). llama.cpp's own ``common_sampler``
does better and so do we: pick a token without the grammar, ask the grammar about that single
token, and only when it is refused mask the whole vocabulary and pick again.

Greedy: the argmax of the masked logits is the same token either way, so the output is unchanged.
Sampling: a token drawn from the unmasked distribution p is kept when allowed, else one is drawn
from the masked one; an allowed token t comes out with probability p_t + (1 - V)·p_t/V = p_t/V
(V: the allowed mass), which is exactly the masked distribution when the chain does not truncate
(top-k 0, top-p 1, min-p 0). With truncation it is llama.cpp's own approximation: allowed tokens
in the unmasked top set gain a little mass over allowed tokens outside it.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from velollm.errors import GenerationError, GrammarError

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class GrammarSampler:
    """A fresh llama.cpp grammar sampler for one completion, with the check-one-token fast path.

    ``chain`` is a llama.cpp sampler chain without the grammar (penalties, top-k/p, temperature,
    dist) or None for plain argmax.
    """

    def __init__(self, vocab: Any, n_vocab: int, gbnf: str, chain: Any = None) -> None:
        import llama_cpp

        self._lib = llama_cpp
        if ctypes.sizeof(llama_cpp.llama_token_data) != TOKEN_DATA.itemsize:  # pragma: no cover - ABI guard
            raise GenerationError("llama_token_data has an unexpected layout in this llama-cpp-python build")
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not self._sampler:
            raise GrammarError("invalid GBNF grammar: rejected by llama.cpp")
        self._chain = chain
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._all = np.zeros(n_vocab, dtype=TOKEN_DATA)
        data = ctypes.cast(self._all.ctypes.data, llama_cpp.llama_token_data_p)
        self._all_array = llama_cpp.llama_token_data_array(data=data, size=n_vocab, selected=-1, sorted=False)
        self.fallbacks = 0  # tokens the grammar refused first (the whole vocabulary was masked)

    def allows(self, token: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(self._one_array))
        return not math.isinf(one.logit)

    def pick(self, logits: np.ndarray) -> int:
        """The next token among those the grammar allows; advances the grammar (and the chain)."""
        token = int(np.argmax(logits)) if self._chain is None else self._chain_pick(logits, masked=False)
        if not self.allows(token):
            self.fallbacks += 1
            token = self._masked_pick(logits)
        self._lib.llama_sampler_accept(self._sampler, token)
        if self._chain is not None:
            self._lib.llama_sampler_accept(self._chain, token)
        return token

    def _fill(self, logits: np.ndarray) -> None:
        self._all["id"] = self._ids  # a chain's top-k sorts and truncates the array in place
        self._all["logit"] = logits
        self._all["p"] = 0.0
        self._all_array.size, self._all_array.selected, self._all_array.sorted = len(self._all), -1, False

    def _masked_pick(self, logits: np.ndarray) -> int:
        self._fill(logits)
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(self._all_array))
        if not np.isfinite(self._all["logit"]).any():
            raise GrammarError("the grammar allows no token at this point (it may need more than max_tokens)")
        if self._chain is None:
            return int(self._all["id"][np.argmax(self._all["logit"])])
        return self._chain_pick(None, masked=True)

    def _chain_pick(self, logits: np.ndarray | None, *, masked: bool) -> int:
        """Run the chain (no accept) over the logits, or over the masked array already filled."""
        if not masked:
            self._fill(logits)  # type: ignore[arg-type]
        self._lib.llama_sampler_apply(self._chain, ctypes.byref(self._all_array))
        selected = int(self._all_array.selected)
        if not 0 <= selected < self._all_array.size:
            raise GenerationError(f"llama.cpp's sampler chain selected no token ({selected})")
        return int(self._all["id"][selected])

    def close(self) -> None:
        if self._sampler:
            self._lib.llama_sampler_free(self._sampler)
            self._sampler = None


def grammar_tokens(runner: Any, vocab: Any, gbnf: str, prompt: list[int], max_new: int, is_end: Any,
                   chain: Any = None) -> Iterator[list[int]]:
    """Token groups (one token each) decoded under ``gbnf`` on a ``LlamaRunner`` (argmax without a chain).

    Reuses the cached prompt prefix like ``Llama.generate`` and leaves the ``Llama``'s bookkeeping
    consistent, so the next plain request keeps reusing the KV cache.
    """
    grammar = GrammarSampler(vocab, runner.n_vocab, gbnf, None if chain is None else chain.sampler)
    try:
        runner.refresh()
        runner.sync(prompt)
        for n in range(max_new):
            token = grammar.pick(runner.logits(-1))
            yield [token]
            if is_end(token) or n + 1 == max_new:
                return
            runner.feed([token])
    finally:
        grammar.close()


def _draw_unaccepted(chain: Any, row: np.ndarray, buf: dict[str, Any]) -> int:
    """A token from ``chain`` over ``row`` without accepting it (it may still be refused)."""
    import llama_cpp

    n = len(row)
    if "all" not in buf:
        buf["all"] = np.zeros(n, dtype=TOKEN_DATA)
        buf["ids"] = np.arange(n, dtype=np.int32)
    data = buf["all"]
    data["id"], data["logit"], data["p"] = buf["ids"], row, 0.0
    array = llama_cpp.llama_token_data_array(data=ctypes.cast(data.ctypes.data, llama_cpp.llama_token_data_p),
                                             size=n, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(array))
    if not 0 <= array.selected < array.size:
        raise GenerationError(f"llama.cpp's sampler chain selected no token ({array.selected})")
    return int(data["id"][array.selected])


def constrained_pick(state: Any, row: np.ndarray, chain: Any = None, buf: dict[str, Any] | None = None) -> int:
    """The next token under a :class:`velollm.constraints.ConstraintState`: the argmax (or a draw from
    ``chain``) when the constraint allows it, else the same from the masked row. Advances neither."""
    if chain is None:
        return state.pick_greedy(row)
    token = _draw_unaccepted(chain, row, {} if buf is None else buf)
    if state.allows(token):
        chain.accept(token)
        return token
    masked = np.array(row, dtype=np.float32, copy=True)
    state.mask(masked)
    return chain.sample_logits(masked)


def constrained_tokens(runner: Any, state: Any, prompt: list[int], max_new: int, is_end: Any,
                       chain: Any = None) -> Iterator[list[int]]:
    """Token groups (one token each) decoded under a constraint state (velollm.constraints, llguidance).

    Stops when the constraint is done (a complete answer) even before an end token comes.
    """
    buf: dict[str, Any] = {}
    runner.refresh()
    runner.sync(prompt)
    for n in range(max_new):
        token = constrained_pick(state, runner.logits(-1), chain, buf)
        state.advance(token)
        yield [token]
        if is_end(token) or n + 1 == max_new or state.done:
            return
        runner.feed([token])
