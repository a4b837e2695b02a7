"""Tool calling (velollm.tools) on Qwen2.5-Coder 0.5B: an OpenAI client against ``velollm serve``,
litellm ``completion(tools=...)`` and a DSPy signature with ``dspy.Tool`` inputs and ``dspy.ToolCalls``
output under native function calling.

Calls are constrained to the tools' schemas, so every call must parse and validate; which tool the
model picks, and whether it answers in text under ``auto``, is the model's own choice (greedy).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import jsonschema
import pytest
from conftest import QWEN_05B, QWEN_15B

from velollm import tools
from velollm.errors import InvalidRequest, UnsupportedFeature

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = [
    _tool("get_weather", "Get the current weather for a city",
          {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    _tool("add", "Add two integers", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
    _tool("send_email", "Send an email",
          {"to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
          ["to", "subject", "body"]),
    _tool("get_stock_price", "Latest stock price for a ticker symbol", {"ticker": {"type": "string"}}, ["ticker"]),
    _tool("convert_currency", "Convert an amount between currencies",
          {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
          ["amount", "from", "to"]),
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

NEEDS_TOOL = [
    ("What's the weather in Paris right now?", "get_weather"),
    ("Use the add tool to compute 17 + 25.", "add"),
    ("Send an email to bob@example.com with subject 'Hi' saying hello.", "send_email"),
    ("What is the current stock price of AAPL?", "get_stock_price"),
    ("Convert 100 US dollars to euros.", "convert_currency"),
]
# Said plainly: with tools in its prompt the 0.5B model calls one for many everyday questions
NEEDS_NONE = [
    "Without using any tool, write a haiku about the sea.",
    "Without using any tool: what is the capital of France? Answer in plain text.",
    "Explain what a Python list comprehension is in one sentence. No tools are needed.",
    "What does HTTP stand for? Answer in plain text without tools.",
    "What does CPU stand for? Answer in plain text without tools.",
]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def assert_valid_call(name: str, arguments: str, expected: str | None = None) -> dict[str, Any]:
    """The call names an offered tool (``expected`` when given) and its arguments validate against its schema."""
    assert name in PARAMETERS, name
    if expected is not None:
        assert name == expected, (name, arguments)
    args = json.loads(arguments)
    jsonschema.validate(args, PARAMETERS[name])
    return args


# --- no model: the pieces ------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "error"), [
    ("nope", InvalidRequest),
    ([{"type": "function", "function": {"name": "has space"}}], InvalidRequest),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
     InvalidRequest),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], InvalidRequest),
    ([{"type": "retrieval"}], UnsupportedFeature),
])
def test_bad_tools_are_typed_errors(raw: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        tools.parse_tools(raw)


def test_tool_choice_forms() -> None:
    offered = tools.parse_tools(TOOLS)
    assert tools.parse_tool_choice(None, offered) == tools.ToolChoice("auto")
    assert tools.parse_tool_choice(None, []) == tools.ToolChoice("none")
    assert tools.parse_tool_choice("required", offered) == tools.ToolChoice("required")
    named = {"type": "function", "function": {"name": "add"}}
    assert tools.parse_tool_choice(named, offered) == tools.ToolChoice("named", "add")
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}, 3):
        with pytest.raises(InvalidRequest):
            tools.parse_tool_choice(bad, offered)
    with pytest.raises(InvalidRequest):
        tools.parse_tool_choice("required", [])


CALLS_TEXT = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris \\"x\\"", "unit": "celsius"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')


@pytest.mark.parametrize("text", [
    CALLS_TEXT,
    '```json\n{\n  "name": "add",\n  "arguments": {"a": 1, "b": 2}\n}\n```',
    '{"name": "add", "arguments": {"a": 1, "b": 2}}',
    "Plain words, with a } brace.",
])
def test_streamed_deltas_reassemble_to_the_whole_parse(text: str) -> None:
    whole = tools.parse_output(text)
    for step in (1, 2, 3, 7, 50):
        parser = tools.ToolCallParser()
        deltas = []
        for i in range(0, len(text), step):
            deltas += parser.feed(text[i:i + step])
        deltas += parser.finish()
        content, calls = tools.merge_deltas(deltas)
        assert content == whole[0]
        assert [c["function"] for c in calls] == [c["function"] for c in whole[1]]
    if whole[1]:
        for call in whole[1]:
            json.loads(call["function"]["arguments"])
    else:
        assert whole[0] == text


def test_calls_parse_with_arguments_verbatim() -> None:
    content, calls = tools.parse_output(CALLS_TEXT)
    assert content is None
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": 'Pa}ris "x"', "unit": "celsius"}
    assert calls[1]["function"]["arguments"] == '{"a": 1, "b": 2}'
    assert len({c["id"] for c in calls}) == 2


def test_templates_without_tools_get_them_as_text() -> None:
    history = [
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    messages, variables = tools.template_inputs(history, tools.parse_tools(TOOLS), "{{ messages }}")
    assert variables == {}
    assert messages[0]["role"] == "system" and '"name": "add"' in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert messages[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}
    native, variables = tools.template_inputs(history, tools.parse_tools(TOOLS), "{% if tools %}<tool_call>{% endif %}")
    assert variables["tools"][1]["function"]["name"] == "add"
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}  # an object, as HF passes it


def test_tools_with_a_response_format_are_refused() -> None:
    with pytest.raises(UnsupportedFeature):
        tools.request_fields({"tools": TOOLS, "response_format": {"type": "json_object"}})


# --- after a tool's result: the answered calls, tool_choice "none" and the loop guard ----------------------
def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


STOCK_RESULT = json.dumps({"ticker": "AAPL", "price": 187.23})
STOCK_HISTORY = [*user("What is the current stock price of AAPL?"),
                 {"role": "assistant", "content": None,
                  "tool_calls": [_call("call_1", "get_stock_price", '{"ticker": "AAPL"}')]},
                 {"role": "tool", "tool_call_id": "call_1", "content": STOCK_RESULT}]


def test_answered_calls_pair_calls_with_results_by_id() -> None:
    history = [*user("add things"),
               {"role": "assistant", "content": "", "tool_calls": [_call("c1", "add", '{"a": 1, "b": 2}'),
                                                                   _call("c2", "add", '{"a": 5, "b": 6}')]},
               {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    answered = tools.answered_calls(history)
    assert answered == [("add", {"a": 1, "b": 2})]  # c2 has no result: not answered
    same = '<tool_call>\n{"name": "add", "arguments": {"b":2,   "a": 1}}\n</tool_call>'
    assert tools.repeats_answered(same, answered)  # key order and spacing do not matter
    assert tools.repeats_answered('{"name": "add", "arguments": {"a": 1, "b": 2}}', answered)  # a bare call too
    assert not tools.repeats_answered('{"name": "add", "arguments": {"a": 1, "b": 3}}', answered)  # other arguments
    assert not tools.repeats_answered('{"name": "add", "arguments": {"a": 5, "b": 6}}', answered)  # the open call
    assert not tools.repeats_answered(same + '\n<tool_call>\n{"name": "add", "arguments": {"a": 7, "b": 8}}\n'
                                      "</tool_call>", answered)  # one new call among them: not a loop
    assert not tools.repeats_answered("The sum is 3.", answered)
    assert tools.answered_calls(history[:2]) == []
    # a result without an id answers the oldest open call
    assert tools.answered_calls([*history[:2], {"role": "tool", "content": "3"}]) == [("add", {"a": 1, "b": 2})]


def test_tool_choice_none_after_calls_is_constrained_to_text() -> None:
    fields, choice = tools.request_fields({"tools": TOOLS, "tool_choice": "none", "messages": STOCK_HISTORY})
    assert choice.mode == "none" and fields == {"grammar": tools.TEXT_GRAMMAR}
    assert tools.text_grammar() == tools.TEXT_GRAMMAR
    # no call history, or a format of the caller's own: free text as before
    assert tools.request_fields({"tools": TOOLS, "tool_choice": "none", "messages": STOCK_HISTORY[:1]})[0] == {}
    assert tools.request_fields({"tools": TOOLS, "tool_choice": "none", "messages": STOCK_HISTORY,
                                 "response_format": {"type": "json_object"}})[0] == {}
    assert tools.request_fields({"tool_choice": "none", "messages": STOCK_HISTORY})[0] == {}  # no tools given
    # the same text rules end the auto grammar (written once)
    auto = tools.tool_grammar(tools.parse_tools(TOOLS), tools.ToolChoice("auto"))
    assert all(line in auto.splitlines() for line in tools.TEXT_GRAMMAR.splitlines()[1:])


def test_velollm_lm_requests_get_the_same_none_rule() -> None:
    from dspy import lm15

    from velollm.adapters.dspy.lm15 import to_generation_request

    tool = lm15.FunctionTool(name="get_stock_price", description="price", parameters=PARAMETERS["get_stock_price"])
    messages = (lm15.Message.user("What is the current stock price of AAPL?"),
                lm15.Message.assistant([lm15.ToolCallPart(id="c1", name="get_stock_price", input={"ticker": "AAPL"})]),
                lm15.Message.tool({"c1": STOCK_RESULT}))

    def request(**config: Any) -> Any:
        return to_generation_request(lm15.Request(model="velollm/x", messages=messages, tools=(tool,),
                                                  config=lm15.Config(tool_choice=lm15.ToolChoice("none"), **config)))

    assert request().grammar == tools.TEXT_GRAMMAR and request().tools is None
    formatted = request(response_format={"type": "json_object"})  # the caller's format still applies
    assert formatted.grammar is None and formatted.json_schema == {"type": "object"}


class _ScriptedEngine:
    """Answers each request with the next scripted text (as one chunk per character when streamed)."""

    def __init__(self, *texts: str) -> None:
        from velollm.engine import Capabilities

        self.texts, self.requests, self.closed, self.streams = list(texts), [], 0, []
        self.capabilities = Capabilities(grammar=True, tools=True)

    def generate(self, request: Any) -> Any:
        from velollm.engine import Completion, Usage

        self.requests.append(request)
        text = self.texts.pop(0)
        return Completion(text=text, finish_reason="stop", usage=Usage(prompt_tokens=9, completion_tokens=len(text)))

    def stream(self, request: Any) -> Iterator[Any]:
        from velollm.engine import Chunk, Timings, Usage

        self.requests.append(request)
        text = self.texts.pop(0)

        def chunks() -> Iterator[Any]:
            try:
                for c in text:
                    yield Chunk(text=c)
                yield Chunk(finish_reason="stop", usage=Usage(prompt_tokens=9, completion_tokens=len(text)),
                            timings=Timings())
            finally:
                self.closed += 1

        self.streams.append(chunks())
        return self.streams[-1]


REPEAT = '{"name": "get_stock_price", "arguments": {"ticker":"AAPL"}}'
ANSWER = "AAPL is at 187.23."


def _parsed(choice: str, messages: list[dict[str, Any]] = STOCK_HISTORY) -> Any:
    from velollm import openai_wire

    return openai_wire.parse_chat({"messages": messages, "tools": TOOLS, "tool_choice": choice}).request


def test_the_loop_guard_answers_in_text_when_a_call_repeats() -> None:
    engine = _ScriptedEngine(REPEAT, ANSWER)
    completion = tools.guarded_generate(engine, _parsed("auto"))  # type: ignore[arg-type]
    assert completion.text == ANSWER
    assert completion.timings.extra["tool_loop_guard"] == {"discarded_tokens": len(REPEAT)}
    again = engine.requests[1]
    assert again.tools is None and again.grammar == tools.TEXT_GRAMMAR  # as under tool_choice "none"
    engine = _ScriptedEngine(REPEAT, ANSWER)
    chunks = list(tools.guarded_stream(engine, _parsed("auto")))  # type: ignore[arg-type]
    assert "".join(c.text for c in chunks) == ANSWER and engine.closed == 2
    assert chunks[-1].timings.extra["tool_loop_guard"] == {"discarded_tokens": len(REPEAT)}


@pytest.mark.parametrize(("choice", "messages", "text"), [
    ("auto", STOCK_HISTORY, '{"name": "get_stock_price", "arguments": {"ticker": "MSFT"}}'),  # a new call
    ("auto", STOCK_HISTORY, ANSWER),  # text
    ("required", STOCK_HISTORY, REPEAT),  # only auto is guarded
    ("auto", STOCK_HISTORY[:2], REPEAT),  # the call has no result yet
])
def test_the_loop_guard_leaves_other_answers_alone(choice: str, messages: list[dict[str, Any]], text: str) -> None:
    engine = _ScriptedEngine(text, text)
    assert tools.guarded_generate(engine, _parsed(choice, messages)).text == text  # type: ignore[arg-type]
    streamed = list(tools.guarded_stream(engine, _parsed(choice, messages)))  # type: ignore[arg-type]
    assert "".join(c.text for c in streamed) == text and len(engine.requests) == 2


def test_a_text_answer_streams_without_waiting_for_the_end() -> None:
    engine = _ScriptedEngine(ANSWER)
    stream = tools.guarded_stream(engine, _parsed("auto"))  # type: ignore[arg-type]
    assert next(stream).text == ANSWER[0]  # held back only while the answer could still be a call
    stream.close()  # type: ignore[attr-defined]
    assert engine.closed == 1
    unstarted = tools.guarded_stream(engine := _ScriptedEngine(ANSWER), _parsed("auto"))  # type: ignore[arg-type]
    unstarted.close()  # type: ignore[attr-defined]
    assert inspect.getgeneratorstate(engine.streams[0]) == inspect.GEN_CLOSED  # the engine's stream is let go


# --- Qwen 0.5B behind a real server, through the OpenAI client ---------------------------------------------
@pytest.fixture(scope="module")
def server(qwen_path: Path, qwen15_path: Path) -> Iterator[Any]:
    from server_process import start_server

    srv = start_server("-m", f"qwen={QWEN_05B}", "-m", f"qwen15={QWEN_15B}", "--ctx", "4096")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)


def _ask(client: Any, messages: list[dict[str, Any]], **kw: Any) -> Any:
    kw.setdefault("tools", TOOLS)
    kw.setdefault("max_tokens", 120)
    return client.chat.completions.create(model="qwen", messages=messages, temperature=0, **kw)


def test_openai_client_prompts_that_need_a_tool_get_a_valid_call(client: Any) -> None:
    for prompt, expected in NEEDS_TOOL:
        choice = _ask(client, user(prompt)).choices[0]
        assert choice.finish_reason == "tool_calls", (prompt, choice)
        assert choice.message.content is None
        assert len(choice.message.tool_calls) >= 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        assert_valid_call(call.function.name, call.function.arguments, expected)


def test_openai_client_prompts_that_need_none_get_text(client: Any) -> None:
    texts, called = [], []
    for prompt in NEEDS_NONE:
        choice = _ask(client, user(prompt)).choices[0]
        if choice.message.tool_calls:
            called.append(prompt)
            if choice.finish_reason == "tool_calls":  # a call made anyway is still a valid one (unless cut short)
                for call in choice.message.tool_calls:
                    assert_valid_call(call.function.name, call.function.arguments)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content.strip()
            texts.append(choice.message.content)
    assert len(texts) >= 4, f"the model called a tool for {called}"  # greedy near-ties differ between CPUs


def test_tool_choice_none_answers_in_text_even_when_a_tool_fits(client: Any) -> None:
    choice = _ask(client, user("What's the weather in Paris right now?"), tool_choice="none").choices[0]
    assert not choice.message.tool_calls and choice.finish_reason in ("stop", "length")
    assert choice.message.content


def test_tool_choice_required_calls_even_for_small_talk(client: Any) -> None:
    # one call (parallel_tool_calls off): with several allowed, the 0.5B model may chain calls until max_tokens
    choice = _ask(client, user("Write a haiku about the sea."), tool_choice="required",
                  parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert_valid_call(call.function.name, call.function.arguments)


def test_named_tool_choice_calls_that_tool_once(client: Any) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    choice = _ask(client, user("What's the weather in Paris right now?"), tool_choice=named).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0].function.name, choice.message.tool_calls[0].function.arguments,
                      "add")


def test_named_tool_unknown_is_a_400(client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError):
        _ask(client, user("hi"), tool_choice={"type": "function", "function": {"name": "nope"}})


def test_streamed_tool_calls_reassemble_to_the_same_call(client: Any) -> None:
    for prompt, _ in NEEDS_TOOL[:3]:
        whole = _ask(client, user(prompt)).choices[0].message.tool_calls
        calls: dict[int, dict[str, str]] = {}
        finish = None
        for chunk in _ask(client, user(prompt), stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            for part in delta.tool_calls or ():
                entry = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += part.id or ""
                entry["name"] += part.function.name or ""
                entry["arguments"] += part.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
            [(c.function.name, c.function.arguments) for c in whole]
        assert all(c["id"].startswith("call_") for c in calls.values())


def _streamed(chunks: Any) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """An OpenAI client's stream reassembled: ``(content, calls by index, finish_reason)``."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or ():
            entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


def test_a_tool_result_yields_a_final_answer_that_uses_it(client: Any) -> None:
    """The agent loop's second step on the 0.5B: it calls the tool, then answers with the result. Left
    alone it would make the same call again (under ``auto``) or write it as text (under ``none``); the
    text grammar after calls and the loop guard leave it the answer."""
    prompt = user("What is the current stock price of AAPL?")
    first = _ask(client, prompt, max_tokens=60).choices[0].message
    assert first.tool_calls and first.tool_calls[0].function.name == "get_stock_price"
    history = [*prompt, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": STOCK_RESULT}]
    for choice in ("none", "auto"):
        answer = _ask(client, history, tool_choice=choice, max_tokens=60).choices[0]
        assert not answer.message.tool_calls, (choice, answer.message.tool_calls)
        assert answer.finish_reason == "stop"
        assert "187.23" in answer.message.content, (choice, answer.message.content)
    content, calls, finish = _streamed(_ask(client, history, tool_choice="auto", max_tokens=60, stream=True))
    assert not calls and finish == "stop"
    assert "187.23" in content, content


def test_the_15b_uses_a_tool_result_too(client: Any) -> None:
    answer = client.chat.completions.create(model="qwen15", messages=STOCK_HISTORY, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=60).choices[0]
    assert not answer.message.tool_calls
    assert "187.23" in answer.message.content, answer.message.content


def test_tool_history_is_accepted_on_qwen_05b(client: Any) -> None:
    """An assistant turn with tool_calls (content null) and a tool result render and generate (a new call,
    or text: the loop guard turns a repeated call into text; see the test above)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 17, "b": 25}'}}
    history = [*user("Use the add tool to compute 17 + 25."), {"role": "assistant", "content": None,
                                                                "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    choice = _ask(client, history).choices[0]
    assert choice.message.content or choice.message.tool_calls
    for made in choice.message.tool_calls or ():
        assert_valid_call(made.function.name, made.function.arguments)


# --- litellm ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litellm_model(qwen_path: Path) -> Iterator[str]:
    import litellm  # noqa: F401  (registers velollm/)

    from velollm.adapters.litellm.provider import register_litellm
    from velollm.pool import ModelPool

    pool = ModelPool()
    register_litellm(pool)
    yield f"velollm/{qwen_path}"
    register_litellm(None)
    pool.close()


def test_litellm_prompts_that_need_a_tool_get_a_valid_call(litellm_model: str) -> None:
    import litellm

    for prompt, expected in NEEDS_TOOL:
        response = litellm.completion(model=litellm_model, messages=user(prompt), tools=TOOLS, temperature=0,
                                      max_tokens=120)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert_valid_call(choice.message.tool_calls[0].function.name, choice.message.tool_calls[0].function.arguments,
                          expected)
        assert response.usage.completion_tokens > 0


def test_litellm_prompts_that_need_none_get_text(litellm_model: str) -> None:
    import litellm

    texts = [litellm.completion(model=litellm_model, messages=user(p), tools=TOOLS, temperature=0, max_tokens=80)
             .choices[0].message for p in NEEDS_NONE]
    assert sum(1 for m in texts if not m.tool_calls and m.content) >= 4, texts


def test_litellm_a_tool_result_yields_a_final_answer_that_uses_it(litellm_model: str) -> None:
    import litellm

    for choice in ("none", "auto"):
        answer = litellm.completion(model=litellm_model, messages=STOCK_HISTORY, tools=TOOLS, tool_choice=choice,
                                    temperature=0, max_tokens=60).choices[0]
        assert not answer.message.tool_calls and answer.finish_reason == "stop", (choice, answer)
        assert "187.23" in answer.message.content, (choice, answer.message.content)
    chunks = list(litellm.completion(model=litellm_model, messages=STOCK_HISTORY, tools=TOOLS, tool_choice="auto",
                                     temperature=0, max_tokens=60, stream=True))
    built = litellm.stream_chunk_builder(chunks).choices[0]
    assert not built.message.tool_calls and built.finish_reason == "stop"
    assert "187.23" in built.message.content, built.message.content


def test_litellm_stream_and_named_choice(litellm_model: str) -> None:
    import litellm

    prompt = user("What's the weather in Paris right now?")
    whole = litellm.completion(model=litellm_model, messages=prompt, tools=TOOLS, temperature=0, max_tokens=120)
    chunks = list(litellm.completion(model=litellm_model, messages=prompt, tools=TOOLS, temperature=0,
                                     max_tokens=120, stream=True))
    built = litellm.stream_chunk_builder(chunks).choices[0]
    assert built.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in built.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    named = litellm.completion(model=litellm_model, messages=prompt, tools=TOOLS, temperature=0, max_tokens=120,
                               tool_choice={"type": "function", "function": {"name": "convert_currency"}})
    calls = named.choices[0].message.tool_calls
    assert len(calls) == 1
    assert_valid_call(calls[0].function.name, calls[0].function.arguments, "convert_currency")


# --- DSPy ---------------------------------------------------------------------------------------------------
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"sunny in {city}"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Plan(dspy.Signature):
    """Answer the question by calling one of the tools."""

    question: str = dspy.InputField()
    tools: list[dspy.Tool] = dspy.InputField()
    calls: dspy.ToolCalls = dspy.OutputField()


def test_dspy_signature_with_tools_returns_a_valid_call(qwen_path: Path) -> None:
    import velollm

    lm = velollm.LM(str(qwen_path), cache=False)
    assert lm.supports_function_calling
    offered = [dspy.Tool(get_weather), dspy.Tool(add)]
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_native_function_calling=True)):
        prediction = dspy.Predict(Plan)(question="What's the weather in Paris?", tools=offered)
    made = prediction.calls.tool_calls
    assert made and made[0].name in ("get_weather", "add")
    schema = {t.name: {"type": "object", "properties": t.args, "required": list(t.args)} for t in offered}
    jsonschema.validate(made[0].args, schema[made[0].name])
    assert made[0].name == "get_weather" and made[0].args["city"] == "Paris"
    assert made[0].execute(functions=offered) == "sunny in Paris"
    assert lm.history[-1]["outputs"][0]["tool_calls"]  # it came back as a native call, not parsed text


@pytest.mark.parametrize("cut", ['{"name": "send_email", "arguments": {"to": "sea", "body": "Today\'s',
                                 '{"name": "add", "arguments": {"a": 1, "b": [2, 3',
                                 '{"name": "add", "arguments": {"a":'])
def test_a_call_cut_short_by_max_tokens_still_parses(cut: str) -> None:
    from velollm.tools import ToolCallParser

    parser = ToolCallParser()
    deltas = parser.feed(cut) + parser.finish()
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    arguments = "".join(c["function"].get("arguments", "") for c in calls)
    assert calls[0]["function"]["name"] in ("send_email", "add")
    assert isinstance(json.loads(arguments), dict), arguments  # closed: the open string, lists and objects
