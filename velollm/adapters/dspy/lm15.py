"""Translation between DSPy's canonical lm15 types and velollm's engine types.

DSPy 3.4's engine protocol speaks ``dspy.lm15`` (Request/Response/stream events/errors); velollm
engines speak :mod:`velollm.engine`. Keeping the whole mapping here means the DSPy LM stays a thin
shell, and a change in either vocabulary is a change in one file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dspy import lm15

from velollm import openai_wire
from velollm.engine import Chunk, Completion, GenerationRequest
from velollm.errors import (
    BackendNotFound,
    BackendUnavailable,
    ContextOverflow,
    InvalidModelFile,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    QueueTimeout,
    UnsupportedFeature,
    VeloError,
)

#: lm15 roles -> velollm chat roles. ``developer`` instructions are system turns for local models.
_ROLES = {"user": "user", "assistant": "assistant", "developer": "system", "tool": "tool"}

#: Sampling knobs a caller may set through ``Config.extensions`` (llama.cpp names).
EXTENSION_KEYS = frozenset({"min_p", "repeat_penalty", "grammar", "typical_p", "penalty_last_n", "mirostat_mode",
                            "mirostat_tau", "mirostat_eta"})


def _text_of(parts: Any, where: str) -> str:
    if isinstance(parts, str):
        return parts
    texts = []
    for part in parts:
        if getattr(part, "type", None) != "text":
            raise UnsupportedFeature(f"velollm engines take text only; {where} holds a {part.type!r} part")
        texts.append(part.text)
    return "".join(texts)


def to_generation_request(request: lm15.Request) -> GenerationRequest:
    """A canonical Request as a velollm GenerationRequest; unset knobs keep velollm's defaults."""
    if request.tools:
        raise UnsupportedFeature("velollm engines do not do native tool calling; use a DSPy adapter's text tools")
    config = request.config
    if config.logprobs is not None:
        raise UnsupportedFeature("velollm engines do not return log probabilities")
    messages: list[dict[str, str]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": _text_of(request.system, "the system prompt")})
    for i, message in enumerate(request.messages):
        messages.append({"role": _ROLES[message.role], "content": _text_of(message.parts, f"message {i}")})

    fields: dict[str, Any] = {"messages": messages}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty"):
        value = getattr(config, name)
        if value is not None:
            fields[name] = value
    if config.stop:
        fields["stop"] = list(config.stop)
    extensions = dict(config.extensions or {})
    unknown = set(extensions) - EXTENSION_KEYS
    if unknown:
        raise UnsupportedFeature(f"velollm does not know the extension setting(s) {sorted(unknown)}; "
                                 f"known: {sorted(EXTENSION_KEYS)}")
    fields.update(extensions)
    fmt = config.response_format
    if fmt is not None and "grammar" not in fields:
        fields["json_schema"] = fmt["schema"] if fmt["type"] == "json_schema" else {"type": "object"}
    return GenerationRequest.of(**fields)


def _usage(completion_usage: Any) -> lm15.Usage:
    return lm15.Usage(
        input_tokens=completion_usage.prompt_tokens,
        output_tokens=completion_usage.completion_tokens,
        total_tokens=completion_usage.prompt_tokens + completion_usage.completion_tokens,
    )


def new_id() -> str:
    return openai_wire.new_id("velollm")


def to_response(completion: Completion, model: str, *, provider_data: dict[str, Any] | None = None) -> lm15.Response:
    """A finished velollm generation as a canonical Response with the real token counts."""
    return lm15.Response(
        id=new_id(),
        model=model,
        message=lm15.Message.assistant(completion.text),
        finish_reason=completion.finish_reason,
        usage=_usage(completion.usage),
        provider_data=provider_data,
    )


def to_events(chunks: Iterator[Chunk], model: str) -> Iterator[Any]:
    """velollm chunks as lm15 stream events: one start, text deltas, one end with usage."""
    yield lm15.StreamStartEvent(id=new_id(), model=model)
    for chunk in chunks:
        if chunk.text:
            yield lm15.StreamDeltaEvent(delta=lm15.TextDelta(text=chunk.text))
        if chunk.finish_reason is not None:
            usage = _usage(chunk.usage) if chunk.usage is not None else None
            yield lm15.StreamEndEvent(finish_reason=chunk.finish_reason, usage=usage)
            return


def to_lm15_error(exc: VeloError, *, model: str) -> lm15.LM15Error:
    """The lm15 error DSPy understands for a velollm error (DSPy retries only retryable kinds)."""
    message = f"{model}: {exc}"
    kind: type[lm15.LM15Error]
    if isinstance(exc, ModelNotFound):
        kind = lm15.UnsupportedModelError
    elif isinstance(exc, ContextOverflow):
        kind = lm15.ContextLengthError
    elif isinstance(exc, UnsupportedFeature):
        return lm15.UnsupportedFeatureError(message, provider="velollm")
    elif isinstance(exc, InvalidRequest):
        kind = lm15.InvalidRequestError
    elif isinstance(exc, (QueueFull, QueueTimeout)):
        kind = lm15.RateLimitError
    elif exc.retryable:
        kind = lm15.ServerError
    elif isinstance(exc, (InvalidModelFile, BackendNotFound, BackendUnavailable)):
        return lm15.ConfigurationError(message)
    else:
        kind = lm15.ProviderError
    return kind(message, provider="velollm")


def velollm_cause(exc: BaseException | None) -> VeloError | None:
    """The velollm error at the root of a DSPy/lm15 error chain, if there is one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, VeloError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
