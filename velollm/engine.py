"""The contract between velollm and its backends.

A *Backend* turns a model file into an *Engine*; an Engine turns a :class:`GenerationRequest`
into a :class:`Completion` (or a stream of :class:`Chunk`). Everything above this module
(pool, DSPy adapter, litellm provider, server) speaks only these types, so a third-party
backend plugs in by implementing the two protocols.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from velollm.errors import GenerationError, InvalidRequest

if TYPE_CHECKING:
    from velollm.hardware import HardwareProbe

FinishReason = Literal["stop", "length"]


class ChatMessage(BaseModel):
    """One chat turn; ``content`` is plain text."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class GenerationRequest(BaseModel):
    """What to generate. Exactly one of ``messages`` (chat) or ``prompt`` (raw text) is set.

    Sampling names follow llama.cpp so users can carry their settings over unchanged;
    ``temperature=0`` means greedy decoding.
    """

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    max_tokens: int | None = Field(default=256, ge=1)
    temperature: float = Field(default=0.8, ge=0.0)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, **fields: Any) -> GenerationRequest:
        """Build a request, turning pydantic's validation errors into :class:`InvalidRequest`."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()
            )
            raise InvalidRequest(f"invalid generation request: {problems}") from None

    @model_validator(mode="after")
    def _check(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise InvalidRequest("a GenerationRequest needs exactly one of 'messages' or 'prompt'")
        if self.messages is not None and not self.messages:
            raise InvalidRequest("'messages' is empty")
        if self.grammar is not None and self.json_schema is not None:
            raise InvalidRequest("give either 'grammar' or 'json_schema', not both")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("empty stop sequence")
        return self


class Usage(BaseModel):
    """Real token counts, as the model's tokenizer counted them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(BaseModel):
    """Wall-clock timings of one generation, in seconds."""

    ttft_s: float = 0.0
    total_s: float = 0.0
    prompt_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def measure(cls, start: float, first: float | None, end: float, prompt_tokens: int,
                completion_tokens: int, **extra: Any) -> Timings:
        """Derive rates from three clock readings (``time.perf_counter``)."""
        first = end if first is None else first
        ttft = max(first - start, 0.0)
        decode_time = max(end - first, 0.0)
        decode_rate = (completion_tokens - 1) / decode_time if completion_tokens > 1 and decode_time else 0.0
        return cls(
            ttft_s=ttft,
            total_s=max(end - start, 0.0),
            prompt_tokens_per_s=prompt_tokens / ttft if ttft else 0.0,
            decode_tokens_per_s=decode_rate,
            extra=extra,
        )


class Completion(BaseModel):
    """A finished generation."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings = Field(default_factory=Timings)
    model: str = ""


class Chunk(BaseModel):
    """A piece of a streamed generation. The last chunk has ``finish_reason`` and ``usage`` set.

    ``text`` never ends in the middle of a UTF-8 character.
    """

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None


class Capabilities(BaseModel):
    """What an engine can do; callers check these instead of catching failures."""

    chat: bool = True
    streaming: bool = True
    grammar: bool = False
    json_schema: bool = False
    tokenize: bool = True
    embeddings: bool = False
    logits: bool = False


class LoadOptions(BaseModel):
    """How to load a model. Backends ignore what does not apply to them.

    ``None`` means "let the backend decide" (e.g. the model's own context length).
    """

    model_config = ConfigDict(extra="forbid")

    n_ctx: int | None = Field(default=None, ge=16)
    n_threads: int | None = Field(default=None, ge=1)
    n_gpu_layers: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    numa: bool = False
    seed: int | None = None
    n_batch: int = Field(default=512, ge=1)
    flash_attn: bool = False
    chat_format: str | None = None
    # speculative decoding (velollm.speculative; the llama.cpp backend): a drafter makes "auto" the default
    speculative: Literal["auto", "draft", "lookup", "off"] | None = None
    draft_model: str | None = None  # a model reference (path, catalogue name, hf:) of the same family
    prompt_lookup: bool = False
    n_draft: int | None = Field(default=None, ge=1, le=32)  # most tokens per draft; the exact number when forced
    draft_p_min: float = Field(default=0.5, ge=0.0, le=1.0)  # the draft stops when its top probability is lower
    extra: dict[str, Any] = Field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A loaded model. Implementations must be safe to call from several threads (they may
    serialise internally) and must never let two threads into the model at once."""

    name: str
    model_path: Path
    capabilities: Capabilities

    @property
    def context_length(self) -> int: ...

    def generate(self, request: GenerationRequest) -> Completion: ...

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]: ...

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A way to run models (llama.cpp on CUDA, the numpy engine, a remote server...)."""

    name: str

    def available(self, probe: HardwareProbe) -> tuple[bool, str]:
        """Whether this backend can run on the probed machine, and why (not)."""
        ...

    def load(self, model_file: Path, options: LoadOptions) -> Engine: ...


def collect_stream(chunks: Iterator[Chunk], model: str = "") -> Completion:
    """Join a stream into a Completion, so a backend can implement ``generate`` via ``stream``."""
    parts: list[str] = []
    last: Chunk | None = None
    for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    if last is None or last.finish_reason is None or last.usage is None:
        raise GenerationError("the engine's stream ended without a final chunk")
    return Completion(
        text="".join(parts),
        finish_reason=last.finish_reason,
        usage=last.usage,
        timings=last.timings or Timings(),
        model=model,
    )
