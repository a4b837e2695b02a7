"""velollm as a litellm custom provider: ``litellm.completion(model="velollm/<model>", ...)``.

This is also the route of ``dspy.LM("velollm/<model>")`` without an engine argument (DSPy calls
litellm, and streams through ``acompletion(stream=True)``). ``<model>`` is any reference the
pool accepts: a catalogue name, a path, ``hf:...`` or ``remote:http://host:8000/v1#name``.

Engines come from the process-wide pool; parameters go through the shared OpenAI mapping
(:mod:`velollm.openai_wire`); velollm errors become litellm's exception types so
that retry logic in user code (and litellm's own ``num_retries``) retries only what can
succeed on a second try. Async calls generate in a worker thread; cancelling the task stops
generation at the next token and frees the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import litellm
from litellm import CustomLLM
from litellm.types.utils import ChoiceLogprobs, Choices, GenericStreamingChunk, Message, ModelResponse

from velollm import openai_wire, tools
from velollm.engine import Chunk
from velollm.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    ContextOverflow,
    EngineClosed,
    GenerationError,
    InsufficientMemory,
    InvalidModelFile,
    InvalidRequest,
    ModelNotFound,
    ModelSourceError,
    QueueFull,
    QueueTimeout,
    RemoteUnavailable,
    UnsupportedFeature,
    VeloError,
)
from velollm.pool.streams import LeasedStream, acollect, collect_choices, open_leased, start_stream

PROVIDER = "velollm"


@contextmanager
def litellm_errors(model: str) -> Iterator[None]:
    """velollm's typed errors as litellm's exception types, for the block (sync or async code)."""
    try:
        yield
    except VeloError as exc:
        raise to_litellm_error(exc, model) from exc


def to_litellm_error(exc: VeloError, model: str) -> Exception:
    """The litellm exception that says the same as ``exc`` (status codes as the server uses)."""
    message = str(exc)
    kw: dict[str, Any] = {"message": message, "model": model, "llm_provider": PROVIDER}
    if isinstance(exc, ContextOverflow):
        return litellm.ContextWindowExceededError(**kw)
    if isinstance(exc, UnsupportedFeature):
        return litellm.UnsupportedParamsError(**kw)
    if isinstance(exc, (InvalidRequest, InvalidModelFile)):
        return litellm.BadRequestError(**kw)
    if isinstance(exc, ModelNotFound):
        return litellm.NotFoundError(**kw)
    if isinstance(exc, AuthenticationFailed):
        return litellm.AuthenticationError(**kw)
    if isinstance(exc, QueueFull):
        return litellm.RateLimitError(**kw)
    if isinstance(exc, QueueTimeout):
        return litellm.Timeout(**kw)
    if isinstance(exc, (BackendUnavailable, InsufficientMemory, EngineClosed)):
        return litellm.ServiceUnavailableError(**kw)
    if isinstance(exc, (RemoteUnavailable, ModelSourceError)):
        return litellm.APIConnectionError(**kw)
    if isinstance(exc, GenerationError):
        return litellm.InternalServerError(**kw)
    return litellm.APIError(status_code=500, **kw)


def _parse(model: str, messages: list[Any], optional_params: dict[str, Any]) -> openai_wire.ParsedRequest:
    params = {k: v for k, v in optional_params.items() if v is not None}
    params["messages"] = messages
    return openai_wire.parse_chat(params, strict=False)


def _fill(response: ModelResponse, model: str, completions: list[Any], tool_calling: bool = False) -> ModelResponse:
    choices = []
    for i, c in enumerate(completions):
        message, finish = openai_wire.chat_message(c, tool_calling=tool_calling)
        choice = Choices(index=i, finish_reason=finish, message=Message(**message))
        if c.logprobs is not None:
            choice.logprobs = ChoiceLogprobs(**openai_wire.chat_logprobs(c.logprobs))
        choices.append(choice)
    response.choices = choices
    usage = openai_wire.total_usage(completions)
    response.usage = litellm.Usage(**usage)  # type: ignore[attr-defined]
    response.model = model
    response.created = int(time.time())
    return response


def _generic(chunk: Chunk, finish_reason: str | None = None) -> GenericStreamingChunk:
    usage = None
    if chunk.usage is not None:
        usage = openai_wire.usage_dict(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    return GenericStreamingChunk(
        text=chunk.text, is_finished=chunk.finish_reason is not None,
        finish_reason=finish_reason or chunk.finish_reason or "", usage=usage, index=0, tool_use=None,
    )


class _GenericChunks:
    """Engine chunks -> litellm's generic chunks; with tools offered, tool calls leave as ``tool_use``
    deltas (one call fragment per chunk) that litellm reassembles into ``tool_calls``."""

    def __init__(self, tool_calling: bool) -> None:
        self._parser = tools.ToolCallParser() if tool_calling else None
        self._calls = False

    def feed(self, chunk: Chunk) -> list[GenericStreamingChunk]:
        if self._parser is None:
            return [_generic(chunk)]
        deltas = self._parser.feed(chunk.text)
        if chunk.finish_reason is not None:
            deltas += self._parser.finish()
        out = []
        for delta in deltas:
            for call in delta.get("tool_calls") or [None]:
                self._calls = self._calls or call is not None
                tool_use = None if call is None else {
                    "id": call.get("id"), "type": "function", "index": call["index"],
                    "function": {"name": call["function"].get("name"), "arguments": call["function"]["arguments"]}}
                out.append(GenericStreamingChunk(text=delta.get("content") or "", is_finished=False, finish_reason="",
                                                 usage=None, index=0, tool_use=tool_use))
        if chunk.finish_reason is not None:
            finish = tools.finish_reason(chunk.finish_reason, [True] if self._calls else [])
            out.append(_generic(chunk.model_copy(update={"text": ""}), finish))
        return out


class VeloLLMProvider(CustomLLM):
    """The ``velollm/`` provider. ``pool`` defaults to the process-wide one, looked up per call."""

    def __init__(self, pool: Any = None) -> None:
        super().__init__()
        self._pool = pool

    @property
    def pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        from velollm.pool import get_pool

        return get_pool()

    # --- plumbing shared by the four entry points -----------------------------------------
    def _prepare(self, model: str, messages: list[Any], optional_params: dict[str, Any],
                 stream: bool) -> openai_wire.ParsedRequest:
        parsed = _parse(model, messages, optional_params)
        if stream and parsed.n > 1:
            raise UnsupportedFeature("n > 1 with stream=True is not supported by the litellm provider")
        if stream and parsed.request.logprobs:  # litellm's generic stream chunks have no place for them
            raise UnsupportedFeature("logprobs with stream=True are not supported by the litellm provider; "
                                     "stream without them, or ask velollm's server")
        return parsed

    def _open(self, model: str, parsed: openai_wire.ParsedRequest) -> LeasedStream:
        return open_leased(self.pool, model, parsed.requests(), parsed.load_options, openai_wire.check_for_engine)

    # --- litellm's entry points ---------------------------------------------------------
    def completion(self, model: str, messages: list[Any], model_response: ModelResponse,
                   optional_params: dict[str, Any], **kwargs: Any) -> ModelResponse:
        with litellm_errors(model):
            parsed = self._prepare(model, messages, optional_params, stream=False)
            with self._open(model, parsed) as stream:
                completions = collect_choices(stream, parsed.n, model)
        return _fill(model_response, model, completions, parsed.tool_calling)

    def streaming(self, model: str, messages: list[Any], model_response: ModelResponse,
                  optional_params: dict[str, Any], **kwargs: Any) -> Iterator[GenericStreamingChunk]:
        with litellm_errors(model):
            parsed = self._prepare(model, messages, optional_params, stream=True)
            stream = self._open(model, parsed)  # load, queue and validate now: errors before any chunk
        return _sync_chunks(stream, model, parsed.tool_calling)

    async def acompletion(self, model: str, messages: list[Any], model_response: ModelResponse,
                          optional_params: dict[str, Any], **kwargs: Any) -> ModelResponse:
        with litellm_errors(model):
            parsed = self._prepare(model, messages, optional_params, stream=False)
            stream = await start_stream(lambda: self._open(model, parsed))
            completions = await acollect(stream, parsed.n, model)
        return _fill(model_response, model, completions, parsed.tool_calling)

    async def astreaming(self, model: str, messages: list[Any], model_response: ModelResponse,
                         optional_params: dict[str, Any], **kwargs: Any) -> AsyncIterator[GenericStreamingChunk]:
        with litellm_errors(model):
            parsed = self._prepare(model, messages, optional_params, stream=True)
            stream = await start_stream(lambda: self._open(model, parsed))
        chunks = _GenericChunks(parsed.tool_calling)
        async with stream:
            with litellm_errors(model):
                async for _, chunk in stream:
                    for generic in chunks.feed(chunk):
                        yield generic

    # --- embeddings (velollm.embeddings) ------------------------------------------------------
    def embedding(self, model: str, input: Any, model_response: Any, optional_params: dict[str, Any] | None = None,
                  **kwargs: Any) -> Any:
        from velollm.embeddings import litellm_embedding

        with litellm_errors(model):
            return litellm_embedding(self.pool, model, input, model_response, optional_params)

    async def aembedding(self, model: str, input: Any, model_response: Any,
                         optional_params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        import asyncio

        return await asyncio.to_thread(self.embedding, model, input, model_response, optional_params)


def _sync_chunks(stream: LeasedStream, model: str, tool_calling: bool = False) -> Iterator[GenericStreamingChunk]:
    chunks = _GenericChunks(tool_calling)
    with stream, litellm_errors(model):
        for _, chunk in stream:
            yield from chunks.feed(chunk)


_registered: VeloLLMProvider | None = None
_register_lock = threading.Lock()


def register_litellm(pool: Any = None) -> VeloLLMProvider:
    """Make ``velollm/<model>`` a litellm provider (idempotent; returns the handler).

    Importing velollm already does this once litellm is imported (see
    :mod:`velollm.adapters.litellm.autoregister`); call it yourself to use a specific pool
    (``None``: the process-wide one) or after turning auto-registration off.
    """
    global _registered
    with _register_lock:
        if _registered is None:
            _registered = VeloLLMProvider(pool)
        _registered._pool = pool
        entries = [e for e in litellm.custom_provider_map if e.get("provider") != PROVIDER]
        entries.append({"provider": PROVIDER, "custom_handler": _registered})
        litellm.custom_provider_map = entries
        from litellm.utils import custom_llm_setup

        custom_llm_setup()
        return _registered


def _register_on_import() -> None:
    """Importing this module imports litellm; when that import is the first one, the import hook
    fires while this module is half-built and cannot register — so register here instead."""
    from velollm.adapters.litellm.autoregister import enabled

    if enabled():
        register_litellm()


_register_on_import()
