"""How ``velollm serve`` maps the model names clients send to pool references (no model needed)."""

from __future__ import annotations

import pytest

from velollm.errors import InvalidRequest, ModelNotFound
from velollm.server.app import ServerConfig
from velollm.server.plugin import _is_loopback


def test_ids_references_and_catalogue_aliases_resolve() -> None:
    config = ServerConfig.from_cli(["qwen=qwen2.5-coder-0.5b-instruct", "gemma3-270m"])
    assert config.models == {"qwen": "qwen2.5-coder-0.5b-instruct", "gemma3-270m": "gemma3-270m"}
    assert config.resolve("qwen") == ("qwen", "qwen2.5-coder-0.5b-instruct")
    assert config.resolve("qwen2.5-coder-0.5b-instruct") == ("qwen", "qwen2.5-coder-0.5b-instruct")
    assert config.resolve("qwen0.5b") == ("qwen", "qwen2.5-coder-0.5b-instruct")
    with pytest.raises(InvalidRequest, match=r"'model' is required \(served: qwen, gemma3-270m\)"):
        config.resolve(None)  # with several models served, picking one would be a guess
    assert ServerConfig(models={"g": "gemma3-270m"}).resolve(None) == ("g", "gemma3-270m")  # the only one
    with pytest.raises(InvalidRequest, match="'model' must be a string"):
        config.resolve(True)  # type: ignore[arg-type]
    with pytest.raises(ModelNotFound, match="served: qwen, gemma3-270m"):
        config.resolve("qwen1.5b")


def test_clients_cannot_pick_arbitrary_models_unless_allowed() -> None:
    strict = ServerConfig(models={"a": "gemma3-270m"})
    with pytest.raises(ModelNotFound):
        strict.resolve("/etc/passwd.gguf")
    loose = ServerConfig(models={"a": "gemma3-270m"}, allow_any_model=True)
    assert loose.resolve("/models/x.gguf") == ("/models/x.gguf", "/models/x.gguf")
    with pytest.raises(ModelNotFound):  # never an address chosen by a client
        loose.resolve("remote:http://127.0.0.1:9/v1#x")
    with pytest.raises(InvalidRequest):
        ServerConfig(models={}).resolve(None)


def test_remote_references_can_be_served_under_an_id() -> None:
    config = ServerConfig.from_cli(["big=remote:http://127.0.0.1:8001/v1#Qwen/Qwen2.5-7B"])
    assert config.resolve("big") == ("big", "remote:http://127.0.0.1:8001/v1#Qwen/Qwen2.5-7B")


def test_loopback_detection() -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("example.org")


def test_serve_refuses_references_nobody_understands() -> None:
    from velollm.server.plugin import _check_refs

    _check_refs({"q": "qwen0.5b", "r": "remote:http://127.0.0.1:8000/v1#q"})
    with pytest.raises(ModelNotFound, match="nonsense"):
        _check_refs({"x": "nonsense"})
    with pytest.raises(ModelNotFound, match="nothing to serve"):
        _check_refs({})
