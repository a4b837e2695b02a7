"""The contract rules: plain functions that check one promise of the backend contract each.

Each rule takes a :class:`Subject` (a backend, a model file, load options, and the engine loaded
from them) and returns quietly or raises :class:`ContractViolation` naming what broke. A rule that
does not apply to the subject (a tokenizer rule for an engine declaring ``tokenize=False``) raises
:class:`RuleSkipped`. Anything else the backend raises propagates: an untyped exception where the
contract promises a typed one is a failure too.

Rules are independent: each uses its own requests, so one broken promise fails one rule.
Generations are short and greedy on prompts whose continuation is near-certain (counting), so
two runs of the same request agree on any CPU, batch shape or implementation.
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velollm.engine import (
    Backend,
    Capabilities,
    Chunk,
    Completion,
    Device,
    EmbeddingEngine,
    Engine,
    GenerationRequest,
    LoadOptions,
    MemoryNeeds,
    Usage,
)
from velollm.errors import (
    EngineClosed,
    InvalidModelFile,
    InvalidRequest,
    UnsupportedFeature,
    VeloError,
)

#: A prompt whose greedy continuation is " 13 14 15 ..." for any real language model.
COUNTING = "1 2 3 4 5 6 7 8 9 10 11 12"
#: A prompt whose continuation is multi-byte text (Japanese).
MULTIBYTE_PROMPT = "東京は日本の首都です。大阪は"
#: Text with 2-, 3- and 4-byte UTF-8 characters, for the tokenizer round trip.
MULTIBYTE_TEXT = "naïve café — Ωμέγα, 東京タワー, emoji 🚀🎉 ✓"
ASCII_TEXT = "Hello, world! The answer is 42."
#: An invalid GBNF grammar (unclosed group).
BAD_GRAMMAR = 'root ::= ("yes" | "no"'
YES_NO_GRAMMAR = 'root ::= "yes" | "no"'
BOOL_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                               "additionalProperties": False}


class ContractViolation(AssertionError):
    """A backend broke a rule of the contract; the message says which promise and how."""


class RuleSkipped(Exception):
    """The rule does not apply to this backend (it declares it lacks the feature)."""


def require(condition: object, message: str) -> None:
    """Raise :class:`ContractViolation` unless ``condition`` holds (``assert`` vanishes under ``-O``)."""
    if not condition:
        raise ContractViolation(message)


@dataclass
class Subject:
    """What the rules check: a backend, the model file it loads, and the engine it loaded (lazily, shared).

    ``timeout_s`` bounds the waits that detect a hang (a follow-up request after a cancelled stream);
    it is a ceiling for a stuck engine, never a speed target.
    """

    backend: Backend
    model_file: Path
    options: LoadOptions = field(default_factory=lambda: LoadOptions(n_ctx=512))
    workdir: Path | None = None
    timeout_s: float = 120.0
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def engine(self) -> Engine:
        """The shared engine, loaded on first use (and again after a rule took it to close it)."""
        if self._engine is None:
            self._engine = self.backend.load(self.model_file, self.options)
        return self._engine

    def take_engine(self) -> Engine:
        """The shared engine, handed over for good (the next :attr:`engine` access loads a new one)."""
        engine, self._engine = self.engine, None
        return engine

    def close(self) -> str | None:
        """Close the shared engine; returns a problem (a raise, or a close that hangs) instead of raising."""
        engine, self._engine = self._engine, None
        if engine is None:
            return None
        outcome = _in_thread(engine.close, self.timeout_s)
        if outcome.pending:
            return f"close() did not return within {self.timeout_s:.0f} s"
        return f"close() raised {outcome.error!r}" if outcome.error is not None else None


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None
    pending: bool = False


def _in_thread(fn: Callable[[], Any], timeout_s: float) -> _Outcome:
    """Run ``fn`` in a daemon thread; a hang is reported (``pending``) instead of hanging the caller."""
    outcome = _Outcome(pending=True)

    def target() -> None:
        try:
            outcome.value = fn()
        except BaseException as exc:  # collected and re-raised by the caller, as threads must
            outcome.error = exc
        finally:
            outcome.pending = False

    thread = threading.Thread(target=target, name="velollm-contract", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome


def _greedy(prompt: str, max_tokens: int, **fields: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0, **fields)


def _raises(fn: Callable[[], Any], what: str) -> BaseException:
    """The exception ``fn`` raises (iterating it when it returns a stream); a violation if it raises none."""
    try:
        result = fn()
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except Exception as exc:
        return exc
    raise ContractViolation(f"{what}: nothing was raised")


def _typed(exc: BaseException, expected: type[VeloError], what: str) -> None:
    require(isinstance(exc, expected),
            f"{what}: raised {type(exc).__module__}.{type(exc).__qualname__} ({exc}), "
            f"not velollm.errors.{expected.__name__}")


def _joined(chunks: list[Chunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


# --- the rules ------------------------------------------------------------------------------------
def check_load(subject: Subject) -> None:
    """``available(probe)`` answers (bool, str); ``load`` returns an Engine with the declared members."""
    from velollm.loading import probe_machine

    backend = subject.backend
    require(isinstance(getattr(backend, "name", None), str) and backend.name, "backend.name must be a non-empty str")
    answer = backend.available(probe_machine())
    require(isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], bool)
            and isinstance(answer[1], str), f"available(probe) must return (bool, str), not {answer!r}")
    engine = subject.engine
    require(isinstance(engine, Engine), f"load() returned {type(engine).__name__}, which lacks Engine members")
    require(isinstance(engine.name, str) and engine.name, "engine.name must be a non-empty str")
    require(isinstance(engine.model_path, Path), f"engine.model_path must be a pathlib.Path, not "
            f"{type(engine.model_path).__name__}")
    require(isinstance(engine.capabilities, Capabilities), "engine.capabilities must be a velollm.engine.Capabilities")
    n_ctx = engine.context_length
    require(isinstance(n_ctx, int) and n_ctx > 0, f"context_length must be a positive int, not {n_ctx!r}")
    if subject.options.n_ctx is not None:
        require(n_ctx <= subject.options.n_ctx, f"context_length {n_ctx} exceeds LoadOptions.n_ctx "
                f"{subject.options.n_ctx}")


def check_generate(subject: Subject) -> None:
    """``generate`` returns a Completion with real usage, and stops at ``max_tokens``."""
    engine = subject.engine
    completion = engine.generate(_greedy(COUNTING, 6))
    require(isinstance(completion, Completion), f"generate() returned {type(completion).__name__}, not Completion")
    require(completion.text.strip(), "generate() returned no text for a counting prompt")
    usage = completion.usage
    require(usage.prompt_tokens > 0, f"usage.prompt_tokens is {usage.prompt_tokens}: count the prompt's tokens")
    require(1 <= usage.completion_tokens <= 6, f"usage.completion_tokens is {usage.completion_tokens} for "
            "max_tokens=6 (and a non-empty text)")
    if completion.finish_reason == "length":
        require(usage.completion_tokens == 6, f"finish_reason 'length' after {usage.completion_tokens} of 6 tokens")
    if engine.capabilities.chat:
        chat = engine.generate(GenerationRequest(messages=[{"role": "user", "content": "Say hello."}],
                                                 max_tokens=3, temperature=0))
        require(isinstance(chat, Completion) and chat.usage.prompt_tokens > 0,
                "a chat request (messages) must give a Completion with prompt usage")


def check_stream(subject: Subject) -> None:
    """Chunks join to the text ``generate`` gives; only the last chunk has ``finish_reason`` and ``usage``."""
    engine = subject.engine
    request = _greedy(COUNTING, 5)
    chunks = list(engine.stream(request))
    require(chunks and all(isinstance(c, Chunk) for c in chunks), "stream() must yield velollm.engine.Chunk objects")
    *body, last = chunks
    require(last.finish_reason in ("stop", "length"), f"the last chunk's finish_reason is {last.finish_reason!r}")
    require(isinstance(last.usage, Usage) and last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0,
            f"the last chunk must carry real usage, not {last.usage!r}")
    early = [i for i, c in enumerate(body) if c.finish_reason is not None or c.usage is not None]
    require(not early, f"chunk(s) {early} before the last carry finish_reason/usage")
    text = engine.generate(request).text
    require(_joined(chunks) == text, f"the stream's chunks join to {_joined(chunks)!r}, generate() gave {text!r}")


def check_stop(subject: Subject) -> None:
    """A stop string ends the text, is not part of it, and makes ``finish_reason`` "stop" (generate and stream)."""
    engine = subject.engine
    free = engine.generate(_greedy(COUNTING, 8)).text
    words = free.split()
    require(len(words) >= 2, f"a counting prompt gave {free!r}; the rule needs two words to stop on the second")
    stop = words[1]
    expected = free[:free.find(stop)]
    stopped = engine.generate(_greedy(COUNTING, 8, stop=[stop]))
    require(stopped.text == expected and stopped.finish_reason == "stop",
            f"with stop={[stop]!r} generate() gave {stopped.text!r} ({stopped.finish_reason}); "
            f"expected {expected!r} (stop)")
    chunks = list(engine.stream(_greedy(COUNTING, 8, stop=[stop])))
    require(_joined(chunks) == expected and chunks[-1].finish_reason == "stop",
            f"with stop={[stop]!r} stream() gave {_joined(chunks)!r} ({chunks[-1].finish_reason}); expected "
            f"{expected!r} (stop)")


def check_utf8(subject: Subject) -> None:
    """Streamed chunks are whole UTF-8 characters: multi-byte output is never split or replaced."""
    chunks = list(subject.engine.stream(_greedy(MULTIBYTE_PROMPT, 8)))
    text = _joined(chunks)
    require(any(ord(ch) > 127 for ch in text), f"the multi-byte prompt gave {text!r}: no multi-byte text to check")
    for i, chunk in enumerate(chunks):
        try:
            chunk.text.encode("utf-8")
        except UnicodeEncodeError:
            raise ContractViolation(f"chunk {i} ({chunk.text!r}) holds a lone surrogate: a split character") from None
        require("\ufffd" not in chunk.text, f"chunk {i} ({chunk.text!r}) holds U+FFFD: a character was split "
                "between chunks (hold back incomplete UTF-8 bytes; velollm.textstream.TokenTextStream does)")


def check_tokenize(subject: Subject) -> None:
    """``detokenize(tokenize(text))`` gives the text back, ASCII and multi-byte alike."""
    engine = subject.engine
    if not engine.capabilities.tokenize:
        raise RuleSkipped("the engine declares tokenize=False (the capabilities rule checks it refuses)")
    for text in (ASCII_TEXT, MULTIBYTE_TEXT):
        tokens = engine.tokenize(text, add_special=False, parse_special=False)
        require(isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens),
                f"tokenize({text!r}) must return a non-empty list of int")
        back = engine.detokenize(tokens)
        require(back == text, f"detokenize(tokenize({text!r})) gave {back!r}")
    with_special = engine.tokenize(ASCII_TEXT, add_special=True)
    require(len(with_special) >= len(engine.tokenize(ASCII_TEXT, add_special=False)),
            "add_special=True must not give fewer tokens than add_special=False")


def check_cancellation(subject: Subject) -> None:
    """Closing a stream mid-way frees the engine: the next request (from another thread) completes."""
    engine = subject.engine
    stream = engine.stream(GenerationRequest(prompt=COUNTING, max_tokens=32, temperature=0.8))
    first = next(iter(stream), None)
    require(first is not None, "a 32-token stream yielded nothing")
    close = getattr(stream, "close", None)
    if callable(close):
        close()
    del stream  # what a consumer that walks away does: the iterator is garbage collected
    gc.collect()
    outcome = _in_thread(lambda: engine.generate(_greedy(COUNTING, 2)), subject.timeout_s)
    require(not outcome.pending, f"after a stream was closed mid-way, the next request did not finish within "
            f"{subject.timeout_s:.0f} s: the closed stream still holds the engine (release it in a finally)")
    if outcome.error is not None:
        raise ContractViolation(f"after a stream was closed mid-way, the next request raised "
                                f"{outcome.error!r}") from outcome.error
    require(isinstance(outcome.value, Completion), "the request after a cancelled stream gave no Completion")


def check_errors(subject: Subject) -> None:
    """Bad input raises velollm.errors types, never bare exceptions: before the model is touched."""
    engine = subject.engine
    n_ctx = engine.context_length
    too_long = _greedy("hello " * (n_ctx + 16), 4)
    _typed(_raises(lambda: engine.generate(too_long), "a prompt longer than the context (generate)"),
           InvalidRequest, "a prompt longer than the context")
    _typed(_raises(lambda: engine.stream(too_long), "a prompt longer than the context (stream)"),
           InvalidRequest, "a streamed prompt longer than the context")
    if engine.capabilities.tokenize:
        _typed(_raises(lambda: engine.detokenize([-1]), "detokenize([-1])"), InvalidRequest, "detokenize([-1])")
        _typed(_raises(lambda: engine.detokenize([2**31 - 1]), "detokenize([2**31 - 1])"), InvalidRequest,
               "detokenize of an id outside the vocabulary")
    if engine.capabilities.grammar:
        _typed(_raises(lambda: engine.generate(_greedy("Yes or no?", 2, grammar=BAD_GRAMMAR)), "an invalid grammar"),
               InvalidRequest, "an invalid grammar")
    if subject.workdir is not None:
        junk = subject.workdir / "not-a-model.gguf"
        junk.write_bytes(b"this is not a model file" * 8)
        _typed(_raises(lambda: subject.backend.load(junk, subject.options), "loading a file that is not a model"),
               InvalidModelFile, "loading a file that is not a model")
    # the engine is still healthy after all that
    require(engine.generate(_greedy(COUNTING, 2)).text, "the engine gave no text after refusing bad requests")


def check_capabilities(subject: Subject) -> None:
    """What ``capabilities`` claims works; what it denies raises UnsupportedFeature."""
    engine = subject.engine
    caps = engine.capabilities
    grammar = _greedy("Is the sky blue? Answer:", 4, grammar=YES_NO_GRAMMAR)
    if caps.grammar:
        text = engine.generate(grammar).text
        require(text in ("yes", "no"), f"capabilities.grammar is true, but a yes/no grammar gave {text!r}")
    else:
        _typed(_raises(lambda: engine.generate(grammar), "capabilities.grammar is false, yet a grammar request"),
               UnsupportedFeature, "a grammar request on an engine without grammar")
    schema = _greedy('A JSON object saying whether the sky is blue: {"ok": ', 24, json_schema=BOOL_SCHEMA)
    if caps.json_schema:
        text = engine.generate(schema).text
        try:
            value = json.loads(text)
        except ValueError:
            raise ContractViolation(f"capabilities.json_schema is true, but the output {text!r} is not JSON") from None
        require(isinstance(value, dict) and set(value) == {"ok"} and isinstance(value["ok"], bool),
                f"capabilities.json_schema is true, but {text!r} does not match the schema {BOOL_SCHEMA}")
    else:
        _typed(_raises(lambda: engine.generate(schema), "capabilities.json_schema is false, yet a schema request"),
               UnsupportedFeature, "a json_schema request on an engine without json_schema")
    chat = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
    if not caps.chat:
        _typed(_raises(lambda: engine.generate(chat), "capabilities.chat is false, yet a messages request"),
               UnsupportedFeature, "a chat request on an engine without chat")
    embed = getattr(engine, "embed", None)
    if caps.embeddings:
        require(callable(embed) and isinstance(engine, EmbeddingEngine),
                "capabilities.embeddings is true, but the engine is no EmbeddingEngine (it has no embed() method)")
        vectors = embed(["a cat", "a dog"])  # type: ignore[misc]
        require(isinstance(vectors, list) and len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0
                and all(isinstance(x, float) for x in vectors[0]),
                "capabilities.embeddings is true, but embed() did not give one float vector per text")
    elif callable(embed):
        _typed(_raises(lambda: embed(["a cat"]), "capabilities.embeddings is false, yet embed()"),
               UnsupportedFeature, "embed() on an engine without embeddings")
    if caps.tokenize:
        require(engine.tokenize(ASCII_TEXT), "capabilities.tokenize is true, but tokenize() gave no tokens")
    else:
        _typed(_raises(lambda: engine.tokenize(ASCII_TEXT), "capabilities.tokenize is false, yet tokenize()"),
               UnsupportedFeature, "tokenize() on an engine without a tokenizer")


def check_optional_members(subject: Subject) -> None:
    """Declared optional members (velollm.engine's docstring lists them) have the declared types."""
    from velollm.gguf.info import inspect
    from velollm.loading import probe_machine

    backend, engine = subject.backend, subject.engine
    if hasattr(backend, "priority"):
        value = backend.priority
        require(isinstance(value, int) and not isinstance(value, bool), f"backend.priority must be an int, not "
                f"{value!r}")
    if hasattr(backend, "auto_select"):
        require(isinstance(backend.auto_select, bool), f"backend.auto_select must be a bool, not "
                f"{backend.auto_select!r}")
    if hasattr(backend, "devices"):
        devices = backend.devices(probe_machine())
        require(isinstance(devices, list) and all(isinstance(d, Device) for d in devices),
                f"backend.devices(probe) must return a list of velollm.engine.Device, not {devices!r}")
    if hasattr(backend, "memory_needs"):
        try:
            info = inspect(subject.model_file)
        except VeloError:
            info = None  # not a GGUF file: placement never asks
        if info is not None:
            needs = backend.memory_needs(info, 512, subject.options)
            require(needs is None or isinstance(needs, MemoryNeeds),
                    f"backend.memory_needs() must return velollm.engine.MemoryNeeds or None, not {needs!r}")
    if hasattr(engine, "max_concurrency"):
        value = engine.max_concurrency
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"engine.max_concurrency must be an int >= 1, not {value!r}")
    if hasattr(engine, "turn_free_methods"):
        names = engine.turn_free_methods
        require(isinstance(names, (set, frozenset)) and all(isinstance(n, str) for n in names),
                f"engine.turn_free_methods must be a set of method names, not {names!r}")
        missing = sorted(n for n in names if not callable(getattr(engine, n, None)))
        require(not missing, f"engine.turn_free_methods names methods the engine lacks: {missing}")


def check_close(subject: Subject) -> None:
    """``close()`` is idempotent; afterwards every call raises EngineClosed."""
    engine = subject.take_engine()
    engine.close()
    engine.close()
    request = _greedy(COUNTING, 2)
    _typed(_raises(lambda: engine.generate(request), "generate() after close()"), EngineClosed,
           "generate() after close()")
    _typed(_raises(lambda: engine.stream(request), "stream() after close()"), EngineClosed, "stream() after close()")
    if engine.capabilities.tokenize:
        _typed(_raises(lambda: engine.tokenize(ASCII_TEXT), "tokenize() after close()"), EngineClosed,
               "tokenize() after close()")


#: Every rule by name, in the order the kit runs them (cancellation last: a backend that fails it
#: may leave its engine stuck).
RULES: dict[str, Callable[[Subject], None]] = {
    "load": check_load,
    "generate": check_generate,
    "stream": check_stream,
    "stop": check_stop,
    "utf8": check_utf8,
    "tokenize": check_tokenize,
    "errors": check_errors,
    "capabilities": check_capabilities,
    "optional_members": check_optional_members,
    "close": check_close,
    "cancellation": check_cancellation,
}


@dataclass
class RuleResult:
    """One rule's outcome from :func:`run_rules`: ``"passed"``, ``"failed"`` or ``"skipped"``."""

    rule: str
    outcome: str
    message: str = ""


def run_rules(subject: Subject, names: list[str] | None = None) -> dict[str, RuleResult]:
    """Run rules outside pytest (``names``: a subset, else all); failures are collected, not raised."""
    results: dict[str, RuleResult] = {}
    for name in names or list(RULES):
        try:
            RULES[name](subject)
        except RuleSkipped as exc:
            results[name] = RuleResult(name, "skipped", str(exc))
        except Exception as exc:
            results[name] = RuleResult(name, "failed", f"{type(exc).__name__}: {exc}")
        else:
            results[name] = RuleResult(name, "passed")
    return results
