"""The one mapping between OpenAI's chat/completions wire format and velollm's engine types.

Three consumers share it, so a parameter means the same thing everywhere: the litellm provider
and the HTTP server turn OpenAI-style parameters into :class:`GenerationRequest`s and turn
:class:`Completion`/:class:`Chunk` back into OpenAI-shaped dicts; the remote backend goes the
other way (a request out to an OpenAI-compatible server, its answers back into engine types).
Errors get one table too: velollm error -> HTTP status / OpenAI error type, and back.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from velollm import tools
from velollm.engine import Chunk, Completion, Engine, GenerationRequest, TokenLogprob, Usage, check_request_extras
from velollm.errors import (
    AuthenticationFailed,
    BackendNotFound,
    BackendUnavailable,
    ContextOverflow,
    EngineClosed,
    GenerationError,
    InsufficientMemory,
    InvalidModelFile,
    InvalidRequest,
    ModelNotFound,
    ModelSourceError,
    PermissionDenied,
    QueueFull,
    QueueTimeout,
    RemoteUnavailable,
    UnsupportedFeature,
    VeloError,
)
from velollm.limits import check_grammar

#: The largest seed: llama.cpp's are 32-bit (a larger one would be cut silently).
MAX_SEED = 2**32 - 1
#: The most choices one request may ask for; more is almost surely a mistake (and a DoS).
MAX_N = 16

#: Parameters velollm cannot honour: set to anything but "off", they are an error, never dropped.
UNSUPPORTED = {
    "functions": "the legacy 'functions' parameter (use 'tools')",
    "function_call": "the legacy 'function_call' parameter (use 'tool_choice')",
    "logit_bias": "logit bias",
    "audio": "audio output",
    "modalities": "non-text modalities",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning effort",
    "echo": "echoing the prompt",
    "best_of": "best_of",
}
#: Values of an unsupported parameter that mean "not used".
_OFF_VALUES: tuple[Any, ...] = (None, False, "none", "", [], {}, 0)

#: Accepted and deliberately without effect (bookkeeping fields of the OpenAI API).
IGNORED = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key",
    "safety_identifier", "stream_options", "verbosity",
})

#: Sampling parameters beyond OpenAI's that llama.cpp, vLLM and llama-server also accept.
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "seed",
             "typical_p", "mirostat_tau", "mirostat_eta")
#: llama.cpp server spellings -> GenerationRequest fields
_SAMPLING_ALIASES = {"mirostat": "mirostat_mode", "mirostat_mode": "mirostat_mode",
                     "repeat_last_n": "penalty_last_n", "penalty_last_n": "penalty_last_n"}


@dataclass
class ParsedRequest:
    """An OpenAI request turned into what an engine needs, plus how to shape the answer."""

    model: str | None
    request: GenerationRequest
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    #: load options for the pool (a velollm extension: ``"load_options": {"n_ctx": 4096}``)
    load_options: dict[str, Any] = field(default_factory=dict)
    #: the answer may hold tool calls (velollm.tools): parse them out of the text
    tool_calling: bool = False
    #: seconds the model stays loaded after this request (Ollama's ``keep_alive``: 0 unloads, -1 keeps)
    keep_alive: float | None = None

    def requests(self) -> list[GenerationRequest]:
        """One request per choice; with a seed, choice ``i`` uses ``seed + i`` so choices differ."""
        if self.n == 1:
            return [self.request]
        seed = self.request.seed
        return [self.request.model_copy(update={"seed": None if seed is None else seed + i}) for i in range(self.n)]


# --- OpenAI parameters -> GenerationRequest -----------------------------------------------------
def _fail_unsupported(params: Mapping[str, Any]) -> None:
    for name, what in UNSUPPORTED.items():
        value = params.get(name)
        if name == "best_of" and value == 1:
            continue
        if value is not None and not any(value is off or value == off for off in _OFF_VALUES if off is not None):
            raise UnsupportedFeature(f"velollm does not support {what} ('{name}'); remove it from the request")


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """``response_format`` -> JSON schema to constrain decoding with (``None``: free text).

    Accepts OpenAI's ``json_schema`` form, ``json_object`` (any JSON object, or the schema given
    llama-cpp-python style under ``"schema"``), ``text``, and a pydantic model class (litellm
    passes those through from user code).
    """
    if response_format is None:
        return None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return response_format.model_json_schema()
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("'response_format' must be an object like {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        if schema is not None and not isinstance(schema, Mapping):
            raise InvalidRequest("'response_format.schema' must be a JSON schema object")
        return dict(schema) if schema is not None else {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise InvalidRequest("'response_format.json_schema.schema' must be a JSON schema object")
        return dict(schema)
    raise InvalidRequest(f"unknown response_format type {kind!r} (use 'text', 'json_object' or 'json_schema')")


def _text_content(content: Any, index: int) -> str:
    """A message's content as text; OpenAI allows a list of parts, velollm reads the text ones."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise UnsupportedFeature(f"messages[{index}]: content part of type {kind!r} is not supported "
                                         "(text-only models)")
        return "".join(texts)
    raise InvalidRequest(f"messages[{index}].content must be a string or a list of text parts")


def messages_from_openai(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages -> velollm's plain-text messages (``developer`` becomes ``system``)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            if role == "function":
                raise UnsupportedFeature(f"messages[{i}]: the legacy role 'function' is not supported; use 'tool'")
            raise InvalidRequest(f"messages[{i}]: unknown role {role!r}")
        if message.get("function_call"):
            raise UnsupportedFeature(f"messages[{i}]: the legacy 'function_call' is not supported; use 'tool_calls'")
        entry: dict[str, Any] = {"role": role, "content": _text_content(message.get("content"), i)}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        if message.get("tool_calls"):
            if role != "assistant":
                raise InvalidRequest(f"messages[{i}]: only assistant messages carry 'tool_calls'")
            entry["tool_calls"] = _tool_calls(message["tool_calls"], i)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise InvalidRequest(f"messages[{i}].tool_call_id must be a string")
            entry["tool_call_id"] = call_id
        out.append(entry)
    return out


def _tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    """An assistant turn's OpenAI ``tool_calls``, checked (arguments must be JSON text or an object)."""
    if not isinstance(calls, list):
        raise InvalidRequest(f"messages[{index}].tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"messages[{index}].tool_calls[{j}] needs a 'function' with a 'name'")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, Mapping):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise InvalidRequest(f"messages[{index}].tool_calls[{j}].function.arguments must be a JSON string")
        try:
            json.loads(arguments or "{}")
        except json.JSONDecodeError:
            raise InvalidRequest(f"messages[{index}].tool_calls[{j}].function.arguments is not valid JSON") from None
        out.append({"id": str(call.get("id") or tools.new_call_id()), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _int_param(params: Mapping[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer, got {value!r}")
    return value


def generation_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling, length, stop and output-format fields of a :class:`GenerationRequest`."""
    _fail_unsupported(params)
    fields: dict[str, Any] = {}
    for name in _SAMPLING:
        if params.get(name) is not None:
            fields[name] = params[name]
    if "seed" in fields:  # llama.cpp seeds are 32-bit: a larger seed would be cut silently
        seed = fields["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"'seed' must be an integer from 0 to {MAX_SEED}, got {seed!r} "
                                 "(leave it out for a random seed)")
    penalty = params.get("repeat_penalty", params.get("repetition_penalty"))
    if penalty is not None:
        fields["repeat_penalty"] = penalty
    for alias, name in _SAMPLING_ALIASES.items():
        if params.get(alias) is not None:
            if fields.get(name, params[alias]) != params[alias]:
                raise InvalidRequest(f"'{alias}' disagrees with another spelling of '{name}'")
            fields[name] = params[alias]
    max_tokens = _int_param(params, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_param(params, "max_tokens")
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    stop = params.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("'stop' must be a string or a list of strings")
        fields["stop"] = stop
    schema = response_format_schema(params.get("response_format"))
    if schema is not None:
        fields["json_schema"] = schema
    if params.get("grammar") is not None:  # llama.cpp's server extension: a GBNF grammar
        check_grammar(params["grammar"])  # empty, huge, deeply nested: refused before any engine sees it
        fields["grammar"] = params["grammar"]
    return fields


def _n(params: Mapping[str, Any]) -> int:
    n = _int_param(params, "n")
    if n is None:
        return 1
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_N}, got {n}")
    return n


def _flags(params: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = params.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"'stream' must be true or false, got {stream!r}")
    stream = bool(stream)
    options = params.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequest("'stream_options' is only allowed with 'stream': true")
    options = options or {}
    if not isinstance(options, Mapping):
        raise InvalidRequest("'stream_options' must be an object")
    return stream, bool(options.get("include_usage"))


def _load_options(params: Mapping[str, Any]) -> dict[str, Any]:
    options = params.get("load_options") or {}
    if not isinstance(options, Mapping):
        raise InvalidRequest("'load_options' must be an object of velollm load options")
    return dict(options)


def _keep_alive(params: Mapping[str, Any]) -> float | None:
    """Ollama's per-request ``keep_alive``: seconds or a duration ("5m"); 0 unloads after the answer, -1 keeps."""
    from velollm.pool.status import parse_keep_alive

    value = params.get("keep_alive")
    return None if value is None else parse_keep_alive(value)


def _check_known(params: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(k for k in params if k not in known and k not in IGNORED and k not in UNSUPPORTED)
    if unknown:
        raise InvalidRequest(f"unrecognized request argument(s): {', '.join(unknown)}")


_COMMON = frozenset({*_SAMPLING, *_SAMPLING_ALIASES, "repeat_penalty", "repetition_penalty", "max_tokens",
                     "max_completion_tokens", "stop", "response_format", "grammar", "n", "stream", "model",
                     "load_options", "keep_alive", "logprobs"})
CHAT_KEYS = _COMMON | {"messages", "tools", "tool_choice", "parallel_tool_calls", "top_logprobs"}
COMPLETION_KEYS = _COMMON | {"prompt", "suffix"}


def fim_stops(suffix: str) -> list[str]:
    """Where a fill-in-the-middle answer has run into the suffix: its first non-blank line, generated as a
    whole line (small coder models often write the suffix again, then go on)."""
    line = next((line.rstrip() for line in suffix.split("\n") if line.strip()), None)
    return [f"\n{line}\n"] if line else []


def _chat_logprobs(params: Mapping[str, Any]) -> dict[str, Any]:
    """Chat's ``logprobs: true`` and ``top_logprobs: 0..20`` as request fields."""
    asked, top = params.get("logprobs"), params.get("top_logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise InvalidRequest("'logprobs' must be true or false (the number of alternatives is 'top_logprobs')")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise InvalidRequest(f"'top_logprobs' must be an integer from 0 to 20, got {top!r}")
    if top and not asked:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true")
    return {"logprobs": True, "top_logprobs": top or 0} if asked else {}


def _completion_logprobs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The legacy ``logprobs: N``: the chosen token's log-probability and the N most likely (0..20)."""
    n = params.get("logprobs")
    if n is None:
        return {}
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 20:
        raise InvalidRequest(f"'logprobs' on /v1/completions is the number of alternatives, 0 to 20; got {n!r}")
    return {"logprobs": True, "top_logprobs": n}


def parse_chat(params: Mapping[str, Any], *, strict: bool = True) -> ParsedRequest:
    """An OpenAI ``/v1/chat/completions`` body -> :class:`ParsedRequest`.

    ``strict`` rejects parameters nobody knows (the server, like OpenAI, answers 400); the
    litellm provider is lenient because litellm and DSPy add their own bookkeeping keys.
    """
    if not isinstance(params, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    if strict:
        _check_known(params, CHAT_KEYS)
    fields = generation_fields(params)
    tool_fields, choice = tools.request_fields(params)
    fields.update(tool_fields)
    fields.update(_chat_logprobs(params))
    request = GenerationRequest.of(messages=messages_from_openai(params.get("messages")), **fields)
    stream, include_usage = _flags(params)
    model = params.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    return ParsedRequest(model=model, request=request, n=_n(params), stream=stream, include_usage=include_usage,
                         load_options=_load_options(params), keep_alive=_keep_alive(params),
                         tool_calling=choice.mode != "none")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's ``prompt``: a string, a list of strings, token ids (a list of ints) or a list of such lists."""
    if isinstance(prompt, str) or _is_token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        return list(prompt)
    raise InvalidRequest("'prompt' must be a string, a non-empty list of strings, a non-empty list of token ids "
                         "(integers), or a list of such lists")


def parse_completion(params: Mapping[str, Any], *, strict: bool = True) -> list[ParsedRequest]:
    """An OpenAI ``/v1/completions`` body -> one :class:`ParsedRequest` per prompt (a list of
    prompts gives ``n`` choices for each, in order, as OpenAI does)."""
    if not isinstance(params, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    if strict:
        _check_known(params, COMPLETION_KEYS)
    prompts = completion_prompts(params.get("prompt"))
    fields = generation_fields(params)
    fields.update(_completion_logprobs(params))
    suffix = params.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise InvalidRequest("'suffix' must be a string")
        fields["suffix"] = suffix
        fields["stop"] = [*fields.get("stop", []), *fim_stops(suffix)]
    stream, include_usage = _flags(params)
    model = params.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    n = _n(params)
    keep_alive = _keep_alive(params)
    if len(prompts) * n > MAX_N:
        raise InvalidRequest(f"at most {MAX_N} completions per request ({len(prompts)} prompts x n={n})")
    return [
        ParsedRequest(model=model, request=GenerationRequest.of(prompt=p, **fields), n=n, stream=stream,
                      include_usage=include_usage, load_options=_load_options(params), keep_alive=keep_alive)
        for p in prompts
    ]


def check_for_engine(request: GenerationRequest, engine: Engine) -> None:
    """Reject what this engine cannot do before any work starts (no silent dropping)."""
    caps = engine.capabilities
    if request.json_schema is not None and not caps.json_schema:
        raise UnsupportedFeature(f"{engine.name} cannot constrain output to a JSON schema")
    if request.grammar is not None and not caps.grammar and request.grammar != tools.TEXT_GRAMMAR:  # that one: a help
        raise UnsupportedFeature(f"{engine.name} does not support grammars")
    if request.messages is not None and not caps.chat:
        raise UnsupportedFeature(f"{engine.name} has no chat mode; use a completion with a prompt")
    check_request_extras(engine, request)
    if request.tools and not caps.tools:
        raise UnsupportedFeature(f"{engine.name} cannot do tool calling (it needs chat templates and grammars)")
    if request.logprobs and not caps.logprobs:
        raise UnsupportedFeature(f"{engine.name} does not report log probabilities")
    if request.suffix is not None and not caps.fill_in_middle:
        raise UnsupportedFeature(f"{engine.name} has no fill-in-the-middle tokens in its vocabulary; 'suffix' needs "
                                 "a FIM model such as qwen2.5-coder")
    n_ctx = engine.context_length
    if n_ctx and request.max_tokens is not None and request.max_tokens > n_ctx:
        raise InvalidRequest(f"max_tokens={request.max_tokens} is larger than the model's context window ({n_ctx})")


# --- engine results -> OpenAI dicts ---------------------------------------------------------------
def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` when a prefix cache served part of the prompt."""
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


def total_usage(completions: list[Completion], prompts: int = 1) -> dict[str, Any]:
    """OpenAI counts each distinct prompt once and every generated token."""
    return sum_usage([c.usage for c in completions], prompts)


def sum_usage(usages: list[Usage], prompts: int = 1) -> dict[str, Any]:
    """Usage of ``n`` choices per prompt: each distinct prompt once, every generated token."""
    per_prompt = len(usages) // max(prompts, 1) or 1
    prompt_tokens = sum(u.prompt_tokens for u in usages[::per_prompt])
    cached = sum(u.cached_tokens for u in usages[::per_prompt])
    return usage_dict(prompt_tokens, sum(u.completion_tokens for u in usages), cached)


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """Chat's ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}``."""
    if entries is None:
        return None
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes}
                                          for t in e.top_logprobs]} for e in entries], "refusal": None}


def text_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions ``logprobs``: parallel lists, top alternatives as ``{token: logprob}``."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries], "text_offset": offsets}


def chat_message(completion: Completion, *, tool_calling: bool = False) -> tuple[dict[str, Any], str]:
    """``(message, finish_reason)`` of one choice; tool calls parsed out when tools were offered."""
    if not tool_calling:
        return {"role": "assistant", "content": completion.text}, completion.finish_reason
    content, calls = tools.parse_output(completion.text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, tools.finish_reason(completion.finish_reason, calls)


def chat_completion(completions: list[Completion], model: str, *, id: str | None = None,
                    tool_calling: bool = False) -> dict[str, Any]:
    """A ``chat.completion`` object; choice ``i`` is ``completions[i]``."""
    choices = []
    for i, c in enumerate(completions):
        message, finish = chat_message(c, tool_calling=tool_calling)
        choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": chat_logprobs(c.logprobs)})
    return {
        "id": id or new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": total_usage(completions),
    }


def text_completion(completions: list[Completion], model: str, *, prompts: int = 1,
                    id: str | None = None) -> dict[str, Any]:
    """A ``text_completion`` object (the legacy ``/v1/completions`` shape)."""
    return {
        "id": id or new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": text_logprobs(c.logprobs)}
            for i, c in enumerate(completions)
        ],
        "usage": total_usage(completions, prompts),
    }


def chat_chunk(id: str, model: str, created: int, index: int, *, content: str | None = None,
               role: bool = False, finish_reason: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a delta for choice ``index``."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}


class ChatChoiceStream:
    """One choice's engine chunks -> ``chat.completion.chunk`` dicts: content deltas, tool-call deltas
    (when tools were offered; they reassemble to the non-streamed calls) and per-token logprobs."""

    def __init__(self, id: str, model: str, created: int, index: int, *, tool_calling: bool = False) -> None:
        self._head = (id, model, created, index)
        self._parser = tools.ToolCallParser() if tool_calling else None
        self._logprobs: list[TokenLogprob] | None = None
        self._calls = False

    def start(self) -> dict[str, Any]:
        return chat_chunk(*self._head, role=True, content="")

    def _take_logprobs(self) -> dict[str, Any] | None:
        out, self._logprobs = chat_logprobs(self._logprobs), None
        return out

    def feed(self, chunk: Chunk) -> list[dict[str, Any]]:
        if chunk.logprobs is not None:
            self._logprobs = (self._logprobs or []) + chunk.logprobs
        if self._parser is None:
            deltas: list[dict[str, Any]] = [{"content": chunk.text}] if chunk.text else []
        else:
            deltas = self._parser.feed(chunk.text)
            if chunk.finish_reason is not None:
                deltas += self._parser.finish()
        out = []
        for delta in deltas:
            self._calls = self._calls or bool(delta.get("tool_calls"))
            out.append(chat_chunk(*self._head, content=delta.get("content"), tool_calls=delta.get("tool_calls"),
                                  logprobs=self._take_logprobs()))
        if chunk.finish_reason is not None:
            finish = tools.finish_reason(chunk.finish_reason, [True] if self._calls else [])
            out.append(chat_chunk(*self._head, finish_reason=finish, logprobs=self._take_logprobs()))
        return out


def text_chunk(id: str, model: str, created: int, index: int, text: str,
               finish_reason: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]}


def usage_chunk(id: str, model: str, created: int, usage: dict[str, int], *, chat: bool = True) -> dict[str, Any]:
    """The extra last chunk OpenAI sends with ``stream_options.include_usage``: no choices, usage."""
    return {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage}


# --- errors --------------------------------------------------------------------------------------
#: velollm error -> (HTTP status, OpenAI error type, code). Most specific classes first.
ERROR_TABLE: list[tuple[type[VeloError], int, str, str | None]] = [
    (ContextOverflow, 400, "invalid_request_error", "context_length_exceeded"),
    (UnsupportedFeature, 400, "invalid_request_error", "unsupported_parameter"),
    (InvalidRequest, 400, "invalid_request_error", None),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (InvalidModelFile, 400, "invalid_request_error", "invalid_model"),
    (AuthenticationFailed, 401, "invalid_request_error", "invalid_api_key"),
    (PermissionDenied, 403, "permission_error", "permission_denied"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (QueueTimeout, 503, "server_error", "queue_timeout"),
    (InsufficientMemory, 503, "server_error", "insufficient_memory"),
    (BackendUnavailable, 503, "server_error", "backend_unavailable"),
    (BackendNotFound, 400, "invalid_request_error", "backend_not_found"),
    (EngineClosed, 503, "server_error", "engine_closed"),
    (RemoteUnavailable, 502, "server_error", "upstream_error"),
    (ModelSourceError, 502, "server_error", "model_source_error"),
    (GenerationError, 500, "server_error", "generation_error"),
]


def error_status(exc: BaseException) -> tuple[int, str, str | None]:
    """``(HTTP status, OpenAI error type, code)`` for any exception; unknown ones are 500s."""
    for cls, status, kind, code in ERROR_TABLE:
        if isinstance(exc, cls):
            return status, kind, code
    return 500, "server_error", None


def error_body(exc: BaseException, *, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    _, kind, code = error_status(exc)
    message = str(exc) if isinstance(exc, VeloError) else f"internal error: {type(exc).__name__}"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_from_response(status: int, body: Any) -> VeloError:
    """The velollm error for an OpenAI-compatible server's error answer (the remote backend)."""
    message = f"HTTP {status}"
    code = None
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):
        message = str(error.get("message") or message)
        code = error.get("code")
    elif isinstance(error, str):
        message = error
    elif isinstance(body, Mapping) and isinstance(body.get("detail"), str):
        message = body["detail"]
    elif isinstance(body, str) and body.strip():
        message = body.strip()[:500]
    lowered = message.lower()
    if status in (401, 403):
        return AuthenticationFailed(f"the server refused the credentials: {message}")
    if status == 404 or code == "model_not_found":
        return ModelNotFound(message)
    if code == "context_length_exceeded" or ("context" in lowered and ("length" in lowered or "window" in lowered)):
        return ContextOverflow(message)
    if code == "unsupported_parameter":
        return UnsupportedFeature(message)
    if status in (400, 413, 422):
        return InvalidRequest(message)
    if status == 429:
        return QueueFull(f"the server is busy: {message}")
    if status >= 500:
        return RemoteUnavailable(f"server error {status}: {message}")
    return GenerationError(f"unexpected answer {status}: {message}")


# --- the other way: GenerationRequest -> OpenAI body, OpenAI answers -> engine types -------------
def openai_body(request: GenerationRequest, model: str, *, sampling_extras: bool = True,
                stream: bool = False) -> tuple[str, dict[str, Any]]:
    """``(endpoint, body)`` that asks an OpenAI-compatible server for this request.

    ``sampling_extras`` also sends top_k/min_p/repetition_penalty (and typical_p, mirostat,
    repeat_last_n when set), which llama.cpp's and velollm's servers accept (vLLM the first three);
    OpenAI itself would reject them, so without it a request that sets them is refused.
    """
    body: dict[str, Any] = {"model": model, "temperature": request.temperature, "top_p": request.top_p}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.frequency_penalty:
        body["frequency_penalty"] = request.frequency_penalty
    if request.presence_penalty:
        body["presence_penalty"] = request.presence_penalty
    llama_only = {"typical_p": ("typical_p", 1.0), "mirostat_mode": ("mirostat", 0),
                  "mirostat_tau": ("mirostat_tau", 5.0), "mirostat_eta": ("mirostat_eta", 0.1),
                  "penalty_last_n": ("repeat_last_n", 64)}
    if sampling_extras:
        body.update(top_k=request.top_k, min_p=request.min_p)
        if request.repeat_penalty != 1.0:
            body["repetition_penalty"] = request.repeat_penalty
        for name, (wire, default) in llama_only.items():
            if getattr(request, name) != default:
                body[wire] = getattr(request, name)
    else:
        beyond = [n for n in ("top_k", "min_p", "repeat_penalty", *llama_only) if n in request.model_fields_set]
        if beyond:
            raise UnsupportedFeature(f"this server takes OpenAI's sampling parameters only; remove "
                                     f"{', '.join(beyond)} (or enable sampling_extras for a llama.cpp/vLLM server)")
    if request.json_schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": request.json_schema, "strict": True}}
    if request.grammar is not None:
        body["grammar"] = request.grammar
    body.update(request.extra)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if request.messages is not None:
        body["messages"] = [m.model_dump(exclude_none=True) for m in request.messages]
        return "chat/completions", body
    body["prompt"] = request.prompt
    return "completions", body


def _finish(reason: Any) -> str:
    return "length" if reason == "length" else "stop"


def _usage(data: Any) -> Usage | None:
    if not isinstance(data, Mapping):
        return None
    details = data.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else 0
    return Usage(prompt_tokens=int(data.get("prompt_tokens") or 0),
                 completion_tokens=int(data.get("completion_tokens") or 0), cached_tokens=int(cached or 0))


def _choice_text(choice: Mapping[str, Any]) -> str:
    if "message" in choice:
        return (choice.get("message") or {}).get("content") or ""
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def completion_from_openai(data: Any) -> Completion:
    """An OpenAI (chat) completion answer -> :class:`Completion` (first choice)."""
    if not isinstance(data, Mapping) or not data.get("choices"):
        raise GenerationError(f"the server's answer has no choices: {str(data)[:300]}")
    choice = data["choices"][0]
    return Completion(text=_choice_text(choice), finish_reason=_finish(choice.get("finish_reason")),
                      usage=_usage(data.get("usage")) or Usage(), model=str(data.get("model") or ""))


def chunk_from_openai(data: Any) -> tuple[str, str | None, Usage | None]:
    """One streamed OpenAI chunk -> ``(text, finish_reason or None, usage or None)``."""
    if not isinstance(data, Mapping):
        raise GenerationError(f"unexpected stream event: {str(data)[:300]}")
    if "error" in data:
        raise error_from_response(500, data)
    choices = data.get("choices") or []
    text, finish = "", None
    if choices:
        text = _choice_text(choices[0])
        if choices[0].get("finish_reason"):
            finish = _finish(choices[0]["finish_reason"])
    return text, finish, _usage(data.get("usage"))


def final_chunk(finish_reason: str, usage: Usage) -> Chunk:
    return Chunk(text="", finish_reason=_finish(finish_reason), usage=usage)
