"""Local embeddings: the llama.cpp engine, velollm.Embedder in DSPy, and the RAG example.

Gemma 3 270M (fast) checks the engine's contract; Qwen2.5-Coder-0.5B, the catalogue model that
embeds best (benchmarks/bench_embeddings.py), runs the retrieval of the RAG example.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import velollm
from velollm.embeddings import embed, load_options
from velollm.engine import Engine, LoadOptions
from velollm.errors import ContextOverflow, InvalidRequest, ModelNotFound, UnsupportedFeature
from velollm.gguf.info import inspect
from velollm.plugins.llamacpp import embed as llamacpp_embed
from velollm.pool import ModelPool

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rag.py"

#: (anchor, paraphrase, unrelated)
TRIPLES = [
    ("The cat sat on the mat.", "A kitten was sitting on the rug.", "The stock market fell sharply today."),
    ("How do I bake bread at home?", "What is a good recipe for homemade bread?", "The rocket launched into orbit."),
    ("The doctor examined the patient.", "The physician checked the sick person.", "The train departs at noon."),
    ("It is raining heavily in London.", "There is a lot of rain in London today.", "She plays the violin well."),
]


@pytest.fixture(scope="module")
def pool() -> Iterator[ModelPool]:
    pool = ModelPool()
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def embedder_engine(gemma_path: Path, pool: ModelPool) -> Iterator[Engine]:
    """Gemma loaded for embeddings through the pool, as velollm.Embedder(..., n_ctx=512) gets it."""
    lease = pool.acquire("gemma3-270m", **load_options(n_ctx=512))
    yield lease.engine
    lease.release()


def cos(a: Any, b: Any) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- the engine -------------------------------------------------------------------------------------
def test_engine_declares_embeddings_and_pools_by_mean_when_the_gguf_says_nothing(
        embedder_engine: Engine, gemma_path: Path) -> None:
    assert embedder_engine.capabilities.embeddings is True
    info = inspect(gemma_path)
    assert info.pooling_type is None  # a generative model declares no pooling...
    assert llamacpp_embed.pooling_value(None, info) == llamacpp_embed.POOLING["mean"]  # ...so velollm means
    # llama.cpp hands out per-token states in bounded micro-batches; velollm pools them
    assert embedder_engine._llama.context_params.pooling_type == llamacpp_embed.POOLING["none"]
    assert embedder_engine._llama.context_params.n_ubatch == llamacpp_embed.EMBED_UBATCH < 512


def test_same_text_gives_the_same_vector(embedder_engine: Engine) -> None:
    first = embedder_engine.embed(["The quick brown fox jumps over the lazy dog."])
    again = embedder_engine.embed(["The quick brown fox jumps over the lazy dog."])
    assert len(first) == 1 and len(first[0]) == 640
    assert np.array_equal(first, again)


def test_similar_sentences_are_closer_than_unrelated_ones(embedder_engine: Engine) -> None:
    vectors = embedder_engine.embed([t for triple in TRIPLES for t in triple])
    for i, (anchor, _, _) in enumerate(TRIPLES):
        a, similar, unrelated = vectors[3 * i: 3 * i + 3]
        assert cos(a, similar) > cos(a, unrelated) + 0.05, anchor


def test_a_batch_equals_one_text_at_a_time(embedder_engine: Engine) -> None:
    texts = [t for triple in TRIPLES[:2] for t in triple]
    batch = np.asarray(embedder_engine.embed(texts))
    single = np.asarray([embedder_engine.embed([t])[0] for t in texts])
    # different batch shapes take different matmul paths in ggml: equal up to float error, not bit for bit
    assert np.allclose(batch, single, atol=2e-2)
    assert min(cos(b, s) for b, s in zip(batch, single, strict=True)) > 0.999


def test_a_text_longer_than_a_micro_batch_pools_exactly_as_llama_cpp_does_in_one(
        embedder_engine: Engine, gemma_path: Path) -> None:
    from llama_cpp import Llama

    texts = ["Tides follow the moon, and the sea rises and falls twice a day. " * 18, "Bees dance."]
    assert len(embedder_engine.tokenize(texts[0])) > llamacpp_embed.EMBED_UBATCH  # spans two micro-batches
    ours = np.asarray(embedder_engine.embed(texts))
    reference = Llama(model_path=str(gemma_path), embedding=True, pooling_type=llamacpp_embed.POOLING["mean"],
                      n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, verbose=False)
    try:
        theirs = np.asarray(reference.embed(texts, normalize=True))
    finally:
        reference.close()
    assert min(cos(a, b) for a, b in zip(ours, theirs, strict=True)) > 0.999  # kernels differ in float rounding


def test_a_model_that_declares_its_pooling_is_pooled_by_llama_cpp(embedder_engine: Engine, gemma_path: Path) -> None:
    # No real embedding model is available here: pretend Gemma's GGUF declares mean pooling.
    from velollm.plugins.llamacpp import LlamaCppEngine

    declared = inspect(gemma_path).model_copy(update={"pooling_type": llamacpp_embed.POOLING["mean"]})
    native = LlamaCppEngine.open(declared, LoadOptions(n_ctx=256, extra={"embedding": True}),
                                 backend="llamacpp-cpu", offload=False)
    try:
        params = native._llama.context_params
        assert params.pooling_type == llamacpp_embed.POOLING["mean"] and params.n_ubatch == 256
        texts = [t for triple in TRIPLES[:2] for t in triple]
        ours, theirs = embedder_engine.embed(texts), native.embed(texts)
        assert min(cos(a, b) for a, b in zip(ours, theirs, strict=True)) > 0.999
    finally:
        native.close()


def test_normalisation_is_an_option(embedder_engine: Engine) -> None:
    unit = np.asarray(embedder_engine.embed(["Tides follow the moon."]))[0]
    raw = np.asarray(embedder_engine.embed(["Tides follow the moon."], normalize=False))[0]
    assert np.linalg.norm(unit) == pytest.approx(1.0, abs=1e-5)
    assert abs(np.linalg.norm(raw) - 1.0) > 0.1
    assert cos(unit, raw) == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs_get_clear_errors(embedder_engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        embedder_engine.embed([])
    with pytest.raises(InvalidRequest, match="text 1 is an empty string"):
        embedder_engine.embed(["fine", ""])
    with pytest.raises(InvalidRequest, match="list of strings"):
        embedder_engine.embed("a bare string")
    with pytest.raises(InvalidRequest, match="text 0 is a int"):
        embedder_engine.embed([3])
    long_text = "lorem ipsum dolor sit amet " * 200
    with pytest.raises(ContextOverflow, match=r"text 1 has \d+ tokens.*at most 512"):
        embedder_engine.embed(["short", long_text])


def test_truncation_embeds_the_first_n_ctx_tokens(gemma_path: Path) -> None:
    from velollm.plugins.llamacpp import LlamaCppBackend

    tiny = LlamaCppBackend("cpu").load(gemma_path, LoadOptions(n_ctx=32, extra={"embedding": True}))
    try:
        limit = tiny.context_length  # llama.cpp rounds a context up (to 256 here)
        long_text = "lorem ipsum dolor sit amet " * (limit // 4)
        tokens = tiny.tokenize(long_text)
        assert len(tokens) > limit
        with pytest.raises(ContextOverflow, match=f"at most {limit}"):
            tiny.embed([long_text])
        head_text = tiny.detokenize(tokens[1:limit])
        assert tiny.tokenize(head_text) == tokens[:limit]  # the same tokens: BOS + the first limit-1 of the text
        cut, head = tiny.embed([long_text, head_text], truncate=True)
        assert cos(cut, head) > 0.999
    finally:
        tiny.close()


def test_a_generating_engine_refuses_to_embed(gemma_engine: Engine) -> None:
    assert gemma_engine.capabilities.embeddings is False
    with pytest.raises(UnsupportedFeature, match="embedding"):
        gemma_engine.embed(["hello"])


def test_poolings_that_give_no_single_vector_are_refused(gemma_path: Path) -> None:
    info = inspect(gemma_path)
    assert llamacpp_embed.pooling_value("last", info) == 3
    with pytest.raises(UnsupportedFeature, match="rank"):
        llamacpp_embed.pooling_value("rank", info)
    with pytest.raises(InvalidRequest, match="unknown pooling"):
        llamacpp_embed.pooling_value("median", info)


# --- through the pool: velollm.embed, velollm.Embedder, DSPy ---------------------------------------------
def test_embed_counts_tokens_and_reuses_the_pooled_engine(pool: ModelPool, embedder_engine: Engine) -> None:
    texts = ["The cat sat on the mat.", "Bananas are yellow."]
    vectors, usage = embed("gemma3-270m", texts, pool=pool, n_ctx=512)
    assert usage.prompt_tokens == sum(len(embedder_engine.tokenize(t)) for t in texts)
    assert np.allclose(vectors, embedder_engine.embed(texts), atol=2e-2)
    embed("gemma3-270m", ["again"], pool=pool, n_ctx=512)
    assert pool.status().loads == 1
    with pytest.raises(InvalidRequest, match="empty"):
        embed("gemma3-270m", [], pool=pool)


def test_embedder_works_with_dspy_embedder_and_retriever(pool: ModelPool) -> None:
    import dspy

    local = velollm.Embedder("gemma3-270m", pool=pool, n_ctx=512)
    wrapped = dspy.Embedder(local, caching=False)
    matrix = wrapped(["one text", "another text", "a third"])
    assert matrix.shape == (3, 640) and matrix.dtype == np.float32
    assert wrapped("just one").shape == (640,)
    corpus = ["Paris is the capital of France.", "Bananas are a yellow fruit rich in potassium.",
              "Python is a programming language for writing software."]
    retriever = dspy.retrievers.Embeddings(corpus=corpus, embedder=local, k=1)
    assert retriever("Which city is the capital of France?").passages == [corpus[0]]
    assert retriever("Which language should I learn to write software?").indices == [2]


def test_embedders_with_different_settings_get_different_dspy_cache_keys(pool: ModelPool) -> None:
    import dspy

    mean = velollm.Embedder("gemma3-270m", pool=pool)
    last = velollm.Embedder("gemma3-270m", pool=pool, pooling="last")
    same = velollm.Embedder("gemma3-270m", pool=pool)
    key = dspy.cache.cache_key
    assert key({"model": mean, "batch_inputs": ["x"]}) != key({"model": last, "batch_inputs": ["x"]})
    assert key({"model": mean, "batch_inputs": ["x"]}) == key({"model": same, "batch_inputs": ["x"]})
    with pytest.raises(ModelNotFound):
        velollm.Embedder("no-such-model-anywhere")


# --- the RAG example ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rag_example() -> Any:
    spec = importlib.util.spec_from_file_location("rag_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rag_example"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rag_retriever(rag_example: Any, qwen_path: Path, pool: ModelPool) -> Any:
    return rag_example.build_retriever(rag_example.load_documents(), pool=pool, n_ctx=512)


def test_rag_example_retrieves_the_right_document(rag_example: Any, rag_retriever: Any) -> None:
    names = [p.stem for p in sorted(rag_example.DOCS.glob("*.md"))]
    questions = {
        "How long can I keep a borrowed drill?": "tool_library",
        "How far do runners go in a marathon?": "marathon",
        "How do bees tell each other where flowers are?": "honeybees",
        "Why don't my Python threads use all CPU cores?": "python_gil",
        "At what temperature should I bake my loaf?": "sourdough",
        "Which Italian mountain erupts frequently?": "etna",
        "Why does the sea level rise and fall twice a day?": "tides",
    }
    for question, want in questions.items():
        assert names[rag_retriever(question).indices[0]] == want, question


def test_rag_example_answers_from_the_retrieved_document(rag_example: Any, rag_retriever: Any) -> None:
    import dspy

    rag = rag_example.RAG(rag_retriever)
    lm = velollm.LM(rag_example.GENERATOR, max_tokens=48, cache=False, n_ctx=2048)
    with dspy.context(lm=lm, adapter=velollm.Adapter()):
        result = rag("How long can I keep a borrowed drill?")
    assert "Harbor Lane" in result.passages[0]
    assert "7" in result.answer or "seven" in result.answer.lower()


# --- the server's POST /v1/embeddings and the litellm provider -------------------------------------------
def test_server_embeddings_endpoint_speaks_openai(pool: ModelPool, embedder_engine: Engine) -> None:
    import base64

    from fastapi.testclient import TestClient

    from velollm.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(models={"gemma": "gemma3-270m"}, load_options={"n_ctx": 512}), pool=pool)
    client = TestClient(app)  # no lifespan: the module's pool stays open
    texts = ["The cat sat on the mat.", "Bananas are yellow."]
    answer = client.post("/v1/embeddings", json={"model": "gemma", "input": texts})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list" and body["model"] == "gemma"
    assert [d["index"] for d in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 640
    assert body["usage"]["prompt_tokens"] == sum(len(embedder_engine.tokenize(t)) for t in texts)
    assert np.allclose([d["embedding"] for d in body["data"]], embedder_engine.embed(texts), atol=2e-2)
    packed = client.post("/v1/embeddings", json={"model": "gemma", "input": texts[0], "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (640,) and cos(vector, body["data"][0]["embedding"]) > 0.9999
    for bad, status in (({"model": "gemma", "input": []}, 400), ({"model": "gemma", "input": [[1, 2, 3]]}, 400),
                        ({"model": "gemma", "input": "x", "dimensions": 64}, 400),
                        ({"model": "nope", "input": "x"}, 404), ({"model": "gemma"}, 400)):
        reply = client.post("/v1/embeddings", json=bad)
        assert reply.status_code == status, (bad, reply.text)
        assert reply.json()["error"]["message"]


def test_litellm_embedding_and_dspy_embedder_by_name(pool: ModelPool) -> None:
    import dspy
    import litellm

    from velollm.adapters.litellm.provider import register_litellm

    register_litellm(pool)
    try:
        response = litellm.embedding(model="velollm/gemma3-270m", input=["The cat sat on the mat.", "Bananas."])
        assert len(response.data) == 2 and len(response.data[0]["embedding"]) == 640
        assert response.usage.prompt_tokens > 0
        by_name = dspy.Embedder("velollm/gemma3-270m", caching=False)(["The cat sat on the mat."])
        assert by_name.shape == (1, 640)
        assert cos(by_name[0], response.data[0]["embedding"]) > 0.999
        with pytest.raises(litellm.BadRequestError, match="empty"):
            litellm.embedding(model="velollm/gemma3-270m", input=[])
    finally:
        register_litellm(None)
