"""Built-in plugin that adds ``velollm quantize`` to the command line.

Import-light (loaded for every ``velollm`` command): llama.cpp is imported only when the
command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

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

