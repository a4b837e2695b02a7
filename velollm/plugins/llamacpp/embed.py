"""Embeddings on the llama.cpp backend: pooled hidden states of a GGUF model.

An engine embeds when it was loaded with ``LoadOptions(extra={"embedding": True})`` (optionally
``"pooling_type": "mean" | "cls" | "last"``). Two paths, chosen by what the GGUF declares:

* **An embedding model** (the GGUF sets ``<arch>.pooling_type``, e.g. BERT-style models):
  llama.cpp pools, as the model was trained to be used. Such models need a whole text in one
  micro-batch (often non-causal attention), so the engine runs with ``n_ubatch = n_ctx``.
* **A generative model** (declares no pooling: every model of velollm's catalogue): llama.cpp
  returns per-token hidden states (pooling ``none``) and velollm pools them, **mean** by
  default. In embedding mode llama.cpp treats every token as an output and still runs the
  output head on it, so its scratch memory grows with ``n_ubatch × vocabulary`` floats (a
  2,048-token micro-batch of Gemma 3's 262k vocabulary took 4.5 GB). velollm therefore decodes
  in micro-batches of :data:`EMBED_UBATCH` tokens, packing short texts together and carrying a
  long text across micro-batches through the KV cache (a causal model's states do not depend
  on later tokens, so this is exact).

Mean pooling beat last-token pooling on the catalogue models (``benchmarks/bench_embeddings.py``);
first-token pooling is useless on a causal model (the first token sees nothing else). The result
is usable topical similarity, not the quality of a trained embedding model; see
``docs/embeddings.md``. A text longer than ``n_ctx`` tokens is refused with
:class:`ContextOverflow` unless the caller asks for truncation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from velollm.embeddings import check_texts
from velollm.errors import ContextOverflow, GenerationError, InvalidRequest, UnsupportedFeature

if TYPE_CHECKING:
    import numpy as np

    from velollm.gguf.info import ModelInfo
    from velollm.plugins.llamacpp import LlamaCppEngine

#: llama.cpp's ``enum llama_pooling_type``.
POOLING: dict[str, int] = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
POOLING_NAMES: dict[int, str] = {v: k for k, v in POOLING.items()}
DEFAULT_POOLING = "mean"
_VECTOR_POOLINGS = frozenset({POOLING["mean"], POOLING["cls"], POOLING["last"]})
#: Tokens per decode when velollm pools a generative model (bounds llama.cpp's output-head scratch).
EMBED_UBATCH = 256


def declares_pooling(info: ModelInfo) -> bool:
    """Whether the GGUF says how to pool it (an embedding model) rather than leaving it to us."""
    return info.pooling_type in _VECTOR_POOLINGS


def pooling_value(pooling: str | int | None, info: ModelInfo) -> int:
    """The pooling to use: the caller's, else the GGUF's, else mean; refuses poolings that give no single vector."""
    if pooling is None or pooling == -1:
        return int(info.pooling_type) if declares_pooling(info) else POOLING[DEFAULT_POOLING]
    if isinstance(pooling, str):
        if pooling.lower() not in POOLING:
            raise InvalidRequest(f"unknown pooling {pooling!r}; choose one of: mean, cls, last")
        pooling = POOLING[pooling.lower()]
    if pooling not in _VECTOR_POOLINGS:
        name = POOLING_NAMES.get(pooling, str(pooling))
        raise UnsupportedFeature(f"pooling {name!r} gives no single vector per text; choose mean, cls or last")
    return int(pooling)


def load_kwargs(info: ModelInfo, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``Llama(...)`` keyword arguments for an embedding engine, from those of a generating one."""
    kw = dict(kwargs)
    kw["embedding"] = True
    pooling = pooling_value(kw.get("pooling_type"), info)  # a bad pooling fails the load, not the first call
    n_ctx = int(kw.get("n_ctx") or 512)
    if declares_pooling(info):
        n_ctx = min(n_ctx, info.context_length or n_ctx)  # embedding models are trained on short texts (often 512)
        kw["n_ctx"], kw["pooling_type"] = n_ctx, pooling
        kw["n_batch"] = kw["n_ubatch"] = n_ctx  # llama.cpp pools a whole text in one micro-batch
    else:
        kw["pooling_type"] = POOLING["none"]  # per-token states; velollm pools them (see module docstring)
        kw["n_batch"] = kw["n_ubatch"] = min(n_ctx, EMBED_UBATCH)
    return kw


def is_embedding_engine(engine: LlamaCppEngine) -> bool:
    return bool(engine._llama.context_params.embeddings)


def _pools_natively(engine: LlamaCppEngine) -> bool:
    return int(engine._llama.context_params.pooling_type) in _VECTOR_POOLINGS


def max_tokens(engine: LlamaCppEngine) -> int:
    """The most tokens one text may have on this engine."""
    llama = engine._llama
    if _pools_natively(engine):
        return int(min(llama.n_batch, llama.context_params.n_ubatch, llama.n_ctx()))
    return int(llama.n_ctx())


def tokenize(engine: LlamaCppEngine, text: str) -> list[int]:
    """Tokens of a text exactly as :func:`embed` feeds them (BOS where the model adds one, no special parsing)."""
    return list(engine._llama.tokenize(text.encode("utf-8"), add_bos=True, special=False))


def embed(engine: LlamaCppEngine, texts: list[str], *, normalize: bool = True,
          truncate: bool = False) -> list[list[float]]:
    """One vector per text, in order; many texts share a decode."""
    import numpy as np

    items = check_texts(texts)
    engine._check_open()
    if not is_embedding_engine(engine):
        raise UnsupportedFeature(
            f"engine {engine.name} was loaded for generation; load it with LoadOptions(extra={{'embedding': True}}) "
            f"(velollm.Embedder and velollm.embeddings.embed do this)"
        )
    limit = max_tokens(engine)
    tokens = [tokenize(engine, t) for t in items]
    for i, toks in enumerate(tokens):
        if len(toks) > limit:
            if not truncate:
                raise ContextOverflow(
                    f"text {i} has {len(toks)} tokens; this embedding engine takes at most {limit} per text "
                    f"(its n_ctx). Split the text, load with a larger n_ctx, or pass truncate=True"
                )
            tokens[i] = toks[:limit]
        if not tokens[i]:
            raise InvalidRequest(f"text {i} has no tokens")
    with engine._lock:
        engine._check_open()
        try:
            if _pools_natively(engine):
                rows = engine._llama.embed(items, normalize=False, truncate=truncate)
                vectors = np.asarray(rows, dtype=np.float32)
            else:
                pooling = pooling_value(engine.options.extra.get("pooling_type"), engine.info)
                vectors = _pool_tokens(engine._llama, tokens, pooling)
        except (RuntimeError, ValueError, OSError) as exc:
            raise GenerationError(f"llama.cpp failed while embedding: {exc}") from exc
        finally:
            engine._llama._ctx.kv_cache_clear()
    if vectors.ndim != 2 or vectors.shape[0] != len(items):
        raise GenerationError(f"llama.cpp returned embeddings of shape {vectors.shape} for {len(items)} texts")
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors.tolist()


def _pool_tokens(llama: Any, token_lists: list[list[int]], pooling: int) -> np.ndarray:
    """Decode per-token hidden states in micro-batches and pool them per text.

    Short texts are packed into one micro-batch (one sequence each, KV cleared after it); a text
    longer than a micro-batch goes alone, chunk after chunk, its positions continuing in the KV cache.
    """
    import llama_cpp
    import numpy as np

    ctx, batch = llama._ctx, llama._batch
    n_ub = int(llama.context_params.n_ubatch)
    n_seq_max = max(int(llama.context_params.n_seq_max), 1)
    n_embd = int(llama.n_embd())
    out = np.zeros((len(token_lists), n_embd), dtype=np.float32)
    pending: list[tuple[int, int, int, bool, bool]] = []  # (text, first row, rows, first chunk, last chunk)

    def add(tokens: list[int], seq: int, pos0: int) -> int:
        b, start = batch.batch, batch.batch.n_tokens
        for i, token in enumerate(tokens):
            j = start + i
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, pos0 + i, 1, True
            b.seq_id[j][0] = seq
        b.n_tokens = start + len(tokens)
        return start

    def flush() -> None:
        n = batch.batch.n_tokens
        if not n:
            return
        ctx.decode(batch)
        ptr = llama_cpp.llama_get_embeddings(ctx.ctx)
        if not ptr:
            raise RuntimeError("llama.cpp returned no token embeddings")
        rows = np.ctypeslib.as_array(ptr, shape=(n, n_embd))
        for text, start, count, first, last in pending:
            part = rows[start:start + count]
            if pooling == POOLING["mean"]:
                out[text] += part.sum(axis=0)
            elif pooling == POOLING["cls"] and first:
                out[text] = part[0]
            elif pooling == POOLING["last"] and last:
                out[text] = part[-1]
        pending.clear()
        batch.reset()

    batch.reset()
    ctx.kv_cache_clear()
    seqs = 0
    for text, tokens in enumerate(token_lists):
        if len(tokens) <= n_ub:
            if batch.batch.n_tokens + len(tokens) > n_ub or seqs >= n_seq_max:
                flush()
                ctx.kv_cache_clear()
                seqs = 0
            pending.append((text, add(tokens, seqs, 0), len(tokens), True, True))
            seqs += 1
            continue
        flush()  # a long text goes alone: finish the packed batch first
        ctx.kv_cache_clear()
        seqs = 0
        for pos in range(0, len(tokens), n_ub):
            chunk = tokens[pos:pos + n_ub]
            pending.append((text, add(chunk, 0, pos), len(chunk), pos == 0, pos + n_ub >= len(tokens)))
            flush()
        ctx.kv_cache_clear()
    flush()
    if pooling == POOLING["mean"]:
        out /= np.asarray([len(t) for t in token_lists], dtype=np.float32)[:, None]
    return out
