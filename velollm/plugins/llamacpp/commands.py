"""The llama.cpp plugin's commands: ``velollm quantize`` and ``velollm bench`` (vanilla vs speculative decoding).

Import-light (loaded for every ``velollm`` command): llama.cpp itself is imported only when a command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from velollm.placement import fmt_bytes
from velollm.plugins.llamacpp.quantize import QUANT_TYPES


def quantize(
    source: Annotated[str, typer.Argument(metavar="IN", help="The GGUF file to quantize (or a catalogue name).")],
    output: Annotated[Path, typer.Argument(metavar="OUT", help="Where to write the quantized GGUF file.")],
    type_name: Annotated[str, typer.Argument(metavar="TYPE", help=f"One of: {', '.join(QUANT_TYPES)}.")],
    threads: Annotated[int | None, typer.Option(help="Quantizer threads (default: physical cores).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
    allow_requantize: Annotated[bool, typer.Option(
        "--allow-requantize", help="Quantize a file that is already quantized (no better than the source).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Quantize a GGUF model with llama.cpp's quantizer; prints the size before and after."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn

    from velollm.plugins.llamacpp import quantize as q

    err = Console(stderr=True)
    info, qtype, _ = q.check(source, output, type_name, force=force, allow_requantize=allow_requantize)
    kind = q.short_file_type(info.file_type) or "?"
    err.print(f"{info.path.name}: {kind} {fmt_bytes(info.file_size)} -> {qtype.name} "
              f"(about {fmt_bytes(q.estimate_bytes(info, qtype))})")
    if q.quantized_tensor_types(info):
        err.print("[yellow]note:[/yellow] requantizing an already quantized file: the result is no more accurate "
                  "than the source")
    progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                        TimeElapsedColumn(), console=err, transient=True, disable=as_json)
    task = progress.add_task(f"quantizing to {qtype.name}", total=info.tensor_bytes)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        result = q.quantize(source, output, type_name, threads=threads, force=force,
                            allow_requantize=allow_requantize, progress=update)
    if as_json:
        sys.stdout.write(json.dumps(result.model_dump(mode="json") | {"ratio": result.ratio}, indent=2) + "\n")
        return
    err.print(f"{result.output}: {result.type}, {fmt_bytes(result.source_bytes)} -> {fmt_bytes(result.output_bytes)} "
              f"({result.ratio:.2f}×) in {result.seconds:.1f} s with {result.threads} threads")
    if result.fallback_tensors:
        err.print(f"[yellow]note:[/yellow] {result.fallback_tensors} tensors do not fit {result.type}'s block size and "
                  f"were written as {', '.join(t for t in result.tensor_types if t not in ('F32', result.type))}")
    sys.stdout.write(f"{result.output}\n")


def bench(
    main_model: Annotated[str, typer.Option("--main-model", "-m", help="Path, catalogue name or hf: reference.")],
    draft_model: Annotated[str | None, typer.Option("--draft-model", "-d", "-md",
                                                    help="A smaller model of the same family to draft with.")] = None,
    mode: Annotated[str, typer.Option(help="auto (the cost model decides), draft, lookup.")] = "auto",
    lookup: Annotated[bool, typer.Option("--lookup/--no-lookup", help="Offer prompt lookup drafting.")] = True,
    n_draft: Annotated[int | None, typer.Option(help="Most tokens per draft (auto); exactly this many (forced).")]
    = None,
    n_predict: Annotated[int, typer.Option("-n", "--n-predict", help="Tokens to generate per run.")] = 128,
    prompt: Annotated[list[str] | None, typer.Option("-p", "--prompt", help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="JSON list, or text with '---' lines between prompts.")]
    = None,
    iterations: Annotated[int, typer.Option("--iterations", "-i", min=1, help="Measured runs per prompt and mode.")]
    = 5,
    warmup: Annotated[int, typer.Option(min=0)] = 1,
    skip_vanilla: Annotated[bool, typer.Option(help="Run only the speculative mode.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the JSON report here.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send prompts as raw text, not as a chat turn.")] = False,
    temperature: Annotated[float, typer.Option("--temp", "--temperature")] = 0.0,
    seed: int = 1234,
    ctx: Annotated[int | None, typer.Option("-c", "--ctx", "--ctx-size", help="Context window in tokens.")] = None,
    threads: Annotated[int | None, typer.Option("-t", "--threads", help="CPU threads.")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option("-ngl", "--n-gpu-layers", help="Layers to offload to the GPU "
                                                     "(-1: all; default: placement).")] = None,
) -> None:
    """Vanilla vs speculative decoding, interleaved in one run: tok/s, TTFT, total, speedup ± σ, acceptance."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from velollm.cli import err, out
    from velollm.engine import LoadOptions
    from velollm.errors import InvalidRequest
    from velollm.loading import load_engine
    from velollm.plugins.llamacpp import bench as benchmod

    if mode not in ("auto", "draft", "lookup"):
        raise InvalidRequest(f"--mode must be auto, draft or lookup, not {mode!r}")
    prompts = [benchmod.BenchPrompt(name=f"prompt{i + 1}", text=p) for i, p in enumerate(prompt or [])]
    if prompts_file is not None:
        prompts += benchmod.read_prompts(prompts_file)
    if not prompts:
        raise InvalidRequest("give at least one --prompt or a --prompts-file")
    config = benchmod.BenchConfig(
        main_model=main_model, draft_model=draft_model, mode=mode, lookup=lookup, n_draft=n_draft,
        n_predict=n_predict, iterations=iterations, warmup=warmup, skip_vanilla=skip_vanilla, chat=not raw,
        temperature=temperature, seed=seed, n_ctx=ctx, threads=threads, prompts=prompts,
    )
    fields: dict[str, Any] = dict(n_ctx=ctx, n_threads=threads, speculative=mode, draft_model=draft_model,
                                  prompt_lookup=lookup, n_draft=n_draft)
    if n_gpu_layers is not None:  # only an explicit value overrides placement
        fields["n_gpu_layers"] = n_gpu_layers
    options = LoadOptions(**fields)
    err.print(f"[dim]loading {main_model}" + (f" + draft {draft_model}" if draft_model else "")
              + " and measuring the batch-cost table...[/dim]")
    engine = load_engine(main_model, options=options)
    runs = len(prompts) * (1 if skip_vanilla else 2) * (iterations + warmup)
    try:
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("bench", total=runs)

            def advance(label: str) -> None:
                bar.update(task, advance=1, description=label)

            report = benchmod.run(engine, config, progress=advance)
    finally:
        engine.close()
    if output is not None:
        output.write_text(report.to_json() + "\n", encoding="utf-8")
        err.print(f"[dim]wrote {output}[/dim]")
    print_report(report, out)


def print_report(report: Any, console: Any) -> None:
    """Per-prompt tables and the overall speedup."""

    spec = report.speculation or {}
    console.print(f"[bold]{report.config.main_model}[/bold] mode={report.config.mode} "
                  f"draft={report.config.draft_model or '-'} lookup={report.config.lookup} "
                  f"n_predict={report.config.n_predict} iterations={report.config.iterations} "
                  f"load={report.machine.get('loadavg', '?')}")
    if spec:
        console.print(f"batch cost (b=1..{len(spec.get('batch_cost', []))}): {spec.get('batch_cost')}  "
                      f"draft cost/token: {spec.get('draft_cost')}  ceilings: {spec.get('ceiling')}")
    from velollm.tables import print_table

    table = []
    for p in report.summary.prompts:
        rows = [("vanilla", p.vanilla)] if p.vanilla else []
        rows.append((report.config.mode, p.speculative))
        for name, m in rows:
            is_spec = name != "vanilla"
            agree = "-"
            if is_spec and p.agreement is not None:
                a = p.agreement
                agree = (f"identical {a.identical}/{a.compared}" if a.identical == a.compared
                         else f"{a.identical}/{a.compared}, first diff @{a.first_difference} ({a.agreement_rate:.0%})"
                         + (f", {a.near_ties} at near ties" if a.near_ties else "")
                         + (f", {a.decisive} DECISIVE" if a.decisive else ""))
            table.append((
                p.prompt if not is_spec or not p.vanilla else "", name, str(m.tokens_per_s),
                f"{m.tokens_per_s.min:.2f}", f"{m.tokens_per_s.max:.2f}",
                f"{m.ttft_s.mean * 1000:.0f} ± {m.ttft_s.stddev * 1000:.0f}",
                str(m.total_s), str(p.speedup) if is_spec and p.speedup else "",
                f"{p.predicted_speedup:.2f}" if is_spec else "", f"{p.acceptance_rate:.0%}" if is_spec else "",
                agree,
            ))
    print_table(console, ("prompt", "mode", "tok/s", "min", "max", "TTFT ms", "total s", "speedup", "predicted",
                          "accept", "greedy agreement"), table)
    summary = report.summary
    if summary.speedup is not None:
        console.print(f"speedup (mean over prompts): {summary.speedup} (ratio of mean decode tok/s, propagated σ)")
    if summary.paired_speedup is not None:
        console.print(f"[bold]decode speedup, paired interleaved runs: {summary.paired_speedup}[/bold]")
    if summary.total_speedup is not None:
        console.print(f"[bold]total-time speedup (whole requests, prompt included): {summary.total_speedup}[/bold]")
    for category, ratio in summary.by_category.items():
        console.print(f"  {category}: {ratio}")
    for line in summary.verdict:
        console.print(f"[bold]verdict:[/bold] {line}")


def register(cli: Any) -> None:
    cli.command("quantize")(quantize)
    cli.command("bench")(bench)
