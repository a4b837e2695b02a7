"""Managing a running server: load and unload models over HTTP (admin keys only), and pool status.

``POST /v1/models/{id}/load`` loads a served model with its configured options (its queue and
memory accounting are the pool's, as for any request) and keeps it for its ``keep_alive`` (or the
body's ``{"keep_alive": "10m"}``); ``POST /v1/models/{id}/unload`` frees it now, or answers 409 if
requests are using it. ``GET /v1/pool`` (any key) shows what is loaded, where, how much memory,
queue depth and idle time, by public model id.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from velollm.errors import InvalidRequest
from velollm.server.access import record_of
from velollm.server.config import parse_duration


def pool_status(pool: Any, names: dict[str, str]) -> dict[str, Any]:
    """The pool's status as JSON, each model with its public ``id`` and ``idle_s`` (None while in use)."""
    status = getattr(pool, "status", None)
    if not callable(status):
        return {"models": [], "note": "this pool does not report its status"}
    result = status()
    data = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
    if not isinstance(data, dict):
        return {"status": data}
    now = datetime.now(timezone.utc)
    for model in data.get("models") or []:
        model["id"] = names.get(model.get("ref", ""), model.get("ref"))
        busy = model.get("leases") or model.get("running") or model.get("queued")
        last = model.get("last_used")
        model["idle_s"] = None if busy or not last else round((now - datetime.fromisoformat(last)).total_seconds(), 3)
    return data


async def _keep_alive_from(request: Request) -> float | None:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("the request body must be empty or a JSON object like {\"keep_alive\": \"10m\"}") from None
    if not isinstance(body, dict) or set(body) - {"keep_alive"}:
        raise InvalidRequest("the only setting a load takes is 'keep_alive'")
    try:
        return parse_duration(body.get("keep_alive"))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def admin_router(config: Any, pool: Any, *, user: Callable[..., Any], admin: Callable[..., Any]) -> APIRouter:
    """The routes; ``config`` is the app's :class:`~velollm.server.app.ServerConfig` (``resolve``,
    ``acquire_options``, ``models``), ``user``/``admin`` the key dependencies."""
    router = APIRouter()

    def names() -> dict[str, str]:
        return {ref: model_id for model_id, ref in config.models.items()}

    def entries(ref: str) -> list[dict[str, Any]]:
        from velollm import models

        try:
            path = str(models.resolve(ref, download=False).path)
        except Exception:
            return [m for m in pool_status(pool, names()).get("models", []) if m.get("ref") == ref]
        return [m for m in pool_status(pool, names()).get("models", []) if m.get("path") == path]

    @router.post("/v1/models/{model_id:path}/load", dependencies=[Depends(admin)])
    async def load(model_id: str, request: Request) -> dict[str, Any]:
        keep_alive = await _keep_alive_from(request)
        found, ref = config.resolve(model_id)
        record = record_of(request)
        if record is not None:
            record.model = found
        options = config.acquire_options(found)
        if keep_alive is not None:
            options["keep_alive"] = keep_alive
        started = time.monotonic()
        lease = await asyncio.to_thread(pool.acquire, ref, **options)
        try:
            context = lease.engine.context_length
        finally:
            lease.release()
        return {"id": found, "ref": ref, "loaded": True, "context_length": context,
                "seconds": round(time.monotonic() - started, 3), "models": entries(ref)}

    @router.post("/v1/models/{model_id:path}/unload", dependencies=[Depends(admin)])
    async def unload(model_id: str, request: Request) -> Any:
        found, ref = config.resolve(model_id)
        record = record_of(request)
        if record is not None:
            record.model = found
        count = await asyncio.to_thread(pool.unload, ref)
        left = entries(ref)
        if left:
            busy = ", ".join(f"{m.get('running', 0)} running, {m.get('queued', 0)} queued" for m in left)
            message = f"{found} is in use ({busy}); unload it when its requests have finished"
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                           "code": "model_busy"}}, status_code=409)
        return {"id": found, "ref": ref, "unloaded": count, "loaded": False}

    @router.get("/v1/pool", dependencies=[Depends(user)])
    async def status() -> dict[str, Any]:
        return {"served": config.models, **pool_status(pool, names())}

    return router
