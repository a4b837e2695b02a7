"""Built-in plugin that adds ``velollm serve`` to the command line.

Import-light on purpose (it is loaded for every ``velollm`` command): FastAPI and uvicorn are
imported only when the command runs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path
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
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="Server config (TOML or YAML): per-model settings, keys, CORS, limits. "
        "Flags override it.")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Validate the config and print every model's placement; load nothing.")] = False,
    host: Annotated[str | None, typer.Option(
        help="Address to bind (default 127.0.0.1); loopback unless you mean otherwise.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000).")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help=f"Require 'Authorization: Bearer KEY' (default: ${ENV_API_KEY}); an admin key.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        "--api-key-file", help="Keys file: 'KEY [NAME [ROLE]]' per line, role user or admin; reloaded on SIGHUP.")
    ] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", help="A browser origin allowed to call the server (repeatable; '*' for any).")] = None,
    ctx: Annotated[int | None, typer.Option("-c", "--ctx", "--ctx-size", help="Context window in tokens for "
                                            "every served model (as llama.cpp's server).")] = None,
    threads: Annotated[int | None, typer.Option("-t", "--threads", help="CPU threads per model.")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option(
        "-ngl", "--n-gpu-layers", help="Layers each model offloads to the GPU (-1: all; default: placement).")] = None,
    parallel: Annotated[int | None, typer.Option(
        "--parallel", help="Requests each model decodes together (continuous batching, shared prefix cache).")] = None,
    preload: Annotated[bool, typer.Option(help="Load every served model before accepting requests.")] = False,
    allow_any_model: Annotated[bool, typer.Option(
        help="Also serve any local model reference a client names (never remote: ones).")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (chat, completions, tokenize, pool status)."""
    import uvicorn

    from velollm.errors import ConfigError
    from velollm.pool import get_pool, set_pool
    from velollm.server import config as team_config
    from velollm.server.app import create_app, pulled_catalogue_models

    key = api_key or os.environ.get(ENV_API_KEY) or None
    # a bad file raises ConfigError (naming the line): the command prints it and exits non-zero
    team = team_config.load_config(config_file) if config_file else team_config.TeamConfig()
    if not team.models and not model:  # nothing named: every pulled catalogue model (so --ctx etc. apply to them)
        model = list(pulled_catalogue_models())
    team = team_config.apply_flags(team, models=model, host=host, port=port, api_keys_file=api_key_file,
                                   cors_origins=cors_origin, ctx=ctx, threads=threads, n_gpu_layers=n_gpu_layers,
                                   parallel=parallel,
                                   preload=preload,
                                   allow_any_model=allow_any_model)
    if check:
        lines, ok = team_config.check_report(team, str(config_file) if config_file else "")
        typer.echo("\n".join(lines))
        if not ok:
            raise ConfigError("some models cannot be served here (see ERROR above)")
        return
    config = team_config.to_server_config(team, api_key=key)
    _check_refs(config.models)
    bind, listen = team.server.host, team.server.port
    if not _is_loopback(bind) and config.keys is not None and not config.keys.enabled:
        typer.echo(f"warning: serving on {bind} without --api-key or a keys file: anyone who can reach it can use it",
                   err=True)
    served = ", ".join(f"{k}={v}" if k != v else k for k, v in config.models.items()) or "none"
    typer.echo(f"velollm: serving {served} on http://{bind}:{listen}/v1", err=True)
    if team.server.log_requests:
        _log_requests_to_stderr()
    set_pool(team_config.make_pool(team))
    uvicorn.run(create_app(config, pool=get_pool()), host=bind, port=listen, log_level=log_level,
                timeout_graceful_shutdown=5, access_log=not team.server.log_requests)


def _log_requests_to_stderr() -> None:
    """One JSON line per request (velollm.access) on stderr, replacing uvicorn's access log."""
    access = logging.getLogger("velollm.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    server_log = logging.getLogger("velollm.server")  # key reloads and their errors
    if not server_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("velollm: %(message)s"))
        server_log.addHandler(handler)
        server_log.setLevel(logging.INFO)
        server_log.propagate = False


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
