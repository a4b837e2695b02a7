"""The hardware probe: this machine for real, other machines through injected tools and sysfs trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from velollm import hardware
from velollm.hardware import GpuInfo, HardwareProbe, MemoryInfo
from velollm.loading import probe_machine

GiB, MiB = 1 << 30, 1 << 20


def runner(outputs: dict[str, str]):  # -> Runner
    """A fake tool runner: the output registered for the command's first words, or None (tool missing)."""

    def run(argv: list[str]) -> str | None:
        for prefix, text in outputs.items():
            if " ".join(argv).startswith(prefix):
                return text
        return None

    return run


def test_probe_this_machine() -> None:
    probe = probe_machine()  # with the plugins' facts, as velollm uses it
    assert probe.cpu.logical_cores >= probe.cpu.physical_cores >= 1
    assert probe.cpu.model and probe.cpu.arch
    assert 0 < probe.memory.available_bytes <= probe.memory.total_bytes
    # every GPU source reports what it found or why not, even where there is nothing to find
    assert {"nvml", "sysfs", "rocm-smi", "sysctl", "ggml"} <= set(probe.sources)
    assert "CPU" in probe.compiled_backends()["ggml"]
    if probe.cpu.arch == "x86_64" and Path("/proc/cpuinfo").exists():
        flags = Path("/proc/cpuinfo").read_text()
        assert ("avx2" in probe.cpu.flags) == (" avx2" in flags)


def test_old_probe_json_still_loads() -> None:
    """Probes saved before the new fields existed (cpu, memory, gpus, extras, notes) still validate."""
    old = {"os": "Linux", "cpu": {"model": "x", "arch": "x86_64", "physical_cores": 4, "logical_cores": 8,
                                  "flags": ["avx2"]},
           "memory": {"total_bytes": 8 * GiB, "available_bytes": 4 * GiB},
           "gpus": [{"index": 0, "name": "g", "vendor": "nvidia", "total_bytes": GiB, "free_bytes": GiB}],
           "extras": {}, "notes": ["n"]}
    probe = HardwareProbe.model_validate(old)
    assert probe.cpu.performance_cores is None and probe.memory.mlock_limit_bytes is None
    assert probe.gpus[0].backends == [] and probe.sources == {}


def test_nvidia_smi_is_the_fallback_without_nvml() -> None:
    run = runner({"nvidia-smi": "0, NVIDIA GeForce RTX 4090, 24564, 23000\n1, NVIDIA A100-SXM4-80GB, 81920, 80000\n"})
    gpus = hardware.probe_nvidia_smi(run)
    assert gpus is not None and [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB"]
    assert gpus[0].total_bytes == 24564 * MiB and gpus[1].free_bytes == 80000 * MiB
    assert gpus[0].source == "nvidia-smi" and gpus[1].index == 1
    assert hardware.probe_nvidia_smi(runner({})) is None


def _amd_card(root: Path, n: int, *, total: int | None, used: int = 0, name: str | None = None,
              vendor: str = "0x1002") -> None:
    device = root / f"card{n}" / "device"
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")
    if total is not None:
        (device / "mem_info_vram_total").write_text(str(total))
        (device / "mem_info_vram_used").write_text(str(used))
    if name:
        (device / "product_name").write_text(name)


ROCM_JSON = json.dumps({
    "card0": {"VRAM Total Memory (B)": str(24 * GiB), "VRAM Total Used Memory (B)": str(2 * GiB),
              "Card Series": "Radeon RX 7900 XTX", "Card Vendor": "Advanced Micro Devices, Inc. [AMD/ATI]"},
})


def test_amd_from_sysfs_named_by_rocm_smi(tmp_path: Path) -> None:
    _amd_card(tmp_path, 0, total=24 * GiB, used=2 * GiB)
    _amd_card(tmp_path, 1, total=8 * GiB, vendor="0x10de")  # an NVIDIA card: not AMD's business
    (tmp_path / "card0-DP-1").mkdir()  # a connector, not a device
    notes: list[str] = []
    sources: dict[str, str] = {}
    gpus = hardware.probe_amd(notes, tmp_path, run=runner({"rocm-smi": ROCM_JSON}), sources=sources)
    assert len(gpus) == 1
    assert gpus[0].name == "Radeon RX 7900 XTX" and gpus[0].vendor == "amd"
    assert gpus[0].total_bytes == 24 * GiB and gpus[0].free_bytes == 22 * GiB and gpus[0].source == "sysfs"
    assert sources["sysfs"] == "1 AMD GPU(s)" and sources["rocm-smi"] == "1 GPU(s)"


def test_amd_from_rocm_smi_alone_and_without_tools(tmp_path: Path) -> None:
    _amd_card(tmp_path, 0, total=None)  # sysfs without counters (a container)
    notes: list[str] = []
    gpus = hardware.probe_amd(notes, tmp_path, run=runner({"rocm-smi": ROCM_JSON}))
    assert [g.source for g in gpus] == ["rocm-smi"] and gpus[0].free_bytes == 22 * GiB
    assert any("without VRAM counters" in n for n in notes)
    sources: dict[str, str] = {}
    assert hardware.probe_amd([], tmp_path / "absent", run=runner({}), sources=sources) == []
    assert "not present" in sources["sysfs"] and sources["rocm-smi"] in ("not installed", "no usable output")
    assert hardware.parse_rocm_smi("not json") is None and hardware.parse_rocm_smi("") is None


def test_apple_silicon_unified_memory() -> None:
    memory = MemoryInfo(total_bytes=16 * GiB, available_bytes=9 * GiB)
    sysctl = runner({"sysctl -n hw.memsize": str(16 * GiB), "sysctl -n machdep.cpu.brand_string": "Apple M2\n"})
    sources: dict[str, str] = {}
    (gpu,) = hardware.probe_apple(memory, [], sources, run=sysctl, system="Darwin", machine="arm64")
    assert gpu.unified_memory and gpu.vendor == "apple" and gpu.name == "Apple M2 GPU"
    assert gpu.total_bytes == 16 * GiB * 2 // 3 and gpu.free_bytes == 9 * GiB
    assert "Apple M2" in sources["sysctl"]
    wired = runner({"sysctl -n hw.memsize": str(16 * GiB), "sysctl -n iogpu.wired_limit_mb": "12288"})
    (gpu,) = hardware.probe_apple(memory, [], {}, run=wired, system="Darwin", machine="arm64")
    assert gpu.total_bytes == 12 * GiB  # the user raised Metal's limit
    assert hardware.metal_working_set(64 * GiB) == 48 * GiB  # above 36 GiB macOS allows 3/4
    linux: dict[str, str] = {}
    assert hardware.probe_apple(memory, [], linux, run=sysctl, system="Linux", machine="x86_64") == []
    assert linux["sysctl"] == "not macOS"


def test_apple_cpu_counts_performance_cores(tmp_path: Path) -> None:
    sysctl = runner({"sysctl -n machdep.cpu.brand_string": "Apple M2", "sysctl -n hw.perflevel0.physicalcpu": "4"})
    cpu = hardware.probe_cpu([], run=sysctl, system="Darwin", machine="arm64", cpuinfo=tmp_path / "none")
    assert cpu.model == "Apple M2" and cpu.arch == "arm64"
    assert cpu.performance_cores == 4 and "neon" in cpu.flags
    intel = runner({"sysctl -n machdep.cpu.features": "FPU SSE4.2 AVX1.0 F16C",
                    "sysctl -n machdep.cpu.leaf7_features": "AVX2 BMI2 AVX512F"})
    cpu = hardware.probe_cpu([], run=intel, system="Darwin", machine="x86_64", cpuinfo=tmp_path / "none")
    assert cpu.performance_cores is None and {"avx", "avx2", "avx512f", "f16c"} <= set(cpu.flags)


def test_plugin_devices_merge_without_duplicates() -> None:
    nvidia = GpuInfo(index=0, name="NVIDIA GeForce RTX 4090", vendor="nvidia", total_bytes=24 * GiB,
                     free_bytes=23 * GiB, source="nvml")
    apple = GpuInfo(name="Apple M2 GPU", vendor="apple", total_bytes=10 * GiB, free_bytes=10 * GiB,
                    unified_memory=True, source="sysctl")
    extras = {"ggml": {"backends": ["CPU", "Vulkan", "Metal"], "devices": [
        {"name": "CPU", "type": "cpu", "backend": "CPU", "total_bytes": 1, "free_bytes": 1},
        {"name": "Vulkan0", "description": "NVIDIA GeForce RTX 4090", "type": "gpu", "backend": "Vulkan",
         "total_bytes": 24 * GiB, "free_bytes": 22 * GiB},
        {"name": "Vulkan1", "description": "Intel(R) UHD Graphics 770", "type": "igpu", "backend": "Vulkan",
         "total_bytes": 8 * GiB, "free_bytes": 8 * GiB},
        {"name": "Metal", "description": "Apple M2", "type": "gpu", "backend": "Metal",
         "total_bytes": 11 * GiB, "free_bytes": 11 * GiB},
    ]}}
    merged = hardware.merge_plugin_devices([nvidia, apple], extras)
    assert [g.name for g in merged] == ["NVIDIA GeForce RTX 4090", "Apple M2 GPU", "Intel(R) UHD Graphics 770"]
    assert merged[0].backends == ["Vulkan"] and merged[0].source == "nvml"  # known card: only noted
    assert merged[1].total_bytes == 11 * GiB and merged[1].source == "ggml:Metal"  # Metal's own figure wins
    assert merged[2].vendor == "intel" and merged[2].unified_memory and merged[2].source == "ggml:Vulkan"
    assert nvidia.backends == []  # the inputs are not modified


def test_probe_json_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from velollm.cli import main

    assert main(["probe", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    machine = data["machine"]
    assert machine["cpu"]["physical_cores"] >= 1 and machine["memory"]["total_bytes"] > 0
    assert "sources" in machine and "gpus" in machine
    assert "CPU" in data["compiled_backends"]["ggml"]
    assert data["backends"]["llamacpp-cpu"]["usable"] is True
    assert data["backends"]["llamacpp-cpu"]["devices"] == []  # the CPU backend offloads nothing
    from velollm.plugins.llamacpp.registry import GgmlRegistry

    found = GgmlRegistry.model_validate(machine["extras"]["ggml"])  # a GPU build on a GPU machine: usable
    assert data["backends"]["llamacpp-cuda"]["usable"] is (found.has_backend("cuda") and bool(found.devices_of("cuda")))
