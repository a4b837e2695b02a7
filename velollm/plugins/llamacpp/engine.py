"""The llama.cpp engine: one loaded ``Llama`` behind velollm's Engine protocol.

The engine renders chat templates itself
(:mod:`velollm.chat_templates`), streams text through :mod:`velollm.textstream`, validates
every grammar before llama.cpp sees it (an invalid GBNF grammar segfaults the process), and
lets one thread at a time into a ``Llama``.
"""

from __future__ import annotations

import ctypes
import functools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

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
    GenerationError,
    GrammarError,
    InvalidModelFile,
    InvalidRequest,
)
from velollm.gguf import info as gguf_info
from velollm.hardware import default_threads
from velollm.limits import check_grammar
from velollm.logprobs import recorder_for
from velollm.plugins.llamacpp import log as llamacpp_log
from velollm.plugins.llamacpp.sampling import SequenceSampler, is_greedy, random_seed
from velollm.plugins.llamacpp.threads import ThreadTuner
from velollm.textstream import TokenTextStream

#: ``GenerationRequest.extra`` keys this engine understands (anything else is refused)
REQUEST_EXTRAS = frozenset({"speculative", "grammar_check", "guards"})
#: the ``Llama``'s own context when a batch decoder holds the KV cache (it only tokenizes then)
BATCH_LLAMA_CTX = 512
#: ggml type ids of the KV cache types (``LoadOptions.type_k`` / ``type_v``)
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}



def load_kwargs(info: gguf_info.ModelInfo, options: LoadOptions, *, offload: bool) -> dict[str, Any]:
    """``Llama(...)`` keyword arguments for ``options`` (every load option that reaches llama.cpp goes here)."""
    import llama_cpp

    from velollm.engine import NUMA_STRATEGIES

    if options.type_v not in ("f32", "f16", "bf16") and not options.flash_attn:
        raise InvalidRequest(f"type_v={options.type_v}: llama.cpp quantises the V cache only with flash_attn=True")
    kwargs: dict[str, Any] = dict(
        n_ctx=options.n_ctx or min(info.context_length or 4096, 4096),
        n_threads=options.n_threads or default_threads(),
        # llama-cpp-python defaults prompt threads to cpu_count(), ignoring n_threads (llama.cpp
        # itself uses n_threads): on a busy 2-core machine that made prefill ~6x slower
        n_threads_batch=options.n_threads or default_threads(),
        n_gpu_layers=options.n_gpu_layers if offload else 0,
        use_mmap=options.use_mmap,
        use_mlock=options.use_mlock,
        numa=NUMA_STRATEGIES.index(options.numa),  # GGML_NUMA_STRATEGY_*
        n_batch=options.n_batch,
        flash_attn=options.flash_attn,
        type_k=KV_TYPES[options.type_k],
        type_v=KV_TYPES[options.type_v],
        verbose=False,
    )
    if options.tensor_split is not None and offload:
        if len(options.tensor_split) > llama_cpp.LLAMA_MAX_DEVICES:
            raise InvalidRequest(f"tensor_split has {len(options.tensor_split)} shares; this llama.cpp build "
                                 f"handles {llama_cpp.LLAMA_MAX_DEVICES} devices")
        kwargs["tensor_split"] = list(options.tensor_split)
    if options.seed is not None:
        kwargs["seed"] = options.seed
    unknown = sorted(set(options.extra) - _llama_parameters())
    if unknown:  # Llama(...) would take them into its **kwargs and ignore them
        raise InvalidRequest(f"LoadOptions.extra: llama.cpp's Llama(...) takes no {', '.join(map(repr, unknown))}")
    kwargs.update(options.extra)
    return kwargs


@functools.cache
def _llama_parameters() -> frozenset[str]:
    """The keyword arguments ``llama_cpp.Llama`` accepts (``LoadOptions.extra`` passes them through)."""
    import inspect

    from llama_cpp.llama import Llama

    # its **kwargs swallows unknown names silently: they are not accepted here
    return frozenset(inspect.signature(Llama.__init__).parameters) - {"self", "model_path", "kwargs"}


class LlamaCppEngine:
    """A loaded ``Llama`` behind the Engine protocol."""

    def __init__(self, llama: Any, info: gguf_info.ModelInfo, options: LoadOptions, backend: str) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._llama = llama
        self.info = info
        self.options = options
        self.name = info.path.stem
        self.backend = backend
        self.model_path = info.path
        self.capabilities = Capabilities(chat=True, streaming=True, grammar=True, json_schema=True, tokenize=True)
        self.capabilities.embeddings = bool(options.extra.get("embedding"))
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._closed = False
        self._vocab = llama._model.vocab
        self._pieces: dict[int, bytes] = {}
        self._grammars: dict[str, Any] = {}
        self._constraints: Any = None  # velollm.constraints.ConstraintCache, made on the first constrained request
        self._speculator: Any = None  # a speculative.Speculator when speculative decoding is configured
        self._runner: Any = None  # velollm.plugins.llamacpp.runner.LlamaRunner, made on the first request
        self._batch: Any = None  # a batch.BatchDecoder when LoadOptions.parallel > 1 (continuous batching)
        self.max_concurrency = 1  # requests the pool lets in at once (the batch's sequences)
        self.request_extras = REQUEST_EXTRAS
        bos, eos = self.token_text(llama.token_bos()), self.token_text(llama.token_eos())
        probes = ("<|im_start|>", "<|start_header_id|>", "[INST]")
        self.template = ChatTemplate.for_model(
            gguf_template=info.chat_template, architecture=info.architecture, chat_format=options.chat_format,
            bos_token=bos, eos_token=eos, vocab_has=[p for p in probes if self._is_single_token(p)],
        )
        self.capabilities.logprobs = self.capabilities.tools = True
        self.capabilities.fill_in_middle = fim_tokens(self.tokenize) is not None

    @classmethod
    def open(cls, info: gguf_info.ModelInfo, options: LoadOptions, *, backend: str, offload: bool) -> LlamaCppEngine:
        from llama_cpp import Llama

        kwargs = load_kwargs(info, options, offload=offload)
        parallel = options.parallel or 1
        batched = parallel > 1 and not kwargs.get("embedding")
        if batched:  # the batch decoder holds the KV cache; the Llama keeps a small context of its own
            n_ctx, kwargs["n_ctx"] = kwargs["n_ctx"], min(kwargs["n_ctx"], BATCH_LLAMA_CTX)
            # ...whose KV cache stays in RAM: it only tokenizes, and the device memory placement
            # planned is the decoder's (the decoder offloads its own: batch.BatchDecoder)
            kwargs["offload_kqv"] = False
        if options.speculative is not None or options.draft_model or options.prompt_lookup:
            from velollm.plugins.llamacpp import speculative

            speculative.plan(options)  # bad speculative options fail before the model loads
        if kwargs.get("embedding"):  # pooling and batch sizes for embeddings: velollm.plugins.llamacpp.embed
            from velollm.plugins.llamacpp import embed as llamacpp_embed

            kwargs = llamacpp_embed.load_kwargs(info, kwargs)
        try:  # one load at a time, process-wide (llamacpp_log.LOAD_LOCK says why)
            with llamacpp_log.LOAD_LOCK, llamacpp_log.capture() as log:
                llama = Llama(model_path=str(info.path), **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            reason = llamacpp_log.summary(log) or str(exc)
            raise InvalidModelFile(
                f"llama.cpp could not load {info.path.name} ({info.architecture}, {info.file_type}, "
                f"{info.file_size:,} bytes) with {backend}: {reason}"
            ) from None
        engine = cls(llama, info, options, backend)
        if batched:
            engine._open_batch(parallel, n_ctx)
        if options.speculative is not None or options.draft_model or options.prompt_lookup:
            engine._attach_speculator()  # batched: it drafts for a sequence while it decodes alone
        return engine

    def _open_batch(self, parallel: int, n_ctx: int) -> None:
        """Continuous batching (:mod:`.batch`): ``parallel`` sequences share one ``n_ctx``-token KV cache."""
        from velollm.plugins.llamacpp import batch

        try:
            self._batch = batch.open_decoder(self, n_parallel=parallel, n_ctx=n_ctx)
        except BaseException:
            self.close()
            raise
        self.max_concurrency = parallel

    def _attach_speculator(self) -> None:
        """Speculative decoding (:mod:`.speculative`); a draft model loads on this engine's backend."""
        from velollm.loading import resolve
        from velollm.plugins.llamacpp import speculative
        from velollm.plugins.llamacpp.backend import LlamaCppBackend

        opts = self.options
        draft_options = LoadOptions(n_ctx=self.context_length, n_threads=self._llama.n_threads,
                                    n_gpu_layers=opts.n_gpu_layers, use_mmap=opts.use_mmap, use_mlock=opts.use_mlock,
                                    n_batch=opts.n_batch, flash_attn=opts.flash_attn)
        backend = LlamaCppBackend(self.backend.removeprefix("llamacpp-"))

        def load_draft(ref: str) -> LlamaCppEngine:
            return backend.load(resolve(ref).path, draft_options)

        try:
            if self._batch is None:
                self._speculator = speculative.attach(self._llama, self.name, opts, load_draft)
            else:  # the batch-cost table is timed on the batch context, where the drafts are verified
                with self._batch.spare_runner() as runner:
                    self._speculator = speculative.attach(self._llama, self.name, opts, load_draft, costs_on=runner)
        except BaseException:
            self.close()
            raise

    @property
    def speculation(self) -> dict[str, Any] | None:
        """Speculative decoding's configuration and load-time measurements (None when not configured)."""
        return self._speculator.describe() if self._speculator is not None else None

    def reset_cache(self) -> None:
        """Forget the KV cache (the draft's too), so the next prompt is evaluated from scratch (benchmarks)."""
        if self._batch is not None:  # the scheduler thread drafts: it resets the draft model's cache itself
            draft = self._speculator.draft if self._speculator is not None else None
            self._batch.clear_cache(then=None if draft is None else draft.reset)
        with self._lock:
            self._check_open()
            self._llama.reset()
            self._llama._ctx.kv_cache_clear()
            if self._speculator is not None and self._batch is None:
                self._speculator.reset()

    # --- tokens ---------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        self._check_open()  # a freed context segfaults when asked
        return self._batch.n_ctx if self._batch is not None else int(self._llama.n_ctx())

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        self._check_open()
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))

    def _check_token_ids(self, tokens: list[int]) -> None:
        n_vocab = self._llama.n_vocab()
        bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab]
        if bad:
            raise InvalidRequest(f"token ids outside the vocabulary (0..{n_vocab - 1}): {bad[:10]}")

    def detokenize(self, tokens: list[int]) -> str:
        self._check_open()
        n_vocab = self._llama.n_vocab()
        bad = [t for t in tokens if not 0 <= t < n_vocab]
        if bad:  # llama.cpp aborts the whole process (std::out_of_range) on an unknown token id
            raise InvalidRequest(f"token ids out of range 0..{n_vocab - 1}: {bad[:5]}")
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def _is_single_token(self, text: str) -> bool:
        return len(self._llama.tokenize(text.encode(), add_bos=False, special=True)) == 1

    def _piece(self, token: int, special: bool = False) -> bytes:
        """Bytes of one token, cached. llama-cpp-python's own helper truncates pieces over 32 bytes."""
        key = token if not special else -1 - token
        piece = self._pieces.get(key)
        if piece is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
                if n >= 0:
                    piece = buf.raw[:n]
                    break
                size = -n
            self._pieces[key] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    # --- prompts and grammars ---------------------------------------------------------------
    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        return self.template.prompt_tokens(request, self.tokenize)

    def grammar_for(self, request: GenerationRequest) -> Any:
        if request.json_schema is not None:
            return self._compile_grammar(schema_to_gbnf(request.json_schema))
        if request.grammar is not None:
            return self._compile_grammar(request.grammar)
        return None

    def _compile_grammar(self, gbnf: str) -> Any:
        """Parse the grammar with llama.cpp itself and check the result (the binding does not)."""
        from llama_cpp import LlamaGrammar

        if gbnf in self._grammars:
            return self._grammars[gbnf]
        check_grammar(gbnf)  # llama.cpp's parser recurses per nesting level: a deep grammar is a SIGSEGV
        with llamacpp_log.capture() as log, llamacpp_log.capture_stderr_fd() as raw:
            sampler = self._lib.llama_sampler_init_grammar(self._vocab, gbnf.encode("utf-8"), b"root")
        log.extend(raw)
        if not sampler:
            raise GrammarError(f"invalid GBNF grammar: {llamacpp_log.summary(log) or 'rejected by llama.cpp'}")
        self._lib.llama_sampler_free(sampler)
        grammar = self._grammars[gbnf] = LlamaGrammar.from_string(gbnf, verbose=False)
        return grammar

    # --- generation -----------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> Completion:
        return collect_stream(self.stream(request), model=self.name)

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        self._check_open()
        if self._batch is None and self._owner == threading.get_ident():
            raise InvalidRequest("this thread is already generating on this engine (an unfinished stream?)")
        # validate before taking the lock, so bad requests fail fast and never touch the model
        check_request_extras(self, request)
        prompt = self.prompt_tokens(request)
        if isinstance(request.prompt, list):  # token ids from the client: llama.cpp aborts on an unknown one
            self._check_token_ids(prompt)
        n_ctx = self.context_length
        if len(prompt) >= n_ctx:
            trained = self.info.context_length
            raise ContextOverflow(
                f"the prompt has {len(prompt)} tokens; the context window holds {n_ctx}: load the model with a larger "
                f"n_ctx (LoadOptions.n_ctx, velollm.LM(n_ctx=...), velollm serve --ctx)"
                + (f"; it was trained on {trained} tokens" if trained else ""))
        grammar = self.grammar_for(request)
        mode = self._speculation_mode(request)
        if self._batch is not None:  # continuous batching: the request joins the running batch
            from velollm.plugins.llamacpp import batch

            return batch.stream(self, self._batch, request, prompt, grammar, mode)
        return self._run(request, prompt, grammar, mode)

    def _speculation_mode(self, request: GenerationRequest) -> Any:
        """The request's speculative mode (``extra["speculative"]`` or the engine's default); "off"
        when it asks for log-probabilities (they need the logits of every step, one token at a time)."""
        mode = "off"
        if self._speculator is not None or "speculative" in request.extra:
            from velollm.plugins.llamacpp.speculative import request_mode

            mode = request_mode(self._speculator, request)  # a bad mode is refused all the same
        return "off" if request.logprobs else mode

    def _run(self, request: GenerationRequest, prompt: list[int], grammar: Any, mode: str = "off") -> Iterator[Chunk]:
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield from self._decode(request, prompt, grammar, mode)
            finally:
                self._owner = None

    def sampler_for(self, request: GenerationRequest, seed: int | None = None, grammar: Any = None) -> SequenceSampler:
        """The request's own llama.cpp sampler chain (:mod:`.sampling`), optionally with a grammar in it."""
        return SequenceSampler(request, n_vocab=self._llama.n_vocab(), n_ctx=self.context_length, seed=seed,
                               grammar=None if grammar is None else (self._vocab, grammar._grammar))

    def _get_runner(self) -> Any:
        from velollm.plugins.llamacpp.runner import LlamaRunner

        if self._runner is None:
            # the thread count adapts to the machine's load (.threads), unless speculation shares this
            # context: its batch-cost table was timed at the configured count
            n_threads = int(self._llama.n_threads)
            adapt = self._speculator is None and n_threads > 1
            self._runner = LlamaRunner(self._llama, tuner=ThreadTuner(n_threads) if adapt else None)
        return self._runner

    def _vanilla_groups(self, request: GenerationRequest, prompt: list[int], grammar: Any, seed: int,
                        max_new: int) -> Iterator[list[int]]:
        """One token per group: argmax, or the request's sampler chain (with the grammar in it, if any)."""
        runner = self._get_runner()
        chain = None if grammar is None and is_greedy(request) else self.sampler_for(request, seed, grammar)
        loops = self._loop_detector(request) if grammar is None else None
        try:
            runner.refresh()
            runner.sync(prompt)  # reuses the cached prefix
            for n in range(max_new):
                token = runner.argmax(-1) if chain is None else chain.sample(runner.ctx, -1)
                yield [token]
                if self.is_end_of_generation(token) or n + 1 == max_new:
                    return
                if loops is not None and loops.feed(token):
                    return  # degenerate repetition (velollm.constraints.loops): stop like an end token
                runner.feed([token])
        finally:
            if chain is not None:
                chain.close()

    def constraint_cache(self) -> Any:
        """Compiled constraints of this model (:mod:`velollm.constraints`; the vocabulary is read once)."""
        from velollm.constraints import ConstraintCache, from_llama_vocab

        if self._constraints is None:
            self._constraints = ConstraintCache(from_llama_vocab(self._vocab))
        return self._constraints

    def constraint_state(self, request: GenerationRequest, max_new: int | None) -> Any:
        """A :class:`velollm.constraints.ConstraintState` for the request (None when unconstrained)."""
        if request.json_schema is None and request.grammar is None:
            return None
        factory = self.constraint_cache().get(json_schema=request.json_schema, grammar=request.grammar)
        guards = request.extra.get("guards", True) is not False  # False: the grammar's own output, no budget/loops
        return factory.start(max_new if guards else None, loops=guards)

    def _loop_detector(self, request: GenerationRequest) -> Any:
        """Stops unconstrained text that repeats itself (``extra={"guards": False}`` turns it off)."""
        from velollm.constraints.loops import LoopDetector, TokenClasses

        if request.extra.get("guards", True) is False:
            return None
        return LoopDetector(TokenClasses(self._piece))

    def _grammar_groups(self, request: GenerationRequest, grammar: Any, prompt: list[int], seed: int,
                        max_new: int) -> Iterator[list[int]]:
        """Constrained decoding that asks the constraint about the chosen token only (:mod:`.grammar`):
        llguidance (budgets, loop closing) when it takes the grammar, else llama.cpp's GBNF sampler."""
        from velollm.plugins.llamacpp.grammar import constrained_tokens, grammar_tokens

        try:  # grammar_check "gbnf": llama.cpp's GBNF sampler with the same fast path (benchmarks)
            state = None if request.extra.get("grammar_check") == "gbnf" else self.constraint_state(request, max_new)
        except GrammarError:  # a GBNF dialect detail llguidance reads differently: llama.cpp's sampler
            state = None
        chain = None if is_greedy(request) else self.sampler_for(request, seed)
        try:
            if state is not None:
                yield from constrained_tokens(self._get_runner(), state, prompt, max_new,
                                              self.is_end_of_generation, chain)
            else:
                yield from grammar_tokens(self._get_runner(), self._vocab, grammar._grammar, prompt, max_new,
                                          self.is_end_of_generation, chain)
        finally:
            if chain is not None:
                chain.close()

    def _speculative_groups(self, request: GenerationRequest, prompt: list[int], grammar: Any, mode: Any, seed: int,
                            max_new: int) -> Iterator[list[int]]:
        """Verified groups from the speculator (:mod:`velollm.plugins.llamacpp.speculative`)."""
        from velollm.plugins.llamacpp.speculative.speculator import ChainPicker, ConstraintPicker, GreedyPicker

        spec = self._speculator
        try:  # a constraint verifies drafts and drafts the tokens it forces (velollm.constraints)
            state = None if grammar is None else self.constraint_state(request, max_new)
        except GrammarError:
            state = None
        if state is not None:
            chain = None if is_greedy(request) else self.sampler_for(request, seed)
            pick: Any = ConstraintPicker(spec.runner, state, chain)
        elif grammar is None and is_greedy(request):
            pick = GreedyPicker(spec.runner)
        else:
            pick = ChainPicker(spec.runner, self.sampler_for(request, seed, grammar))
        return spec.run(prompt, pick, mode, max_new, self.is_end_of_generation)

    def _decode(self, request: GenerationRequest, prompt: list[int], grammar: Any, mode: Any) -> Iterator[Chunk]:
        """Tokens to text chunks (stops, end of generation, max_tokens); speculation metrics in ``Timings.extra``."""
        self._check_open()
        start = time.perf_counter()
        first: float | None = None
        budget = self.context_length - len(prompt)
        max_new = min(request.max_tokens or budget, budget)
        seed = request.seed if request.seed is not None else random_seed()
        speculating = mode != "off"
        if speculating:
            groups = self._speculative_groups(request, prompt, grammar, mode, seed, max_new)
        elif grammar is not None and request.extra.get("grammar_check") != "full":
            groups = self._grammar_groups(request, grammar, prompt, seed, max_new)
        else:
            groups = self._vanilla_groups(request, prompt, grammar, seed, max_new)
        text = TokenTextStream(request.stop)
        logprobs = recorder_for(request, self._piece)  # velollm.logprobs: on_logits(row, token) per step
        n_out, finish = 0, "length"
        try:
            for group in groups:
                if first is None:
                    first = time.perf_counter()
                pieces = []
                for token in group:
                    if self.is_end_of_generation(token):
                        finish = "stop"
                        break
                    if logprobs is not None:  # one-token groups: the last decode's logits chose this token
                        logprobs.on_logits(self._get_runner().logits(-1), token)
                    n_out += 1
                    pieces.append(text.feed(self._piece(token)))
                    if text.stopped:
                        finish = "stop"
                        break
                    if n_out >= max_new:
                        break
                piece = "".join(pieces)
                if piece:
                    yield Chunk(text=piece, logprobs=logprobs.take() if logprobs is not None else None)
                if finish == "stop" or n_out >= max_new:
                    break
            else:
                if n_out < max_new:  # the tokens ran out early: a constraint finished its answer
                    finish = "stop"
        except (RuntimeError, ValueError, OSError) as exc:  # llama_decode failures surface as these
            raise GenerationError(f"llama.cpp failed while generating: {exc}") from exc
        finally:
            groups.close()
        tail = text.finish()
        end = time.perf_counter()
        last = self._speculator.last if speculating else None
        yield Chunk(
            text=tail,
            finish_reason=finish,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=n_out),
            timings=Timings.measure(start, first, end, len(prompt), n_out, **(last.as_dict() if last else {})),
            logprobs=logprobs.take() if logprobs is not None else None,
        )

    # --- embeddings -------------------------------------------------------------------------
    def embed(self, texts: list[str], *, normalize: bool = True, truncate: bool = False) -> list[list[float]]:
        """One vector per text; needs an engine loaded with ``extra={"embedding": True}``."""
        from velollm.plugins.llamacpp import embed as llamacpp_embed

        return llamacpp_embed.embed(self, texts, normalize=normalize, truncate=truncate)

    # --- lifetime ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed(f"engine for {self.name} is closed")

    def close(self) -> None:
        """Free the model now (``Llama.close``); waits for a running generation to finish."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._batch is not None:
                    self._batch.close()
                self._grammars.clear()
                if self._speculator is not None:
                    self._speculator.close()
                self._llama.close()

    def __repr__(self) -> str:
        return f"<LlamaCppEngine {self.name} on {self.backend}>"


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """JSON schema -> GBNF with llama-cpp-python's converter; failures become GrammarError."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exceptions, KeyErrors... on odd schemas
        raise GrammarError(f"cannot turn this JSON schema into a grammar: {type(exc).__name__}: {exc}") from None
