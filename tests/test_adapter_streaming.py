"""Streaming field chunks with DSPy's own StreamListener and velollm.Adapter."""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest
from dspy.streaming import StreamListener, StreamResponse
from dspy_support import lm

import velollm
from velollm.adapters.dspy import listeners as streaming


def test_dspy_listener_contract() -> None:
    """Pins the DSPy internals velollm.adapters.dspy.listeners relies on. If this fails, DSPy changed how
    listeners choose their markers: revisit ``adapt_listeners`` (maybe it is no longer needed)."""
    listener = StreamListener("answer")
    table = listener.adapter_identifiers
    assert table["ChatAdapter"]["start_identifier"] == "[[ ## answer ## ]]"
    assert "Adapter" not in table
    # unadapted, DSPy's listener refuses any adapter whose class name it does not know...
    chunk: Any = type("Chunk", (), {"choices": [type("C", (), {"delta": type("D", (), {"content": "[["})()})()]})()
    with dspy.context(adapter=velollm.Adapter()), pytest.raises(ValueError, match="Unsupported adapter"):
        listener.receive(chunk)
    # ...and once adapted it treats velollm.Adapter as the ChatAdapter subclass it is
    assert streaming.adapt_listeners(velollm.Adapter(), [listener]) == 1
    assert table["Adapter"] is table["ChatAdapter"]
    assert streaming.adapt_listeners(velollm.Adapter(), [listener]) == 0  # idempotent
    with dspy.context(adapter=velollm.Adapter()):
        assert listener.receive(chunk) is None  # buffering a possible marker, no error


async def _stream(program: Any, **inputs: Any) -> tuple[list[StreamResponse], dspy.Prediction]:
    chunks, final = [], None
    async for item in program(**inputs):
        if isinstance(item, StreamResponse):
            chunks.append(item)
        elif isinstance(item, dspy.Prediction):
            final = item
    return chunks, final


@pytest.mark.slow
@pytest.mark.parametrize("is_async", [False, True], ids=["sync-program", "async-program"])
def test_streamify_yields_answer_chunks(is_async: bool) -> None:
    model = lm(max_tokens=48)
    program = dspy.streamify(dspy.Predict("question -> answer"), stream_listeners=[StreamListener("answer")],
                             is_async_program=is_async)
    with dspy.context(lm=model, adapter=velollm.Adapter()):
        chunks, final = asyncio.run(_stream(program, question="Name three primary colors."))
    assert final is not None and final.answer
    assert len(chunks) >= 2, chunks  # token by token, not one blob at the end
    assert all(c.signature_field_name == "answer" for c in chunks)
    streamed = "".join(c.chunk for c in chunks)
    assert "[[" not in streamed and streamed.strip() == final.answer
    assert len(model.history) == 1
