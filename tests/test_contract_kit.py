"""The contract kit (velollm.testing) passes on the real backends and catches each broken rule alone.

The built-in llama.cpp and native backends run the whole kit on Gemma 270M, exactly as a plugin
would. Then a backend that wraps the real llama.cpp engine and breaks one promise at a time must
fail exactly the rule for that promise, and the faithful wrapper none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from velollm.engine import PLUGIN_API_VERSION, Chunk, Completion, GenerationRequest, LoadOptions, Usage
from velollm.errors import UnsupportedFeature
from velollm.plugins.llamacpp import LlamaCppBackend
from velollm.plugins.native import NativeBackend
from velollm.testing import RULES, BackendContract, Subject, run_rules

pytest_plugins = ["pytester"]

OPTIONS = LoadOptions(n_ctx=512, n_threads=1)  # one thread: llama.cpp's spinning workers starve on a busy machine


class TestLlamaCppCpuContract(BackendContract):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls) -> LlamaCppBackend:
        return LlamaCppBackend("cpu")

    @pytest.fixture(scope="class")
    @classmethod
    def load_options(cls) -> LoadOptions:
        return OPTIONS


@pytest.mark.slow  # numpy decoding: about a minute on a busy 2-core machine
class TestNativeContract(BackendContract):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls) -> NativeBackend:
        return NativeBackend()

    @pytest.fixture(scope="class")
    @classmethod
    def load_options(cls) -> LoadOptions:
        return OPTIONS


def test_every_rule_is_a_test_of_the_class() -> None:
    tests = {name.removeprefix("test_") for name in dir(BackendContract) if name.startswith("test_")}
    assert tests == set(RULES)


# --- a deliberately broken backend: a real llama.cpp engine with one promise broken ---------------
class BrokenEngine:
    """Wraps a real engine faithfully, except for the one rule named by ``broken``."""

    def __init__(self, inner: Any, broken: str | None) -> None:
        self.inner, self.broken = inner, broken
        self.name = inner.name
        self.model_path = str(inner.model_path) if broken == "load" else inner.model_path
        caps = inner.capabilities.model_copy()
        if broken == "capabilities":  # denies grammars, yet runs them
            caps.grammar = caps.json_schema = False
        self.capabilities = caps
        if broken == "optional_members":
            self.max_concurrency = 0
        self.leaked: list[Iterator[Chunk]] = []

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    def _request(self, request: GenerationRequest) -> GenerationRequest:
        return request.model_copy(update={"stop": []}) if self.broken == "stop" else request

    def generate(self, request: GenerationRequest) -> Completion:
        completion = self.inner.generate(self._request(request))
        if self.broken == "generate":  # made-up usage
            completion = completion.model_copy(update={"usage": Usage()})
        return completion

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        chunks = self.inner.stream(self._request(request))
        if self.broken == "stream":
            return self._no_final_usage(chunks)
        if self.broken == "utf8":
            return self._byte_chunks(chunks)
        if self.broken == "cancellation":
            return self._leaky(chunks)
        return chunks

    @staticmethod
    def _no_final_usage(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            yield chunk.model_copy(update={"usage": None})

    @staticmethod
    def _byte_chunks(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """Re-chunks every two bytes, decoding each piece alone: splits multi-byte characters."""
        for chunk in chunks:
            data = chunk.text.encode("utf-8")
            pieces = [data[i:i + 2] for i in range(0, len(data), 2)] or [b""]
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                yield Chunk(text=piece.decode("utf-8", errors="replace"), finish_reason=chunk.finish_reason
                            if last else None, usage=chunk.usage if last else None,
                            timings=chunk.timings if last else None)

    def _leaky(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """Keeps the inner stream alive when the consumer walks away: the engine stays locked."""
        self.leaked.append(chunks)
        for chunk in chunks:  # noqa: UP028 - `yield from` would close the inner stream: the point is not to
            yield chunk

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.inner.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        if self.broken == "errors" and any(t < 0 or t >= 2**20 for t in tokens):
            raise IndexError("list index out of range")  # a bare exception for a bad request
        text = self.inner.detokenize(tokens)
        return text.encode("utf-8").decode("latin-1") if self.broken == "tokenize" else text

    def close(self) -> None:
        if self.broken != "close":  # the broken one "forgets" to close
            self.inner.close()

    def repair(self) -> None:
        """Let go of what a broken rule held, so the test can clean up."""
        for chunks in self.leaked:
            chunks.close()  # type: ignore[attr-defined]
        self.inner.close()


class BrokenBackend:
    def __init__(self, broken: str | None) -> None:
        self.inner = LlamaCppBackend("cpu")
        self.name = f"broken-{broken}"
        self.broken = broken
        self.engines: list[BrokenEngine] = []

    def available(self, probe: Any) -> tuple[bool, str]:
        return self.inner.available(probe)

    def load(self, model_file: Path, options: LoadOptions) -> BrokenEngine:
        engine = BrokenEngine(self.inner.load(model_file, options), self.broken)
        self.engines.append(engine)
        return engine


@pytest.mark.slow  # 12 variants x 11 rules; the broken cancellation waits out its 30 s hang detector
@pytest.mark.parametrize("broken", [None, *RULES])
def test_a_backend_breaking_one_rule_fails_that_rule_alone(broken: str | None, gemma_path: Path,
                                                           tmp_path: Path) -> None:
    backend = BrokenBackend(broken)
    # the hang detector only fires for the broken cancellation; the others finish in seconds
    subject = Subject(backend, gemma_path, OPTIONS, workdir=tmp_path, timeout_s=30 if broken else 120)
    try:
        results = run_rules(subject)
    finally:
        for engine in backend.engines:
            engine.repair()
    assert list(results) == list(RULES)
    failed = {name: r.message for name, r in results.items() if r.outcome == "failed"}
    assert set(failed) == ({broken} if broken else set()), failed
    assert all(r.outcome == "passed" for name, r in results.items() if name != broken)



class NoTokenizerEngine(BrokenEngine):
    """An honest engine without a public tokenizer: declares tokenize=False and refuses it."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner, None)
        self.capabilities = self.capabilities.model_copy(update={"tokenize": False})

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        raise UnsupportedFeature("this engine has no public tokenizer")


class NoTokenizerBackend(BrokenBackend):
    def load(self, model_file: Path, options: LoadOptions) -> BrokenEngine:
        engine = NoTokenizerEngine(self.inner.load(model_file, options))
        self.engines.append(engine)
        return engine


def test_a_rule_that_does_not_apply_is_skipped_and_the_denial_checked(gemma_path: Path, tmp_path: Path) -> None:
    backend = NoTokenizerBackend(None)
    subject = Subject(backend, gemma_path, OPTIONS, workdir=tmp_path)
    try:
        results = run_rules(subject, ["tokenize", "capabilities", "close"])
    finally:
        for engine in backend.engines:
            engine.repair()
    assert {name: r.outcome for name, r in results.items()} == {
        "tokenize": "skipped", "capabilities": "passed", "close": "passed"}, results
    assert "tokenize=False" in results["tokenize"].message


def test_the_kit_runs_as_a_pytest_plugin(pytester: pytest.Pytester, gemma_path: Path) -> None:
    """What a plugin's own test file does: the plugin module, a class-scoped classmethod fixture, the rules."""
    pytester.makepyfile(test_mine="""
        import pytest
        from velollm.plugins.llamacpp import LlamaCppBackend
        from velollm.testing import BackendContract

        pytest_plugins = ["velollm.testing.plugin"]

        class TestMine(BackendContract):
            @pytest.fixture(scope="class")
            @classmethod
            def backend(cls):
                return LlamaCppBackend("cpu")

            @pytest.fixture(scope="class")
            @classmethod
            def model_file(cls, velollm_model_file):
                return velollm_model_file
    """)
    result = pytester.runpytest_subprocess("-k", "load or tokenize or optional_members", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"velollm *, plugin API {PLUGIN_API_VERSION} (velollm.testing contract kit)"])


def test_an_embedding_engine_is_held_to_its_embeddings(gemma_path: Path, tmp_path: Path) -> None:
    """capabilities.embeddings true: embed() must give vectors; claiming it without embed() fails the rule."""
    options = OPTIONS.model_copy(update={"extra": {"embedding": True}})
    honest = Subject(LlamaCppBackend("cpu"), gemma_path, options, workdir=tmp_path)
    claiming = Subject(BrokenBackend(None), gemma_path, OPTIONS, workdir=tmp_path)
    try:
        assert honest.engine.capabilities.embeddings
        assert run_rules(honest, ["capabilities"])["capabilities"].outcome == "passed"
        claiming.engine.capabilities.embeddings = True  # the wrapper has no embed()
        result = run_rules(claiming, ["capabilities"])["capabilities"]
        assert result.outcome == "failed" and "no EmbeddingEngine" in result.message
    finally:
        honest.close()
        claiming.close()
