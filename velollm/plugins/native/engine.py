"""The native engine: a GGUF model run by numpy behind velollm's Engine contract.

Same contract and behaviour as the llama.cpp engine (prompt building through the shared chat
templates, BOS rules, end-of-generation tokens, stop sequences through the shared text stream,
usage and timings, one thread in the model at a time), plus what only a numpy engine can give:
logits and hidden states of any prompt (:meth:`NativeEngine.logits`, :meth:`hidden_states`).

Load options (``LoadOptions.extra``):
  ``numerics``           ``"ggml"`` (default: round like llama.cpp's CPU backend, so outputs
                         match it token for token) or ``"exact"`` (plain float32).
  ``memory_budget_bytes`` most bytes of float32 weights to keep (default: 80 % of the RAM
                         available at load); weights beyond it are dequantized on every use.
  ``prefix_cache``       reuse the KV cache of the previous request's common prefix (default
                         False). Faster for repeated prompts, but the reused positions were
                         computed in a different batch shape, which in ``ggml`` numerics can move
                         logits slightly; off, every request computes from scratch and the same
                         request (and seed) always gives the same output.
Sampling: every field of ``GenerationRequest`` (llama.cpp's pipeline, :mod:`.sampling`); no request
extras (any ``extra`` key is refused). The KV cache is float32: ``type_k``/``type_v`` other than
f16/f32 are refused.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from velollm.chat_templates import ChatTemplate, fim_tokens
from velollm.engine import (
    Capabilities,
    Chunk,
    Completion,
    GenerationRequest,
    LoadOptions,
    Timings,
    Usage,
    check_request_extras,
    collect_stream,
)
from velollm.errors import (
    ContextOverflow,
    EngineClosed,
    InvalidModelFile,
    InvalidRequest,
    UnsupportedArchitecture,
    UnsupportedFeature,
)
from velollm.gguf import info as gguf_info
from velollm.gguf.header import HeaderError, read_header
from velollm.hardware import default_threads
from velollm.logprobs import recorder_for
from velollm.plugins.native.model import KVCache, ModelConfig, Transformer
from velollm.plugins.native.numerics import MODES, Numerics
from velollm.plugins.native.sampling import Sampler, SamplingParams
from velollm.plugins.native.tokenizer import Tokenizer
from velollm.plugins.native.vocab import load_vocab
from velollm.plugins.native.weights import WeightStore, can_dequantize
from velollm.textstream import TokenTextStream

_controller: Any = None
_controller_lock = threading.Lock()


def _blas_threads(n: int) -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to ``n`` threads for a block (spinning BLAS threads on a busy machine cost more
    than they give)."""
    global _controller
    try:
        with _controller_lock:
            if _controller is None:
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController()
        return _controller.limit(limits=n, user_api="blas")
    except Exception:  # threadpoolctl missing or unable to see the BLAS: run with its defaults
        return contextlib.nullcontext()


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return 8 << 30


class NativeEngine:
    """A loaded model; see the module docstring."""

    def __init__(self, info: gguf_info.ModelInfo, options: LoadOptions, backend: str = "native-cpu") -> None:
        self.info = info
        self.options = options
        self.name = info.path.stem
        self.backend = backend
        self.model_path = info.path
        # constrained decoding through velollm.constraints (llguidance), as on the llama.cpp backend
        self.capabilities = Capabilities(chat=True, streaming=True, grammar=True, json_schema=True,
                                         tokenize=True, logits=True)
        self._constraints: Any = None  # velollm.constraints.ConstraintCache, made on the first constrained request
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._closed = False
        self._last_eog = False
        self._reused = 0
        self.request_extras: frozenset[str] = frozenset({"guards"})  # guards: False turns budgets/loop closing off
        quantised = [f"{name}={value}" for name, value in (("type_k", options.type_k), ("type_v", options.type_v))
                     if value not in ("f16", "f32")]
        if quantised:
            raise UnsupportedFeature(f"the native backend keeps its KV cache in float32; {', '.join(quantised)} "
                                     "needs a llamacpp backend")
        extra = dict(options.extra)
        mode = extra.pop("numerics", "ggml")
        if mode not in MODES:
            raise InvalidRequest(f"LoadOptions.extra['numerics'] must be one of {MODES}, not {mode!r}")
        budget = extra.pop("memory_budget_bytes", None)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise InvalidRequest("LoadOptions.extra['memory_budget_bytes'] must be a non-negative integer")
        self.prefix_cache = extra.pop("prefix_cache", False)
        if not isinstance(self.prefix_cache, bool):
            raise InvalidRequest("LoadOptions.extra['prefix_cache'] must be true or false")
        self.threads = options.n_threads or default_threads()
        self.n_batch = options.n_batch
        try:
            header = read_header(info.path)
        except HeaderError as exc:
            raise InvalidModelFile(f"{info.path}: {exc}") from None
        for tensor in header.tensors:
            if not can_dequantize(tensor.type):
                raise UnsupportedArchitecture(
                    f"{info.path.name}: tensor {tensor.name} is {tensor.type.name}, which the installed gguf "
                    "package cannot dequantize")
        self.vocab = load_vocab(info.path, header)
        self.tokenizer = Tokenizer(self.vocab)
        n_ctx = options.n_ctx or min(info.context_length or 4096, 4096)
        kv_bytes = info.kv_cache_bytes(n_ctx, 4.0)
        if budget is None:
            budget = max(int(_available_memory() * 0.8) - kv_bytes, 0)
        workers = max(self.threads, min(4, os.cpu_count() or 1))  # dequantization is numpy, not BLAS
        self.store = WeightStore(info.path, header, budget_bytes=budget, threads=workers)
        try:
            self.config = ModelConfig.from_metadata(header.metadata, self.store, info.path.name)
            if self.config.n_vocab != self.vocab.size:
                raise InvalidModelFile(f"{info.path.name}: the embedding has {self.config.n_vocab} rows but the "
                                       f"vocabulary {self.vocab.size} tokens")
            self.numerics = Numerics(mode)
            self.model = Transformer(self.config, self.store, self.numerics, n_ctx)
        except Exception:
            self.store.close()
            raise
        self.cache = KVCache(self.config, n_ctx)
        bos = self.tokenizer.token_text(self.vocab.bos_id) if self.vocab.bos_id is not None else ""
        eos = self.tokenizer.token_text(self.vocab.eos_id) if self.vocab.eos_id is not None else ""
        probes = ("<|im_start|>", "<|start_header_id|>", "[INST]")
        self.template = ChatTemplate.for_model(
            gguf_template=info.chat_template, architecture=info.architecture, chat_format=options.chat_format,
            bos_token=bos, eos_token=eos,
            vocab_has=[p for p in probes if len(self.tokenizer.encode(p, add_special=False, parse_special=True)) == 1],
        )
        self.capabilities.logprobs = True
        self.capabilities.fill_in_middle = fim_tokens(self.tokenizer.encode) is not None

    # --- tokens ---------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.cache.n_ctx

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        self._ensure_open()
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        self._ensure_open()
        return self.tokenizer.decode(tokens)

    def token_text(self, token: int) -> str:
        return self.tokenizer.token_text(token)

    def is_end_of_generation(self, token: int) -> bool:
        return self.vocab.is_eog(token)

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The request as token ids, built exactly as the llama.cpp engine builds it."""
        return self.template.prompt_tokens(request, self.tokenize)

    # --- research API -------------------------------------------------------------------------
    def logits(self, tokens: list[int], *, all_positions: bool = False,
               positions: list[int] | None = None) -> np.ndarray:
        """Logits after ``tokens`` on a fresh cache: the last position's (vocab,), every position's
        (len(tokens), vocab), or those of ``positions`` (len(positions), vocab)."""
        self._check_tokens(tokens)
        if positions is not None and any(not 0 <= p < len(tokens) for p in positions):
            raise InvalidRequest(f"positions must be in 0..{len(tokens) - 1}")
        with self._mutex, _blas_threads(self.threads):
            self._ensure_open()
            cache = KVCache(self.config, self.cache.n_ctx)
            if positions is not None:
                return self._forward_chunks(list(tokens), cache, np.asarray(positions, dtype=np.int64))
            out = self._forward_chunks(list(tokens), cache, "all" if all_positions else "last")
        return out if all_positions else out[-1]

    def hidden_states(self, tokens: list[int]) -> list[np.ndarray]:
        """The residual stream after the embedding and after each layer: ``n_layer + 1`` arrays of
        shape (len(tokens), n_embd)."""
        self._check_tokens(tokens)
        hidden: list[np.ndarray] = []
        with self._mutex, _blas_threads(self.threads):
            self._ensure_open()
            cache = KVCache(self.config, self.cache.n_ctx)
            self.model.forward(list(tokens), cache, logits="none", hidden=hidden)
        return hidden

    def _check_tokens(self, tokens: list[int]) -> None:
        if not tokens:
            raise InvalidRequest("no tokens given")
        bad = [t for t in tokens if not 0 <= int(t) < self.vocab.size]
        if bad:
            raise InvalidRequest(f"token ids outside the vocabulary (0..{self.vocab.size - 1}): {bad[:5]}")

    def _forward_chunks(self, tokens: list[int], cache: KVCache, logits: str | np.ndarray) -> np.ndarray:
        """Run ``tokens`` in batches of ``n_batch``; logits of the last position, of every position,
        or of the positions in an index array (returned in that array's order)."""
        outs, picked = [], []
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            final = i + self.n_batch >= len(tokens)
            if isinstance(logits, np.ndarray):
                inside = np.nonzero((logits >= i) & (logits < i + len(chunk)))[0]
                picked.append(inside)
                want: str | np.ndarray = logits[inside] - i if inside.size else "none"
            else:
                want = logits if (final or logits == "all") else "none"
            out = self.model.forward(chunk, cache, logits=want)
            if out is not None:
                outs.append(out)
        if isinstance(logits, np.ndarray):
            result = np.empty((logits.size, self.config.n_vocab), np.float32)
            if outs:
                result[np.concatenate(picked)] = np.concatenate(outs)
            return result
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    # --- generation -----------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> Completion:
        return collect_stream(self.stream(request), model=self.name)

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        self._ensure_open()
        if self._owner == threading.get_ident():
            raise InvalidRequest("this thread is already generating on this engine (an unfinished stream?)")
        check_request_extras(self, request)
        params = SamplingParams.from_request(request)
        prompt = self.prompt_tokens(request)
        if isinstance(request.prompt, list):  # token ids from the client
            self._check_tokens(prompt)
        if len(prompt) >= self.context_length:
            raise ContextOverflow(
                f"the prompt has {len(prompt)} tokens; the context window holds {self.context_length}")
        state = self.constraint_state(request, len(prompt))  # a bad grammar fails here, before the lock
        return self._run(request, prompt, params, state)

    def constraint_cache(self) -> Any:
        """Compiled constraints of this model (:mod:`velollm.constraints`; the vocabulary is read once)."""
        from velollm.constraints import ConstraintCache, from_pieces

        if self._constraints is None:
            vocab, tok = self.vocab, self.tokenizer
            pieces = [tok.piece(i, special=True) for i in range(vocab.size)]
            eos = sorted(vocab.eog_ids) or ([vocab.eos_id] if vocab.eos_id is not None else [])
            self._constraints = ConstraintCache(from_pieces(
                pieces, eos, lambda b: tok.encode(b.decode("utf-8", "replace"), add_special=False),
                special=vocab.special_ids))
        return self._constraints

    def constraint_state(self, request: GenerationRequest, n_prompt: int) -> Any:
        """A :class:`velollm.constraints.ConstraintState` for the request (None when unconstrained)."""
        if request.json_schema is None and request.grammar is None:
            return None
        budget = self.context_length - n_prompt
        guards = request.extra.get("guards", True) is not False
        factory = self.constraint_cache().get(json_schema=request.json_schema, grammar=request.grammar)
        return factory.start(min(request.max_tokens or budget, budget) if guards else None, loops=guards)

    def _run(self, request: GenerationRequest, prompt: list[int], params: SamplingParams,
             state: Any = None) -> Iterator[Chunk]:
        with self._mutex:
            self._owner = threading.get_ident()
            try:
                yield from self._decode(request, prompt, params, state)
            finally:
                self._owner = None

    def _prefill(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        """Logits after ``prompt``, reusing the cached prefix of the previous generation."""
        cache = self.cache
        same = 0
        if self.prefix_cache:
            for a, b in zip(cache.tokens, prompt, strict=False):
                if a != b:
                    break
                same += 1
        reuse = min(same, len(prompt) - 1)
        cache.truncate(reuse)
        with _blas_threads(self.threads):
            logits = self._forward_chunks(prompt[reuse:], cache, "last")
        return logits[-1], reuse

    def _tokens(self, prompt: list[int], sampler: Sampler, max_new: int,
                on_logits: Callable[[np.ndarray, int], None] | None = None, state: Any = None,
                loops: Any = None) -> Iterator[int]:
        """Sampled token ids after ``prompt``, up to ``max_new``; stops before an end-of-generation
        token. The cache is reset if anything goes wrong, so a failed step never poisons the next.
        ``on_logits(row, token)`` sees the logits each token was sampled from (log-probabilities)."""
        try:
            logits, self._reused = self._prefill(prompt)
            for n in range(max_new):
                token = sampler.sample(logits) if state is None else _constrained_sample(state, sampler, logits)
                if state is not None:
                    state.advance(token)
                if self.vocab.is_eog(token):
                    self._last_eog = True
                    return
                if on_logits is not None:
                    on_logits(logits, token)
                yield token
                if state is not None and state.done:
                    return
                if loops is not None and loops.feed(token):  # degenerate repetition: stop (velollm.constraints)
                    return
                if n + 1 < max_new:
                    self._ensure_open()
                    with _blas_threads(self.threads):
                        logits = self.model.forward([token], self.cache)[-1]  # type: ignore[index]
        except BaseException:
            if not self._closed:
                self.cache.truncate(0)
            raise

    def generate_ids(self, prompt: list[int], *, max_tokens: int = 32, sampling: SamplingParams | None = None,
                     ) -> list[int]:
        """Generated token ids for raw prompt ids (greedy unless ``sampling`` says otherwise): the
        id-level view researchers and parity checks need; stops at an end-of-generation token."""
        self._ensure_open()
        self._check_tokens(prompt)
        if len(prompt) >= self.context_length:
            raise ContextOverflow(
                f"the prompt has {len(prompt)} tokens; the context window holds {self.context_length}")
        params = sampling or SamplingParams(temperature=0.0)
        budget = min(max_tokens, self.context_length - len(prompt))
        with self._mutex:
            self._last_eog = False
            return list(self._tokens(list(prompt), Sampler(params), budget))

    def _decode(self, request: GenerationRequest, prompt: list[int], params: SamplingParams,
                state: Any = None) -> Iterator[Chunk]:
        self._ensure_open()
        start = time.perf_counter()
        first: float | None = None
        budget = self.context_length - len(prompt)
        max_new = min(request.max_tokens or budget, budget)
        text = TokenTextStream(request.stop)
        n_out, finish = 0, "length"
        self._last_eog, self._reused = False, 0
        logprobs = recorder_for(request, self.tokenizer.piece)
        loops = None
        if state is None and request.extra.get("guards", True) is not False:
            from velollm.constraints.loops import LoopDetector, TokenClasses

            loops = LoopDetector(TokenClasses(self.tokenizer.piece))
        tokens = self._tokens(prompt, Sampler(params), max_new, None if logprobs is None else logprobs.on_logits,
                              state, loops)
        try:
            for token in tokens:
                if first is None:
                    first = time.perf_counter()
                n_out += 1
                piece = text.feed(self.tokenizer.piece(token))
                if piece:
                    yield Chunk(text=piece, logprobs=logprobs.take() if logprobs is not None else None)
                if text.stopped:
                    finish = "stop"
                    break
        finally:
            tokens.close()
        if self._last_eog:
            finish = "stop"
            first = first or time.perf_counter()
        tail = text.finish()
        end = time.perf_counter()
        yield Chunk(
            text=tail,
            finish_reason=finish,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=n_out),
            timings=Timings.measure(start, first, end, len(prompt), n_out, prompt_tokens_reused=self._reused),
            logprobs=logprobs.take() if logprobs is not None else None,
        )

    # --- lifetime ---------------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._closed:
            raise EngineClosed(f"engine for {self.name} is closed")

    def close(self) -> None:
        """Drop the weights and the cache; waits for a running generation to finish."""
        with self._mutex:
            if not self._closed:
                self._closed = True
                self.model = None  # type: ignore[assignment]  # drops the float32 weights it holds
                self.store.close()
                self.cache = KVCache.__new__(KVCache)
                self.cache.n_ctx, self.cache.k, self.cache.v, self.cache.tokens = 0, [], [], []

    def __repr__(self) -> str:
        return f"<NativeEngine {self.name} on {self.backend}>"


def _constrained_sample(state: Any, sampler: Sampler, logits: np.ndarray) -> int:
    """Check the sampler's token against the constraint; sample again from the masked row when refused."""
    token = sampler.sample(logits)
    if state.allows(token):
        return token
    masked = np.array(logits, dtype=np.float32, copy=True)
    state.mask(masked)
    return sampler.sample(masked)


def open_engine(model_file: Path, options: LoadOptions, backend: str = "native-cpu") -> NativeEngine:
    """Validate the file (typed errors for every defect), then load it."""
    from velollm.plugins.native.model import SUPPORTED_ARCHITECTURES

    info = gguf_info.inspect(model_file)
    gguf_info.validate_for(info, backend, SUPPORTED_ARCHITECTURES)
    return NativeEngine(info, options, backend)
