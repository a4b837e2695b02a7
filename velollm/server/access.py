"""Who may call the server, and what each request did: API keys, request ids, one log line per request.

* **Keys** come from ``--api-key`` (one admin key) and/or a keys file, one key per line with an
  optional name and role (``user`` or ``admin``), reloaded on SIGHUP so a key can be revoked
  without a restart. Keys are kept only as SHA-256 digests and never logged: log lines and
  errors name the key's *name* (or its line).
* **Request ids.** Every response carries ``x-request-id``: the client's, when it sent a sane
  one, else a new one — so a client's log line and the server's can be matched.
* **One JSON log line per request** (logger ``velollm.access``): id, key name, route, model,
  status, tokens, load and queue wait, time to first token, duration. The same record feeds the
  Prometheus metrics (:mod:`velollm.server.metrics`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from starlette.requests import Request

from velollm.errors import AuthenticationFailed, PermissionDenied, VeloError

log = logging.getLogger("velollm.access")
server_log = logging.getLogger(__name__)

Role = Literal["user", "admin"]
ROLES: tuple[str, ...] = ("user", "admin")
REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")  # printable, no spaces: safe to log and echo

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


# --- keys -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiKey:
    """A known key: its name (what logs show), role, and the SHA-256 of the secret."""

    name: str
    role: Role
    digest: bytes = field(repr=False)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def parse_keys_file(text: str, source: str = "keys file") -> list[ApiKey]:
    """``KEY [NAME [ROLE]]`` per line (whitespace-separated, ``#`` comments); errors never show a key.

    A plain list of keys (llama.cpp's ``--api-key-file``) is valid: each becomes a ``user`` key
    named after its line.
    """
    keys: list[ApiKey] = []
    seen: dict[bytes, int] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = re.split(r"\s+#", line, maxsplit=1)[0]  # a trailing comment (keys may contain '#')
        parts = line.split()
        if len(parts) > 3:
            raise AuthenticationFailed(f"{source}:{number}: expected 'KEY [NAME [ROLE]]', found {len(parts)} fields")
        secret = parts[0]
        name = parts[1] if len(parts) > 1 else f"line{number}"
        role = parts[2].lower() if len(parts) > 2 else "user"
        if role not in ROLES:
            raise AuthenticationFailed(f"{source}:{number}: role {parts[2]!r} is not 'user' or 'admin'")
        digest = _digest(secret)
        if digest in seen:
            raise AuthenticationFailed(f"{source}:{number}: the same key is already on line {seen[digest]}")
        if name in names:
            raise AuthenticationFailed(f"{source}:{number}: the name {name!r} is used twice")
        seen[digest] = number
        names.add(name)
        keys.append(ApiKey(name=name, role=role, digest=digest))  # type: ignore[arg-type]
    return keys


class KeyStore:
    """The keys the server accepts: ``--api-key`` (role admin) plus a keys file, swapped atomically on reload."""

    def __init__(self, *, api_key: str | None = None, keys_file: str | Path | None = None) -> None:
        self.keys_file = Path(keys_file) if keys_file else None
        self._static = [ApiKey(name="api-key", role="admin", digest=_digest(api_key))] if api_key else []
        self._keys: list[ApiKey] = list(self._static)
        self._mutex = threading.Lock()
        if self.keys_file is not None:
            self.reload()

    @property
    def enabled(self) -> bool:
        """Whether any key is required (no keys and no file: an open server)."""
        return bool(self._static) or self.keys_file is not None

    def __len__(self) -> int:
        return len(self._keys)

    def reload(self) -> int:
        """Re-read the keys file; on any error keep the keys in force and raise. Returns how many keys."""
        if self.keys_file is None:
            return len(self._keys)
        try:
            text = self.keys_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthenticationFailed(f"cannot read the keys file {self.keys_file}: {exc}") from None
        keys = [*self._static, *parse_keys_file(text, str(self.keys_file))]
        with self._mutex:
            self._keys = keys
        if readable_by_others(self.keys_file):
            server_log.warning("the keys file %s can be read by other users: chmod 600 it", self.keys_file)
        return len(keys)

    def reload_logged(self) -> None:
        """SIGHUP: reload, and say what happened without ever printing a key."""
        try:
            count = self.reload()
        except VeloError as exc:
            server_log.error("keys not reloaded (the old keys stay in force): %s", exc)
            return
        server_log.warning("reloaded %s: %d key(s)", self.keys_file, count)

    def check(self, token: str) -> ApiKey | None:
        """The key matching ``token``, compared in constant time against every digest."""
        digest = _digest(token)
        found = None
        with self._mutex:
            keys = self._keys
        for key in keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key from an ``Authorization: Bearer`` header; None on an open server."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        key = self.check(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if key is None:
            raise AuthenticationFailed("missing or incorrect API key: send 'Authorization: Bearer <key>'")
        return key


def readable_by_others(path: Path) -> bool:
    """Whether users other than the owner may read ``path`` (POSIX permissions; False elsewhere)."""
    try:
        return os.name == "posix" and bool(path.stat().st_mode & 0o077)
    except OSError:
        return False


# --- the record of one request ------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """What one request did; filled by the middleware, the auth dependency and the handlers."""

    id: str
    method: str
    path: str
    route: str = ""
    key: str | None = None
    role: str | None = None
    model: str | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    load_s: float | None = None  # time spent getting the model (loading it if it was not loaded)
    queue_wait_s: float | None = None  # time spent waiting for a turn on the model
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def duration_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token (None with fewer than two tokens)."""
        if self.first_token_at is None or self.finished_at is None or self.completion_tokens < 2:
            return None
        elapsed = self.finished_at - self.first_token_at
        return (self.completion_tokens - 1) / elapsed if elapsed > 0 else None

    def log_fields(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return {"event": "request", "id": self.id, "method": self.method, "path": self.path, "route": self.route,
                "key": self.key, "model": self.model, "status": self.status,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "load_s": r(self.load_s), "queue_wait_s": r(self.queue_wait_s), "ttft_s": r(self.ttft_s),
                "duration_s": r(self.duration_s)}


def record_of(request: Any) -> RequestRecord | None:
    """The record the middleware attached to a Starlette request (None outside the middleware)."""
    return request.scope.get("state", {}).get("velollm")


def timed_open(record: RequestRecord | None, pool: Any, ref: str, requests: list[Any], load_options: dict[str, Any],
               check: Callable[[Any, Any], None] | None = None) -> Iterator[Any]:
    """:func:`velollm.pool.streams.open_leased`, noting the load time and the wait for a turn."""
    from velollm.pool.streams import LeasedStream

    t0 = time.monotonic()
    lease = pool.acquire(ref, **load_options)
    t1 = time.monotonic()
    try:
        if check is not None:
            for request in requests:
                check(request, lease.engine)
        stream = LeasedStream(lease, requests)  # takes the engine's turn: QueueFull/QueueTimeout raise here
    except BaseException:
        lease.release()
        raise
    if record is not None:
        record.load_s, record.queue_wait_s = t1 - t0, time.monotonic() - t1
    return stream


class MeteredStream:
    """An :class:`~velollm.pool.streams.AsyncStream` of ``(index, chunk)`` that notes the first token
    and the usage of every finished choice into a :class:`RequestRecord`."""

    def __init__(self, stream: Any, record: RequestRecord | None, prompts: int = 1) -> None:
        self._stream, self._record, self._prompts = stream, record, max(prompts, 1)
        self._usages: list[Any] = []

    def __aiter__(self) -> MeteredStream:
        return self

    async def __anext__(self) -> Any:
        pair = await self._stream.__anext__()
        record = self._record
        if record is not None:
            _, chunk = pair
            if record.first_token_at is None and getattr(chunk, "text", ""):
                record.first_token_at = time.monotonic()
            if getattr(chunk, "finish_reason", None) is not None and getattr(chunk, "usage", None) is not None:
                self._usages.append(chunk.usage)
                per_prompt = max(len(self._usages) // self._prompts, 1)  # n choices share a prompt
                record.prompt_tokens = sum(u.prompt_tokens for u in self._usages[::per_prompt])
                record.completion_tokens = sum(u.completion_tokens for u in self._usages)
        return pair

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> MeteredStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# --- the middleware -------------------------------------------------------------------------------------
def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``x-request-id`` when it is short and printable, else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1").strip()
            if _CLIENT_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


class AccessMiddleware:
    """Pure ASGI (streams pass through untouched): request id in and out, then one log line and
    the metrics once the response, streamed or not, has been sent."""

    def __init__(self, app: ASGIApp, *, on_done: Callable[[RequestRecord], None] | None = None,
                 log_requests: bool = True) -> None:
        self.app, self.on_done, self.log_requests = app, on_done, log_requests

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(id=request_id(scope.get("headers") or []), method=scope.get("method", ""),
                               path=scope.get("path", ""))
        scope.setdefault("state", {})["velollm"] = record
        header = (REQUEST_ID_HEADER.encode(), record.id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
                message["headers"] = [*(message.get("headers") or []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            record.finished_at = time.monotonic()
            route = scope.get("route")
            record.route = getattr(route, "path", "") or "unmatched"  # a template: clients cannot add label values
            self._done(record)

    def _done(self, record: RequestRecord) -> None:
        if self.log_requests:
            log.info(json.dumps(record.log_fields(), ensure_ascii=False))
        if self.on_done is not None:
            try:
                self.on_done(record)
            except Exception:  # metrics must never break an answer
                server_log.exception("recording request metrics failed")


# --- FastAPI dependencies ---------------------------------------------------------------------------
def require_key(store: KeyStore, *, role: Role = "user") -> Callable[[Any], Awaitable[ApiKey | None]]:
    """A dependency that checks the bearer key (401) and, for ``role="admin"``, its role (403).

    On an open server (no key configured) everyone passes, admin routes included: whoever can
    reach an open server can already use all of it.
    """

    async def dependency(request: Request) -> ApiKey | None:
        key = store.authenticate(request.headers.get("authorization"))
        record = record_of(request)
        if record is not None and key is not None:
            record.key, record.role = key.name, key.role
        if role == "admin" and key is not None and key.role != "admin":
            raise PermissionDenied(f"the key {key.name!r} has the role {key.role!r}; this needs an admin key")
        return key

    return dependency
