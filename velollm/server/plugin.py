"""Built-in plugin that adds ``velollm serve`` to the command line.

Import-light on purpose (it is loaded for every ``velollm`` command): FastAPI and uvicorn are
imported only when the command runs.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated, Any

import typer

from velollm.hookspecs import hookimpl

ENV_API_KEY = "VELOLLM_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="REF or ID=REF to serve (repeatable). Default: every pulled catalogue model.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you mean otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help=f"Require 'Authorization: Bearer KEY' (default: ${ENV_API_KEY}).")] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", help="Context window for loaded models.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads per model.")] = None,
    preload: Annotated[bool, typer.Option(help="Load every served model before accepting requests.")] = False,
    allow_any_model: Annotated[bool, typer.Option(
        help="Also serve any local model reference a client names (never remote: ones).")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (chat, completions, tokenize, pool status)."""
    import uvicorn

    from velollm.server.app import ServerConfig, create_app

    key = api_key or os.environ.get(ENV_API_KEY) or None
    load_options: dict[str, Any] = {}
    if ctx is not None:
        load_options["n_ctx"] = ctx
    if threads is not None:
        load_options["n_threads"] = threads
    config = ServerConfig.from_cli(model or [], api_key=key, allow_any_model=allow_any_model,
                                   load_options=load_options, preload=preload)
    _check_refs(config.models)
    if not _is_loopback(host) and not key:
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    served = ", ".join(f"{k}={v}" if k != v else k for k, v in config.models.items()) or "none"
    typer.echo(f"velollm: serving {served} on http://{host}:{port}/v1", err=True)
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _check_refs(models: dict[str, str]) -> None:
    """Fail at start, not at the first request, on a reference no model source understands."""
    from velollm.errors import ModelNotFound
    from velollm.loading import find_source

    if not models:
        raise ModelNotFound("nothing to serve: pass --model REF (or pull a catalogue model first)")
    for model_id, ref in models.items():
        try:
            find_source(ref)
        except ModelNotFound:
            raise ModelNotFound(f"--model {model_id}: no model source understands {ref!r} "
                                "(a path, a catalogue name, hf:owner/repo/file.gguf or remote:URL#model)") from None


@hookimpl
def register_commands(cli: Any) -> None:
    cli.command("serve")(serve)
