"""The llama.cpp backend: ``llamacpp-cpu|cuda|vulkan|metal``.

All four are the same code; they differ in which ggml backend must be compiled in (and have a
device) and in how many layers they may offload.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from velollm.engine import Device, LoadOptions
from velollm.gguf import info as gguf_info
from velollm.plugins.llamacpp.engine import LlamaCppEngine
from velollm.plugins.llamacpp.registry import GgmlRegistry, availability, read_registry

if TYPE_CHECKING:
    from velollm.hardware import HardwareProbe

KINDS = ("cpu", "cuda", "vulkan", "metal")
#: Tried first when the user names no backend: GPUs before the CPU (placement reads ``priority``).
PRIORITY = {"cuda": 0, "metal": 10, "vulkan": 20, "cpu": 30}


@functools.lru_cache(maxsize=1)
def supported_architectures() -> frozenset[str]:
    """Architectures llama.cpp knows: the ``gguf`` package mirrors llama.cpp's list."""
    import gguf

    return frozenset(gguf.MODEL_ARCH_NAMES.values())


def registry_from_probe(probe: HardwareProbe) -> GgmlRegistry:
    """The probe's ggml section when it has one (tests inject machines this way), else the live one."""
    data = probe.extras.get("ggml")
    return GgmlRegistry.model_validate(data) if data is not None else read_registry()


class LlamaCppBackend:
    """One ggml device kind of llama.cpp."""

    auto_select = True
    max_parallel = 64  # LoadOptions.parallel's bound; batch.py holds them in one context

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"llamacpp-{kind}"
        self.priority = PRIORITY.get(kind, 40)
        self.architectures = supported_architectures()

    def available(self, probe: HardwareProbe) -> tuple[bool, str]:
        return availability(self.kind, registry_from_probe(probe))

    def devices(self, probe: HardwareProbe) -> list[Device]:
        """The ggml devices placement may offload layers to (see :mod:`velollm.placement`)."""
        if self.kind == "cpu":
            return []
        apple = self.kind == "metal" and probe.cpu.arch != "x86_64"  # Apple Silicon: the GPU shares RAM
        return [Device(id=d.name, name=d.description or d.name, total_bytes=d.total_bytes, free_bytes=d.free_bytes,
                       unified_memory=apple or d.type == "igpu")
                for d in registry_from_probe(probe).devices_of(self.kind)]

    def load(self, model_file: Path, options: LoadOptions) -> LlamaCppEngine:
        info = gguf_info.inspect(model_file)
        gguf_info.validate_for(info, self.name, self.architectures)
        return LlamaCppEngine.open(info, options, backend=self.name, offload=self.kind != "cpu")
