"""One llama.cpp sampler chain per sequence, built from a :class:`~velollm.engine.GenerationRequest`.

llama-cpp-python's ``Llama._init_sampler`` fixes the repeat-penalty window at load time and
``Llama.generate`` cannot be told about typical-p or mirostat per request without also taking
over its decode loop; this module builds the chain itself, with llama.cpp's own samplers:

    penalties(penalty_last_n) -> [grammar] -> top-k -> typical -> top-p -> min-p -> temperature -> dist(seed)
    penalties(penalty_last_n) -> [grammar] -> temperature -> mirostat v1 | v2 (seed)      (mirostat_mode 1 | 2)
    penalties(penalty_last_n) -> [grammar] -> greedy                                      (temperature 0)

That is llama.cpp's ``common_sampler`` order (mirostat replaces the truncation samplers and the
final draw). The native engine (:mod:`velollm.plugins.native.sampling`) implements the same
pipeline in numpy, so both backends honour the same request fields.

Penalties only see tokens accepted into the chain (the generated ones), as llama-cpp-python does;
``penalty_last_n=-1`` means the whole context, ``0`` turns penalties off.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
from typing import Any

import numpy as np

from velollm.errors import GenerationError

#: llama.cpp's mirostat v1 estimates the Zipf exponent from this many top tokens (its default)
MIROSTAT_M = 100

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


def _field(request: Any, name: str, default: Any) -> Any:
    return getattr(request, name, default)


def penalizes(request: Any) -> bool:
    """Whether the request's penalties can change any logit."""
    if _field(request, "penalty_last_n", 64) == 0:
        return False
    return bool(request.repeat_penalty != 1.0 or request.frequency_penalty or request.presence_penalty)


def is_greedy(request: Any) -> bool:
    """Plain argmax decoding: temperature 0 and no penalty that depends on history.

    Callers may then skip the chain and take the argmax of the logits (the same token).
    """
    return request.temperature == 0 and not penalizes(request)


def random_seed() -> int:
    """A fresh 32-bit seed (llama.cpp's ``LLAMA_DEFAULT_SEED`` would mean "random" too, but unreported)."""
    return random.randrange(2**32 - 1)


class SequenceSampler:
    """The llama.cpp sampler chain of one sequence and its state (penalty window, mirostat mu, RNG).

    ``sample(ctx, i)`` draws from output ``i`` of the last ``llama_decode`` (llama.cpp reads the
    logits in place, so a caller may mask that row through a numpy view first); ``sample_logits``
    draws from a numpy row instead. Both accept the drawn token into the chain; ``accept`` is for
    tokens chosen elsewhere (forced by a grammar, drafted and verified) and is a no-op when given
    the token the last ``sample`` call returned, so "sample then accept" never counts a token twice.
    """

    def __init__(self, request: Any, *, n_vocab: int, n_ctx: int, seed: int | None = None,
                 grammar: tuple[Any, str] | None = None) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.n_vocab = int(n_vocab)
        if seed is None:
            seed = request.seed if request.seed is not None else random_seed()
        self.seed = int(seed) & 0xFFFFFFFF
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        if not self._chain:
            raise GenerationError("llama.cpp could not create a sampler chain")
        self._pending: int | None = None  # the token the last sample() drew (already accepted)
        self._row: np.ndarray | None = None  # candidates buffer for sample_logits, made on first use
        try:
            self._build(request, n_ctx, grammar)
        except BaseException:
            self.close()
            raise

    # --- construction ------------------------------------------------------------------------
    def _add(self, sampler: Any, what: str) -> None:
        if not sampler:
            raise GenerationError(f"llama.cpp could not create the {what} sampler")
        self._lib.llama_sampler_chain_add(self._chain, sampler)

    def _build(self, request: Any, n_ctx: int, grammar: tuple[Any, str] | None) -> None:
        lib = self._lib
        last_n = int(_field(request, "penalty_last_n", 64))
        window = n_ctx if last_n < 0 else last_n
        if penalizes(request):
            self._add(lib.llama_sampler_init_penalties(self.n_vocab, window, request.repeat_penalty,
                                                       request.frequency_penalty, request.presence_penalty),
                      "penalties")
        if grammar is not None:
            vocab, gbnf = grammar
            self._add(lib.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root"), "grammar")
        temp = float(request.temperature)
        mirostat = int(_field(request, "mirostat_mode", 0))
        if temp == 0:
            self._add(lib.llama_sampler_init_greedy(), "greedy")
            return
        if mirostat:
            tau = float(_field(request, "mirostat_tau", 5.0))
            eta = float(_field(request, "mirostat_eta", 0.1))
            self._add(lib.llama_sampler_init_temp(temp), "temperature")
            if mirostat == 1:
                self._add(lib.llama_sampler_init_mirostat(self.n_vocab, self.seed, tau, eta, MIROSTAT_M), "mirostat")
            elif mirostat == 2:
                self._add(lib.llama_sampler_init_mirostat_v2(self.seed, tau, eta), "mirostat v2")
            else:
                raise GenerationError(f"mirostat_mode must be 0, 1 or 2, not {mirostat}")
            return
        self._add(lib.llama_sampler_init_top_k(int(request.top_k)), "top-k")
        self._add(lib.llama_sampler_init_typical(float(_field(request, "typical_p", 1.0)), 1), "typical")
        self._add(lib.llama_sampler_init_top_p(float(request.top_p), 1), "top-p")
        self._add(lib.llama_sampler_init_min_p(float(request.min_p), 1), "min-p")
        self._add(lib.llama_sampler_init_temp(temp), "temperature")
        self._add(lib.llama_sampler_init_dist(self.seed), "dist")

    # --- use -----------------------------------------------------------------------------------
    @property
    def sampler(self) -> Any:
        """The raw ``llama_sampler*`` chain (for code that drives llama.cpp's sampler API itself)."""
        self._check()
        return self._chain

    def sample(self, ctx: Any, i: int = -1) -> int:
        """Draw from output ``i`` of the last decode of ``ctx`` (a ``llama_context*``); accepted."""
        self._check()
        token = int(self._lib.llama_sampler_sample(self._chain, ctx, i))
        if token < 0:
            raise GenerationError(f"llama.cpp's sampler chain selected no token ({token})")
        self._pending = token
        return token

    def sample_logits(self, logits: np.ndarray) -> int:
        """Draw from a logits row (e.g. one with refused tokens set to -inf); accepted."""
        self._check()
        if logits.shape != (self.n_vocab,):
            raise GenerationError(f"a logits row has {self.n_vocab} entries, got shape {logits.shape}")
        if self._row is None:
            self._row = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
        row = self._row
        row["id"] = self._ids  # top-k sorts the array in place
        row["logit"] = logits
        row["p"] = 0.0
        data = ctypes.cast(row.ctypes.data, self._lib.llama_token_data_p)
        array = self._lib.llama_token_data_array(data=data, size=self.n_vocab, selected=-1, sorted=False)
        self._lib.llama_sampler_apply(self._chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise GenerationError(f"llama.cpp's sampler chain selected no token ({array.selected})")
        token = int(row["id"][array.selected])
        self._lib.llama_sampler_accept(self._chain, token)
        self._pending = token
        return token

    def accept(self, token: int) -> None:
        """Record a token in the chain's history (penalties, mirostat, grammar)."""
        self._check()
        if self._pending is not None and token == self._pending:
            self._pending = None
            return
        self._pending = None
        self._lib.llama_sampler_accept(self._chain, int(token))

    def reset(self) -> None:
        """Forget the history (penalty window, mirostat mu, grammar state); the RNG keeps going."""
        self._check()
        self._pending = None
        self._lib.llama_sampler_reset(self._chain)

    def close(self) -> None:
        if self._chain:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None

    def _check(self) -> None:
        if not self._chain:
            raise GenerationError("this sampler is closed")

    def __enter__(self) -> SequenceSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten sampler must not leak its C chain
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
