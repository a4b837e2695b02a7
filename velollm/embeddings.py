"""Local embeddings for DSPy retrievers, litellm and the server, on the model pool.

``velollm.Embedder("gemma3-270m")`` is a plain callable (list of texts -> 2-D float32 array), the
shape DSPy expects from a custom embedder, so it works both as ``dspy.Embedder(velollm.Embedder(...))``
and directly as ``dspy.retrievers.Embeddings(corpus=..., embedder=velollm.Embedder(...))``.
:func:`embed` is the same thing with token usage, for the HTTP server and the litellm provider.

Engines are leased from the pool with ``extra={"embedding": True}``, so an embedding engine is a
pool entry of its own, apart from a generating engine for the same model. Which model to use and
how well a generative model embeds: see ``docs/embeddings.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel

from velollm.engine import Usage
from velollm.errors import InvalidRequest, ModelNotFound, UnsupportedFeature

#: Context (= the longest text, in tokens) of an embedding engine unless the caller says otherwise.
DEFAULT_N_CTX = 2048
#: Texts handed to the engine per call; bounds how long one call holds the engine.
DEFAULT_BATCH_SIZE = 64


def check_texts(texts: Any) -> list[str]:
    """The inputs as a non-empty list of non-empty strings, or a clear :class:`InvalidRequest`."""
    if isinstance(texts, str):
        raise InvalidRequest("embed() takes a list of strings; wrap a single text in a list")
    try:
        items = list(texts)
    except TypeError:
        raise InvalidRequest(f"embed() takes a list of strings, not {type(texts).__name__}") from None
    if not items:
        raise InvalidRequest("nothing to embed: the list of texts is empty")
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidRequest(f"text {i} is a {type(text).__name__}, not a string")
        if not text:
            raise InvalidRequest(f"text {i} is an empty string: it has no meaning to embed")
    return items


def load_options(*, pooling: str | None = None, n_ctx: int | None = None, n_threads: int | None = None,
                 **options: Any) -> dict[str, Any]:
    """Pool load options for an embedding engine (``ModelPool.acquire(ref, **load_options(...))``)."""
    extra = dict(options.pop("extra", None) or {})
    extra["embedding"] = True
    if pooling is not None:
        extra["pooling_type"] = pooling
    n_ctx = n_ctx or DEFAULT_N_CTX
    opts: dict[str, Any] = {"n_ctx": n_ctx, "n_batch": n_ctx, "extra": extra, **options}
    if n_threads is not None:
        opts["n_threads"] = n_threads
    return opts


def embed_with(engine: Any, texts: Sequence[str], *, normalize: bool = True, truncate: bool = False,
               batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[list[list[float]], Usage]:
    """Embed on an engine already in hand, ``batch_size`` texts per engine call; returns (vectors, usage)."""
    items = check_texts(texts)
    if batch_size < 1:
        raise InvalidRequest(f"batch_size must be at least 1, not {batch_size}")
    if not getattr(engine.capabilities, "embeddings", False) or not callable(getattr(engine, "embed", None)):
        raise UnsupportedFeature(
            f"engine {getattr(engine, 'name', engine)!r} cannot embed (load it with extra={{'embedding': True}} on "
            f"a backend that supports embeddings, such as llamacpp-cpu)"
        )
    vectors: list[list[float]] = []
    for start in range(0, len(items), batch_size):
        vectors.extend(engine.embed(items[start:start + batch_size], normalize=normalize, truncate=truncate))
    if truncate:  # the engine cut long texts; count what it read, not what was sent
        limit = engine.context_length
        tokens = sum(min(len(engine.tokenize(t)), limit) for t in items)
    else:
        tokens = sum(len(engine.tokenize(t)) for t in items)
    return vectors, Usage(prompt_tokens=tokens)


def embed(ref: str, texts: Sequence[str], *, normalize: bool = True, pooling: str | None = None,
          truncate: bool = False, batch_size: int = DEFAULT_BATCH_SIZE, backend: str | None = None,
          n_ctx: int | None = None, pool: Any = None, **options: Any) -> tuple[list[list[float]], Usage]:
    """Embed ``texts`` with model ``ref`` from the pool; returns (one vector per text, token usage).

    Raises :class:`InvalidRequest` for an empty list or an empty text, :class:`ContextOverflow`
    for a text longer than the engine's context (unless ``truncate``), and
    :class:`UnsupportedFeature` when the backend cannot embed.
    """
    items = check_texts(texts)  # fail before any model loads
    if pool is None:
        from velollm.pool import get_pool

        pool = get_pool()
    lease = pool.acquire(ref, backend=backend, **load_options(pooling=pooling, n_ctx=n_ctx, **options))
    try:
        return embed_with(lease.engine, items, normalize=normalize, truncate=truncate, batch_size=batch_size)
    finally:
        lease.release()


class Embedder:
    """A local embedding function for DSPy: ``texts -> float32 array`` of shape (len(texts), dim).

    ``dspy.Embedder(velollm.Embedder("gemma3-270m"))`` and
    ``dspy.retrievers.Embeddings(corpus=docs, embedder=velollm.Embedder("gemma3-270m"))`` both work.
    A single string gives a 1-D vector (as ``dspy.Embedder`` does). The engine comes from the pool
    on each call, so idle embedders let the pool unload the model.
    """

    def __init__(self, model: str, *, normalize: bool = True, pooling: str | None = None, truncate: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, n_ctx: int | None = None, backend: str | None = None,
                 pool: Any = None, **load: Any) -> None:
        if batch_size < 1:
            raise InvalidRequest(f"batch_size must be at least 1, not {batch_size}")
        self.model = model
        self.normalize, self.pooling, self.truncate, self.batch_size = normalize, pooling, truncate, batch_size
        self.n_ctx, self.backend, self.pool, self.load = n_ctx, backend, pool, load
        # DSPy's cache keys a callable by its __name__ (an instance has no source to hash): name the model file and
        # the settings, or two embedders would share cached vectors.
        self.__name__ = (f"velollm.Embedder({_identity(model)}, pooling={pooling or 'auto'}, normalize={normalize}, "
                         f"truncate={truncate}, n_ctx={n_ctx or DEFAULT_N_CTX})")

    def __call__(self, texts: str | Sequence[str]) -> Any:
        import numpy as np

        single = isinstance(texts, str)
        vectors, _usage = embed(
            self.model, [texts] if single else list(texts), normalize=self.normalize, pooling=self.pooling,
            truncate=self.truncate, batch_size=self.batch_size, backend=self.backend, n_ctx=self.n_ctx,
            pool=self.pool, **self.load,
        )
        array = np.asarray(vectors, dtype=np.float32)
        return array[0] if single else array

    def __repr__(self) -> str:
        return self.__name__


def _identity(model: str) -> str:
    """The model file (name, size, mtime) when it is local; the reference when it still has to be pulled.

    Raises :class:`ModelNotFound` at once for a reference no model source understands.
    """
    from velollm.loading import find_source

    source = find_source(model)  # ModelNotFound at once when no source understands it
    try:
        path = source.resolve(model.strip(), download=False).path
    except ModelNotFound:
        return model
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


# --- OpenAI's embeddings API: the server's POST /v1/embeddings and the litellm provider -------------
class OpenAIEmbeddingsRequest(BaseModel):
    """The parts of an OpenAI ``/v1/embeddings`` body velollm acts on (``user`` is accepted and ignored)."""

    model: str | None = None
    texts: list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def parse_openai(body: Any) -> OpenAIEmbeddingsRequest:
    """Validate an OpenAI embeddings body; token-array inputs are refused (send text)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if "input" not in body:
        raise InvalidRequest("'input' is required: a string or a list of strings")
    raw = body["input"]
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, (int, list)) for x in raw):
        raise UnsupportedFeature("'input' as token ids is not supported; send the text itself")
    else:
        texts = raw
    texts = check_texts(texts)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest(f"'encoding_format' must be 'float' or 'base64', not {encoding!r}")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise InvalidRequest(f"'dimensions' must be a positive integer, not {dimensions!r}")
    return OpenAIEmbeddingsRequest(model=model, texts=texts, encoding_format=encoding, dimensions=dimensions)


def _check_dimensions(vectors: list[list[float]], dimensions: int | None) -> None:
    if dimensions is not None and vectors and dimensions != len(vectors[0]):
        raise UnsupportedFeature(
            f"this model's embeddings have {len(vectors[0])} dimensions; 'dimensions' cannot change that "
            f"(omit it, or ask for {len(vectors[0])})"
        )


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def openai_embeddings(request: OpenAIEmbeddingsRequest, ref: str, model_id: str, *, pool: Any = None,
                      **options: Any) -> dict[str, Any]:
    """Embed and answer in OpenAI's shape (``base64`` is little-endian float32, as OpenAI sends it)."""
    vectors, usage = embed(ref, request.texts, pool=pool, **options)
    _check_dimensions(vectors, request.dimensions)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, request.encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": model_id,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }


def litellm_embedding(pool: Any, model: str, input: Any, model_response: Any,
                      optional_params: dict[str, Any] | None = None) -> Any:
    """Fill litellm's ``EmbeddingResponse`` (the provider's ``embedding``); errors stay velollm's."""
    import litellm

    params = {k: v for k, v in (optional_params or {}).items() if v is not None}
    request = parse_openai({**params, "model": model, "input": input})
    answer = openai_embeddings(request, model, model, pool=pool)
    model_response.data = answer["data"]
    model_response.model = model
    model_response.usage = litellm.Usage(prompt_tokens=answer["usage"]["prompt_tokens"], completion_tokens=0,
                                         total_tokens=answer["usage"]["total_tokens"])
    return model_response
