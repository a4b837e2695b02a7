"""The ``remote`` backend: an Engine that forwards to any OpenAI-compatible server.

velollm does not build its own cluster: to scale beyond one machine, point a model reference at
an existing engine (vLLM, llama.cpp's llama-server, Ollama, another ``velollm serve``)::

    remote:http://gpu-box:8000/v1#Qwen/Qwen2.5-Coder-7B-Instruct   # URL, '#' remote model name
    remote:http://127.0.0.1:8000/v1                                  # the server's only model
    remote:cluster#qwen                                             # an entry of remotes.json

Named entries live in ``$VELOLLM_REMOTES`` (a JSON file) or ``$VELOLLM_HOME/remotes.json``::

    {"cluster": {"base_url": "http://vllm:8000/v1", "api_key_env": "VLLM_KEY",
                 "models": {"qwen": "Qwen/Qwen2.5-Coder-7B-Instruct"}, "retries": 3}}

The reference goes through the pool like any other, so ``velollm.LM``, the litellm provider
(``velollm/remote:...``) and the server use it unchanged. Requests and answers are translated
by the shared mapping in :mod:`velollm.openai_wire`; transient failures (connection
errors, 429, 5xx) are retried with tenacity before the first byte of an answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from velollm import openai_wire
from velollm.engine import Capabilities, Chunk, Completion, GenerationRequest, LoadOptions, Timings, Usage
from velollm.errors import (
    GenerationError,
    InvalidModelFile,
    ModelNotFound,
    RemoteUnavailable,
    UnsupportedFeature,
    VeloError,
    validated,
)
from velollm.hookspecs import hookimpl

if TYPE_CHECKING:
    import httpx

    from velollm.hardware import HardwareProbe
    from velollm.models import Progress, ResolvedModel

PREFIX = "remote:"
#: API key used when neither the config entry nor its ``api_key_env`` gives one.
ENV_API_KEY = "VELOLLM_REMOTE_API_KEY"
#: Path of the JSON file with named remote entries.
ENV_CONFIG = "VELOLLM_REMOTES"


class RemoteSpec(BaseModel):
    """Where a remote model lives and how to talk to it."""

    model_config = ConfigDict(extra="forbid")

    base_url: str
    model: str | None = None
    api_key: str | None = Field(default=None, repr=False)
    api_key_env: str | None = None
    timeout_s: float = Field(default=600.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    retries: int = Field(default=3, ge=0, le=20)
    json_schema: bool = True
    grammar: bool = False
    sampling_extras: bool = True
    context_length: int | None = Field(default=None, ge=1)
    max_concurrency: int = Field(default=8, ge=1)
    headers: dict[str, str] = Field(default_factory=dict)
    models: dict[str, str] = Field(default_factory=dict)

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        return os.environ.get(ENV_API_KEY) or None

    @property
    def root_url(self) -> str:
        """The server root (``/tokenize`` lives beside ``/v1``, not under it)."""
        base = self.base_url.rstrip("/")
        return base[: -len("/v1")] if base.endswith("/v1") else base


def config_path() -> Path:
    from velollm.models import velollm_home

    return Path(os.environ.get(ENV_CONFIG) or velollm_home() / "remotes.json").expanduser()


def load_config(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Named remote entries; a missing file is an empty config, a broken one an error."""
    path = path or config_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFound(f"cannot read the remote config {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ModelNotFound(f"{path} must map names to objects like {{\"base_url\": ...}}")
    return data


def parse_ref(ref: str, overrides: dict[str, Any] | None = None) -> RemoteSpec:
    """``remote:URL[#model]`` or ``remote:NAME[#model]`` -> :class:`RemoteSpec`."""
    if not ref.startswith(PREFIX):
        raise ModelNotFound(f"{ref!r} is not a remote reference (expected {PREFIX}URL#model)")
    target, _, model = ref[len(PREFIX):].partition("#")
    target, model = target.strip(), model.strip() or None
    if not target:
        raise ModelNotFound(f"bad remote reference {ref!r}: expected {PREFIX}http://host:port/v1#model")
    if target.startswith(("http://", "https://")):
        fields: dict[str, Any] = {"base_url": target}
    else:
        config = load_config()
        if target not in config:
            known = ", ".join(sorted(config)) or "none"
            raise ModelNotFound(f"no remote named {target!r} in {config_path()} (known: {known}); "
                                f"or use {PREFIX}http://host:port/v1#model")
        fields = dict(config[target])
    fields.update(overrides or {})
    spec = validated(RemoteSpec, fields, f"remote settings for {ref!r}", ModelNotFound)
    if model is not None:
        spec = spec.model_copy(update={"model": spec.models.get(model, model)})
    _check_url(spec.base_url, ref)
    return spec


def _check_url(url: str, ref: str) -> None:
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ModelNotFound(f"bad URL in remote reference {ref!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ModelNotFound(f"bad URL in remote reference {ref!r}: need http(s)://host[:port]/path")


# --- the model source --------------------------------------------------------------------------
class RemoteSource:
    """Resolves ``remote:`` references to a small spec file that the ``remote`` backend loads.

    Asked before the path source (a URL contains '/'). The file holds only the reference, never
    an API key: keys are looked up when the engine connects.
    """

    name = "remote"
    priority = 5

    def handles(self, ref: str) -> bool:
        return ref.startswith(PREFIX)

    def resolve(self, ref: str, *, download: bool = True, progress: Progress | None = None) -> ResolvedModel:
        from velollm.models import ResolvedModel, velollm_home

        spec = parse_ref(ref)
        folder = velollm_home() / "remote"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{hashlib.sha256(ref.encode()).hexdigest()[:16]}.json"
        content = json.dumps({"ref": ref, "base_url": spec.base_url, "model": spec.model}, indent=1)
        if not path.exists() or path.read_text() != content:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(content)
            os.replace(tmp, path)
        name = spec.model or spec.base_url
        return ResolvedModel(ref=ref, path=path, source=self.name, name=name, backend=RemoteBackend.name)


# --- the backend -------------------------------------------------------------------------------
class RemoteBackend:
    """Loads a spec file written by :class:`RemoteSource` into a connected :class:`RemoteEngine`."""

    name = "remote"
    auto_select = False  # a remote server is used only when a model reference names it

    def available(self, probe: HardwareProbe) -> tuple[bool, str]:
        try:
            import httpx  # noqa: F401
        except ImportError:  # pragma: no cover - a declared dependency
            return False, "httpx is not installed"
        return True, "forwards requests to an OpenAI-compatible server over HTTP"

    def load(self, model_file: Path, options: LoadOptions) -> RemoteEngine:
        try:
            ref = json.loads(Path(model_file).read_text())["ref"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidModelFile(f"{model_file} is not a remote model spec ({type(exc).__name__}: {exc})") from None
        known = set(RemoteSpec.model_fields)
        overrides = {k: v for k, v in options.extra.items() if k in known}
        unknown = sorted(set(options.extra) - known)
        if unknown:
            raise InvalidModelFile(f"unknown remote options: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return RemoteEngine(parse_ref(ref, overrides), model_path=Path(model_file))


class RemoteEngine:
    """An Engine whose model runs on an OpenAI-compatible server.

    Many requests may be in flight at once (the server batches them); ``max_concurrency`` says
    how many the pool should let through.
    """

    backend = "remote"

    def __init__(self, spec: RemoteSpec, *, model_path: Path | None = None, client: httpx.Client | None = None,
                 connect: bool = True) -> None:
        import httpx

        self.spec = spec
        self.model_path = model_path or Path(spec.base_url)
        self.max_concurrency = spec.max_concurrency
        self.request_extras = None  # GenerationRequest.extra goes into the request body: the server decides
        headers = dict(spec.headers)
        key = spec.resolved_api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = client or httpx.Client(
            base_url=spec.base_url.rstrip("/") + "/", headers=headers,
            timeout=httpx.Timeout(spec.timeout_s, connect=spec.connect_timeout_s),
        )
        self.capabilities = Capabilities(chat=True, streaming=True, grammar=spec.grammar, json_schema=spec.json_schema,
                                         tokenize=True)
        self.model = spec.model or ""
        self.name = self.model
        self.served_models: list[dict[str, Any]] = []
        self._context_length = spec.context_length
        self._closed = False
        if connect:
            self._connect()

    # --- HTTP ------------------------------------------------------------------------------
    def _retrying(self) -> Any:
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

        return Retrying(stop=stop_after_attempt(self.spec.retries + 1), reraise=True,
                        wait=wait_exponential(multiplier=0.2, max=4.0) + wait_random(0, 0.2),
                        retry=retry_if_exception(lambda e: isinstance(e, VeloError) and e.retryable))

    def _where(self) -> str:
        return self.spec.base_url

    def _transport_error(self, exc: Exception) -> RemoteUnavailable:
        import httpx

        what = "timed out" if isinstance(exc, httpx.TimeoutException) else "cannot be reached"
        return RemoteUnavailable(f"{self._where()} {what}: {type(exc).__name__}: {exc}")

    @staticmethod
    def _body(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            return response.text

    def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request with retries; an error answer becomes the matching velollm error."""
        import httpx

        self._ensure_open()
        for attempt in self._retrying():
            with attempt:
                try:
                    response = self._client.request(method, url, json=body)
                except httpx.TransportError as exc:
                    raise self._transport_error(exc) from None
                if response.status_code >= 400:
                    raise openai_wire.error_from_response(response.status_code, self._body(response))
                data = self._body(response)
                if isinstance(data, str):
                    raise GenerationError(f"{self._where()} answered with non-JSON: {data[:200]!r}")
                return data
        raise AssertionError("unreachable")  # pragma: no cover

    def _open_stream(self, url: str, body: dict[str, Any]) -> httpx.Response:
        """Send a streaming request; retried until the server starts answering, never after."""
        import httpx

        self._ensure_open()
        for attempt in self._retrying():
            with attempt:
                try:
                    request = self._client.build_request("POST", url, json=body)
                    response = self._client.send(request, stream=True)
                except httpx.TransportError as exc:
                    raise self._transport_error(exc) from None
                if response.status_code >= 400:
                    try:
                        response.read()
                        error = openai_wire.error_from_response(response.status_code, self._body(response))
                    finally:
                        response.close()
                    raise error
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    # --- connecting ------------------------------------------------------------------------
    def _connect(self) -> None:
        """Check the server answers and serves the model; learn its context length."""
        try:
            data = self._call("GET", "models")
        except ModelNotFound:  # a server without /models: trust the reference
            data = None
        models = data.get("data") if isinstance(data, dict) else None
        self.served_models = [m for m in models or [] if isinstance(m, dict) and "id" in m]
        ids = [str(m["id"]) for m in self.served_models]
        if not self.model:
            if not ids:
                raise ModelNotFound(f"{self._where()} lists no models; name one: {PREFIX}{self.spec.base_url}#MODEL")
            self.model = self.name = ids[0]
        elif ids and self.model not in ids:
            raise ModelNotFound(f"{self._where()} does not serve {self.model!r}; it serves: {', '.join(ids)}")
        self._learn_context_length()

    def _learn_context_length(self) -> None:
        for entry in self.served_models:
            if entry.get("id") == self.model:
                for key in ("max_model_len", "context_length", "n_ctx"):
                    value = entry.get(key) or (entry.get("meta") or {}).get(key)
                    if isinstance(value, int) and value > 0:
                        self._context_length = self.spec.context_length or value
                        return

    @property
    def context_length(self) -> int:
        """The remote's window if it says (vLLM and velollm do), else 0 = unknown."""
        return self._context_length or 0

    # --- generation ------------------------------------------------------------------------
    def _body_for(self, request: GenerationRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        if request.grammar is not None and not self.capabilities.grammar:
            raise UnsupportedFeature(f"{self._where()} is not configured for grammars (set grammar: true)")
        if request.json_schema is not None and not self.capabilities.json_schema:
            raise UnsupportedFeature(f"{self._where()} is not configured for JSON schemas")
        if request.json_schema is not None and "x-guidance" in request.json_schema:
            # llguidance's layout options (velollm.Adapter sends them to velollm's engines) are not JSON
            # Schema: a strict server (OpenAI's) refuses unknown keywords
            request = request.model_copy(update={"json_schema": {
                k: v for k, v in request.json_schema.items() if k != "x-guidance"}})
        for name, asked in (("logprobs", request.logprobs), ("tools", request.tools), ("suffix", request.suffix)):
            if asked:  # not passed on (yet): refused rather than silently dropped
                raise UnsupportedFeature(f"the remote backend does not pass '{name}' on to {self._where()}")
        return openai_wire.openai_body(request, self.model, sampling_extras=self.spec.sampling_extras, stream=stream)

    def generate(self, request: GenerationRequest) -> Completion:
        url, body = self._body_for(request, stream=False)
        start = time.perf_counter()
        completion = openai_wire.completion_from_openai(self._call("POST", url, body))
        end = time.perf_counter()
        completion.timings = Timings.measure(start, None, end, completion.usage.prompt_tokens,
                                             completion.usage.completion_tokens, remote=True)
        completion.model = completion.model or self.model
        return completion

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        """Opens the request now (errors surface here); chunks arrive as the server sends them."""
        url, body = self._body_for(request, stream=True)
        start = time.perf_counter()
        return _SSEChunks(self._open_stream(url, body), start, self._where())

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        body = {"model": self.model, "prompt": text, "content": text, "add_special_tokens": add_special,
                "add_special": add_special}
        data = self._call_root("tokenize", body)
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list):
            raise GenerationError(f"{self._where()}/tokenize answered without 'tokens'")
        return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]

    def detokenize(self, tokens: list[int]) -> str:
        data = self._call_root("detokenize", {"model": self.model, "tokens": list(tokens)})
        text = (data.get("prompt") if "prompt" in data else data.get("content")) if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise GenerationError(f"{self._where()}/detokenize answered without text")
        return text

    def _call_root(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return self._call("POST", f"{self.spec.root_url}/{path}", body)
        except ModelNotFound as exc:  # the model was checked at connect: a 404 here is a missing endpoint
            raise UnsupportedFeature(f"{self.spec.root_url} has no /{path} endpoint ({exc})") from None

    # --- lifetime --------------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._closed:
            from velollm.errors import EngineClosed

            raise EngineClosed(f"remote engine for {self.model or self._where()} is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    def __repr__(self) -> str:
        return f"<RemoteEngine {self.model} at {self.spec.base_url}>"


class _SSEChunks:
    """Server-sent events of an OpenAI stream -> :class:`Chunk`s; the last one carries usage.

    An iterator object rather than a generator, so ``close()`` frees the connection even when
    iteration never started.
    """

    def __init__(self, response: httpx.Response, start: float, where: str) -> None:
        self._response = response
        self._lines = response.iter_lines()
        self._start = start
        self._first: float | None = None
        self._where = where
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._pieces = 0
        self._done = False

    def __iter__(self) -> _SSEChunks:
        return self

    def __next__(self) -> Chunk:
        import httpx

        if self._done:
            raise StopIteration
        try:
            while True:
                event = self._next_event()
                if event is None:
                    return self._final()
                text, finish, usage = openai_wire.chunk_from_openai(event)
                self._finish = finish or self._finish
                self._usage = usage or self._usage
                if text:
                    self._first = self._first or time.perf_counter()
                    self._pieces += 1
                    return Chunk(text=text)
        except httpx.HTTPError as exc:
            self.close()
            raise RemoteUnavailable(f"{self._where} broke off the stream: {type(exc).__name__}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _next_event(self) -> Any:
        """The next ``data:`` payload as JSON, or None at ``[DONE]`` / end of stream."""
        data: list[str] = []
        for line in self._lines:
            if line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif not line.strip() and data:
                break
        if not data:
            return None
        payload = "\n".join(data)
        if payload.strip() == "[DONE]":
            return None
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            raise GenerationError(f"{self._where} sent a malformed stream event: {payload[:200]!r}") from None

    def _final(self) -> Chunk:
        self.close()
        self._done = True
        if self._finish is None:
            raise RemoteUnavailable(f"{self._where} ended the stream without a finish reason")
        usage = self._usage or Usage(completion_tokens=self._pieces)
        end = time.perf_counter()
        timings = Timings.measure(self._start, self._first, end, usage.prompt_tokens, usage.completion_tokens,
                                  remote=True)
        return Chunk(text="", finish_reason="length" if self._finish == "length" else "stop", usage=usage,
                     timings=timings)

    def close(self) -> None:
        self._done = True
        self._response.close()


# --- plugin hooks ------------------------------------------------------------------------------
@hookimpl
def register_backends(register: Any) -> None:
    register(RemoteBackend())


@hookimpl
def register_model_sources(register: Any) -> None:
    register(RemoteSource())
