"""velollm's standard backend tests (the contract kit), run against this plugin's backend.

Every velollm backend plugin should have this file: subclass ``BackendContract``, give it your
backend, and pytest runs each rule of the backend contract (load, generate, stream, stop strings,
UTF-8, tokenizer round trip, cancellation, typed errors, honest capabilities, optional members,
close) on a real model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import velollm
from velollm.testing import BackendContract

# Fixtures around the kit: a real small model (`velollm_model_file`), and a summary line naming the plugin API.
pytest_plugins = ["velollm.testing.plugin"]


class TestDiskcacheContract(BackendContract):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
        with pytest.MonkeyPatch.context() as env:  # a cache of its own for the whole class
            env.setenv("VELOLLM_DISKCACHE_PATH", str(tmp_path_factory.mktemp("diskcache") / "cache.sqlite"))
            yield velollm.get_host().backend("cached-llamacpp-cpu")

    @pytest.fixture(scope="class")
    @classmethod
    def model_file(cls, velollm_model_file: Any) -> Any:
        return velollm_model_file  # Gemma 270M unless VELOLLM_CONTRACT_MODEL names another catalogue model
