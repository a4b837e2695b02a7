"""The llama.cpp plugin's commands: ``velollm quantize`` and ``velollm bench``.

Import-light: llama.cpp itself is imported only when a command runs.
"""

from __future__ import annotations

from typing import Any


def register(cli: Any) -> None:
    from velollm.plugins.llamacpp.bench_command import bench
    from velollm.plugins.llamacpp.quantize_command import quantize

    cli.command("quantize")(quantize)
    cli.command("bench")(bench)
