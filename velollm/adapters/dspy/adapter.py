"""``velollm.Adapter``: a DSPy adapter that makes small local models' predictions parse.

Per call it picks one output format:

* **json, constrained** (default when the LM can take a response schema — every velollm engine
  with a grammar can): the model writes a JSON object constrained to the signature's schema,
  so the first answer always parses; one LM call per prediction.
* **markers** (``[[ ## field ## ]]``, DSPy's ChatAdapter format) when constraining is off or
  impossible, and always while the prediction is streamed, so DSPy's ``StreamListener`` can cut
  field chunks out of the token stream.

Whatever the format, parsing tries markers, then JSON (repaired), then the whole text for a
lone field (:mod:`velollm.adapters.dspy.parsing`). An answer that still does not parse is sent back
to the model with what was missing, a bounded number of times (:mod:`velollm.adapters.dspy.retry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import warnings
from contextvars import ContextVar
from typing import Any, Literal

from dspy.adapters.chat_adapter import ChatAdapter, FieldInfoWithName
from dspy.adapters.types.tool import ToolCalls
from dspy.adapters.utils import get_annotation_name, serialize_for_json, translate_field_type
from dspy.signatures.signature import Signature
from dspy.utils.callback import BaseCallback
from dspy.utils.exceptions import AdapterParseError

from velollm.adapters.dspy import listeners as streaming
from velollm.adapters.dspy import parsing, schema
from velollm.adapters.dspy.retry import RetryPolicy

logger = logging.getLogger(__name__)

OutputFormat = Literal["json", "markers"]
_FORMAT: ContextVar[OutputFormat | None] = ContextVar("velollm_adapter_format", default=None)
#: Closes the last user turn when the first output is free text (see :func:`_writes_free_text_first`).
FREE_TEXT_CUE = "Now respond with the JSON object."


def _message_call(lm: Any, messages: list[dict[str, Any]]) -> Any:
    """DSPy's marker for an adapter-owned ``messages=`` call (it silences the 3.5 deprecation
    warning meant for end users); absent in other DSPy versions, where nothing is needed."""
    try:
        from dspy.clients._deprecation import adapter_message_call
    except ImportError:  # pragma: no cover - depends on the DSPy version
        return contextlib.nullcontext()
    return adapter_message_call(lm, messages)


class Adapter(ChatAdapter):
    """DSPy adapter for local models: constrained JSON when possible, tolerant parsing always.

    Args:
        constrained: generate JSON constrained to the signature's schema when the LM supports
            response schemas (velollm engines with grammars do). ``False`` turns it off.
        max_attempts: LM calls per prediction at most (parse failures and transient backend
            errors are retried; other errors are not).
        unconstrained_format: what to ask for when not constraining: ``"markers"`` (default,
            what small chat models follow best) or ``"json"``.
        backoff_s, max_backoff_s: exponential backoff for transient backend errors.
    """

    def __init__(
        self,
        *,
        constrained: bool = True,
        max_attempts: int = 3,
        unconstrained_format: OutputFormat = "markers",
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        callbacks: list[BaseCallback] | None = None,
        native_response_types: list[type] | None = None,
    ) -> None:
        if unconstrained_format not in ("json", "markers"):
            raise ValueError("unconstrained_format must be 'json' or 'markers'")
        super().__init__(callbacks=callbacks, native_response_types=native_response_types,
                         use_json_adapter_fallback=False)
        self.constrained = constrained
        self.unconstrained_format: OutputFormat = unconstrained_format
        self.retry_policy = RetryPolicy(max_attempts=max_attempts, backoff_s=backoff_s, max_backoff_s=max_backoff_s)

    # --- choosing the format ---------------------------------------------------------------------
    @property
    def output_format(self) -> OutputFormat:
        """The format ``format()`` writes now: the current call's, else the configured default."""
        current = _FORMAT.get()
        if current is not None:
            return current
        return "json" if self.constrained else self.unconstrained_format

    def plan(self, lm: Any, lm_kwargs: dict[str, Any], signature: type[Signature]) -> tuple[OutputFormat, dict | None]:
        """(output format, response_format to send) for one call."""
        if streaming.streaming_now():
            return "markers", None
        if not self.constrained or "response_format" in lm_kwargs or not getattr(lm, "supports_response_schema", False):
            return self.unconstrained_format, None
        try:
            return "json", schema.response_format(signature, fixed_layout=_fixed_layout(lm))
        except schema.SchemaUnavailable as exc:
            warnings.warn(f"velollm.Adapter: cannot constrain {signature.__name__} ({exc}); "
                          "generating without a schema", RuntimeWarning, stacklevel=3)
            return self.unconstrained_format, None

    def _prepare(self, lm: Any, lm_kwargs: dict[str, Any], signature: type[Signature], demos: list[dict[str, Any]],
                 inputs: dict[str, Any], force: OutputFormat | None = None,
                 ) -> tuple[type[Signature], list[dict[str, Any]], dict[str, Any], OutputFormat]:
        fmt, response_format = self.plan(lm, lm_kwargs, signature)
        if force is not None and force != fmt:  # a retry in the other format
            fmt, response_format = force, None
            if force == "json" and not streaming.streaming_now() and getattr(lm, "supports_response_schema", False):
                with contextlib.suppress(schema.SchemaUnavailable):
                    response_format = schema.response_format(signature, fixed_layout=_fixed_layout(lm))
        processed = self._call_preprocess(lm, lm_kwargs, signature, inputs)
        token = _FORMAT.set(fmt)
        try:
            messages = self.format(processed, demos, inputs)
        finally:
            _FORMAT.reset(token)
        kwargs = dict(lm_kwargs)
        if force is not None and response_format is None:
            kwargs.pop("response_format", None)
        if response_format is not None:
            kwargs["response_format"] = response_format
        if streaming.streaming_now():
            streaming.adapt_listeners(self)
        return processed, messages, kwargs, fmt

    # --- the call --------------------------------------------------------------------------------
    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: type[Signature], demos: list[dict[str, Any]],
                 inputs: dict[str, Any]) -> list[dict[str, Any]]:
        run = _Attempts(self, lm, lm_kwargs, signature, demos, inputs)
        for attempt in self.retry_policy.retrying(_lm_retries(lm)):
            with attempt:
                # inside the retry: planning may load the model, which can fail transiently too
                messages, kwargs = run.next_call()
                with _message_call(lm, messages):
                    outputs = lm(messages=messages, **kwargs)
                run.sent(kwargs)
                return run.parse(outputs)
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

    async def acall(self, lm: Any, lm_kwargs: dict[str, Any], signature: type[Signature],
                    demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        run = _Attempts(self, lm, lm_kwargs, signature, demos, inputs)
        async for attempt in self.retry_policy.aretrying(_lm_retries(lm)):
            with attempt:
                # planning may load the model: keep it off the event loop
                messages, kwargs = await asyncio.to_thread(run.next_call)
                with _message_call(lm, messages):
                    outputs = await lm.acall(messages=messages, **kwargs)
                run.sent(kwargs)
                return run.parse(outputs)
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

    def feedback(self, signature: type[Signature], exc: AdapterParseError, fmt: OutputFormat) -> list[dict[str, Any]]:
        """The turns that show the model its unusable answer and what a usable one needs."""
        answer = exc.lm_response or ""
        if isinstance(exc, parsing.ParseFailure):
            problem = parsing.describe(signature, answer, exc.report)
        else:
            problem = "The answer was empty." if not answer.strip() else "It could not be read."
        token = _FORMAT.set(fmt)
        try:
            requirements = self.user_message_output_requirements(signature)
        finally:
            _FORMAT.reset(token)
        return [
            {"role": "assistant", "content": answer or "(empty answer)"},
            {"role": "user", "content": f"Your answer could not be used. {problem} Answer again, concisely, "
                                        f"with every output field. {requirements}"},
        ]

    # --- formatting --------------------------------------------------------------------------------
    def format_field_structure(self, signature: type[Signature]) -> str:
        if self.output_format == "markers":
            return super().format_field_structure(signature)
        inputs = self.format_field_with_value({
            FieldInfoWithName(name, info): translate_field_type(name, info)
            for name, info in signature.input_fields.items()
        })
        outputs = json.dumps({name: translate_field_type(name, info) for name, info in signature.output_fields.items()},
                             indent=2, ensure_ascii=False)
        return (
            "All interactions will be structured in the following way, with the appropriate values filled in.\n\n"
            f"Inputs will have the following structure:\n\n{inputs}\n\n"
            f"Outputs will be a JSON object with the following fields.\n\n{outputs}"
        )

    def format_user_message_content(self, signature: type[Signature], inputs: dict[str, Any], prefix: str = "",
                                    suffix: str = "", main_request: bool = False) -> str:
        """DSPy's layout with the output requirements moved ahead of the inputs: they are the same
        on every call, so the prompt cache serves them and only the inputs are new prompt tokens
        (under ``Evaluate`` or an optimizer, that halves the prefill of a short example). Free text
        first gets a cue after the inputs (:func:`_writes_free_text_first`); ChainOfThought's
        reasoning gets DSPy's own order (:func:`_reasons_first`)."""
        if not main_request or self.output_format == "markers":
            return super().format_user_message_content(signature, inputs, prefix, suffix, main_request)
        requirements = self.user_message_output_requirements(signature)
        fields = super().format_user_message_content(signature, inputs, main_request=False)
        if _reasons_first(signature):
            parts = (prefix, fields, requirements, suffix)
        else:
            cue = FREE_TEXT_CUE if _writes_free_text_first(signature) else ""
            parts = (prefix, requirements, fields, cue, suffix)
        return "\n\n".join(part for part in parts if part).strip()

    def user_message_output_requirements(self, signature: type[Signature]) -> str:
        if self.output_format == "markers":
            return super().user_message_output_requirements(signature)

        def type_info(info: Any) -> str:
            if info.annotation == ToolCalls:
                return ' (must be a JSON object like {"tool_calls": [{"name": "...", "args": {...}}]})'
            if info.annotation is str:
                return ""
            return f" (must be formatted as a valid Python {get_annotation_name(info.annotation)})"

        order = ", then ".join(f"`{name}`{type_info(info)}" for name, info in signature.output_fields.items())
        return f"Respond with a JSON object in the following order of fields: {order}."

    def format_assistant_message_content(self, signature: type[Signature], outputs: dict[str, Any],
                                         missing_field_message: str | None = None) -> str:
        if self.output_format == "markers":
            return super().format_assistant_message_content(signature, outputs, missing_field_message)
        values = {name: outputs.get(name, missing_field_message) for name in signature.output_fields}
        return json.dumps(serialize_for_json(values), indent=2, ensure_ascii=False)

    # --- parsing -----------------------------------------------------------------------------------
    def parse(self, signature: type[Signature], completion: str) -> dict[str, Any]:
        return parsing.parse_completion(signature, completion)


def _fixed_layout(lm: Any) -> bool:
    """Whether the LM's engines take llguidance's layout options (velollm.LM says so)."""
    return getattr(lm, "fixed_json_layout", False) is True


def _lm_retries(lm: Any) -> int:
    """The LM's own retries of transient failures (DSPy's ``num_retries``)."""
    value = getattr(lm, "num_retries", 0)
    return value if isinstance(value, int) else 0


class _Attempts:
    """One prediction's LM calls: the first as planned, each retry changed (:func:`retry.next_changes`)."""

    def __init__(self, adapter: Adapter, lm: Any, lm_kwargs: dict[str, Any], signature: type[Signature],
                 demos: list[dict[str, Any]], inputs: dict[str, Any]) -> None:
        self.adapter, self.lm, self.lm_kwargs = adapter, lm, lm_kwargs
        self.signature, self.demos, self.inputs = signature, demos, inputs
        self.prepared: tuple[type[Signature], list[dict[str, Any]], dict[str, Any], OutputFormat] | None = None
        self.number = 0
        self.failure: AdapterParseError | None = None
        self.feedback: list[dict[str, Any]] = []
        self.overrides: dict[str, Any] = {}
        self.changes: list[str] = []
        self.seen: set[str] = set()

    def next_call(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        self.number += 1
        if self.prepared is None:
            self.prepared = self.adapter._prepare(self.lm, self.lm_kwargs, self.signature, self.demos, self.inputs)
        if self.failure is not None:
            self._change()
        processed, messages, kwargs, fmt = self.prepared
        messages, kwargs = messages + self.feedback, {**kwargs, **self.overrides}
        key = json.dumps([messages, kwargs], sort_keys=True, default=str)
        if key in self.seen:  # never the same request twice: sample a little instead
            kwargs["temperature"] = self.overrides["temperature"] = 0.7
            kwargs["seed"] = self.overrides["seed"] = self.number
            self.changes.append("temperature=0.7")
            key = json.dumps([messages, kwargs], sort_keys=True, default=str)
        self.seen.add(key)
        return messages, kwargs

    def _change(self) -> None:
        from velollm.adapters.dspy.retry import next_changes

        assert self.failure is not None and self.prepared is not None
        processed, _, kwargs, fmt = self.prepared
        answer = self.failure.lm_response or ""
        limit = kwargs.get("max_tokens") or getattr(self.lm, "kwargs", {}).get("max_tokens")
        limit = self.overrides.get("max_tokens", limit)
        wanted = next_changes(self.number, answer=answer, hit_max_tokens=self._hit_limit(limit), max_tokens=limit,
                              can_switch_format=not streaming.streaming_now())
        self.changes = ["error fed back"]
        if "max_tokens" in wanted:
            self.overrides["max_tokens"] = wanted["max_tokens"]
            self.changes.append(f"max_tokens={wanted['max_tokens']}")
        if "frequency_penalty" in wanted:
            self.overrides["frequency_penalty"] = wanted["frequency_penalty"]
            self.changes.append(f"frequency_penalty={wanted['frequency_penalty']}")
        if wanted.get("switch_format"):
            other: OutputFormat = "markers" if fmt == "json" else "json"
            self.prepared = self.adapter._prepare(self.lm, self.lm_kwargs, self.signature, self.demos, self.inputs,
                                                  force=other)
            self.changes.append(f"format={other}")
            fmt = other
        self.feedback = self.adapter.feedback(processed, self.failure, fmt)
        self.failure = None

    def _hit_limit(self, limit: Any) -> bool:
        history = getattr(self.lm, "history", None)
        if not history or not isinstance(limit, int):
            return False
        usage = history[-1].get("usage") or {}
        return int(usage.get("completion_tokens") or 0) >= limit

    def sent(self, kwargs: dict[str, Any]) -> None:
        """Note in the LM's history entry what this retry changed."""
        history = getattr(self.lm, "history", None)
        if self.number > 1 and history and isinstance(history[-1], dict):
            history[-1]["velollm_retry"] = {"attempt": self.number, "changes": list(self.changes)}

    def parse(self, outputs: Any) -> list[dict[str, Any]]:
        assert self.prepared is not None
        processed = self.prepared[0]
        try:
            return self.adapter._call_postprocess(processed, self.signature, outputs, self.lm, self.lm_kwargs)
        except AdapterParseError as exc:
            self.failure = exc
            raise


def _writes_free_text_first(signature: type[Signature]) -> bool:
    """The first output is free text (an answer string, ChainOfThought's ``reasoning``).

    Free text is where a small model copies what it read last. When the turn ended with the
    inputs, Qwen 0.5B's bootstrapped ChainOfThought reasoning ran on from the copied input into
    the requirements line and DSPy's "Not supplied" placeholder. A short cue after the inputs
    stops that for ~8 uncached tokens per call. A typed first output (a Literal, a number) cannot
    copy, so it gets no cue.
    """
    first = next(iter(signature.output_fields.values()), None)
    return first is not None and first.annotation is str


def _reasons_first(signature: type[Signature]) -> bool:
    """The first output is ChainOfThought's ``reasoning``: the requirements line follows the inputs,
    as in DSPy's adapters, so the answer fields' types are what the model read last before it
    reasons towards them.

    Measured with Qwen 0.5B (benchmarks/bench_parallel.py --bootstrap; the bootstrapped
    ChainOfThought sentiment classifier on 104 dev sentences). DSPy's order missed 3, the same 3 in
    two runs, as JSONAdapter on plain llama-cpp-python did. With the requirements ahead and the cue,
    it missed 5 and 7 in two runs of the same code; with a cue naming the fields, 11. The price is
    ~30 uncached tokens per call: that Evaluate took 53 s instead of 31 s. For a plain ``str``
    answer first, the cue did better in benchmarks/dspy_suite.py (33/41 against 31/41), so it
    keeps the cached order.
    """
    first = next(iter(signature.output_fields), None)
    return first == "reasoning" and _writes_free_text_first(signature)
