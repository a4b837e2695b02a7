"""The FastAPI application: OpenAI's chat/completions API, tokenization, health and pool status.

Every request gets its engine from the pool and generates in its own thread
(:func:`velollm.pool.streams.start_stream`), so requests for different models run at once
and requests for one model queue on that engine. Loading, queueing and validation happen before
an answer starts, so their errors get a proper HTTP status; an error mid-stream becomes an
error event. A client that goes away stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from velollm import limits
from velollm import openai_wire as oc
from velollm.engine import Chunk
from velollm.errors import InvalidRequest, ModelNotFound, VeloError
from velollm.pool.streams import AsyncStream, acollect, start_stream
from velollm.server.access import AccessMiddleware, KeyStore, MeteredStream, record_of, require_key, timed_open

log = logging.getLogger(__name__)

#: How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ServerConfig:
    """What a server serves. ``models`` maps the public model id to a pool reference."""

    models: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    allow_any_model: bool = False
    load_options: dict[str, Any] = field(default_factory=dict)
    preload: bool = False
    # per model id (velollm.server.config): load options over ``load_options``, keep_alive seconds
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep_alive: dict[str, float] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> model id
    preload_models: list[str] = field(default_factory=list)  # ids loaded at start (all with ``preload``)
    keys: KeyStore | None = None  # default: ``api_key`` alone
    cors_origins: list[str] = field(default_factory=list)
    log_requests: bool = True

    @classmethod
    def from_cli(cls, models: list[str], **kwargs: Any) -> ServerConfig:
        """``--model REF`` or ``--model ID=REF``; none given: every pulled catalogue model."""
        mapping: dict[str, str] = {}
        for item in models:
            alias, sep, ref = item.partition("=")
            if sep and _ALIAS.match(alias) and ref and not Path(item).exists():
                mapping[alias] = ref
            else:
                mapping[item] = item
        if not mapping:
            mapping = pulled_catalogue_models()
        return cls(models=mapping, **kwargs)

    def options_for(self, model_id: str) -> dict[str, Any]:
        """Load options of one served model: the server-wide ones, then the model's own."""
        return {**self.load_options, **self.model_options.get(model_id, {})}

    def acquire_options(self, model_id: str, keep_alive: float | None = None) -> dict[str, Any]:
        """``pool.acquire`` keywords: load options and keep_alive (the request's, else the model's)."""
        options = self.options_for(model_id)
        keep = keep_alive if keep_alive is not None else self.keep_alive.get(model_id)
        if keep is not None:
            options["keep_alive"] = keep
        return options

    def resolve(self, name: str | None) -> tuple[str, str]:
        """``(public id, pool reference)`` for a request's ``model``."""
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(f"'model' must be a string, got {type(name).__name__}")
        if not name:
            if len(self.models) != 1:  # with several models served, picking one would be a guess
                served = ", ".join(self.models) or "none"
                raise InvalidRequest(f"'model' is required (served: {served})")
            return next(iter(self.models.items()))
        if name in self.models:
            return name, self.models[name]
        if name in self.aliases and self.aliases[name] in self.models:
            return self.aliases[name], self.models[self.aliases[name]]
        for alias, ref in self.models.items():
            if name == ref:
                return alias, ref
        from velollm.models import catalog_entry

        entry = catalog_entry(name)
        if entry is not None:  # a catalogue alias ("qwen0.5b") of a served model
            for alias, ref in self.models.items():
                if entry is catalog_entry(alias) or entry is catalog_entry(ref):
                    return alias, ref
        if self.allow_any_model and not name.startswith("remote:"):
            return name, name
        served = ", ".join(self.models) or "none"
        raise ModelNotFound(f"the model {name!r} does not exist on this server (served: {served})")


def pulled_catalogue_models() -> dict[str, str]:
    from velollm.models import CATALOG, cached_path

    return {name: name for name, entry in CATALOG.items() if cached_path(entry).exists()}


def _pool_status(pool: Any) -> dict[str, Any]:
    status = getattr(pool, "status", None)
    if not callable(status):
        return {"models": [], "note": "this pool does not report its status"}
    result = status()
    if hasattr(result, "model_dump"):
        result = result.model_dump(mode="json")
    return result if isinstance(result, dict) else {"status": result}


def _loaded_models(pool: Any) -> dict[str, dict[str, Any]]:
    """Pool-status entries of ready models, by model reference."""
    try:
        models = _pool_status(pool).get("models") or []
    except Exception:
        return {}
    return {str(m["ref"]): m for m in models if isinstance(m, dict) and m.get("ref") and m.get("state") == "ready"}


class ContainErrors:
    """ASGI middleware: an unexpected exception becomes a logged 500 in OpenAI's envelope, and is not re-raised.

    Starlette's own catch-all re-raises after answering, and uvicorn then closes the connection: the
    next request a client sends on that keep-alive connection was reset.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            log.error("unexpected error answering %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:  # the answer is under way: nothing else can be said on this connection
                raise
            await JSONResponse(oc.error_body(exc), status_code=500)(scope, receive, send)


class _JSONError(Exception):
    """An error answer that is not a velollm error (bad JSON, unknown route)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": None, "code": code}}


def create_app(config: ServerConfig, pool: Any = None) -> FastAPI:
    """The server for ``config``; ``pool`` defaults to the process-wide pool."""
    from velollm.pool import get_pool
    from velollm.server.admin import admin_router
    from velollm.server.metrics import Metrics

    pool = pool or get_pool()
    started = int(time.time())
    keys = config.keys if config.keys is not None else KeyStore(api_key=config.api_key)
    metrics = Metrics(pool, lambda: {ref: model_id for model_id, ref in config.models.items()})
    windows: dict[str, int] = {}  # context length of each reference once an engine has served it

    def check(ref: str) -> Any:
        def run(request: Any, engine: Any) -> None:
            windows[ref] = engine.context_length
            oc.check_for_engine(request, engine)

        return run

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model_id in (list(config.models) if config.preload else config.preload_models):
            lease = await asyncio.to_thread(pool.acquire, config.models[model_id], **config.acquire_options(model_id))
            windows[config.models[model_id]] = lease.engine.context_length
            lease.release()
        reload_on_hangup = (keys.keys_file is not None and hasattr(signal, "SIGHUP")
                            and _on_signal(signal.SIGHUP, keys.reload_logged))
        yield
        if reload_on_hangup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        close = getattr(pool, "close", None)
        if callable(close):
            await asyncio.to_thread(close)

    # the schema is served below, behind the API key like every route but /health
    app = FastAPI(title="velollm", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(ContainErrors)  # innermost: a 500 never closes the keep-alive connection
    if config.cors_origins:  # answers preflights itself: only listed origins get Access-Control-* headers
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id"], max_age=600)
    app.add_middleware(AccessMiddleware, on_done=metrics.observe, log_requests=config.log_requests)

    # --- errors, all in OpenAI's envelope ------------------------------------------------------
    @app.exception_handler(VeloError)
    async def _velo_error(request: Request, exc: VeloError) -> JSONResponse:
        status, _, _ = oc.error_status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(oc.error_body(exc), status_code=status, headers=headers)

    @app.exception_handler(_JSONError)
    async def _json_error(request: Request, exc: _JSONError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(oc.error_body(exc), status_code=500)

    authorized = require_key(keys)
    guarded = [Depends(authorized)]

    async def body_of(request: Request) -> Any:
        """The JSON body, after the media type, size, nesting and Unicode limits (:mod:`velollm.limits`)."""
        try:
            return limits.parse_json_body(await _read_body(request), request.headers.get("content-type"))
        except limits.UnsupportedMediaType as exc:
            raise _JSONError(415, str(exc), code="unsupported_media_type") from None
        except limits.BodyTooLarge as exc:
            raise _JSONError(413, str(exc), code="body_too_large") from None
        except limits.InvalidJSON as exc:
            raise _JSONError(400, str(exc), code="invalid_json") from None

    def no_load_options(parsed: oc.ParsedRequest) -> None:
        if parsed.load_options:
            raise InvalidRequest("'load_options' are set by whoever runs the server, not per request")

    async def open_choices(request: Request, model_id: str, ref: str, requests: list[Any],
                           keep_alive: float | None = None, prompts: int = 1) -> AsyncStream:
        record = record_of(request)
        if record is not None:
            record.model = model_id
        options = config.acquire_options(model_id, keep_alive)
        stream = await start_stream(lambda: timed_open(record, pool, ref, requests, options, check(ref)))
        return MeteredStream(stream, record, prompts)  # type: ignore[return-value]

    # --- OpenAI endpoints ------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Any:
        parsed = oc.parse_chat(await body_of(request))
        no_load_options(parsed)
        model_id, ref = config.resolve(parsed.model)
        stream = await open_choices(request, model_id, ref, parsed.requests(), parsed.keep_alive)
        if parsed.stream:
            return _sse(_chat_events(stream, model_id, parsed.n, parsed.include_usage, parsed.tool_calling))
        completions = await _unless_disconnected(request, acollect(stream, parsed.n, model_id))
        return oc.chat_completion(completions, model_id, tool_calling=parsed.tool_calling)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Any:
        batch = oc.parse_completion(await body_of(request))
        first = batch[0]
        no_load_options(first)
        model_id, ref = config.resolve(first.model)
        requests = [r for parsed in batch for r in parsed.requests()]
        stream = await open_choices(request, model_id, ref, requests, first.keep_alive, prompts=len(batch))
        if first.stream:
            return _sse(_text_events(stream, model_id, len(batch), first.include_usage))
        done = await _unless_disconnected(request, acollect(stream, len(requests), model_id))
        return oc.text_completion(done, model_id, prompts=len(batch))

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> dict[str, Any]:
        loaded = _loaded_models(pool)
        data = []
        for model_id, ref in config.models.items():
            entry: dict[str, Any] = {"id": model_id, "object": "model", "created": started, "owned_by": "velollm",
                                     "ref": ref, "loaded": ref in loaded}
            n_ctx = windows.get(ref)
            if n_ctx:
                entry["max_model_len"] = n_ctx
            data.append(entry)
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def get_model(model_id: str) -> dict[str, Any]:
        found, ref = config.resolve(model_id)
        return {"id": found, "object": "model", "created": started, "owned_by": "velollm", "ref": ref}

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(request: Request) -> dict[str, Any]:
        from velollm import embeddings as emb  # the model is loaded a second time, for embeddings

        parsed = emb.parse_openai(await body_of(request))
        model_id, ref = config.resolve(parsed.model)
        return await asyncio.to_thread(emb.openai_embeddings, parsed, ref, model_id, pool=pool,
                                       **config.options_for(model_id))

    # --- tokenization (vLLM's and llama.cpp's shapes both accepted) --------------------------------
    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        text = next((body[k] for k in ("prompt", "content", "text") if k in body), None)
        if not isinstance(text, str):
            raise InvalidRequest("send the text to tokenize as 'prompt' (or 'content')")
        add_special = bool(body.get("add_special_tokens", body.get("add_special", True)))
        model_id, ref = config.resolve(body.get("model"))

        def run() -> tuple[list[int], int]:
            with pool.engine(ref, **config.acquire_options(model_id)) as engine:
                return engine.tokenize(text, add_special=add_special), engine.context_length

        tokens, n_ctx = await asyncio.to_thread(run)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": n_ctx, "model": model_id}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise InvalidRequest("'tokens' must be a list of integers")
        model_id, ref = config.resolve(body.get("model"))

        def run() -> str:
            with pool.engine(ref, **config.acquire_options(model_id)) as engine:
                return engine.detokenize(tokens)

        text = await asyncio.to_thread(run)
        return {"prompt": text, "content": text, "model": model_id}

    # --- operations ----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(config.models)}

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi_schema() -> dict[str, Any]:
        return app.openapi()

    @app.get("/metrics", dependencies=guarded)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    # load/unload (admin keys), GET /v1/pool
    app.include_router(admin_router(config, pool, user=authorized, admin=require_key(keys, role="admin")))
    return app


def _on_signal(signum: int, handler: Any) -> bool:
    """Run ``handler`` on the event loop when the process gets ``signum`` (only where the loop may
    install signal handlers: the main thread, not Windows)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signum, handler)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


async def _read_body(request: Request, limit: int = limits.MAX_BODY_BYTES) -> bytes:
    """The raw body, refused as soon as it passes ``limit`` bytes (never read whole into memory first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise limits.BodyTooLarge(f"the request body has {int(declared):,} bytes; the limit is {limit:,}")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise limits.BodyTooLarge(f"the request body has more than {limit:,} bytes; the limit is {limit:,}")
        parts.append(part)
    return b"".join(parts)


def _version() -> str:
    from velollm import __version__

    return __version__


# --- streaming --------------------------------------------------------------------------------------
def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _chat_events(stream: AsyncStream, model: str, n: int, include_usage: bool,
                       tool_calling: bool = False) -> AsyncIterator[str]:
    id, created = oc.new_id(), int(time.time())
    choices: dict[int, oc.ChatChoiceStream] = {}  # per choice: tool-call deltas, logprobs
    finals: list[Chunk] = []
    async with stream:
        try:
            async for index, chunk in stream:
                if index not in choices:
                    choices[index] = oc.ChatChoiceStream(id, model, created, index, tool_calling=tool_calling)
                    yield _data(choices[index].start())
                for event in choices[index].feed(chunk):
                    yield _data(event)
                if chunk.finish_reason is not None:
                    finals.append(chunk)
        except Exception as exc:  # the answer has started: the error can only be an event
            yield _stream_error(exc)
            return
    if include_usage:
        yield _data(oc.usage_chunk(id, model, created, _usage(finals, 1)))
    yield "data: [DONE]\n\n"


async def _text_events(stream: AsyncStream, model: str, prompts: int, include_usage: bool) -> AsyncIterator[str]:
    id, created = oc.new_id("cmpl"), int(time.time())
    finals: list[Chunk] = []
    offsets: dict[int, int] = {}  # text offset of each choice's next logprobs token
    async with stream:
        try:
            async for index, chunk in stream:
                if chunk.text or chunk.finish_reason is not None:
                    logprobs = oc.text_logprobs(chunk.logprobs, offsets.get(index, 0))
                    if logprobs is not None:
                        offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
                    yield _data(oc.text_chunk(id, model, created, index, chunk.text, chunk.finish_reason, logprobs))
                if chunk.finish_reason is not None:
                    finals.append(chunk)
        except Exception as exc:
            yield _stream_error(exc)
            return
    if include_usage:
        yield _data(oc.usage_chunk(id, model, created, _usage(finals, prompts), chat=False))
    yield "data: [DONE]\n\n"


def _stream_error(exc: Exception) -> str:
    """The error event of a stream that failed after it started, and the ``[DONE]`` every stream ends with."""
    if not isinstance(exc, VeloError):
        log.error("generation failed mid-stream", exc_info=exc)
    return _data(oc.error_body(exc)) + "data: [DONE]\n\n"


def _usage(finals: list[Chunk], prompts: int) -> dict[str, int]:
    return oc.sum_usage([c.usage for c in finals if c.usage is not None], prompts)


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client goes away first, cancel it (which stops generation)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise _JSONError(499, "client closed the request")
    finally:
        if not task.done():
            task.cancel()
