"""Tool calling (OpenAI ``tools`` / ``tool_choice``) on local models.

Local models that were trained for tools (Qwen2.5, Hermes and their kin) write a call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. velollm uses that one dialect
everywhere:

- *prompt*: a chat template that declares tools in that dialect renders them itself (the model
  sees exactly what it was trained on); any other template gets the same description as a system
  message, and earlier calls and ``role: "tool"`` results are written into the turns as text;
- *decoding*: a GBNF grammar (:func:`tool_grammar`) makes the output either plain text or calls
  whose JSON matches ``{"name": <one of the tools>, "arguments": <that tool's parameters>}``, so a
  call always parses; ``tool_choice`` picks which of those the grammar allows;
- *output*: :class:`ToolCallParser` turns the text back into OpenAI ``tool_calls``, incrementally
  for streams (the deltas reassemble to exactly the non-streamed call).

Everything here is backend-neutral: any engine that renders chat templates through
:mod:`velollm.chat_templates` and honours GBNF grammars does tool calling.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from velollm.engine import Chunk, Completion, Engine, GenerationRequest, Timings
from velollm.errors import GrammarError, InvalidRequest, UnsupportedFeature

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
#: The most tools one request may declare (OpenAI's own limit).
MAX_TOOLS = 128
#: The most calls one answer may hold when parallel tool calls are allowed.
MAX_PARALLEL_CALLS = 8

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

Mode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolChoice:
    """What the model may answer: ``none`` (text), ``auto`` (text or calls), ``required`` (calls),
    ``named`` (calls of the tool ``name`` only)."""

    mode: Mode
    name: str | None = None


# --- request side ---------------------------------------------------------------------------------
def parse_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI ``tools`` checked and normalised to ``{"type": "function", "function": {name,
    description, parameters}}`` (parameters default to an empty object schema)."""
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools per request, got {len(tools)}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise InvalidRequest(f"tools[{i}] must be an object")
        kind = tool.get("type", "function")
        if kind != "function":
            raise UnsupportedFeature(f"tools[{i}]: tool type {kind!r} is not supported (only 'function')")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InvalidRequest(f"tools[{i}].function must be an object with a 'name'")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', "
                                 f"got {name!r}")
        if name in seen:
            raise InvalidRequest(f"tools[{i}]: the tool name {name!r} is used twice")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"tools[{i}].function.description must be a string")
        entry: dict[str, Any] = {"name": name}
        if description:
            entry["description"] = description
        entry["parameters"] = dict(parameters)
        out.append({"type": "function", "function": entry})
    return out


def parse_tool_choice(choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> ToolChoice:
    """OpenAI ``tool_choice`` -> :class:`ToolChoice`; the default is ``auto`` with tools, else ``none``."""
    names = [t["function"]["name"] for t in tools or ()]
    if choice is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(f"'tool_choice' must be 'none', 'auto', 'required' or a named function, "
                                 f"got {choice!r}")
        if choice == "required" and not names:
            raise InvalidRequest("'tool_choice' is 'required' but no 'tools' were given")
        return ToolChoice(choice if names else "none")  # type: ignore[arg-type]
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise InvalidRequest("a named 'tool_choice' looks like {\"type\": \"function\", \"function\": "
                                 "{\"name\": \"...\"}}")
        if name not in names:
            raise InvalidRequest(f"'tool_choice' names {name!r}, which is not among the tools "
                                 f"({', '.join(names) or 'none given'})")
        return ToolChoice("named", name)
    raise InvalidRequest("'tool_choice' must be a string or an object")


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _json_gbnf(schema: Mapping[str, Any], rule: str) -> str:
    """A JSON schema as GBNF whose start rule is ``rule`` (llama.cpp's own converter)."""
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError:  # pragma: no cover - the llama.cpp backend is a core dependency
        raise UnsupportedFeature("tool calling needs llama-cpp-python's JSON-schema converter") from None
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exceptions, KeyErrors... on odd schemas
        raise GrammarError(f"a tool's parameters cannot be turned into a grammar: {type(exc).__name__}: {exc}"
                           ) from None
    return re.sub(r"^root ::=", f"{rule} ::=", gbnf, flags=re.MULTILINE)


# text may not start like a call: not '<', '{', whitespace, nor a json code fence
_TEXT_RULES = (
    r'tc-text ::= [^<{`\x00 \t\r\n] tc-any | "`" [^`\x00] tc-any | "``" [^`\x00] tc-any | "```" tc-lang',
    r'tc-lang ::= [^j\x00] tc-any | "j" [^s\x00] tc-any | "js" [^o\x00] tc-any | "jso" [^n\x00] tc-any',
    r"tc-any ::= [^\x00]*",
)
#: The root of an ``auto`` grammar: how the loop guard tells ``auto`` from the other choices on a request.
_AUTO_ROOT = "root ::= tc-calls | tc-json | tc-fenced | tc-text"
#: See :func:`text_grammar`.
TEXT_GRAMMAR = "\n".join(("root ::= tc-text", *_TEXT_RULES))


def tool_grammar(tools: Sequence[Mapping[str, Any]], choice: ToolChoice, *, parallel: bool = True) -> str | None:
    """The GBNF grammar that makes an answer obey ``choice`` (``None`` for ``none``: free text).

    Calls are ``<tool_call>\\n{json}\\n</tool_call>`` blocks (one only for a named choice). Under
    ``auto`` the answer may instead be one bare JSON call, one in a json code fence (0.5B models
    write those more often than the tags), or plain text that cannot start like a call (not ``<``,
    ``{``, whitespace or a json fence), so no call escapes the check.
    """
    if choice.mode == "none":
        return None
    chosen = [t for t in tools if choice.mode != "named" or t["function"]["name"] == choice.name]
    schema = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(t) for t in chosen]}
    many = parallel and choice.mode != "named"
    calls = f'tc-call ("\\n" tc-call){{0,{MAX_PARALLEL_CALLS - 1}}}' if many else "tc-call"
    lines = [
        _AUTO_ROOT if choice.mode == "auto" else "root ::= tc-calls",
        f"tc-calls ::= {calls}",
        'tc-call ::= "<tool_call>\\n" tc-json "\\n</tool_call>"',
        'tc-fenced ::= "```json\\n" tc-json "```"',
        *_TEXT_RULES,
    ]
    return "\n".join(lines) + "\n" + _json_gbnf(schema, "tc-json")


def text_grammar() -> str:
    """Plain text that cannot start like a call: the answer once the tools have done their part.

    Small models (Qwen2.5-Coder 0.5B) write the call they made before again as text even with the
    tools out of the prompt; this grammar leaves them only the answer (``tool_choice: "none"`` after
    tool calls, and the loop guard)."""
    return TEXT_GRAMMAR


def request_fields(params: Mapping[str, Any]) -> tuple[dict[str, Any], ToolChoice]:
    """``GenerationRequest`` fields for an OpenAI body's ``tools``/``tool_choice``/``parallel_tool_calls``.

    Returns ``({"tools": ..., "grammar": ...}, choice)``; both fields are absent when no tool is in
    play. ``tool_choice: "none"`` keeps the tools out of the prompt too, so the model answers in text;
    when the tools were given and ``messages`` hold calls or results, that text is constrained by
    :func:`text_grammar` (unless a ``response_format`` or ``grammar`` says otherwise).
    """
    raw = params.get("tools")
    tools = parse_tools(raw) if raw not in (None, []) else []
    choice = parse_tool_choice(params.get("tool_choice"), tools)
    formatted = params.get("response_format") not in (None, {"type": "text"}) or params.get("grammar") is not None
    if choice.mode == "none":
        # after calls, small models write the last call again as text: only an answer may follow
        if tools and not formatted and has_call_history(params.get("messages")):
            return {"grammar": TEXT_GRAMMAR}, choice
        return {}, choice
    if formatted:
        raise UnsupportedFeature("'tools' cannot be combined with 'response_format' or 'grammar' in one request")
    parallel = params.get("parallel_tool_calls")
    grammar = tool_grammar(tools, choice, parallel=parallel is None or bool(parallel))
    return {"tools": tools, "grammar": grammar}, choice


# --- prompt side ----------------------------------------------------------------------------------
def template_declares_tools(source: str) -> bool:
    """Whether a chat template renders ``tools`` itself, in the ``<tool_call>`` dialect velollm parses."""
    return "tools" in source and OPEN in source


def tools_system_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tool description for models whose template has none (the dialect Qwen2.5 was trained on)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to help with the user's request. "
        "The functions are described in JSON inside <tools></tools>:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call a function, answer only with a JSON object holding its name and arguments inside "
        "<tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>'
    )


def _arguments_object(arguments: Any, where: str) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise InvalidRequest(f"{where}.function.arguments is not valid JSON") from None
    return arguments if arguments is not None else {}


def _calls_as_text(calls: Sequence[Mapping[str, Any]], where: str) -> str:
    blocks = []
    for j, call in enumerate(calls):
        function = call.get("function") or {}
        arguments = _arguments_object(function.get("arguments"), f"{where}.tool_calls[{j}]")
        payload = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
        blocks.append(f"{OPEN}\n{payload}\n{CLOSE}")
    return "\n".join(blocks)


def template_inputs(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                    template_source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(messages, extra template variables)`` to render: tool definitions, earlier calls and tool
    results either handed to a template that knows them or written into plain turns."""
    native = template_declares_tools(template_source)
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        entry = {k: v for k, v in message.items() if v is not None}
        entry["content"] = message.get("content") or ""
        calls = message.get("tool_calls")
        if native:
            if calls:
                entry["tool_calls"] = [
                    {**call, "function": {**(call.get("function") or {}), "arguments": _arguments_object(
                        (call.get("function") or {}).get("arguments"), f"messages[{i}].tool_calls[{j}]")}}
                    for j, call in enumerate(calls)
                ]
            out.append(entry)
            continue
        entry.pop("tool_calls", None)
        entry.pop("tool_call_id", None)
        if calls:
            text = _calls_as_text(calls, f"messages[{i}]")
            entry["content"] = f"{entry['content']}\n{text}" if entry["content"] else text
        if message.get("role") == "tool":
            response = f"<tool_response>\n{entry['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response
                continue
            entry = {"role": "user", "content": response, "_tool_results": True}
        out.append(entry)
    for entry in out:
        entry.pop("_tool_results", None)
    if not tools:
        return out, {}
    if native:
        return out, {"tools": list(tools)}
    description = tools_system_text(tools)
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{description}" if out[0]["content"] else description}
    else:
        out.insert(0, {"role": "system", "content": description})
    return out, {}


# --- output side ----------------------------------------------------------------------------------
# the arguments start at the first non-space character after their key (waits for it when streaming)
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)', re.DOTALL)
FENCE = "```json"


def closing_suffix(text: str) -> str:
    """What closes JSON cut off mid-way: the open string (and a dangling escape), a missing value after
    a key, then every open object and array, innermost first. Empty for complete JSON."""
    stack: list[str] = []
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]" and stack:
            stack.pop()
    suffix = ""
    if in_string:
        suffix = ("\\" if escaped else "") + '"'
    elif text.rstrip().endswith(":"):
        suffix = "null"
    elif text.rstrip().endswith(","):
        suffix = '"_": null' if stack and stack[-1] == "}" else "null"
    if not text.strip():
        return "{}"
    return suffix + "".join(reversed(stack))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Model text -> OpenAI message deltas (``{"content": ...}`` or ``{"tool_calls": [...]}``).

    A call is a ``<tool_call>`` block (one or more), or, under ``auto``, one bare JSON call or one
    in a json code fence (small models write those; the grammar checks them the same way). Feed
    text as it streams; each call's deltas are a header (id, name, empty arguments) followed by
    argument fragments whose concatenation is the call's arguments JSON.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._mode: Literal["start", "text", "tags", "single"] = "start"
        self._index = -1  # the call being streamed
        self._args_at: int | None = None  # where its arguments start in self._buf
        self._sent = 0  # characters of its arguments already sent

    @property
    def calling(self) -> bool:
        return self._mode in ("tags", "single")

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        if self._mode == "text":
            return [{"content": text}]
        self._buf += text
        if self._mode == "start":
            head = self._buf.lstrip()
            if not head or any(form.startswith(head) and form != head for form in (OPEN, FENCE)):
                return []  # may still become a call
            if head.startswith(OPEN):
                self._mode = "tags"
            elif head.startswith(FENCE) or head.startswith("{"):
                self._mode = "single"
                self._buf = head[len(FENCE):] if head.startswith(FENCE) else head
            else:
                self._mode = "text"
                out, self._buf = self._buf, ""
                return [{"content": out}]
        return self._advance(final=False)

    def finish(self) -> list[dict[str, Any]]:
        """Deltas for what is still held back at the end of the output."""
        if self._mode == "start":
            self._mode = "text"
            out, self._buf = self._buf, ""
            return [{"content": out}] if out else []
        if self.calling:
            return self._advance(final=True)
        return []

    def _header(self, text: str, at: int) -> list[dict[str, Any]] | None:
        match = _HEADER.match(text, at)
        if match is None:
            return None
        self._index += 1
        self._buf, self._args_at, self._sent = text, match.end(), 0
        name = json.loads(f'"{match.group(1)}"')
        return [{"tool_calls": [{"index": self._index, "id": new_call_id(), "type": "function",
                                 "function": {"name": name, "arguments": ""}}]}]

    def _arguments(self, body: str, *, complete: bool) -> list[dict[str, Any]]:
        """Send what is certain of the arguments: all up to the last ``}`` (the call's own closing
        brace is the last one of all), or everything when the output was cut short."""
        if complete:
            brace = body.rfind("}")
            arguments = body[:brace].rstrip() if brace >= 0 else ""
        else:  # cut short by max_tokens: close what is open, so the arguments still parse
            arguments = body.rstrip()
            arguments += closing_suffix(arguments)
        if len(arguments) <= self._sent:
            return []
        delta = arguments[self._sent:]
        self._sent = len(arguments)
        return [{"tool_calls": [{"index": self._index, "function": {"arguments": delta}}]}]

    def _advance(self, *, final: bool) -> list[dict[str, Any]]:
        if self._mode == "single":
            out: list[dict[str, Any]] = []
            if self._args_at is None:
                header = self._header(self._buf, 0)
                if header is None:
                    if final:
                        self._buf = ""
                    return out
                out += header
            body = self._buf[self._args_at:]
            if final:
                trimmed = body.rstrip()
                trimmed = trimmed[:-3].rstrip() if trimmed.endswith("```") else trimmed
                complete = trimmed.endswith("}")
                out += self._arguments(trimmed, complete=complete)
                self._buf, self._args_at = "", None
                return out
            return out + self._arguments(body, complete=True)
        out = []
        while True:
            if self._args_at is None:
                stripped = self._buf.lstrip()
                if not stripped:
                    self._buf = ""
                    return out
                if not stripped.startswith(OPEN):
                    if OPEN.startswith(stripped) and not final:
                        return out  # the start of the next call, perhaps
                    self._buf = ""
                    out.append({"content": stripped})  # text after the calls (only without a grammar)
                    return out
                header = self._header(stripped, len(OPEN))
                if header is None:
                    self._buf = "" if final else stripped  # cut off before the name: nothing to report
                    return out
                out += header
            end = self._buf.find(CLOSE, self._args_at)
            body = self._buf[self._args_at:] if end < 0 else self._buf[self._args_at:end]
            out += self._arguments(body, complete=not (end < 0 and final))
            if end < 0:
                if final:
                    self._buf, self._args_at = "", None
                return out
            self._buf, self._args_at = self._buf[end + len(CLOSE):], None


def parse_output(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer -> ``(content or None, tool_calls)`` as in an OpenAI ``message``."""
    parser = ToolCallParser()
    deltas = parser.feed(text) + parser.finish()
    return merge_deltas(deltas)


def merge_deltas(deltas: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """Reassemble message deltas the way an OpenAI client does: content concatenated, each call's
    arguments concatenated by index."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        if delta.get("content"):
            content.append(delta["content"])
        for part in delta.get("tool_calls") or ():
            call = calls.setdefault(part["index"], {"id": None, "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
            if part.get("id"):
                call["id"] = part["id"]
            function = part.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
    text = "".join(content)
    return (text if text or not calls else None), [calls[i] for i in sorted(calls)]


def finish_reason(engine_reason: str, tool_calls: Sequence[Any]) -> str:
    """OpenAI's finish reason: ``tool_calls`` when the answer ended with complete calls."""
    return "tool_calls" if tool_calls and engine_reason == "stop" else engine_reason


# --- after the tools answered: call history and the loop guard ------------------------------------
# Qwen2.5-Coder 0.5B (and the 1.5B), given a tool's result with the tools still offered, makes the same
# call again, and would for ever in an agent loop. The guard answers in text instead.
def _get(message: Any, name: str) -> Any:
    return message.get(name) if isinstance(message, Mapping) else getattr(message, name, None)


def has_call_history(messages: Any) -> bool:
    """Whether chat ``messages`` (OpenAI dicts or :class:`~velollm.engine.ChatMessage`) hold tool calls or
    tool results."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return False
    return any(_get(m, "tool_calls") or _get(m, "role") == "tool" for m in messages)


_UNPARSED = object()


def _parsed_arguments(arguments: Any) -> Any:
    """A call's arguments as parsed JSON (text or already an object); ``_UNPARSED`` when not JSON."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return _UNPARSED
    return {} if arguments is None else arguments


def answered_calls(messages: Any) -> list[tuple[str, Any]]:
    """``(name, parsed arguments)`` of each call in a chat history that has its result: an assistant
    ``tool_call`` whose id a later ``role: "tool"`` message answers (a result without an id answers the
    oldest call still open, the order chat templates pair them in)."""
    open_calls: dict[str, tuple[str, Any]] = {}  # id -> call, oldest first
    answered: list[tuple[str, Any]] = []
    for message in messages or ():
        for call in _get(message, "tool_calls") or ():
            function = call.get("function") or {}
            call_id = str(call.get("id") or new_call_id())
            open_calls[call_id] = (str(function.get("name")), _parsed_arguments(function.get("arguments")))
        if _get(message, "role") == "tool":
            call_id = _get(message, "tool_call_id")
            if call_id is None and open_calls:
                call_id = next(iter(open_calls))
            if call_id in open_calls:
                answered.append(open_calls.pop(call_id))
    return [call for call in answered if call[1] is not _UNPARSED]


def repeats_answered(text: str, answered: Sequence[tuple[str, Any]]) -> bool:
    """Whether a model's answer is calls only, each one (same name, same arguments as parsed JSON) a call
    the history already answered. Text, no calls or one new call: ``False``."""
    _, calls = parse_output(text)
    if not calls or not answered:
        return False
    for call in calls:
        arguments = _parsed_arguments(call["function"]["arguments"])
        if arguments is _UNPARSED or (call["function"]["name"], arguments) not in answered:
            return False
    return True


def _guarded_calls(request: GenerationRequest) -> list[tuple[str, Any]]:
    """The answered calls the guard compares an answer with; empty when it cannot fire (tool_choice other
    than ``auto``, which is the grammar's root, or no answered call)."""
    if not request.tools or not request.messages or not (request.grammar or "").startswith(_AUTO_ROOT + "\n"):
        return []
    return answered_calls(request.messages)


def answer_request(request: GenerationRequest) -> GenerationRequest:
    """``request`` as under ``tool_choice: "none"`` after calls: no tools in the prompt, text that cannot
    start like a call."""
    return request.model_copy(update={"tools": None, "grammar": TEXT_GRAMMAR})


def _fit(engine: Engine, request: GenerationRequest) -> GenerationRequest:
    """The text grammar is a help, not a demand: an engine without grammars answers freely."""
    if request.grammar == TEXT_GRAMMAR and not engine.capabilities.grammar:
        return request.model_copy(update={"grammar": None})
    return request


def _noted(timings: Timings | None, discarded_tokens: int) -> Timings:
    out = (timings or Timings()).model_copy(deep=True)
    out.extra["tool_loop_guard"] = {"discarded_tokens": discarded_tokens}
    return out


def guarded_generate(engine: Engine, request: GenerationRequest) -> Completion:
    """``engine.generate`` with the loop guard: under ``auto``, an answer that only repeats answered calls
    is generated again as text (:func:`answer_request`); ``timings.extra["tool_loop_guard"]`` says so."""
    request = _fit(engine, request)
    completion = engine.generate(request)
    answered = _guarded_calls(request)
    if not answered or not repeats_answered(completion.text, answered):
        return completion
    answer = engine.generate(answer_request(request))
    answer.timings = _noted(answer.timings, completion.usage.completion_tokens)
    return answer


def guarded_stream(engine: Engine, request: GenerationRequest) -> Iterator[Chunk]:
    """``engine.stream`` with the loop guard. The stream opens now (a bad request fails before any chunk);
    chunks are held back only while the guard can fire and the answer is a call, else they flow as made."""
    request = _fit(engine, request)
    chunks = engine.stream(request)
    answered = _guarded_calls(request)
    return _GuardedChunks(engine, request, chunks, answered) if answered else chunks


def _close(chunks: Iterator[Chunk]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


class _GuardedChunks:
    """The guarded stream; ``close()`` closes the engine stream open at the time, even before the first
    chunk (a generator never started would skip its ``finally``)."""

    def __init__(self, engine: Engine, request: GenerationRequest, chunks: Iterator[Chunk],
                 answered: list[tuple[str, Any]]) -> None:
        self._engine, self._request, self._answered = engine, request, answered
        self._current = chunks
        self._gen = self._run()

    def __iter__(self) -> _GuardedChunks:
        return self

    def __next__(self) -> Chunk:
        return next(self._gen)

    def close(self) -> None:
        try:
            self._gen.close()
        finally:
            _close(self._current)

    def _run(self) -> Iterator[Chunk]:
        parser = ToolCallParser()
        held: list[Chunk] = []
        for chunk in self._current:
            held.append(chunk)
            deltas = parser.feed(chunk.text) + (parser.finish() if chunk.finish_reason is not None else [])
            if not parser.calling and any(d.get("content") for d in deltas):  # text: nothing to guard
                yield from held
                yield from self._current
                return
        if not repeats_answered("".join(c.text for c in held), self._answered):
            yield from held
            return
        discarded = next((c.usage.completion_tokens for c in reversed(held) if c.usage is not None), 0)
        _close(self._current)  # the engine serves one stream at a time
        self._current = self._engine.stream(answer_request(self._request))
        for chunk in self._current:
            if chunk.finish_reason is not None:
                chunk = chunk.model_copy(update={"timings": _noted(chunk.timings, discarded)})
            yield chunk
