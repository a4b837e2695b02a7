"""The whole contract between velollm and its backends: what a backend author needs, in one file.

A *Backend* turns a model file into an *Engine*; an Engine turns a :class:`GenerationRequest`
into a :class:`Completion` (or a stream of :class:`Chunk`). Everything above this module
(pool, placement, DSPy adapter, litellm provider, server) speaks only these types, so a
third-party backend plugs in by implementing the two protocols.

Optional members are declared here, never guessed by name elsewhere:

Backend
    ``priority: int`` (lower is tried first when the user names no backend; default 100),
    ``auto_select: bool`` (``False``: used only when named; default ``True``),
    ``devices(probe) -> list[Device]`` (accelerators placement may put layers on),
    ``memory_needs(info, n_ctx, options) -> MemoryNeeds | None`` (``None``: uses no local memory),
    ``max_parallel: int`` (sequences one engine can decode together, ``LoadOptions.parallel``; when the
    caller names none, placement picks up to this many from memory; default 1).
Engine
    ``max_concurrency: int`` (requests the pool lets in at once; default 1),
    ``turn_free_methods: frozenset[str]`` (methods that do not run the model and need no turn;
    default :data:`TURN_FREE_METHODS`), ``embed`` (see :class:`EmbeddingEngine`),
    ``request_extras: frozenset[str] | None`` (the keys of ``GenerationRequest.extra`` it
    understands; default none, so any key is refused; ``None``: passed on, e.g. to a server).
Read them with :func:`backend_priority`, :func:`backend_auto_select`, :func:`backend_max_parallel`,
:func:`engine_concurrency`, :func:`engine_turn_free_methods` and :func:`check_request_extras`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from velollm.errors import GenerationError, InvalidRequest, UnsupportedFeature, validated

if TYPE_CHECKING:
    from velollm.hardware import HardwareProbe

#: Plugin API version: bumped when this contract changes incompatibly (``velollm plugins`` shows it).
PLUGIN_API_VERSION = "2"
#: Engine methods that do not run the model, so the pool lets them through without a turn.
TURN_FREE_METHODS = frozenset({"tokenize", "detokenize", "token_text", "is_end_of_generation", "prompt_tokens",
                               "apply_chat_template", "render"})
DEFAULT_BACKEND_PRIORITY = 100

FinishReason = Literal["stop", "length"]
#: KV cache element types llama.cpp offers (``type_k`` / ``type_v``; quantised V needs flash attention).
KVCacheType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
#: ggml's NUMA strategies, in llama.cpp's order (``GGML_NUMA_STRATEGY_*``).
NUMA_STRATEGIES = ("disabled", "distribute", "isolate", "numactl", "mirror")
NumaStrategy = Literal["disabled", "distribute", "isolate", "numactl", "mirror"]
#: Sampling settings that older callers put in ``GenerationRequest.extra``: lifted into their fields.
SAMPLING_EXTRAS = {"typical_p": "typical_p", "penalty_last_n": "penalty_last_n", "repeat_last_n": "penalty_last_n",
                   "mirostat": "mirostat_mode", "mirostat_mode": "mirostat_mode", "mirostat_tau": "mirostat_tau",
                   "mirostat_eta": "mirostat_eta"}


class ChatMessage(BaseModel):
    """One chat turn; ``content`` is plain text.

    Tool calling (:mod:`velollm.tools`): an assistant turn may carry OpenAI ``tool_calls`` (its
    content then often empty), a ``tool`` turn answers one by ``tool_call_id``.
    """

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class GenerationRequest(BaseModel):
    """What to generate. Exactly one of ``messages`` (chat) or ``prompt`` (raw text) is set.

    Sampling names follow llama.cpp so users can carry their settings over unchanged;
    ``temperature=0`` means greedy decoding. The pipeline is llama.cpp's: penalties over the last
    ``penalty_last_n`` generated tokens, then top-k, typical-p, top-p, min-p, temperature and the
    draw; ``mirostat_mode`` 1 or 2 replaces everything after the temperature. ``extra`` carries
    backend-specific settings; an engine refuses keys it does not know (:func:`check_request_extras`).
    """

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None  # text, or token ids used as they are (OpenAI's completions allow both)
    max_tokens: int | None = Field(default=256, ge=1)
    temperature: float = Field(default=0.8, ge=0.0)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = Field(default=64, ge=-1)  # generated tokens the penalties look back on; -1: all, 0: off
    typical_p: float = Field(default=1.0, gt=0.0, le=1.0)  # 1: off
    mirostat_mode: int = Field(default=0, ge=0, le=2)  # 0: off, 1: mirostat, 2: mirostat 2.0
    mirostat_tau: float = Field(default=5.0, gt=0.0)  # target surprise, in bits
    mirostat_eta: float = Field(default=0.1, gt=0.0)  # learning rate
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # tool definitions (OpenAI ``tools``, normalised by velollm.tools) for the chat template to show;
    # the call format is enforced through ``grammar`` (velollm.tools.tool_grammar)
    tools: list[dict[str, Any]] | None = None
    logprobs: bool = False  # report each generated token's log-probability (Chunk.logprobs)
    top_logprobs: int = Field(default=0, ge=0, le=20)  # and this many most likely alternatives
    suffix: str | None = None  # fill-in-the-middle: the text after the hole (prompt requests, FIM models)
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, **fields: Any) -> GenerationRequest:
        """Build a request, turning pydantic's validation errors into :class:`InvalidRequest`."""
        return validated(cls, fields, "generation request")

    @model_validator(mode="before")
    @classmethod
    def _lift_sampling_extras(cls, data: Any) -> Any:
        """``extra={"typical_p": 0.5}`` (how sampling knobs were passed before they had fields) sets the field."""
        extra = data.get("extra") if isinstance(data, dict) else None
        if not isinstance(extra, dict) or not any(key in SAMPLING_EXTRAS for key in extra):
            return data
        data, extra = dict(data), dict(extra)
        for key in [k for k in extra if k in SAMPLING_EXTRAS]:
            name, value = SAMPLING_EXTRAS[key], extra.pop(key)
            if data.get(name, value) != value:
                raise InvalidRequest(f"'{name}' is given twice with different values (as a field and as extra.{key})")
            data[name] = value
        data["extra"] = extra
        return data

    @model_validator(mode="after")
    def _check(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise InvalidRequest("a GenerationRequest needs exactly one of 'messages' or 'prompt'")
        if self.messages is not None and not self.messages:
            raise InvalidRequest("'messages' is empty")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequest("'prompt' as token ids is empty")
        if isinstance(self.prompt, list) and self.suffix is not None:
            raise InvalidRequest("'suffix' (fill-in-the-middle) needs the prompt as text, not token ids")
        if self.grammar is not None and self.json_schema is not None:
            raise InvalidRequest("give either 'grammar' or 'json_schema', not both")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("empty stop sequence")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs' set")
        if self.suffix is not None and self.prompt is None:
            raise InvalidRequest("'suffix' (fill-in-the-middle) needs a 'prompt', not 'messages'")
        return self


class Usage(BaseModel):
    """Real token counts, as the model's tokenizer counted them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from a cache, not computed (OpenAI's prompt_tokens_details)

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


class TopLogprob(BaseModel):
    """One candidate token at a step and its log-probability under the model."""

    token: str
    logprob: float
    bytes: list[int]
    id: int


class TokenLogprob(TopLogprob):
    """A generated token's log-probability (the model's raw distribution, before penalties,
    temperature and grammar), with the ``top_logprobs`` most likely tokens at that step."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Completion(BaseModel):
    """A finished generation."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings = Field(default_factory=Timings)
    model: str = ""
    logprobs: list[TokenLogprob] | None = None  # one per generated token when the request asked


class Chunk(BaseModel):
    """A piece of a streamed generation. The last chunk has ``finish_reason`` and ``usage`` set.

    ``text`` never ends in the middle of a UTF-8 character.
    """

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens generated since the previous chunk


class Capabilities(BaseModel):
    """What an engine can do; callers check these instead of catching failures."""

    chat: bool = True
    streaming: bool = True
    grammar: bool = False
    json_schema: bool = False
    tokenize: bool = True
    embeddings: bool = False
    logits: bool = False
    logprobs: bool = False  # fills Chunk.logprobs when a request asks (GenerationRequest.logprobs)
    tools: bool = False  # renders GenerationRequest.tools (velollm.tools) and honours the call grammar
    fill_in_middle: bool = False  # the model's vocabulary has FIM tokens (GenerationRequest.suffix)


class LoadOptions(BaseModel):
    """How to load a model. Backends ignore what does not apply to them.

    ``None`` means "let the backend decide" (e.g. the model's own context length).
    """

    model_config = ConfigDict(extra="forbid")

    n_ctx: int | None = Field(default=None, ge=16)
    n_threads: int | None = Field(default=None, ge=1)
    # sequences decoded together in one context (continuous batching; llama.cpp's --parallel). None: placement
    # picks it from memory; n_ctx is then the KV cache all of them share (the llama.cpp backend, batch.py)
    parallel: int | None = Field(default=None, ge=1, le=64)
    n_gpu_layers: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    numa: NumaStrategy = "disabled"  # how llama.cpp spreads threads and memory over NUMA nodes (True: distribute)
    seed: int | None = None
    n_batch: int = Field(default=512, ge=1)
    flash_attn: bool = False
    type_k: KVCacheType = "f16"  # KV cache element types (llama.cpp's --cache-type-k / -v)
    type_v: KVCacheType = "f16"
    # share of the offloaded layers per GPU, in the backend's device order (placement sets it for multi-GPU plans)
    tensor_split: list[float] | None = None
    chat_format: str | None = None
    # speculative decoding (the llama.cpp backend: plugins/llamacpp/speculative): a drafter makes "auto" the default
    speculative: Literal["auto", "draft", "lookup", "off"] | None = None
    draft_model: str | None = None  # a model reference (path, catalogue name, hf:) of the same family
    prompt_lookup: bool = False
    n_draft: int | None = Field(default=None, ge=1, le=32)  # most tokens per draft; the exact number when forced
    draft_p_min: float = Field(default=0.5, ge=0.0, le=1.0)  # the draft stops when its top probability is lower
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("numa", mode="before")
    @classmethod
    def _numa_from_bool(cls, value: Any) -> Any:
        """The old boolean: True meant llama.cpp's ``--numa distribute``."""
        if isinstance(value, bool):
            return "distribute" if value else "disabled"
        return value

    @field_validator("tensor_split")
    @classmethod
    def _check_split(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(v < 0 for v in value) or not sum(value) > 0):
            raise ValueError("tensor_split needs non-negative shares with a positive sum")
        return value


class Device(BaseModel):
    """A memory a backend can put layers on: a GPU, or an Apple GPU sharing system RAM."""

    id: str
    name: str = ""
    total_bytes: int = 0
    free_bytes: int = 0
    unified_memory: bool = False  # the device's memory IS system RAM (Apple Silicon, iGPUs)


class MemoryNeeds(BaseModel):
    """A model's memory needs on one backend for one context size, split the way placement moves them."""

    layer_bytes: list[int] = Field(default_factory=list)  # weights of each repeating layer
    kv_layer_bytes: list[int] = Field(default_factory=list)  # KV cache of each layer (moves with it)
    input_bytes: int = 0  # always in RAM: token embeddings, norms (and a tied output head)
    output_bytes: int = 0  # the output head: on a GPU only when every layer is there
    output_tied: bool = False  # the head is the embedding matrix: a GPU gets a copy, RAM keeps it
    graph_bytes: int = 0  # activation/attention scratch on the device that runs the layers
    logits_bytes: int = 0  # logits scratch, with the output head

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.input_bytes + (0 if self.output_tied else self.output_bytes)

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_layer_bytes)

    @property
    def compute_bytes(self) -> int:
        return max(self.graph_bytes, self.logits_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes


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


@runtime_checkable
class EmbeddingEngine(Protocol):
    """An engine that embeds (``capabilities.embeddings`` is true)."""

    capabilities: Capabilities

    def embed(self, texts: list[str], *, normalize: bool = True, truncate: bool = False) -> list[list[float]]: ...

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]: ...


def backend_priority(backend: Any) -> int:
    """A backend's declared ``priority`` (lower first), or :data:`DEFAULT_BACKEND_PRIORITY`."""
    value = getattr(backend, "priority", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else DEFAULT_BACKEND_PRIORITY


def backend_auto_select(backend: Any) -> bool:
    """Whether placement may pick this backend when the user names none (declared ``auto_select``)."""
    return bool(getattr(backend, "auto_select", True))


def backend_max_parallel(backend: Any) -> int:
    """Sequences a backend's engines can decode together (declared ``max_parallel``; at least 1)."""
    value = getattr(backend, "max_parallel", 1)
    return max(1, int(value)) if isinstance(value, int) and not isinstance(value, bool) else 1


def engine_concurrency(engine: Any) -> int:
    """Requests an engine runs at once (declared ``max_concurrency``; at least 1)."""
    value = getattr(engine, "max_concurrency", 1)
    return max(1, int(value)) if isinstance(value, int) and not isinstance(value, bool) else 1


def engine_turn_free_methods(engine: Any) -> frozenset[str]:
    """Methods of ``engine`` that need no turn (declared ``turn_free_methods``, else the defaults)."""
    declared = getattr(engine, "turn_free_methods", None)
    return frozenset(declared) if declared is not None else TURN_FREE_METHODS


def check_request_extras(engine: Any, request: GenerationRequest) -> None:
    """Refuse ``request.extra`` keys the engine does not declare in ``request_extras`` (none by default).

    An option the engine would silently ignore is worse than a refusal: the user thinks it worked.
    """
    if not request.extra:
        return
    known = getattr(engine, "request_extras", frozenset())
    if known is None:  # passed on as they are (a remote server decides)
        return
    unknown = sorted(set(request.extra) - set(known))
    if unknown:
        listed = ", ".join(sorted(known)) or "none"
        raise UnsupportedFeature(f"{getattr(engine, 'name', 'this engine')} does not understand extra "
                                 f"{', '.join(repr(k) for k in unknown)} (the extra keys it knows: {listed})")


def collect_stream(chunks: Iterator[Chunk], model: str = "") -> Completion:
    """Join a stream into a Completion, so a backend can implement ``generate`` via ``stream``."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] | None = None
    last: Chunk | None = None
    for chunk in chunks:
        parts.append(chunk.text)
        if chunk.logprobs is not None:
            logprobs = (logprobs or []) + chunk.logprobs
        last = chunk
    if last is None or last.finish_reason is None or last.usage is None:
        raise GenerationError("the engine's stream ended without a final chunk")
    return Completion(
        text="".join(parts),
        finish_reason=last.finish_reason,
        usage=last.usage,
        timings=last.timings or Timings(),
        model=model,
        logprobs=logprobs,
    )
