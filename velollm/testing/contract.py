"""``BackendContract``: the contract rules as a pytest class a backend plugin subclasses.

Subclass it in your plugin's tests and give it your backend (and, if Gemma 270M is not a model
your backend runs, a model file)::

    import pytest
    from velollm.testing import BackendContract

    class TestMyBackend(BackendContract):
        @pytest.fixture(scope="class")
        @classmethod
        def backend(cls):
            return MyBackend()

Every rule of :data:`velollm.testing.rules.RULES` becomes one test. The fixtures are class-scoped
(one engine serves the rules): override them as above, ``scope="class"`` over ``@classmethod``.
Other fixtures to override: ``model_file`` (a path to a model your backend runs) and
``load_options`` (default ``LoadOptions(n_ctx=512, n_threads=1)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from velollm.engine import Backend, LoadOptions
from velollm.testing.rules import RULES, RuleSkipped, Subject

#: The model the kit loads unless a subclass overrides ``model_file`` (small, pulled once per machine).
DEFAULT_MODEL = "gemma3-270m"


def _run(name: str, subject: Subject) -> None:
    try:
        RULES[name](subject)
    except RuleSkipped as exc:
        pytest.skip(str(exc))


class BackendContract:
    """The standard tests of a velollm backend; subclass with a ``backend`` fixture."""

    #: catalogue name of the model ``model_file`` pulls by default
    model: str = DEFAULT_MODEL
    #: the longest a hang detector waits (a stuck engine, not a speed target)
    timeout_s: float = 120.0

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls) -> Backend:
        raise NotImplementedError("subclass BackendContract and define a class-scoped `backend` fixture")

    @pytest.fixture(scope="class")
    @classmethod
    def model_file(cls) -> Path:
        """A real model file the backend can run: :attr:`model`, pulled into the velollm cache."""
        from velollm.models import pull

        return pull(cls.model)

    @pytest.fixture(scope="class")
    @classmethod
    def load_options(cls) -> LoadOptions:
        # one thread: the rules check behaviour, not speed, and spinning worker threads crawl on a busy CI machine
        return LoadOptions(n_ctx=512, n_threads=1)

    @pytest.fixture(scope="class")
    @classmethod
    def contract_subject(cls, backend: Backend, model_file: Path, load_options: LoadOptions,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Subject]:
        subject = Subject(backend, Path(model_file), load_options, workdir=tmp_path_factory.mktemp("contract"),
                          timeout_s=cls.timeout_s)
        yield subject
        problem = subject.close()
        if problem:
            pytest.fail(f"closing the engine after the contract rules: {problem}")

    def test_load(self, contract_subject: Subject) -> None:
        _run("load", contract_subject)

    def test_generate(self, contract_subject: Subject) -> None:
        _run("generate", contract_subject)

    def test_stream(self, contract_subject: Subject) -> None:
        _run("stream", contract_subject)

    def test_stop(self, contract_subject: Subject) -> None:
        _run("stop", contract_subject)

    def test_utf8(self, contract_subject: Subject) -> None:
        _run("utf8", contract_subject)

    def test_tokenize(self, contract_subject: Subject) -> None:
        _run("tokenize", contract_subject)

    def test_errors(self, contract_subject: Subject) -> None:
        _run("errors", contract_subject)

    def test_capabilities(self, contract_subject: Subject) -> None:
        _run("capabilities", contract_subject)

    def test_optional_members(self, contract_subject: Subject) -> None:
        _run("optional_members", contract_subject)

    def test_close(self, contract_subject: Subject) -> None:
        _run("close", contract_subject)

    def test_cancellation(self, contract_subject: Subject) -> None:
        _run("cancellation", contract_subject)
