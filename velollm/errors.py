"""One exception tree for everything velollm raises on purpose.

Callers catch :class:`VeloError` to handle any velollm failure; ``retryable`` tells retry
logic (the DSPy adapter, the litellm provider) whether trying again can help.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

M = TypeVar("M")


class VeloError(Exception):
    """Base of every error velollm raises deliberately."""

    retryable: bool = False

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


# --- models and files -------------------------------------------------------------------------
class ModelNotFound(VeloError):
    """A model reference resolves to nothing (unknown name, missing path, not pulled)."""


class ModelSourceError(VeloError):
    """A model source could not deliver a file (offline hub, pip failure)."""


class ChecksumMismatch(ModelSourceError):
    """A downloaded or assembled file does not have the expected sha256."""


class InvalidModelFile(VeloError):
    """A file exists but cannot be used as a model; the message names the real cause."""


class NotAGGUFFile(InvalidModelFile):
    """The file does not start with the GGUF magic."""


class TruncatedModelFile(InvalidModelFile):
    """The GGUF header promises more bytes than the file holds."""


class UnsupportedArchitecture(InvalidModelFile):
    """The chosen backend cannot run this model architecture."""


# --- plugins and backends ---------------------------------------------------------------------
class PluginError(VeloError):
    """A plugin failed to import, register or run a hook."""


class BackendNotFound(VeloError):
    """No registered backend has the requested name."""


class BackendUnavailable(VeloError):
    """The backend is registered but cannot run here (build or device missing)."""


# --- requests and generation ------------------------------------------------------------------
class InvalidRequest(VeloError):
    """The request itself is wrong (bad parameter, empty prompt); retrying cannot help."""


class ContextOverflow(InvalidRequest):
    """The prompt does not fit the model's context window."""


class GrammarError(InvalidRequest):
    """A grammar or JSON schema cannot be compiled into a valid constraint."""


class UnsupportedFeature(InvalidRequest):
    """The engine cannot do what the request asks (tools, grammars on a backend without them)."""


# --- quantization ------------------------------------------------------------------------------
class QuantizeError(VeloError):
    """``velollm quantize`` failed; the message carries llama.cpp's own reason."""


class UnknownQuantType(QuantizeError):
    """The requested quantization type is not one llama.cpp's quantizer can write."""


class RequantizeRefused(QuantizeError):
    """The source cannot be quantized to the asked type: already quantized, or the type needs an importance matrix."""


class OutputExists(QuantizeError):
    """The output file exists and ``--force`` was not given."""


class GenerationError(VeloError):
    """The backend failed while generating; may succeed on a second try."""

    retryable = True


class EngineClosed(VeloError):
    """The engine was closed (unloaded) while a request still referred to it."""


class RemoteUnavailable(GenerationError):
    """A remote server could not be reached or answered with a server error (after retries)."""


class AuthenticationFailed(VeloError):
    """A server refused the credentials (a remote backend's API key, or the key sent to ``velollm serve``)."""


class PermissionDenied(VeloError):
    """The credentials are valid but may not do this (a ``user`` key asking ``velollm serve`` to load a model)."""


class ConfigError(VeloError):
    """A server config or keys file is invalid; the message names the file and line."""


# --- pool ------------------------------------------------------------------------------------
class PoolError(VeloError):
    """Base of pool failures."""


class InsufficientMemory(PoolError):
    """The model does not fit in any memory the machine has; the message gives the numbers."""


class QueueFull(PoolError):
    """Too many requests are already waiting for this engine."""

    retryable = True


class QueueTimeout(PoolError):
    """A request waited longer than its timeout for its turn on an engine."""

    retryable = True


class PoolBusy(QueueTimeout):
    """A load waited too long for models in use to free the pool's memory budget or a ``max_loaded`` slot."""


# --- speculative decoding --------------------------------------------------------------------------
class IncompatibleDraftModel(InvalidRequest):
    """A draft model's vocabulary differs from the main model's, so its tokens would mean other text."""


__all__ = [name for name, value in globals().items() if isinstance(value, type) and issubclass(value, VeloError)]


def invalid_request_from(exc: Any, what: str, error: type[VeloError] | None = None) -> VeloError:
    """A pydantic ``ValidationError`` as one readable typed error: ``invalid <what>: field: problem; ...``."""
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in exc.errors())
    return (error or InvalidRequest)(f"invalid {what}: {problems}")


def validated(model: type[M], data: Mapping[str, Any], what: str, error: type[VeloError] | None = None) -> M:
    """``model(**data)``, with pydantic's ValidationError turned into :func:`invalid_request_from`."""
    from pydantic import ValidationError

    try:
        return model(**data)
    except ValidationError as exc:
        raise invalid_request_from(exc, what, error) from None
