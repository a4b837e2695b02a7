"""``velollm.LM``: a ``dspy.LM`` whose engine is velollm's model pool.

DSPy 3.4 deprecates ``BaseLM.forward``; the supported extension point is an *engine*
(``complete(Request) -> Response`` and ``stream(Request)``, plus an async twin) handed to
``dspy.LM(engine=..., async_engine=...)``. Going through that route keeps DSPy's response cache,
usage tracking, history, retries, ``acall``, ``n`` fan-out and ``dspy.streamify`` working
unchanged; this module only turns canonical requests into engine calls on a pooled model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dspy
from dspy import lm15

from velollm.adapters.dspy import lm15 as lm15_convert
from velollm.engine import Capabilities, Completion, Engine, GenerationRequest, LoadOptions
from velollm.errors import GrammarError, VeloError, validated

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
PREFIX = "velollm/"

#: Call options DSPy may hand this engine (adapters read this to decide what to send).
SUPPORTED_PARAMS = frozenset({
    "temperature", "max_tokens", "top_p", "top_k", "stop", "seed", "n", "response_format",
    "frequency_penalty", "presence_penalty", "stream", "tools", "tool_choice", "parallel_tool_calls",
    "logprobs", "top_logprobs",
})


def check_ref(ref: str) -> None:
    """Fail at construction, not at the first call, when no model source understands ``ref``."""
    from velollm.loading import find_source

    find_source(ref)


class PoolEngine:
    """The synchronous DSPy engine: one pooled velollm engine per call, leased and released."""

    supports_reasoning = False

    def __init__(self, ref: str, *, backend: str | None = None, load_options: dict[str, Any] | None = None,
                 structured_outputs: bool = True) -> None:
        self.ref = ref
        self.backend = backend
        self.load_options = dict(load_options or {})
        self.structured_outputs = structured_outputs
        self.model = PREFIX + ref
        self._capabilities: Capabilities | None = None
        self._mutex = threading.Lock()

    # --- pool seam ----------------------------------------------------------------------------
    def _acquire(self) -> Any:
        from velollm.pool import get_pool

        return get_pool().acquire(self.ref, backend=self.backend, **self.load_options)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """velollm errors leave as lm15 errors, so DSPy classifies (and retries) them correctly."""
        try:
            yield
        except VeloError as exc:
            raise lm15_convert.to_lm15_error(exc, model=self.model) from exc

    def capabilities(self) -> Capabilities:
        """What the pooled engine can do (loads the model on first use)."""
        if self._capabilities is None:
            with self._mutex, self._errors():
                if self._capabilities is None:
                    lease = self._acquire()
                    try:
                        self._capabilities = lease.engine.capabilities
                    finally:
                        lease.release()
        return self._capabilities

    @property
    def supports_response_schema(self) -> bool:
        return self.structured_outputs and self.capabilities().json_schema

    @property
    def supports_function_calling(self) -> bool:
        """Native tool calling (velollm.tools): the engine renders tools and constrains the calls."""
        return self.capabilities().tools

    @property
    def supported_params(self) -> frozenset[str]:
        return SUPPORTED_PARAMS if self.structured_outputs else SUPPORTED_PARAMS - {"response_format"}

    # --- generation ---------------------------------------------------------------------------
    def _constrainable(self, engine: Engine, request: GenerationRequest) -> GenerationRequest:
        if request.json_schema is not None and not engine.capabilities.json_schema:
            warnings.warn(f"{self.model}: this engine cannot constrain output to a JSON schema; "
                          "generating without the constraint", RuntimeWarning, stacklevel=4)
            return request.model_copy(update={"json_schema": None})
        return request

    def _unconstrained(self, request: GenerationRequest, exc: GrammarError) -> GenerationRequest:
        """A schema llama.cpp cannot take becomes an unconstrained request, never an invalid grammar."""
        if request.json_schema is None:
            raise exc
        warnings.warn(f"{self.model}: the JSON schema cannot be used as a grammar ({exc}); "
                      "generating without the constraint", RuntimeWarning, stacklevel=4)
        return request.model_copy(update={"json_schema": None})

    def generate(self, engine: Engine, request: GenerationRequest) -> Completion:
        request = self._constrainable(engine, request)
        try:
            return engine.generate(request)
        except GrammarError as exc:
            return engine.generate(self._unconstrained(request, exc))

    def complete(self, request: lm15.Request) -> lm15.Response:
        with self._errors():
            generation = lm15_convert.to_generation_request(request)
            lease = self._acquire()
            try:
                completion = self.generate(lease.engine, generation)
            finally:
                lease.release()
        timings = completion.timings.model_dump(exclude={"extra"})
        return lm15_convert.to_response(completion, self.model, provider_data={"velollm": {"timings": timings}},
                                        tool_calling=lm15_convert.tool_calling(request))

    def stream(self, request: lm15.Request) -> Iterator[Any]:
        with self._errors():
            generation = lm15_convert.to_generation_request(request)
        return self._events(generation, lm15_convert.tool_calling(request))

    def _events(self, generation: GenerationRequest, tool_calling: bool = False) -> Iterator[Any]:
        with self._errors():
            lease = self._acquire()
            chunks: Any = None
            try:
                engine = lease.engine
                generation = self._constrainable(engine, generation)
                try:
                    chunks = engine.stream(generation)
                except GrammarError as exc:
                    chunks = engine.stream(self._unconstrained(generation, exc))
                yield from lm15_convert.to_events(chunks, self.model, tool_calling=tool_calling)
            finally:
                # close the engine's generator here: it holds the model until closed
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
                lease.release()

    def close(self) -> None:
        """Engines belong to the pool; there is nothing to free per LM."""

    # --- persistence (program.save with an LM) ------------------------------------------------
    def dump_state(self) -> dict[str, Any]:
        return {"ref": self.ref, "backend": self.backend, "load_options": self.load_options,
                "structured_outputs": self.structured_outputs}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> PoolEngine:
        return cls(state["ref"], backend=state.get("backend"), load_options=state.get("load_options"),
                   structured_outputs=state.get("structured_outputs", True))


class AsyncPoolEngine:
    """The async twin: blocking engine work runs in worker threads, never on the event loop."""

    def __init__(self, sync: PoolEngine) -> None:
        self.sync = sync

    supports_reasoning = False

    @property
    def supports_response_schema(self) -> bool:
        return self.sync.supports_response_schema

    @property
    def supports_function_calling(self) -> bool:
        return self.sync.supports_function_calling

    @property
    def supported_params(self) -> frozenset[str]:
        return self.sync.supported_params

    async def complete(self, request: lm15.Request) -> lm15.Response:
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: lm15.Request) -> AsyncIterator[Any]:
        from velollm.pool.streams import start_stream

        events = await start_stream(lambda: self.sync.stream(request))
        async with events:  # leaving early stops generation between two tokens
            async for event in events:
                yield event

    async def aclose(self) -> None:
        self.sync.close()

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncPoolEngine:
        return cls(PoolEngine.load_state(state))


class LM(dspy.LM):
    """A local GGUF model as a DSPy LM: ``dspy.configure(lm=velollm.LM("qwen2.5-coder-0.5b-instruct"))``.

    ``model`` is any velollm model reference (catalogue name, path, ``hf:...``), with or without
    the ``velollm/`` prefix. Greedy decoding (``temperature=0``) is the default because small
    local models follow output formats far more reliably without sampling noise.
    ``backend``, ``n_ctx``, ``n_threads`` and ``load_options`` say how the pool loads the model;
    ``parallel=N`` decodes up to N requests together (DSPy threads, ``dspy.Evaluate(num_threads=N)``)
    in one batch on backends that batch (llama.cpp), sharing cached prompt prefixes.
    ``structured_outputs=False`` stops advertising response-schema support, so DSPy adapters
    (JSONAdapter, velollm.Adapter) generate without a grammar.
    """

    #: velollm.Adapter may send llguidance's layout options in the schema (adapters/dspy/schema.py)
    fixed_json_layout = True

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        temperature: float | None = 0.0,
        max_tokens: int | None = 512,
        cache: bool = True,
        num_retries: int = 2,
        backend: str | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        parallel: int | None = None,
        load_options: dict[str, Any] | None = None,
        structured_outputs: bool = True,
        engine: Any = None,
        async_engine: Any = None,
        **kwargs: Any,
    ) -> None:
        ref = model.removeprefix(PREFIX)
        if engine is None:  # load_state hands engines back; everyone else gets a pool engine
            check_ref(ref)
            options = dict(load_options or {})
            if n_ctx is not None:
                options["n_ctx"] = n_ctx
            if n_threads is not None:
                options["n_threads"] = n_threads
            if parallel is not None:
                options["parallel"] = parallel
            validated(LoadOptions, options, f"load options for {ref!r}")
            engine = PoolEngine(ref, backend=backend, load_options=options, structured_outputs=structured_outputs)
            async_engine = AsyncPoolEngine(engine)
        super().__init__(PREFIX + ref, engine=engine, async_engine=async_engine, temperature=temperature,
                         max_tokens=max_tokens, cache=cache, num_retries=num_retries, **kwargs)

    @property
    def ref(self) -> str:
        """The velollm model reference (the model string without ``velollm/``)."""
        return self.model.removeprefix(PREFIX)

    def capabilities(self) -> Capabilities:
        """The engine's capabilities (grammar, JSON schema...); loads the model if needed."""
        return self.engine.capabilities()
