"""The one place velollm adapts to DSPy's streaming internals.

``dspy.streaming.StreamListener`` picks its field markers from a per-instance table keyed by the
*class name* of the configured adapter, and knows only ``ChatAdapter``, ``JSONAdapter`` and
``XMLAdapter``; any other adapter makes ``receive`` raise. velollm's adapter is a ChatAdapter
subclass that writes ChatAdapter's ``[[ ## field ## ]]`` markers whenever a prediction is
streamed, so the adaptation is to register ChatAdapter's own entry under velollm's class name
on the listeners of the running ``streamify`` call — instance data, no DSPy code is patched.

``tests/test_adapter_streaming.py::test_dspy_listener_contract`` pins the DSPy behaviour this
relies on and fails when DSPy changes it.
"""

from __future__ import annotations

from typing import Any

from dspy.dsp.utils.settings import settings

#: The DSPy adapter whose stream format velollm's adapter uses while streaming.
STREAM_FORMAT_OF = "ChatAdapter"


def streaming_now() -> bool:
    """Whether this prediction's tokens go to a ``dspy.streamify`` consumer."""
    return settings.send_stream is not None


def adapt_listeners(adapter: Any, listeners: list[Any] | None = None) -> int:
    """Register ``adapter``'s class name on the active stream listeners; returns how many changed."""
    name = type(adapter).__name__
    changed = 0
    for listener in listeners if listeners is not None else (settings.stream_listeners or []):
        table = getattr(listener, "adapter_identifiers", None)
        if isinstance(table, dict) and name not in table and STREAM_FORMAT_OF in table:
            table[name] = table[STREAM_FORMAT_OF]
            changed += 1
    return changed
