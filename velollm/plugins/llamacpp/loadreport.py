"""What llama.cpp says it did when it loaded a model: layers offloaded and buffer sizes per device.

Why: placement predicts how many layers go to the GPU and how much memory each device gets; the
only authority on what llama.cpp actually did is its load log ("offloaded 9/9 layers to GPU",
"CUDA0 model buffer size = ...", KV and compute buffers), since the C API exposes no per-device
breakdown that the binding wraps. Capture the log around a load (``llamacpp.log.capture``) and
parse it here to check placement against reality (tests/test_gpu.py, benchmarks/bench_gpu.py).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

_MiB = 1 << 20
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"(\S+) (model|KV|compute) buffer size =\s*([\d.]+) MiB")


class LoadReport(BaseModel):
    """Read back from llama.cpp's load log; buffer sizes in bytes by buffer name (CUDA0, CPU_Mapped...)."""

    offloaded_layers: int | None = None  # None: a build without GPU offload logs no such line
    offloadable_layers: int | None = None  # repeating layers + the output layer
    model_buffers: dict[str, int] = Field(default_factory=dict)
    kv_buffers: dict[str, int] = Field(default_factory=dict)
    compute_buffers: dict[str, int] = Field(default_factory=dict)

    def device_bytes(self, device: str) -> int:
        """Everything llama.cpp allocated on ``device`` (e.g. ``CUDA0``): weights, KV cache, compute."""
        return sum(buffers.get(device, 0) for buffers in (self.model_buffers, self.kv_buffers, self.compute_buffers))


def parse(lines: list[str] | str) -> LoadReport:
    """Parse captured log text (a list of fragments as the log callback delivers them, or one string)."""
    text = lines if isinstance(lines, str) else "".join(lines)
    report = LoadReport()
    if match := _OFFLOADED.search(text):
        report.offloaded_layers, report.offloadable_layers = int(match.group(1)), int(match.group(2))
    for name, kind, mib in _BUFFER.findall(text):
        target = {"model": report.model_buffers, "KV": report.kv_buffers, "compute": report.compute_buffers}[kind]
        target[name] = target.get(name, 0) + round(float(mib) * _MiB)
    return report
