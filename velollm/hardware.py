"""What this machine has: CPU, memory, GPUs, and what plugins report (e.g. ggml's registry).

Every source is optional: a missing tool (no nvidia-ml-py, no /sys) is recorded as a fact in
``notes``, never raised. Placement and backend availability are pure functions of a
:class:`HardwareProbe`, so tests inject probes of machines we do not have.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

GpuVendor = Literal["nvidia", "amd", "apple", "intel", "other"]


class CpuInfo(BaseModel):
    model: str = ""
    arch: str = ""
    physical_cores: int = 1
    logical_cores: int = 1
    flags: list[str] = Field(default_factory=list)  # the SIMD flags that matter to ggml


class MemoryInfo(BaseModel):
    total_bytes: int = 0
    available_bytes: int = 0


class GpuInfo(BaseModel):
    index: int = 0
    name: str = ""
    vendor: GpuVendor = "other"
    total_bytes: int = 0
    free_bytes: int = 0
    unified_memory: bool = False  # Apple Silicon: GPU memory is the system RAM
    source: str = ""  # where this fact came from (nvml, sysfs, ggml, sysctl)


class HardwareProbe(BaseModel):
    """A snapshot of the machine; ``extras`` holds plugin sections such as ``"ggml"``."""

    os: str = ""
    cpu: CpuInfo = Field(default_factory=CpuInfo)
    memory: MemoryInfo = Field(default_factory=MemoryInfo)
    gpus: list[GpuInfo] = Field(default_factory=list)
    extras: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


_SIMD_FLAGS = ("avx", "avx2", "avx512f", "avx512bw", "avx512vnni", "avx_vnni", "fma", "f16c", "neon", "asimd",
               "sve", "amx_int8", "amx_bf16")


def probe_cpu(notes: list[str]) -> CpuInfo:
    logical = os.cpu_count() or 1
    physical = logical
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except Exception as exc:  # psutil missing or unsupported platform
        notes.append(f"physical core count unknown ({exc}); using logical count")
    model, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text(errors="replace")
        if m := re.search(r"^(?:model name|Hardware|Model)\s*:\s*(.+)$", text, re.M):
            model = m.group(1).strip()
        if m := re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M):
            flags = set(m.group(1).split())
    elif platform.system() == "Darwin":
        with contextlib.suppress(Exception):
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
        if platform.machine() == "arm64":
            flags.add("neon")
    return CpuInfo(model=model, arch=platform.machine(), physical_cores=physical, logical_cores=logical,
                   flags=sorted(f for f in flags if f in _SIMD_FLAGS))


def probe_memory(notes: list[str]) -> MemoryInfo:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return MemoryInfo(total_bytes=vm.total, available_bytes=vm.available)
    except Exception as exc:
        notes.append(f"memory unknown ({exc})")
        return MemoryInfo()


def probe_nvidia(notes: list[str]) -> list[GpuInfo]:
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        notes.append("nvidia-ml-py not installed: NVIDIA GPUs are not probed (pip install velollm[cuda])")
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        notes.append(f"no NVIDIA driver ({type(exc).__name__})")
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(GpuInfo(index=i, name=name.decode() if isinstance(name, bytes) else name, vendor="nvidia",
                                total_bytes=int(mem.total), free_bytes=int(mem.free), source="nvml"))
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return gpus


def probe_amd(notes: list[str], root: Path = Path("/sys/class/drm")) -> list[GpuInfo]:
    """AMD cards expose VRAM totals in sysfs (amdgpu driver); no tool needed."""
    gpus = []
    if not root.exists():
        return gpus
    for card in sorted(root.glob("card[0-9]*")):
        device = card / "device"
        try:
            vendor = (device / "vendor").read_text().strip()
        except OSError:
            continue
        if vendor != "0x1002":
            continue
        try:
            total = int((device / "mem_info_vram_total").read_text())
            used = int((device / "mem_info_vram_used").read_text())
        except (OSError, ValueError):
            notes.append(f"{card.name}: AMD GPU without VRAM counters")
            continue
        name = ""
        with contextlib.suppress(OSError):
            name = (device / "product_name").read_text().strip()
        gpus.append(GpuInfo(index=len(gpus), name=name or card.name, vendor="amd", total_bytes=total,
                            free_bytes=max(total - used, 0), source="sysfs"))
    return gpus


def probe_apple(memory: MemoryInfo) -> list[GpuInfo]:
    """Apple Silicon shares system memory with the GPU; Metal may use about 2/3 of it by default."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []
    usable = memory.total_bytes * 2 // 3
    return [GpuInfo(name="Apple Silicon GPU", vendor="apple", total_bytes=usable,
                    free_bytes=min(usable, memory.available_bytes), unified_memory=True, source="sysctl")]


def probe(*, with_plugins: bool = True) -> HardwareProbe:
    """Probe this machine now. Cheap enough to call per decision (tens of milliseconds)."""
    notes: list[str] = []
    memory = probe_memory(notes)
    gpus = probe_nvidia(notes) + probe_amd(notes) + probe_apple(memory)
    extras: dict[str, Any] = {}
    if with_plugins:
        from velollm.host import get_host

        extras = get_host().hardware_facts()
    return HardwareProbe(os=f"{platform.system()} {platform.release()}", cpu=probe_cpu(notes), memory=memory,
                         gpus=gpus, extras=extras, notes=notes)
