"""Translation between DSPy's canonical lm15 types and velollm's engine types.

DSPy 3.4's engine protocol speaks ``dspy.lm15`` (Request/Response/stream events/errors); velollm
engines speak :mod:`velollm.engine`. Keeping the whole mapping here means the DSPy LM stays a thin
shell, and a change in either vocabulary is a change in one file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from dspy import lm15

from velollm import openai_wire, tools
from velollm.engine import Chunk, Completion, GenerationRequest, TokenLogprob
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


def _tool_params(request: lm15.Request) -> dict[str, Any]:
    """lm15 tools and tool choice as OpenAI ``tools`` / ``tool_choice`` / ``parallel_tool_calls``."""
    functions = []
    for tool in request.tools:
        if not isinstance(tool, lm15.FunctionTool):
            raise UnsupportedFeature(f"velollm engines call function tools only, not {tool.type!r} tool {tool.name!r}")
        functions.append({"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                           "parameters": dict(tool.parameters)}})
    params: dict[str, Any] = {"tools": functions}
    choice = request.config.tool_choice
    if choice is not None:
        if choice.allowed:  # the tools the model may call this time: only those are offered
            params["tools"] = [f for f in functions if f["function"]["name"] in choice.allowed]
        if choice.mode == "required" and len(choice.allowed) == 1:
            params["tool_choice"] = {"type": "function", "function": {"name": choice.allowed[0]}}
        else:
            params["tool_choice"] = choice.mode
        if choice.parallel is not None:
            params["parallel_tool_calls"] = choice.parallel
    if request.config.response_format is not None:
        params["response_format"] = request.config.response_format
    return params


def tool_calling(request: lm15.Request) -> bool:
    """Whether the answer to ``request`` may hold tool calls (to be parsed out of the text)."""
    choice = request.config.tool_choice
    return bool(request.tools) and (choice is None or choice.mode != "none")


def _message_entries(message: Any, i: int) -> list[dict[str, Any]]:
    """One lm15 message as velollm chat messages (a tool message may answer several calls)."""
    if message.role == "tool":
        return [{"role": "tool", "tool_call_id": part.id, "name": part.name,
                 "content": _text_of(part.content, f"message {i}'s tool result")} for part in message.parts]
    calls = [part for part in message.parts if isinstance(part, lm15.ToolCallPart)]
    texts = [part for part in message.parts if not isinstance(part, lm15.ToolCallPart)]
    entry: dict[str, Any] = {"role": _ROLES[message.role], "content": _text_of(texts, f"message {i}")}
    if calls:
        entry["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": json.dumps(c.input, ensure_ascii=False)}}
                               for c in calls]
    return [entry]


def to_generation_request(request: lm15.Request) -> GenerationRequest:
    """A canonical Request as a velollm GenerationRequest; unset knobs keep velollm's defaults."""
    config = request.config
    messages: list[dict[str, Any]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": _text_of(request.system, "the system prompt")})
    for i, message in enumerate(request.messages):
        messages.extend(_message_entries(message, i))

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
    if config.logprobs is not None:
        fields.update(logprobs=True, top_logprobs=config.logprobs)
    if request.tools:
        grammar = {"grammar": fields["grammar"]} if "grammar" in fields else {}  # an extension's grammar
        tool_fields, _ = tools.request_fields({**_tool_params(request), "messages": messages, **grammar})
        fields.update(tool_fields)
        if tool_fields.get("tools"):  # tools in play; under tool_choice "none" a response format still applies
            return GenerationRequest.of(**fields)
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


def _logprobs(entries: list[TokenLogprob] | None) -> tuple[lm15.TokenLogprob, ...] | None:
    if entries is None:
        return None
    return tuple(lm15.TokenLogprob(token=e.token, logprob=e.logprob, bytes=tuple(e.bytes), token_id=e.id,
                                   top=tuple(lm15.TopLogprob(token=t.token, logprob=t.logprob, bytes=tuple(t.bytes),
                                                             token_id=t.id) for t in e.top_logprobs))
                 for e in entries)


def _call_part(call: dict[str, Any]) -> Any:
    """A parsed call as an lm15 ToolCallPart; ``None`` when its arguments were cut off (finish "length")."""
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except json.JSONDecodeError:
        return None
    if not isinstance(arguments, dict):
        return None
    return lm15.ToolCallPart(id=call["id"], name=call["function"]["name"], input=arguments)


def to_response(completion: Completion, model: str, *, provider_data: dict[str, Any] | None = None,
                tool_calling: bool = False) -> lm15.Response:
    """A finished velollm generation as a canonical Response with the real token counts (tool calls as
    ToolCallParts when tools were offered)."""
    parts: list[Any] = []
    finish: str = completion.finish_reason
    if tool_calling:
        content, calls = tools.parse_output(completion.text)
        if content:
            parts.append(lm15.TextPart(text=content))
        parts += [part for part in map(_call_part, calls) if part is not None]
        finish = "tool_call" if calls and finish == "stop" else finish
    return lm15.Response(
        id=new_id(),
        model=model,
        message=lm15.Message.assistant(parts or completion.text),
        finish_reason=finish,
        usage=_usage(completion.usage),
        logprobs=_logprobs(completion.logprobs),
        provider_data=provider_data,
    )


def to_events(chunks: Iterator[Chunk], model: str, *, tool_calling: bool = False) -> Iterator[Any]:
    """velollm chunks as lm15 stream events: one start, text (with logprobs) and tool-call deltas, one end."""
    yield lm15.StreamStartEvent(id=new_id(), model=model)
    parser = tools.ToolCallParser() if tool_calling else None
    calls = False
    for chunk in chunks:
        logprobs = _logprobs(chunk.logprobs) or ()
        if parser is None:
            deltas = [{"content": chunk.text}] if chunk.text else []
        else:
            deltas = parser.feed(chunk.text) + (parser.finish() if chunk.finish_reason is not None else [])
        for delta in deltas:
            if delta.get("content"):
                yield lm15.StreamDeltaEvent(delta=lm15.TextDelta(text=delta["content"], logprobs=logprobs))
                logprobs = ()
            for call in delta.get("tool_calls") or ():
                calls = True
                function = call["function"]
                yield lm15.StreamDeltaEvent(delta=lm15.ToolCallDelta(
                    input=function.get("arguments") or "", part_index=1 + call["index"], id=call.get("id"),
                    name=function.get("name")))
        if chunk.finish_reason is not None:
            usage = _usage(chunk.usage) if chunk.usage is not None else None
            finish = "tool_call" if calls and chunk.finish_reason == "stop" else chunk.finish_reason
            yield lm15.StreamEndEvent(finish_reason=finish, usage=usage)
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
