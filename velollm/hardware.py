"""What this machine has: CPU, memory, GPUs, and what plugins report (e.g. ggml's registry).

Every source is optional: a missing tool (no nvidia-ml-py, no rocm-smi, no /sys) is recorded as
a fact in ``notes`` and ``sources``, never raised. Placement and backend availability are pure
functions of a :class:`HardwareProbe`, so tests inject probes of machines we do not have.

GPU sources, in order: NVIDIA through NVML (``nvidia-ml-py``, else ``nvidia-smi``), AMD through
the amdgpu sysfs counters (named and completed by ``rocm-smi`` when installed), Apple Silicon
through ``sysctl`` (unified memory: the GPU's share of RAM), and finally the devices plugins
report (llama.cpp's ggml registry lists Vulkan, CUDA and Metal devices as ggml sees them).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

GpuVendor = Literal["nvidia", "amd", "apple", "intel", "other"]

#: A command runner: argv -> stdout, or None when the tool is missing or fails (injected in tests).
Runner = Callable[[list[str]], "str | None"]


class CpuInfo(BaseModel):
    model: str = ""
    arch: str = ""
    physical_cores: int = 1
    logical_cores: int = 1
    performance_cores: int | None = None  # Apple Silicon: P-cores (ggml should use these, not E-cores)
    flags: list[str] = Field(default_factory=list)  # the SIMD flags that matter to ggml


class MemoryInfo(BaseModel):
    total_bytes: int = 0
    available_bytes: int = 0
    mlock_limit_bytes: int | None = None  # RLIMIT_MEMLOCK; None = unlimited or unknown


class GpuInfo(BaseModel):
    index: int = 0
    name: str = ""
    vendor: GpuVendor = "other"
    total_bytes: int = 0
    free_bytes: int = 0
    unified_memory: bool = False  # Apple Silicon / integrated GPUs: GPU memory is the system RAM
    source: str = ""  # where this fact came from (nvml, nvidia-smi, sysfs, rocm-smi, sysctl, ggml:Vulkan)
    backends: list[str] = Field(default_factory=list)  # plugin backends that report this device (Vulkan...)


class HardwareProbe(BaseModel):
    """A snapshot of the machine; ``extras`` holds plugin sections such as ``"ggml"``."""

    os: str = ""
    cpu: CpuInfo = Field(default_factory=CpuInfo)
    memory: MemoryInfo = Field(default_factory=MemoryInfo)
    gpus: list[GpuInfo] = Field(default_factory=list)
    extras: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    sources: dict[str, str] = Field(default_factory=dict)  # each probe source -> what it found, or why not

    def compiled_backends(self) -> dict[str, list[str]]:
        """Plugin section -> the backends it reports compiled in (e.g. ``{"ggml": ["CPU", "CUDA"]}``)."""
        return {name: list(section.get("backends") or []) for name, section in self.extras.items()
                if isinstance(section, dict) and "backends" in section}


_SIMD_FLAGS = ("avx", "avx2", "avx512f", "avx512bw", "avx512vnni", "avx_vnni", "fma", "f16c", "neon", "asimd",
               "sve", "amx_int8", "amx_bf16")


def run_tool(argv: list[str], timeout: float = 5.0) -> str | None:
    """Run a probing tool; a missing, failing or hanging tool yields None (a fact, not an error)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _sysctl(name: str, run: Runner = run_tool) -> str | None:
    out = run(["sysctl", "-n", name])
    return out.strip() if out and out.strip() else None


def default_threads() -> int:
    """Physical cores: llama.cpp's and Ollama's default thread count (hyper-threads only add spin-waiting)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:  # psutil missing or unsupported platform
        return os.cpu_count() or 1


def probe_cpu(notes: list[str], *, run: Runner = run_tool, system: str | None = None, machine: str | None = None,
              cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    system = system or platform.system()
    machine = machine or platform.machine()
    logical = os.cpu_count() or 1
    physical = logical
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except Exception as exc:  # psutil missing or unsupported platform
        notes.append(f"physical core count unknown ({exc}); using logical count")
    model, flags, perf = platform.processor(), set(), None
    if cpuinfo.exists():
        text = cpuinfo.read_text(errors="replace")
        if m := re.search(r"^(?:model name|Hardware|Model)\s*:\s*(.+)$", text, re.M):
            model = m.group(1).strip()
        if m := re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M):
            flags = set(m.group(1).split())
        if "asimd" in flags:  # ARMv8 Linux reports NEON as "asimd"
            flags.add("neon")
    elif system == "Darwin":
        model = _sysctl("machdep.cpu.brand_string", run) or model
        if machine == "arm64":
            flags.add("neon")
            with contextlib.suppress(TypeError, ValueError):
                perf = int(_sysctl("hw.perflevel0.physicalcpu", run) or "")
        else:
            features = (_sysctl("machdep.cpu.features", run) or "") + " " + (
                _sysctl("machdep.cpu.leaf7_features", run) or "")
            flags |= {f.lower().replace(".", "_") for f in features.split()}
            if "avx2_0" in flags:
                flags.add("avx2")
            if "avx1_0" in flags:
                flags.add("avx")
    return CpuInfo(model=model, arch=machine, physical_cores=physical, logical_cores=logical,
                   performance_cores=perf, flags=sorted(f for f in flags if f in _SIMD_FLAGS))


def probe_memory(notes: list[str]) -> MemoryInfo:
    limit: int | None = None
    with contextlib.suppress(Exception):  # no resource module on Windows
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = None if soft == resource.RLIM_INFINITY else int(soft)
    try:
        import psutil

        vm = psutil.virtual_memory()
        return MemoryInfo(total_bytes=vm.total, available_bytes=vm.available, mlock_limit_bytes=limit)
    except Exception as exc:
        notes.append(f"memory unknown ({exc})")
        return MemoryInfo(mlock_limit_bytes=limit)


# --- NVIDIA ---------------------------------------------------------------------------------------
def probe_nvidia(notes: list[str], sources: dict[str, str] | None = None, *, run: Runner = run_tool) -> list[GpuInfo]:
    """NVML when ``nvidia-ml-py`` is installed, else ``nvidia-smi``; neither is a fact, not an error."""
    sources = {} if sources is None else sources
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        gpus = probe_nvidia_smi(run)
        if gpus is None:
            sources["nvml"] = "nvidia-ml-py not installed; nvidia-smi not found"
            notes.append("nvidia-ml-py not installed: NVIDIA GPUs are not probed (pip install velollm[cuda])")
            return []
        sources["nvml"] = f"nvidia-ml-py not installed; nvidia-smi found {len(gpus)} GPU(s)"
        return gpus
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        sources["nvml"] = f"no NVIDIA driver ({type(exc).__name__})"
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
    except Exception as exc:  # a driver/library mismatch shows up here, not at init
        notes.append(f"NVML failed while listing GPUs: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    sources["nvml"] = f"{len(gpus)} GPU(s)"
    return gpus


def probe_nvidia_smi(run: Runner = run_tool) -> list[GpuInfo] | None:
    """``nvidia-smi`` CSV (MiB); None when the tool is absent or fails."""
    out = run(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"])
    if out is None:
        return None
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        with contextlib.suppress(ValueError):
            gpus.append(GpuInfo(index=int(parts[0]), name=parts[1], vendor="nvidia", total_bytes=int(parts[2]) << 20,
                                free_bytes=int(parts[3]) << 20, source="nvidia-smi"))
    return gpus


# --- AMD ------------------------------------------------------------------------------------------
def probe_amd(notes: list[str], root: Path = Path("/sys/class/drm"), *, run: Runner = run_tool,
              sources: dict[str, str] | None = None) -> list[GpuInfo]:
    """AMD cards expose VRAM counters in sysfs (amdgpu driver); ``rocm-smi`` adds names, or the
    counters themselves where sysfs is not readable (containers)."""
    sources = {} if sources is None else sources
    gpus = _amd_sysfs(notes, root)
    sources["sysfs"] = f"{len(gpus)} AMD GPU(s)" if root.exists() else f"{root} not present"
    rocm = parse_rocm_smi(run(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json"]) or "")
    if rocm is None:
        sources["rocm-smi"] = "not installed" if shutil.which("rocm-smi") is None else "no usable output"
        return gpus
    sources["rocm-smi"] = f"{len(rocm)} GPU(s)"
    if not gpus:
        return rocm
    for gpu, extra in zip(gpus, rocm, strict=False):  # same enumeration order (card index)
        if extra.name and (not gpu.name or gpu.name.startswith("card")):
            gpu.name = extra.name
    return gpus


def _amd_sysfs(notes: list[str], root: Path) -> list[GpuInfo]:
    gpus: list[GpuInfo] = []
    if not root.exists():
        return gpus
    for card in sorted(root.glob("card[0-9]*")):
        if "-" in card.name:  # connectors (card0-HDMI-A-1) are not devices
            continue
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
        # an APU's "VRAM" is a carve-out of system RAM (usually small); report it as unified
        unified = total < (2 << 30) and (device / "mem_info_gtt_total").exists()
        gpus.append(GpuInfo(index=len(gpus), name=name or card.name, vendor="amd", total_bytes=total,
                            free_bytes=max(total - used, 0), unified_memory=unified, source="sysfs"))
    return gpus


def parse_rocm_smi(text: str) -> list[GpuInfo] | None:
    """``rocm-smi --showproductname --showmeminfo vram --json`` -> GPUs; None if unparsable."""
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    gpus = []
    for key in sorted((k for k in data if k.lower().startswith("card")), key=lambda k: int(re.sub(r"\D", "", k) or 0)):
        fields = {str(k).lower(): v for k, v in (data[key] or {}).items()}
        try:
            total = int(fields.get("vram total memory (b)", 0))
            used = int(fields.get("vram total used memory (b)", 0))
        except (TypeError, ValueError):
            total = used = 0
        name = next((str(fields[k]) for k in ("card series", "device name", "card model", "marketing name")
                     if fields.get(k) and str(fields[k]).lower() != "n/a"), key)
        gpus.append(GpuInfo(index=len(gpus), name=name, vendor="amd", total_bytes=total,
                            free_bytes=max(total - used, 0), source="rocm-smi"))
    return gpus


# --- Apple ----------------------------------------------------------------------------------------
def metal_working_set(total_ram: int, wired_limit_mb: int | None = None) -> int:
    """How much of the RAM Metal lets the GPU use: ``iogpu.wired_limit_mb`` when set, else macOS's
    default (about 2/3 of RAM up to 36 GiB, 3/4 above), which is what Metal reports as
    ``recommendedMaxWorkingSetSize``."""
    if wired_limit_mb:
        return min(wired_limit_mb << 20, total_ram)
    return total_ram * 3 // 4 if total_ram > 36 << 30 else total_ram * 2 // 3


def probe_apple(memory: MemoryInfo, notes: list[str] | None = None, sources: dict[str, str] | None = None, *,
                run: Runner = run_tool, system: str | None = None, machine: str | None = None) -> list[GpuInfo]:
    """Apple Silicon shares system memory with the GPU; Metal may use a fixed share of it."""
    sources = {} if sources is None else sources
    system = system or platform.system()
    machine = machine or platform.machine()
    if system != "Darwin":
        sources["sysctl"] = "not macOS"
        return []
    if machine != "arm64":
        sources["sysctl"] = "Intel Mac: GPUs are not unified memory (Metal devices come from the ggml registry)"
        return []
    total = memory.total_bytes
    with contextlib.suppress(TypeError, ValueError):
        total = int(_sysctl("hw.memsize", run) or total)
    wired = None
    with contextlib.suppress(TypeError, ValueError):
        wired = int(_sysctl("iogpu.wired_limit_mb", run) or 0) or None
    chip = _sysctl("machdep.cpu.brand_string", run) or "Apple Silicon"
    usable = metal_working_set(total, wired)
    sources["sysctl"] = f"{chip}, {total / 2**30:.0f} GiB unified memory, GPU working set {usable / 2**30:.1f} GiB" + (
        f" (iogpu.wired_limit_mb={wired})" if wired else "")
    return [GpuInfo(name=f"{chip} GPU", vendor="apple", total_bytes=usable,
                    free_bytes=min(usable, memory.available_bytes or usable), unified_memory=True, source="sysctl")]


# --- plugin-reported devices (ggml registry: Vulkan, CUDA, Metal as llama.cpp sees them) ---------
def _vendor_of(name: str) -> GpuVendor:
    low = name.lower()
    for vendor, words in (("nvidia", ("nvidia", "geforce", "quadro", "tesla", "rtx")),
                          ("amd", ("amd", "radeon", "instinct")), ("apple", ("apple",)), ("intel", ("intel", "arc "))):
        if any(w in low for w in words):
            return vendor  # type: ignore[return-value]
    return "other"


def _model_tokens(name: str) -> set[str]:
    """The distinctive parts of a GPU name (model numbers like 4090, 7900, a100)."""
    return {t for t in re.findall(r"[a-z0-9]+", name.lower()) if any(c.isdigit() for c in t)}


def _same_gpu(gpu: GpuInfo, name: str) -> bool:
    a, b = gpu.name.lower(), name.lower()
    if a and (a in b or b in a):
        return True
    return bool(_model_tokens(a) & _model_tokens(b)) and _vendor_of(name) in (gpu.vendor, "other")


def merge_plugin_devices(gpus: list[GpuInfo], extras: dict[str, Any]) -> list[GpuInfo]:
    """Add GPUs that plugins report (``extras[section]["devices"]``) and vendor tools missed.

    A device already known (same model name) only gets the plugin backend noted; Apple's Metal
    device replaces the sysctl estimate, since Metal's own working-set figure is authoritative.
    """
    merged = [g.model_copy(deep=True) for g in gpus]
    for section_name, section in extras.items():
        if not isinstance(section, dict):
            continue
        for dev in section.get("devices") or []:
            if not isinstance(dev, dict) or dev.get("type") not in ("gpu", "igpu"):
                continue
            backend = str(dev.get("backend") or section_name)
            label = str(dev.get("description") or dev.get("name") or "")
            total, free = int(dev.get("total_bytes") or 0), int(dev.get("free_bytes") or 0)
            match = next((g for g in merged if _same_gpu(g, label)), None)
            if match is None and backend in ("Metal", "MTL"):
                match = next((g for g in merged if g.vendor == "apple"), None)
            if match is not None:
                if backend not in match.backends:
                    match.backends.append(backend)
                if match.vendor == "apple" and backend in ("Metal", "MTL") and total:
                    match.total_bytes, match.free_bytes, match.source = total, free, f"{section_name}:{backend}"
                continue
            merged.append(GpuInfo(index=len(merged), name=label, vendor=_vendor_of(label), total_bytes=total,
                                  free_bytes=free, unified_memory=dev.get("type") == "igpu",
                                  source=f"{section_name}:{backend}", backends=[backend]))
    return merged


def probe(*, facts: dict[str, Any] | None = None) -> HardwareProbe:
    """Probe this machine now. Cheap enough to call per decision (tens of milliseconds).

    ``facts`` are the plugins' hardware facts (``Host.hardware_facts()``; :func:`velollm.loading.probe`
    passes them): ``None`` probes without plugins.
    """
    notes: list[str] = []
    sources: dict[str, str] = {}
    memory = probe_memory(notes)
    gpus = probe_nvidia(notes, sources) + probe_amd(notes, sources=sources) + probe_apple(memory, notes, sources)
    extras: dict[str, Any] = {}
    if facts is not None:
        extras = dict(facts)
        for name, backends in HardwareProbe(extras=extras).compiled_backends().items():
            error = extras[name].get("error") if isinstance(extras[name], dict) else None
            sources[name] = error or f"compiled backends: {', '.join(backends) or 'none'}"
        gpus = merge_plugin_devices(gpus, extras)
    return HardwareProbe(os=f"{platform.system()} {platform.release()}", cpu=probe_cpu(notes), memory=memory,
                         gpus=gpus, extras=extras, notes=notes, sources=sources)
