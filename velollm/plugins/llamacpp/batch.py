"""Continuous batching for llama.cpp: concurrent requests share every ``llama_decode``.

One ``llama_context`` holds up to ``n_parallel`` running sequences (``n_seq_max``) in a unified
KV cache, and a scheduler thread runs the loop llama.cpp's server runs: every step decodes one
token for each generating sequence plus chunks of waiting prompts (chunked prefill) in a single
batch, then samples each sequence from its own output row. On this 2-core CPU a batch of 8 tokens
costs ~3x one token, so 8 sequences decode ~2.7x faster together than in turn.

Why the pieces look as they do:

* **Sequences own everything per request**: sampler chain (seed), grammar state, stop strings,
  budget, cancellation. A closed stream marks its sequence cancelled; the scheduler frees its slot
  before the next decode. An exception while sampling one sequence fails that sequence only; a
  failed ``llama_decode`` is retried sequence by sequence so only the culprit fails.
* **Prefix cache**: in a unified KV cache ``llama_memory_seq_cp`` does not copy data, it tags the
  same cells with another sequence id. A finished sequence keeps its KV under its id as a cache
  entry (LRU); a new request attaches the longest common prefix of any cache entry or running
  sequence instead of recomputing it. Requests that arrive together with the same prefix (DSPy
  threads) wait for the first one to prefill it rather than computing it N times.
* **Exact cell accounting** (:class:`KvLedger`): llama.cpp has no "used cells" call, and shared
  cells must not be counted twice, so the scheduler mirrors every decode, copy and removal with
  per-cell reference counts. A prompt that does not fit waits in the queue (cache entries are
  evicted first); a running sequence that no longer fits is preempted (its KV dropped, it re-enters
  the queue with its tokens so far and resumes where it was).
* **Speculation for a lone sequence** (:mod:`.speculative`): while one sequence runs alone and
  nobody waits, its step carries a draft after its last token (prompt lookup, a walk along its
  constraint, a draft model), with logits on every draft row; it picks row by row with its own
  picker until the first disagreement and the rejected cells are removed. Once another sequence
  shares the step, the batch already costs what verification would, and speculation steps aside.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from velollm.engine import Chunk, Timings, Usage
from velollm.errors import EngineClosed, GenerationError, VeloError
from velollm.plugins.llamacpp.runner import ContextRunner, common_prefix
from velollm.plugins.llamacpp.threads import ThreadTuner
from velollm.textstream import TokenTextStream

log = logging.getLogger(__name__)

#: Requests whose shared prefix is shorter than this are not held back to wait for another's prefill.
MIN_SHARED_WAIT = 16


# --- pickers: how one sequence chooses its next token ------------------------------------------
class Picker(Protocol):
    """Chooses (and accepts) the next token of one sequence from output ``i`` of the last decode."""

    def pick(self, ctx: Any, i: int, row: np.ndarray) -> int: ...

    def close(self) -> None: ...


class GreedyPicker:
    """Plain argmax (temperature 0, no penalties)."""

    def pick(self, ctx: Any, i: int, row: np.ndarray) -> int:
        return int(np.argmax(row))

    def close(self) -> None:
        pass


class ChainPicker:
    """A llama.cpp sampler chain owned by one sequence (``llama_sampler_sample`` samples and accepts)."""

    def __init__(self, sampler: Any) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._sampler = sampler  # a llama_cpp._internals.LlamaSampler (frees its chain on close)

    def pick(self, ctx: Any, i: int, row: np.ndarray) -> int:
        return int(self._lib.llama_sampler_sample(self._sampler.sampler, ctx, i))

    def close(self) -> None:
        self._sampler.close()


class GrammarPicker:
    """The grammar fast path of :mod:`velollm.plugins.llamacpp.grammar`, one state per sequence."""

    def __init__(self, grammar: Any, chain: Any = None) -> None:
        self._grammar, self._chain = grammar, chain

    def pick(self, ctx: Any, i: int, row: np.ndarray) -> int:
        return self._grammar.pick(row)

    def close(self) -> None:
        self._grammar.close()
        if self._chain is not None:
            self._chain.close()


class ConstraintPicker:
    """A :class:`velollm.constraints.ConstraintState` (llguidance) with the request's chain or argmax;
    ``done`` once the constraint is complete (the sequence then stops, as the single-sequence path does)."""

    def __init__(self, state: Any, chain: Any = None) -> None:
        self._state, self._chain = state, chain
        self._buf: dict[str, Any] = {}
        self.drafts: Any = None  # speculative.ConstraintDrafts when the sequence speculates along the constraint

    def pick(self, ctx: Any, i: int, row: np.ndarray) -> int:
        from velollm.plugins.llamacpp.grammar import constrained_pick

        token = constrained_pick(self._state, row, self._chain, self._buf)
        if self.drafts is not None:
            self.drafts.note(token)
        self._state.advance(token)
        return token

    def start_drafts(self) -> Any:
        """Drafting along this constraint (:class:`.speculative.speculator.ConstraintDrafts`)."""
        from velollm.plugins.llamacpp.speculative.speculator import ConstraintDrafts

        self.drafts = ConstraintDrafts(self._state)
        return self.drafts

    @property
    def done(self) -> bool:
        return bool(self._state.done)

    def take_forced(self) -> list[int]:
        """Tokens the constraint forces next, already advanced (they are decoded later as one chunk)."""
        if self._state.done:
            return []
        tokens = self._state.forced()
        for token in tokens:
            self._state.advance(token)
            if self._chain is not None:
                self._chain.accept(token)
        return tokens

    def close(self) -> None:
        if self._chain is not None:
            self._chain.close()


class LoopGuard:
    """Stops unconstrained text that repeats itself (velollm.constraints.loops), around another picker."""

    def __init__(self, inner: Picker, detector: Any) -> None:
        self._inner, self._detector = inner, detector
        self.done = False

    def pick(self, ctx: Any, i: int, row: np.ndarray) -> int:
        token = self._inner.pick(ctx, i, row)
        self.done = bool(self._detector.feed(token))
        return token

    def close(self) -> None:
        self._inner.close()


class SamplerPicker:
    """Adapter for ``sampling.SequenceSampler`` (``sample(ctx, i)`` + ``accept(token)``)."""

    def __init__(self, sampler: Any) -> None:
        self._sampler = sampler

    def pick(self, ctx: Any, i: int, row: np.ndarray) -> int:
        token = int(self._sampler.sample(ctx, i))
        self._sampler.accept(token)
        return token

    def close(self) -> None:
        self._sampler.close()


# --- KV cell accounting ----------------------------------------------------------------------------
class _Block:
    """Physical KV cells written by consecutive decodes of one sequence; ``refs[k]`` counts their seq tags."""

    __slots__ = ("refs", "start")

    def __init__(self, start: int, n: int) -> None:
        self.start = start
        self.refs = [1] * n

    @property
    def end(self) -> int:
        return self.start + len(self.refs)


class KvLedger:
    """Mirror of a unified KV cache: which cells each sequence id uses, shared cells counted once."""

    def __init__(self, n_cells: int) -> None:
        self.n_cells = n_cells
        self.used = 0
        self._runs: dict[int, list[list[Any]]] = {}  # seq -> [[block, lo, hi]] in position order
        self._tail: dict[int, _Block] = {}  # seq -> the block its own decodes extend

    @property
    def free(self) -> int:
        return self.n_cells - self.used

    def length(self, seq: int) -> int:
        runs = self._runs.get(seq)
        return runs[-1][2] if runs else 0

    def append(self, seq: int, pos: int, n: int) -> None:
        """``n`` new cells for ``seq`` at positions ``pos..pos+n-1`` (a decode)."""
        runs = self._runs.setdefault(seq, [])
        last = runs[-1] if runs else None
        if last is not None and last[0] is self._tail.get(seq) and last[2] == pos == last[0].end:
            last[0].refs.extend([1] * n)
            last[2] += n
        else:
            block = self._tail[seq] = _Block(pos, n)
            runs.append([block, pos, pos + n])
        self.used += n

    def copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        """``llama_memory_seq_cp(src, dst, p0, p1)``: dst shares src's cells, no new cells."""
        runs = self._runs.setdefault(dst, [])
        for block, lo, hi in list(self._runs.get(src, [])):
            a, b = max(lo, p0), min(hi, p1)
            if a >= b:
                continue
            refs, base = block.refs, block.start
            for p in range(a - base, b - base):
                if refs[p] == 0:
                    self.used += 1
                refs[p] += 1
            runs.append([block, a, b])

    def remove(self, seq: int, p0: int = 0) -> None:
        """``llama_memory_seq_rm(seq, p0, -1)``."""
        self._tail.pop(seq, None)
        runs = self._runs.get(seq)
        if not runs:
            return
        keep: list[list[Any]] = []
        for run in runs:
            block, lo, hi = run
            a = max(lo, p0)
            if a < hi:
                refs, base = block.refs, block.start
                for p in range(a - base, hi - base):
                    refs[p] -= 1
                    if refs[p] == 0:
                        self.used -= 1
                if lo < a:
                    keep.append([block, lo, a])
            else:
                keep.append(run)
        if keep:
            self._runs[seq] = keep
        else:
            del self._runs[seq]


# --- sequences ------------------------------------------------------------------------------------
class Sequence:
    """One request inside the batch: its tokens, sampler, text stream, output queue and fate."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], picker: Picker, *, max_new: int, stop: list[str] | None = None,
                 logprobs: Any = None, session: Any = None) -> None:
        if not prompt:
            raise GenerationError("a sequence needs at least one prompt token")
        self.id = next(Sequence._ids)
        self.tokens = list(prompt)
        self.n_prompt = len(prompt)
        self.picker = picker
        self.max_new = max_new
        self.logprobs = logprobs  # a velollm.logprobs.LogprobRecorder (on_logits(row, token), take()) or None
        self.session = session  # a speculative.Session: this sequence speculates while it decodes alone
        self.draft: list[int] | None = None  # this step's draft, decoded after its tokens (None: no plan)
        self.text = TokenTextStream(stop or [])
        self.n_past = 0  # tokens whose KV is in the cache under ``slot``
        self.slot: int | None = None
        self.cached = 0  # prompt tokens whose KV came from the cache or another sequence
        self.n_out = 0
        self.order = 0  # admission order (preempted sequences keep theirs)
        self.cancelled = False
        self.done = False
        self.events: queue.SimpleQueue[Chunk | BaseException] = queue.SimpleQueue()
        self.start = time.perf_counter()
        self.first: float | None = None
        self._wake: Callable[[], None] = lambda: None

    def cancel(self) -> None:
        """Stop generating; the scheduler frees the slot before its next decode."""
        self.cancelled = True
        self._wake()

    def chunks(self) -> SequenceStream:
        """The consumer side: chunks until the final one; closing (or dropping) it cancels the sequence."""
        return SequenceStream(self)


class SequenceStream(Iterator[Chunk]):
    """Iterates one sequence's chunks; ``close()`` (or garbage collection) cancels it at once."""

    def __init__(self, seq: Sequence) -> None:
        self._seq = seq
        self._ended = False

    def __next__(self) -> Chunk:
        if self._ended:
            raise StopIteration
        event = self._seq.events.get()
        if isinstance(event, BaseException):
            self._ended = True
            raise event
        if event.finish_reason is not None:
            self._ended = True
        return event

    def close(self) -> None:
        self._ended = True
        if not self._seq.done:
            self._seq.cancel()

    def __del__(self) -> None:
        self.close()


# --- the scheduler --------------------------------------------------------------------------------
class BatchDecoder:
    """N sequences in one llama.cpp context, decoded together by one scheduler thread.

    ``llama`` is the engine's ``llama_cpp.Llama`` (its model, vocabulary and thread settings are
    used; its own context is not touched). ``cache_slots`` extra sequence ids keep finished
    sequences' KV for prefix reuse.
    """

    def __init__(self, llama: Any, *, n_parallel: int, n_ctx: int, n_batch: int = 512, cache_slots: int | None = None,
                 is_eog: Callable[[int], bool], piece: Callable[[int], bytes], adaptive_threads: bool = True,
                 offload_kqv: bool = True) -> None:
        import llama_cpp
        from llama_cpp import _internals

        if n_parallel < 1:
            raise ValueError("n_parallel must be at least 1")
        self._lib = llama_cpp
        self.llama = llama
        self.n_parallel = n_parallel
        self.cache_slots = max(n_parallel, 4) if cache_slots is None else cache_slots
        n_seq = min(n_parallel + self.cache_slots, int(llama_cpp.llama_max_parallel_sequences()))
        self.cache_slots = n_seq - n_parallel
        params = llama_cpp.llama_context_params.from_buffer_copy(llama.context_params)
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, int(llama.context_params.n_ubatch) or n_batch)
        params.n_seq_max = n_seq
        params.kv_unified = True  # shared prefixes are tagged cells, not copies
        params.swa_full = True  # sliding-window models: prefixes stay copyable and removable
        params.embeddings = False
        params.offload_kqv = offload_kqv  # the Llama's own (tokenizing) context keeps its KV in RAM
        self._context = _internals.LlamaContext(model=llama._model, params=params, verbose=False)
        self.ctx = self._context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx))
        self.n_vocab = int(llama.n_vocab())
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._is_eog, self._piece = is_eog, piece
        self.ledger = KvLedger(self.n_ctx)
        n_threads = int(params.n_threads)
        self.tuner = ThreadTuner(n_threads) if adaptive_threads and n_threads > 1 else None
        self._threads = n_threads
        self._cost_threads = n_threads  # the thread count the speculation cost table was measured at
        self._free_ids = list(range(n_seq))[::-1]
        self._cache: OrderedDict[int, list[int]] = OrderedDict()  # seq id -> tokens in its KV (LRU first)
        self._running: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        self._inbox: deque[Sequence] = deque()
        self._orders = itertools.count()
        self._cond = threading.Condition()
        self._closing = False
        self._clear_cache = False
        self._on_clear: list[Callable[[], None]] = []  # run by the scheduler with the next cache clearing
        self.stats: dict[str, float] = {"steps": 0, "decoded": 0, "cached_tokens": 0, "preempted": 0, "evicted": 0,
                                        "decode_s": 0.0, "sample_s": 0.0, "sequences": 0}
        self._thread = threading.Thread(target=self._loop, name="velollm-batch", daemon=True)
        self._thread.start()

    # --- public ---------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        """Queue a sequence; iterate ``seq.chunks()`` for its output."""
        if len(seq.tokens) >= self.n_ctx:
            raise GenerationError(f"the prompt has {len(seq.tokens)} tokens; the context holds {self.n_ctx}")
        seq._wake = self._wake
        with self._cond:
            if self._closing:
                raise EngineClosed("the batch decoder is closed")
            self._inbox.append(seq)
            self._cond.notify()
        return seq

    def clear_cache(self, then: Callable[[], None] | None = None) -> None:
        """Forget cached prefixes (benchmarks measure cold prefill); ``then`` runs on the scheduler thread
        right after (a draft model's cache is reset there, never under a running draft)."""
        with self._cond:
            self._clear_cache = True
            if then is not None:
                self._on_clear.append(then)
            self._cond.notify()

    @contextlib.contextmanager
    def spare_runner(self) -> Iterator[ContextRunner]:
        """A runner on a free sequence id of this context, for load-time measurements (speculation's
        batch-cost table): use it before any request is submitted; its cells are dropped after."""
        slot = self._take_id()
        if slot is None:
            raise GenerationError("the batch context has no free sequence id to measure on")
        runner = ContextRunner(self.llama, self.ctx, self._batch, n_batch=self.n_batch, n_ctx=self.n_ctx, seq=slot)
        self._cost_threads = self._threads
        try:
            yield runner
        finally:
            runner.reset()
            self._free_ids.append(slot)

    @property
    def busy(self) -> int:
        return len(self._running) + len(self._waiting) + len(self._inbox)

    def close(self) -> None:
        """Fail what is still queued or running with EngineClosed and free the context."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        self._context.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closing or self._inbox or self._running or self._waiting or self._clear_cache):
                    self._cond.wait()
                if self._closing:
                    break
                while self._inbox:
                    seq = self._inbox.popleft()
                    seq.order = next(self._orders)
                    self._waiting.append(seq)
                clear, self._clear_cache = self._clear_cache, False
                then, self._on_clear = self._on_clear, []
            try:
                if clear:
                    self._evict_all()
                for fn in then:
                    fn()
                if not self._step():
                    with self._cond:  # nothing could run (all waiting on others): do not spin
                        if not self._inbox and not self._closing:
                            self._cond.wait(0.01)
            except Exception as exc:  # a scheduler bug must not leave callers waiting forever
                log.exception("batch scheduler step failed")
                for seq in [*self._running, *self._waiting]:
                    self._fail(seq, GenerationError(f"the batch scheduler failed: {type(exc).__name__}: {exc}"))
                self._running.clear()
                self._waiting.clear()
        error = EngineClosed("the engine was closed while this request was queued or running")
        for seq in [*self._running, *self._waiting, *self._inbox]:
            self._fail(seq, error)

    def _step(self) -> bool:
        """One scheduling round; False when there was nothing to decode."""
        self._reap()
        self._admit()
        entries = self._plan()
        if not entries:
            return False
        self._decode(entries)
        self.stats["steps"] += 1
        return True

    # --- slots and cache ------------------------------------------------------------------------
    def _reap(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._retire(seq)
            self._finish_silently(seq)
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._finish_silently(seq)

    def _retire(self, seq: Sequence, *, keep: bool = True) -> None:
        """Leave the running set; a healthy sequence's KV becomes a cache entry."""
        if seq in self._running:
            self._running.remove(seq)
        slot, seq.slot = seq.slot, None
        if slot is None:
            return
        self._lib.llama_memory_seq_rm(self.memory, slot, seq.n_past if keep else 0, -1)
        self.ledger.remove(slot, seq.n_past if keep else 0)
        if not keep or seq.n_past == 0 or self.cache_slots == 0:
            self._drop_kv(slot)
            return
        tokens = seq.tokens[:seq.n_past]
        for other, cached in list(self._cache.items()):  # entries this one extends are redundant
            if len(cached) <= len(tokens) and tokens[:len(cached)] == cached:
                self._evict(other)
        self._cache[slot] = tokens
        while len(self._cache) > self.cache_slots:
            self._evict(next(iter(self._cache)))

    def _drop_kv(self, slot: int) -> None:
        self._lib.llama_memory_seq_rm(self.memory, slot, 0, -1)
        self.ledger.remove(slot)
        self._free_ids.append(slot)

    def _evict(self, slot: int) -> None:
        self._cache.pop(slot, None)
        self._drop_kv(slot)
        self.stats["evicted"] += 1

    def _evict_all(self) -> None:
        for slot in list(self._cache):
            self._evict(slot)

    def _make_room(self, need: int, protect: int | None = None) -> bool:
        """Evict least recently used cache entries until ``need`` cells are free."""
        for slot in list(self._cache):
            if self.ledger.free >= need:
                break
            if slot != protect:
                self._evict(slot)
        return self.ledger.free >= need

    def _take_id(self) -> int | None:
        if self._free_ids:
            return self._free_ids.pop()
        if self._cache:
            slot = next(iter(self._cache))
            self._evict(slot)
            return self._free_ids.pop()
        return None

    def _best_source(self, seq: Sequence) -> tuple[int | None, int]:
        """The sequence id whose KV shares the longest prefix with ``seq`` (beyond what it has)."""
        limit = len(seq.tokens) - 1  # the last prompt token is decoded by the sequence itself
        best, best_n = None, seq.n_past
        for slot, tokens in self._cache.items():
            n = min(common_prefix(tokens, seq.tokens), limit)
            if n > best_n:
                best, best_n = slot, n
        for other in self._running:
            if other is seq or other.slot is None:
                continue
            n = min(common_prefix(other.tokens[:other.n_past], seq.tokens), limit)
            if n > best_n:
                best, best_n = other.slot, n
        return best, best_n

    def _attach(self, seq: Sequence) -> None:
        """Share the longest available prefix of ``seq`` from the cache or a running sequence."""
        src, n = self._best_source(seq)
        if src is None or seq.slot is None:
            return
        self._lib.llama_memory_seq_cp(self.memory, src, seq.slot, seq.n_past, n)
        self.ledger.copy(src, seq.slot, seq.n_past, n)
        if src in self._cache:
            self._cache.move_to_end(src)
        if seq.n_past < seq.n_prompt:
            seq.cached += min(n, seq.n_prompt) - seq.n_past
        seq.n_past = n

    def _admit(self) -> None:
        """Move waiting sequences into free slots, FIFO, while their prompts fit the context."""
        while self._waiting and len(self._running) < self.n_parallel:
            seq = self._waiting[0]
            src, shared = self._best_source(seq)
            need = len(seq.tokens) - shared
            if not self._make_room(need, protect=src) and self._running:
                return  # the context is full: wait for running sequences to finish
            slot = self._take_id()
            if slot is None:
                return
            self._waiting.popleft()
            seq.slot = slot
            self._running.append(seq)
            self._running.sort(key=lambda s: s.order)
            self._attach(seq)

    def _blocked_by(self, seq: Sequence) -> bool:
        """Whether an earlier sequence is about to compute a long prefix ``seq`` shares (wait for it)."""
        for other in self._running:
            if other.order >= seq.order or other.n_past >= other.n_prompt:
                continue
            shared = min(common_prefix(other.tokens, seq.tokens), len(seq.tokens) - 1)
            if shared - seq.n_past >= MIN_SHARED_WAIT and other.n_past < shared:
                return True
        return False

    def _preempt(self) -> bool:
        """Drop the newest running sequence's KV and queue it again (it resumes from its tokens)."""
        if len(self._running) <= 1:
            return False
        victim = max(self._running, key=lambda s: s.order)
        self._running.remove(victim)
        slot, victim.slot = victim.slot, None
        if slot is not None:
            self._drop_kv(slot)
        victim.n_past = 0
        self._waiting.appendleft(victim)
        self.stats["preempted"] += 1
        return True

    # --- one decode -------------------------------------------------------------------------------
    def _plan(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, first position, token count) for this step: decodes first, then prompt chunks."""
        while True:
            for seq in self._running:
                if seq.n_past < len(seq.tokens) - 1:
                    self._attach(seq)
            budget = self.n_batch
            entries: list[tuple[Sequence, int, int]] = []
            for seq in self._running:  # generating sequences: one token each
                if seq.n_past == len(seq.tokens) - 1 and budget > 0:
                    entries.append((seq, seq.n_past, 1))
                    budget -= 1
            for seq in self._running:  # prompt chunks, oldest first
                if seq.n_past >= len(seq.tokens) - 1 or budget <= 0 or self._blocked_by(seq):
                    continue
                n = min(len(seq.tokens) - seq.n_past, budget)
                entries.append((seq, seq.n_past, n))
                budget -= n
            need = sum(n for _, _, n in entries)
            if self._make_room(need) or not self._preempt():
                self._speculate(entries)
                return entries

    def _speculate(self, entries: list[tuple[Sequence, int, int]]) -> None:
        """Draft for a lone sequence (:mod:`.speculative`): when it is the only one running and nobody
        waits, its step is a one-sequence decode, priced by the batch-cost table as on the ``Llama``'s
        own context. With other sequences in the step, the batch already spends what verification
        would cost and the gain is gone, so speculation steps aside (``stepped_aside`` counts it)."""
        lone = len(entries) == 1 and len(self._running) == 1 and not self._waiting and not self._inbox
        for k, (seq, pos, n) in enumerate(entries):
            session = seq.session
            if session is None or seq.n_out == 0 or pos + n != len(seq.tokens):
                continue  # no speculation, still in its prompt, or a prompt chunk
            if not lone:
                session.stats.stepped_aside += 1
                continue
            room = min(self.n_batch - n, self.ledger.free - n, self.n_ctx - len(seq.tokens))
            try:
                seq.draft = session.plan(seq.tokens, min(session.spec.max_gamma, seq.max_new - seq.n_out - 1, room))
            except Exception:  # a drafter's failure must not fail the request: it goes on without speculation
                log.exception("speculative drafting failed; the sequence continues without it")
                seq.session = seq.draft = None
                continue
            entries[k] = (seq, pos, n + len(seq.draft))

    def _fill(self, entries: list[tuple[Sequence, int, int]]) -> list[int]:
        """Write the batch; returns, per entry, the batch index of its logits (-1: none)."""
        batch = self._batch
        idx, outs = 0, []
        for seq, pos, n in entries:
            tokens, slot, draft = seq.tokens, seq.slot, seq.draft or []
            known = len(tokens)
            for j in range(n):
                p = pos + j
                batch.token[idx] = tokens[p] if p < known else draft[p - known]
                batch.pos[idx] = p
                batch.n_seq_id[idx] = 1
                batch.seq_id[idx][0] = slot
                batch.logits[idx] = False
                idx += 1
            if pos + n - len(draft) == known:  # logits after the last known token and after each draft token
                first = idx - 1 - len(draft)
                for k in range(first, idx):
                    batch.logits[k] = True
                outs.append(first)
            else:
                outs.append(-1)
        batch.n_tokens = idx
        return outs

    def _decode(self, entries: list[tuple[Sequence, int, int]]) -> None:
        outs = self._fill(entries)
        if self.tuner is not None:
            self._threads = self.tuner.before(lambda n: self._lib.llama_set_n_threads(self.ctx, n, n))
        start = time.perf_counter()
        rc = self._lib.llama_decode(self.ctx, self._batch)
        elapsed = time.perf_counter() - start
        self.stats["decode_s"] += elapsed
        if self.tuner is not None and rc == 0:
            self.tuner.after(elapsed, self._batch.n_tokens)
        if rc != 0:
            self._undo(entries)
            drafted = any(seq.draft for seq, _, _ in entries)
            entries = [self._undraft(entry) for entry in entries]
            if len(entries) > 1 or drafted:  # find the culprit: decode each sequence alone, without drafts
                for entry in entries:
                    if entry[0].slot is not None:
                        self._decode([entry])
                return
            seq = entries[0][0]
            reason = "no room in the KV cache" if rc == 1 else f"llama_decode returned {rc}"
            self._fail(seq, GenerationError(f"llama.cpp failed while generating: {reason}"))
            return
        for seq, pos, n in entries:
            self.ledger.append(seq.slot, pos, n)  # type: ignore[arg-type]
            seq.n_past = pos + n - len(seq.draft or ())  # draft cells count once verified (_verify)
            self.stats["decoded"] += n
        lone = entries[0][0] if len(entries) == 1 else None
        if lone is not None and lone.draft is not None and self._threads == self._cost_threads:
            lone.session.spec.table.observe(self._batch.n_tokens, elapsed)  # a lone step: what the table prices
        start = time.perf_counter()
        for (seq, _, _), i in zip(entries, outs, strict=True):
            if seq.draft is not None:
                self._verify(seq, i)
            elif i >= 0 and not seq.cancelled:
                self._advance(seq, i)
        self.stats["sample_s"] += time.perf_counter() - start

    @staticmethod
    def _undraft(entry: tuple[Sequence, int, int]) -> tuple[Sequence, int, int]:
        """The entry without its draft (a failed decode is retried plain)."""
        seq, pos, n = entry
        draft, seq.draft = seq.draft, None
        return (seq, pos, n - len(draft)) if draft else entry

    def _verify(self, seq: Sequence, first: int) -> None:
        """Pick along this step's draft row by row, as plain decoding would pick (forced tokens included),
        until the first disagreement (:func:`~velollm.plugins.llamacpp.speculative.speculator.verify`);
        then drop the cells of the draft tokens that did not stay."""
        from velollm.plugins.llamacpp.speculative.speculator import verify

        base, draft = seq.n_past, seq.draft or []  # the sequence's tokens are in the cache; the draft after them

        def pick_row(row: int) -> list[int] | None:
            if seq.done or seq.cancelled:
                return None
            self._advance(seq, first + row)
            return None if seq.done else seq.tokens[base:]

        verify(draft, pick_row)
        kept = self._settle(seq)
        if seq.slot is not None and kept < len(draft):
            self._lib.llama_memory_seq_rm(self.memory, seq.slot, base + kept, -1)
            self.ledger.remove(seq.slot, base + kept)
        if seq.slot is not None:
            seq.n_past = base + kept

    def _settle(self, seq: Sequence) -> int:
        """Close the step's draft (once): how many of its tokens stay, told to the speculation session."""
        draft, seq.draft = seq.draft, None
        if draft is None or seq.session is None:
            return 0
        kept = common_prefix(seq.tokens[seq.n_past:], draft)
        seq.session.settle(seq.tokens, kept)
        return kept

    def _undo(self, entries: list[tuple[Sequence, int, int]]) -> None:
        """A failed decode may leave part of its batch in the cache: remove it."""
        for seq, pos, _ in entries:
            if seq.slot is not None:
                self._lib.llama_memory_seq_rm(self.memory, seq.slot, pos, -1)

    def _advance(self, seq: Sequence, i: int) -> None:
        """Sample sequence ``seq`` from output ``i`` and stream the text; finish it when it is done."""
        try:
            ptr = self._lib.llama_get_logits_ith(self.ctx, i)
            if not ptr:
                raise GenerationError(f"llama.cpp has no logits for output {i}")
            row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            token = seq.picker.pick(self.ctx, i, row)
            if seq.logprobs is not None and not self._is_eog(token):
                seq.logprobs.on_logits(row, token)
        except Exception as exc:
            self._fail(seq, exc if isinstance(exc, VeloError) else GenerationError(
                f"sampling failed: {type(exc).__name__}: {exc}"))
            return
        if seq.first is None:
            seq.first = time.perf_counter()
        if self._emit(seq, token):
            return
        # While other sequences share the step, the run of tokens a constraint forces next is inserted at
        # once (llguidance's spelling of the forced text) and decoded as one chunk: it saves every sequence
        # steps. Alone, the model picks them under the mask like the single-sequence path, so a lone
        # request gives that path's output (the inserted spelling is not always the model's: on DSPy's
        # ChainOfThought a 0.5B model then looped); a speculating sequence drafts and verifies them instead.
        take_forced = getattr(seq.picker, "take_forced", None)
        if take_forced is None or seq.logprobs is not None or len(self._running) < 2:
            return
        try:
            forced = take_forced()
        except Exception as exc:
            self._fail(seq, exc if isinstance(exc, VeloError) else GenerationError(
                f"constraint failed: {type(exc).__name__}: {exc}"))
            return
        for token in forced:
            if self._emit(seq, token):
                return

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Append one chosen token and stream its text; True when the sequence finished."""
        if self._is_eog(token):
            self._finish(seq, "stop")
            return True
        seq.tokens.append(token)
        seq.n_out += 1
        text = seq.text.feed(self._piece(token))
        if text:
            seq.events.put(Chunk(text=text, logprobs=seq.logprobs.take() if seq.logprobs is not None else None))
        if seq.text.stopped or getattr(seq.picker, "done", False):
            self._finish(seq, "stop")
        elif seq.n_out >= seq.max_new or len(seq.tokens) >= self.n_ctx:
            self._finish(seq, "length")
        else:
            return False
        return True

    # --- endings ----------------------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str) -> None:
        end = time.perf_counter()
        tail = seq.text.finish()
        speculation: dict[str, Any] = {}
        if seq.session is not None:  # finished while verifying a draft: that step counts too
            self._settle(seq)
            speculation = seq.session.finish(seq.tokens).as_dict()
        self.stats["cached_tokens"] += seq.cached
        self.stats["sequences"] += 1
        seq.done = True
        self._retire(seq)
        seq.picker.close()
        seq.events.put(Chunk(
            text=tail, finish_reason=reason,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=seq.n_prompt, completion_tokens=seq.n_out, cached_tokens=seq.cached),
            timings=Timings.measure(seq.start, seq.first, end, seq.n_prompt, seq.n_out, batched=True,
                                    cached_tokens=seq.cached, **speculation),
            logprobs=seq.logprobs.take() if seq.logprobs is not None else None,
        ))

    def _finish_silently(self, seq: Sequence) -> None:
        """A cancelled sequence: nobody reads its events any more."""
        seq.done = True
        seq.picker.close()

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        if seq.done:
            return
        seq.done = True
        if seq in self._running or seq.slot is not None:
            self._retire(seq, keep=False)
        try:
            seq.picker.close()
        except Exception:  # pragma: no cover - closing a sampler must not hide the real error
            log.exception("closing a sampler failed")
        seq.events.put(error)


# --- the engine's side ------------------------------------------------------------------------------
def picker_for(engine: Any, request: Any, grammar: Any, seed: int, max_new: int) -> Picker:
    """The sequence's token chooser, as the engine's single-sequence path chooses: argmax or the request's
    sampler chain (with the loop guard), the constraint (llguidance) or llama.cpp's grammar fast path."""
    from velollm.errors import GrammarError
    from velollm.plugins.llamacpp.sampling import is_greedy

    if grammar is None:
        base: Picker = GreedyPicker() if is_greedy(request) else SamplerPicker(engine.sampler_for(request, seed))
        loops = engine._loop_detector(request) if hasattr(engine, "_loop_detector") else None
        return base if loops is None else LoopGuard(base, loops)
    if request.extra.get("grammar_check") == "full":
        return SamplerPicker(engine.sampler_for(request, seed, grammar))
    from velollm.plugins.llamacpp.grammar import GrammarSampler

    state = None
    if hasattr(engine, "constraint_state"):
        try:
            state = engine.constraint_state(request, max_new)
        except GrammarError:  # a GBNF dialect detail llguidance reads differently: llama.cpp's sampler
            state = None
    chain = None if is_greedy(request) else engine.sampler_for(request, seed)
    if state is not None:
        return ConstraintPicker(state, chain)
    try:
        sampler = GrammarSampler(engine._vocab, engine._llama.n_vocab(), grammar._grammar,
                                 None if chain is None else chain.sampler)
    except BaseException:
        if chain is not None:
            chain.close()
        raise
    return GrammarPicker(sampler, chain)


def open_decoder(engine: Any, *, n_parallel: int, n_ctx: int) -> BatchDecoder:
    """A BatchDecoder on the engine's model (its ``Llama`` keeps a small context of its own)."""
    return BatchDecoder(engine._llama, n_parallel=n_parallel, n_ctx=n_ctx, n_batch=engine.options.n_batch,
                        is_eog=engine.is_end_of_generation, piece=engine._piece,
                        offload_kqv=bool(engine.options.extra.get("offload_kqv", True)))


def stream(engine: Any, decoder: BatchDecoder, request: Any, prompt: list[int], grammar: Any,
           mode: str = "off") -> Iterator[Chunk]:
    """Submit one request to the batch; the returned iterator's ``close()`` cancels it.

    ``mode``: its speculative mode (the engine's ``_speculator`` drafts for it while it runs alone)."""
    from velollm.logprobs import recorder_for
    from velollm.plugins.llamacpp.sampling import random_seed

    budget = decoder.n_ctx - len(prompt)
    max_new = min(request.max_tokens or budget, budget)
    seed = request.seed if request.seed is not None else random_seed()
    picker = picker_for(engine, request, grammar, seed, max_new)
    try:
        session = None
        if mode != "off":  # along a constraint, drafts walk the grammar
            drafts = picker.start_drafts() if isinstance(picker, ConstraintPicker) else None
            session = engine._speculator.session(prompt, mode, drafts)
        seq = Sequence(prompt, picker, max_new=max_new, stop=request.stop,
                       logprobs=recorder_for(request, engine._piece), session=session)
        decoder.submit(seq)
    except BaseException:
        picker.close()
        raise
    return seq.chunks()
