"""A thin driver for one ``llama_cpp.Llama`` on llama.cpp's low-level API.

``Llama.generate`` evaluates one token per call and samples through a chain that builds a
candidate array of the whole vocabulary for every token; ``Llama.eval`` with ``logits_all`` copies
the full logits of every position. Speculation needs neither: it decodes small batches, asks for
logits only where they are read, and takes argmaxes of zero-copy views. The runner keeps the
``Llama``'s own bookkeeping (``n_tokens``, ``input_ids``) true, so the vanilla path that shares
the same ``Llama`` keeps reusing the KV cache prefix.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from velollm.errors import GenerationError
from velollm.plugins.llamacpp.threads import ThreadTuner


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the shared prefix; list-slice comparisons run in C, so this is a binary search."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class ContextRunner:
    """One sequence of a ``llama_context``: batches in, logits views out, a mirror of its KV cells.

    ``llama`` is the ``llama_cpp.Llama`` whose model and vocabulary the context uses (tokenizing);
    ``batch`` a ``llama_batch`` of at least ``n_batch`` tokens. The batch decoder measures its
    batch-cost table through one on a spare sequence id of its context.
    """

    def __init__(self, llama: Any, ctx: Any, batch: Any, *, n_batch: int, n_ctx: int, seq: int = 0,
                 tuner: ThreadTuner | None = None) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llama = llama
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.batch = batch
        self.seq = seq
        self.n_batch = n_batch
        self.n_ctx = n_ctx
        self.n_vocab = int(llama.n_vocab())
        self.kv: list[int] = []  # mirror of what the KV cache holds for ``seq``
        self.evaluated = 0  # tokens evaluated so far (a draft model's cost)
        self.tuner = tuner  # picks each decode's thread count (None: the context's own, fixed)

    # --- state ------------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions of the KV cache."""
        if n < len(self.kv):
            self._lib.llama_memory_seq_rm(self.memory, self.seq, n, -1)
            del self.kv[n:]
            self._kept(n)
        self._stale()

    def reset(self) -> None:
        self._lib.llama_memory_seq_rm(self.memory, self.seq, 0, -1)
        self.kv = []

    def _kept(self, n: int) -> None:
        """The cache now holds ``kv[:n]`` (hook: the ``Llama``'s own bookkeeping)."""

    def _wrote(self, n_past: int, chunk: Sequence[int]) -> None:
        """``chunk`` was decoded at ``n_past`` (hook)."""

    def _stale(self) -> None:
        """The context's logits changed (hook)."""

    # --- evaluation ---------------------------------------------------------------------------
    def feed(self, tokens: Sequence[int], *, all_logits: bool = False) -> float:
        """Append ``tokens`` to the KV cache; logits for the last one (or all, one batch at most).

        Returns the seconds the last ``llama_decode`` took (the cost model learns from it).
        """
        if not tokens:
            raise ValueError("nothing to evaluate")
        if all_logits and len(tokens) > self.n_batch:
            raise ValueError("logits for every position need the tokens to fit in one batch")
        if len(self.kv) + len(tokens) > self.n_ctx:
            raise GenerationError(f"the context window ({self.n_ctx} tokens) is full")
        batch, lib = self.batch, self._lib
        elapsed = 0.0
        for lo in range(0, len(tokens), self.n_batch):
            chunk = tokens[lo:lo + self.n_batch]
            n_past, n = len(self.kv), len(chunk)
            batch.n_tokens = n
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = n_past + i
                batch.seq_id[i][0] = self.seq
                batch.n_seq_id[i] = 1
                batch.logits[i] = all_logits
            batch.logits[n - 1] = True
            if self.tuner is not None:
                self.tuner.before(lambda k: lib.llama_set_n_threads(self.ctx, k, k))
            start = time.perf_counter()
            rc = lib.llama_decode(self.ctx, batch)
            elapsed = time.perf_counter() - start
            if self.tuner is not None and rc == 0:
                self.tuner.after(elapsed, n)
            if rc != 0:
                # the failed batch may have left part of itself in the cache: drop it
                lib.llama_memory_seq_rm(self.memory, self.seq, n_past, -1)
                raise GenerationError(f"llama_decode returned {rc} (batch of {n} at position {n_past})")
            self.kv.extend(chunk)
            self.evaluated += n
            self._wrote(n_past, chunk)
        self._stale()
        return elapsed

    def logits(self, i: int) -> np.ndarray:
        """A zero-copy view of the logits of output ``i`` of the last batch (-1: the last output)."""
        ptr = self._lib.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise GenerationError(f"llama.cpp has no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def argmax(self, i: int) -> int:
        return int(np.argmax(self.logits(i)))

    def top(self, i: int) -> tuple[int, float]:
        """The most likely token of output ``i`` and its probability (one pass of exp, no sort)."""
        row = self.logits(i)
        token = int(np.argmax(row))
        total = float(np.exp(row - row[token]).sum())
        return token, 1.0 / total

    def sync(self, seq: Sequence[int]) -> float:
        """Make the KV cache hold ``seq`` and the last logits be those after ``seq[-1]``.

        Reuses the longest cached prefix (re-evaluating one token when all of ``seq`` is cached).
        """
        keep = common_prefix(self.kv, seq)
        if keep == len(seq):
            keep -= 1
        self.truncate(keep)
        return self.feed(seq[keep:])


class LlamaRunner(ContextRunner):
    """The ``Llama``'s own context (sequence 0), its bookkeeping (``n_tokens``, ``input_ids``) kept true."""

    def __init__(self, llama: Any, *, tuner: ThreadTuner | None = None) -> None:
        super().__init__(llama, llama._ctx.ctx, llama._batch.batch, n_batch=int(llama.n_batch),
                         n_ctx=int(llama.n_ctx()), tuner=tuner)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the ``Llama``'s state: another path (vanilla ``generate``) may have used it."""
        self.kv = self.llama.input_ids[: self.llama.n_tokens].tolist()
        self._lib.llama_memory_seq_rm(self.memory, 0, len(self.kv), -1)

    def reset(self) -> None:
        self._lib.llama_memory_clear(self.memory, True)
        self.kv = []
        self._kept(0)
        self._stale()

    def _kept(self, n: int) -> None:
        self.llama.n_tokens = n

    def _wrote(self, n_past: int, chunk: Sequence[int]) -> None:
        self.llama.input_ids[n_past:n_past + len(chunk)] = chunk
        self.llama.n_tokens = n_past + len(chunk)

    def _stale(self) -> None:
        self.llama._requires_eval = True  # the context's logits are no longer the vanilla path's
