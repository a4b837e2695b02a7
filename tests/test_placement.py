"""Placement on machines we do not have: injected probes, the real llama.cpp backends, real GGUF metadata.

The llama.cpp backends read GPU availability and free memory from ``probe.extras["ggml"]``, so a
probe of "an 8 GB NVIDIA card" exercises exactly the code a real one would. Expected layer counts
are worked out in the comments from the model's numbers; they are not read back from the code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from velollm.errors import BackendNotFound, BackendUnavailable, InsufficientMemory
from velollm.gguf.info import ModelInfo, inspect
from velollm.hardware import CpuInfo, GpuInfo, HardwareProbe, MemoryInfo
from velollm.placement import (
    Device,
    MemoryNeeds,
    PlacementOptions,
    estimate_needs,
    fmt_bytes,
    place,
)
from velollm.plugins.llamacpp import KINDS, LlamaCppBackend

MiB, GiB = 1 << 20, 1 << 30


def machine(*, ram_total: int, ram_free: int, cores: int = 8, perf: int | None = None, arch: str = "x86_64",
            ggml: tuple[str, ...] = ("CPU",), devices: list[dict[str, Any]] | None = None,
            gpus: list[GpuInfo] | None = None) -> HardwareProbe:
    cpu_dev = {"name": "CPU", "description": "test CPU", "type": "cpu", "backend": "CPU", "free_bytes": ram_free,
               "total_bytes": ram_total}
    return HardwareProbe(
        os="test", cpu=CpuInfo(model="test CPU", arch=arch, physical_cores=cores, logical_cores=cores * 2,
                               performance_cores=perf, flags=["avx2"]),
        memory=MemoryInfo(total_bytes=ram_total, available_bytes=ram_free), gpus=gpus or [],
        extras={"ggml": {"backends": list(ggml), "devices": [cpu_dev, *(devices or [])], "error": None}},
    )


def cuda(i: int, name: str, total: int, free: int) -> dict[str, Any]:
    return {"name": f"CUDA{i}", "description": name, "type": "gpu", "backend": "CUDA", "free_bytes": free,
            "total_bytes": total}


def nvml(i: int, name: str, total: int, free: int) -> GpuInfo:
    return GpuInfo(index=i, name=name, vendor="nvidia", total_bytes=total, free_bytes=free, source="nvml")


@pytest.fixture(scope="module")
def backends() -> dict[str, Any]:
    return {f"llamacpp-{k}": LlamaCppBackend(k) for k in KINDS}


@pytest.fixture(scope="module")
def big() -> ModelInfo:
    """A 13B-class model with round numbers: 40 layers of 200 MiB, untied 500 MiB head, 500 MiB embeddings.

    KV cache: 40 layers × 8 KV heads × (128 + 128) × 2 bytes = 160 KiB per token, so 16 MiB per layer
    at 4096 tokens. Compute (batch 512): attention 4·512·(1 + 4·5120 + 4096·41) = 368.0 MiB >
    logits 4·512·(5120 + 32000) = 72.5 MiB. One offloaded layer therefore costs 216 MiB.
    """
    return ModelInfo(path=Path("/models/big-13b-q4.gguf"), file_size=9000 * MiB, gguf_version=3,
                     architecture="llama", name="big", context_length=16384, block_count=40,
                     embedding_length=5120, head_count=40, head_count_kv=8, key_length=128, value_length=128,
                     vocab_size=32000, layer_bytes=[200 * MiB] * 40, non_layer_bytes=1000 * MiB,
                     output_bytes=500 * MiB, tensor_bytes=9000 * MiB)


@pytest.fixture(scope="module")
def qwen15(qwen15_path: Path) -> ModelInfo:
    return inspect(qwen15_path)


def decision(plan: Any, topic: str) -> Any:
    return next(d for d in plan.decisions if d.topic == topic)


# --- the five machines of the issue ------------------------------------------------------------
def test_8gb_nvidia_card_offloads_the_head_and_29_of_40_layers(big: ModelInfo, backends: dict[str, Any]) -> None:
    # 7.5 GiB free - 512 MiB margin - 368 MiB compute = 6800 MiB; llama.cpp offloads the 500 MiB output
    # head first (n_gpu_layers counts it as the last layer), then (6800 - 500) // 216 = 29 layers
    probe = machine(ram_total=32 * GiB, ram_free=24 * GiB, ggml=("CPU", "CUDA"),
                    devices=[cuda(0, "NVIDIA GeForce RTX 3070", 8 * GiB, 7680 * MiB)],
                    gpus=[nvml(0, "NVIDIA GeForce RTX 3070", 8 * GiB, 7680 * MiB)])
    plan = place(big, probe, PlacementOptions(), backends)
    assert plan.backend == "llamacpp-cuda"
    assert plan.n_gpu_layers == 30 and plan.gpu_layers == 29 and plan.output_on_gpu
    assert plan.n_ctx == 4096 and plan.n_threads == 8
    reason = decision(plan, "n_gpu_layers").reason
    assert "the output head and 29 of 40 layers fit" in reason and "lower 11 run on the CPU" in reason
    assert "CUDA0" in reason
    assert plan.load_options().n_gpu_layers == 30
    # what stays in RAM: embeddings 500 + 11 layers × 216 (the head and its logits are on the GPU)
    assert plan.ram_bytes == 500 * MiB + 11 * 216 * MiB
    assert "llamacpp-cpu" in plan.rejected and "comes first" in plan.rejected["llamacpp-cpu"]


def test_24gb_card_takes_every_layer_and_the_output_head(big: ModelInfo, backends: dict[str, Any]) -> None:
    probe = machine(ram_total=64 * GiB, ram_free=60 * GiB, ggml=("CPU", "CUDA"),
                    devices=[cuda(0, "NVIDIA GeForce RTX 4090", 24 * GiB, 23 * GiB)])
    plan = place(big, probe, PlacementOptions(), backends)
    assert plan.backend == "llamacpp-cuda"
    assert plan.n_gpu_layers == 41 and plan.gpu_layers == 40 and plan.output_on_gpu  # 40 layers + the head
    assert "all 40 layers and the output head fit" in decision(plan, "n_gpu_layers").reason
    (gpu,) = plan.devices
    assert gpu.layers == 40 and gpu.output_head
    assert gpu.bytes == 40 * 216 * MiB + 500 * MiB + 4 * 512 * (1 + 4 * 5120 + 4096 * 41)
    assert plan.ram_bytes == 500 * MiB  # only the input embeddings stay in RAM


def test_two_gpus_share_the_layers(big: ModelInfo, backends: dict[str, Any]) -> None:
    # one 6 GiB card alone: 5640 - 512 - 368 = 4760 MiB -> the 500 MiB head + 19 layers (4104); the two
    # together hold all 40
    one = machine(ram_total=32 * GiB, ram_free=24 * GiB, ggml=("CPU", "CUDA"),
                  devices=[cuda(0, "NVIDIA GeForce RTX 2060", 6 * GiB, 5640 * MiB)])
    assert place(big, one, PlacementOptions(), backends).n_gpu_layers == 20
    two = machine(ram_total=32 * GiB, ram_free=24 * GiB, ggml=("CPU", "CUDA"),
                  devices=[cuda(0, "NVIDIA GeForce RTX 2060", 6 * GiB, 5640 * MiB),
                           cuda(1, "NVIDIA GeForce RTX 2060", 6 * GiB, 5640 * MiB)])
    plan = place(big, two, PlacementOptions(), backends)
    assert plan.n_gpu_layers == 41 and plan.output_on_gpu
    by_id = {d.id: d for d in plan.devices}
    assert set(by_id) == {"CUDA0", "CUDA1"}
    assert by_id["CUDA0"].layers + by_id["CUDA1"].layers == 40
    # CUDA0 carries the 368 MiB compute buffer, so the 500 MiB head goes to CUDA1: the layers come out even
    assert by_id["CUDA1"].output_head and not by_id["CUDA0"].output_head
    assert by_id["CUDA0"].layers == by_id["CUDA1"].layers == 20
    reason = decision(plan, "n_gpu_layers").reason
    assert "CUDA0" in reason and "CUDA1" in reason and "all 40 layers" in reason


def test_m2_with_16gb_unified_memory(qwen15: ModelInfo, big: ModelInfo, backends: dict[str, Any]) -> None:
    # Metal's working set on 16 GiB is 2/3 of it; the GPU's memory is the RAM itself
    probe = machine(ram_total=16 * GiB, ram_free=11 * GiB, cores=8, perf=4, arch="arm64", ggml=("CPU", "Metal"),
                    devices=[{"name": "Metal", "description": "Apple M2", "type": "gpu", "backend": "Metal",
                              "free_bytes": 16 * GiB * 2 // 3, "total_bytes": 16 * GiB * 2 // 3}],
                    gpus=[GpuInfo(name="Apple M2 GPU", vendor="apple", total_bytes=16 * GiB * 2 // 3,
                                  free_bytes=16 * GiB * 2 // 3, unified_memory=True, source="sysctl")])
    plan = place(qwen15, probe, PlacementOptions(), backends)
    assert plan.backend == "llamacpp-metal"
    assert plan.n_gpu_layers == qwen15.block_count + 1 == 29 and plan.output_on_gpu
    assert plan.devices[0].unified_memory
    assert plan.n_threads == 4 and "performance cores" in decision(plan, "n_threads").reason
    # the 13B model: 9.5 GiB at 4096 tokens is more than 11 GiB free minus the 1.6 GiB reserve, because
    # on unified memory GPU layers use RAM too; at 2048 tokens (8 MiB of KV per layer) it fits
    plan = place(big, probe, PlacementOptions(), backends)
    assert plan.backend == "llamacpp-metal" and plan.n_gpu_layers == 41
    assert plan.n_ctx == 2048
    assert "capped from 4096 to 2048" in decision(plan, "n_ctx").reason


def test_cpu_only_with_4gb_ram(qwen15: ModelInfo, big: ModelInfo, backends: dict[str, Any]) -> None:
    probe = machine(ram_total=4 * GiB, ram_free=3 * GiB, cores=4)
    plan = place(qwen15, probe, PlacementOptions(), backends)
    assert plan.backend == "llamacpp-cpu" and plan.n_gpu_layers == 0 and plan.n_ctx == 4096 and plan.n_threads == 4
    assert "runs on the CPU: all 28 layers in RAM" in decision(plan, "n_gpu_layers").reason
    assert "no CUDA backend" in plan.rejected["llamacpp-cuda"]
    # 32768 tokens: 896 MiB KV + 844 MiB attention scratch + 1.04 GiB weights > 3 GiB - 512 MiB reserve;
    # 16384 tokens (448 + 428 MiB) fits
    plan = place(qwen15, probe, PlacementOptions(n_ctx=32768), backends)
    assert plan.n_ctx == 16384
    assert "requested; capped from 32768 to 16384" in decision(plan, "n_ctx").reason
    with pytest.raises(InsufficientMemory) as err:
        place(qwen15, probe, PlacementOptions(n_ctx=32768, cap_ctx=False), backends)
    assert "32768-token context" in str(err.value)
    with pytest.raises(InsufficientMemory) as err:
        place(big, probe, PlacementOptions(), backends)
    message = str(err.value)
    assert "does not fit in memory" in message and "3.00 GiB is available" in message
    assert "512-token context either" in message and "no GPU memory is usable" in message


# --- decisions and overrides -------------------------------------------------------------------
def test_gpu_without_a_gpu_build_is_explained(qwen15: ModelInfo, backends: dict[str, Any]) -> None:
    probe = machine(ram_total=32 * GiB, ram_free=20 * GiB, gpus=[nvml(0, "NVIDIA GeForce RTX 4090", 24 * GiB,
                                                                       23 * GiB)])
    plan = place(qwen15, probe, PlacementOptions(), backends)
    assert plan.backend == "llamacpp-cpu"
    reason = decision(plan, "n_gpu_layers").reason
    assert "RTX 4090" in reason and "no usable backend drives it" in reason
    assert "rebuild with" in plan.rejected["llamacpp-cuda"]


def test_a_gpu_too_small_for_one_layer_falls_back_to_the_cpu(big: ModelInfo, backends: dict[str, Any]) -> None:
    # 1 GiB free - 512 MiB margin - 368 MiB compute = 144 MiB < 216 MiB per layer
    probe = machine(ram_total=32 * GiB, ram_free=24 * GiB, ggml=("CPU", "CUDA"),
                    devices=[cuda(0, "NVIDIA GeForce GT 1030", 2 * GiB, 1 * GiB)])
    plan = place(big, probe, PlacementOptions(), backends)
    assert plan.backend == "llamacpp-cpu" and plan.n_gpu_layers == 0
    assert "not one layer fits on CUDA0" in plan.rejected["llamacpp-cuda"]


def test_user_overrides_win_and_are_labelled(big: ModelInfo, backends: dict[str, Any]) -> None:
    probe = machine(ram_total=32 * GiB, ram_free=24 * GiB, ggml=("CPU", "CUDA"),
                    devices=[cuda(0, "NVIDIA GeForce RTX 3070", 8 * GiB, 7680 * MiB)])
    forced = place(big, probe, PlacementOptions(n_gpu_layers=-1, n_threads=3, use_mmap=False), backends)
    assert forced.n_gpu_layers == 41 and forced.n_threads == 3 and forced.use_mmap is False
    assert "WARNING: over the free memory of CUDA0" in decision(forced, "n_gpu_layers").reason
    assert decision(forced, "n_threads").reason == "requested"
    on_cpu = place(big, probe, PlacementOptions(backend="llamacpp-cpu"), backends)
    assert on_cpu.backend == "llamacpp-cpu" and on_cpu.n_gpu_layers == 0
    assert decision(on_cpu, "backend").reason.startswith("requested")
    with pytest.raises(BackendUnavailable, match="no Vulkan backend"):
        place(big, probe, PlacementOptions(backend="llamacpp-vulkan"), backends)
    with pytest.raises(BackendNotFound, match="no backend named 'nope'"):
        place(big, probe, PlacementOptions(backend="nope"), backends)


def test_mlock_is_refused_when_the_limit_is_too_low(qwen15: ModelInfo, backends: dict[str, Any]) -> None:
    probe = machine(ram_total=16 * GiB, ram_free=12 * GiB)
    probe.memory.mlock_limit_bytes = 8 * MiB
    plan = place(qwen15, probe, PlacementOptions(use_mlock=True), backends)
    assert plan.use_mlock is False and "RLIMIT_MEMLOCK is 8 MiB" in decision(plan, "use_mlock").reason
    probe.memory.mlock_limit_bytes = None
    assert place(qwen15, probe, PlacementOptions(use_mlock=True), backends).use_mlock is True


def test_quantized_kv_cache_and_flash_attention_shrink_the_estimate(qwen15: ModelInfo) -> None:
    f16 = estimate_needs(qwen15, 32768, PlacementOptions())
    q8 = estimate_needs(qwen15, 32768, PlacementOptions(kv_cache_type="q8_0"))
    fa = estimate_needs(qwen15, 32768, PlacementOptions(flash_attn=True))
    assert q8.kv_bytes == pytest.approx(f16.kv_bytes * 34 / 64, rel=1e-6)
    assert fa.compute_bytes < f16.compute_bytes


def test_estimates_match_what_llama_cpp_allocates(qwen15: ModelInfo, gemma_path: Path) -> None:
    """Reference figures from llama.cpp 0.3.36's own log (``verbose=True``) on this machine."""
    needs = estimate_needs(qwen15, 32768, PlacementOptions())
    assert needs.kv_bytes == 896 * MiB  # "CPU KV buffer size = 896.00 MiB"
    assert needs.compute_bytes == pytest.approx(848.01 * MiB, rel=0.01)  # "compute buffer size = 848.01 MiB"
    flash = estimate_needs(qwen15, 32768, PlacementOptions(flash_attn=True))
    assert flash.compute_bytes == pytest.approx(302.75 * MiB, rel=0.02)  # flash_attn=True: 302.75 MiB
    gemma = estimate_needs(inspect(gemma_path), 2048, PlacementOptions())
    assert gemma.kv_bytes == 36 * MiB  # 6 MiB full + 30 MiB sliding-window cache
    assert gemma.compute_bytes == pytest.approx(514.5 * MiB, rel=0.01)
    assert gemma.output_tied  # Gemma reuses its embeddings as the output head


# --- third-party backends --------------------------------------------------------------------------
class ToyAccelerator:
    """A third-party backend stating its devices and its own (float32) memory needs."""

    name = "toy-accel"
    priority = 5  # after CUDA (0), before Metal (10)

    def available(self, probe: HardwareProbe) -> tuple[bool, str]:
        return True, "toy accelerator card"

    def devices(self, probe: HardwareProbe) -> list[Device]:
        return [Device(id="toy0", name="Toy NPU", total_bytes=16 * GiB, free_bytes=16 * GiB)]

    def memory_needs(self, info: ModelInfo, n_ctx: int, options: PlacementOptions) -> MemoryNeeds:
        base = estimate_needs(info, n_ctx, options)  # weights dequantized to float32: about 8× a Q4 file
        return base.model_copy(update={"layer_bytes": [b * 8 for b in base.layer_bytes]})

    def load(self, model_file: Path, options: Any) -> Any:
        raise AssertionError("placement must not load")


class PlainCpuBackend:
    """A third-party backend that says nothing about placement: it runs from RAM."""

    name = "plain"

    def available(self, probe: HardwareProbe) -> tuple[bool, str]:
        return True, "always"

    def load(self, model_file: Path, options: Any) -> Any:
        raise AssertionError("placement must not load")


class RemoteLike(PlainCpuBackend):
    name = "remote-like"
    auto_select = False  # declared, never guessed from the name

    def memory_needs(self, info: ModelInfo, n_ctx: int, options: PlacementOptions) -> None:
        return None


def test_third_party_backends_are_placeable(qwen15: ModelInfo, backends: dict[str, Any]) -> None:
    probe = machine(ram_total=16 * GiB, ram_free=12 * GiB)
    everything = {**backends, "toy-accel": ToyAccelerator(), "plain": PlainCpuBackend(), "remote-like": RemoteLike()}
    plan = place(qwen15, probe, PlacementOptions(), everything)
    assert plan.backend == "toy-accel"  # priority 5 beats llamacpp-cpu (30)
    assert plan.n_gpu_layers == 29 and plan.devices[0].id == "toy0"
    assert plan.weights_bytes > 8 * sum(qwen15.layer_bytes) - 1  # its own estimate was used
    assert plan.rejected["remote-like"] == "used only when named explicitly"
    plain = place(qwen15, probe, PlacementOptions(backend="plain"), everything)
    assert plain.n_gpu_layers == 0 and plain.accounted and plain.memory_bytes > sum(qwen15.layer_bytes)
    # a backend that declares no max_parallel decodes one sequence; llama.cpp's batches the ones memory allows
    assert plan.parallel == plain.parallel == 1
    assert place(qwen15, probe, PlacementOptions(backend="llamacpp-cpu"), everything).parallel == 4
    remote = place(qwen15, probe, PlacementOptions(backend="remote-like"), everything)
    assert not remote.accounted and remote.memory_bytes == 0


def test_place_cli_prints_the_plan_and_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from velollm.cli import main

    assert main(["place", "qwen2.5-coder-1.5b-instruct", "--ctx", "8192", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["n_ctx"] == 8192 and data["load_options"]["n_ctx"] == 8192
    assert any(line.startswith("n_gpu_layers: ") for line in data["explain"])
    assert main(["place", "qwen2.5-coder-1.5b-instruct", "--ctx", "8192", "--json",
                 "--draft-model", "qwen2.5-coder-0.5b-instruct"]) == 0
    paired = json.loads(capsys.readouterr().out)
    assert any(line.startswith("draft_model: ") for line in paired["explain"])
    assert paired["plan"]["ram_bytes"] > data["plan"]["ram_bytes"]
    assert paired["load_options"]["draft_model"] == "qwen2.5-coder-0.5b-instruct"
    assert main(["place", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_a_speculative_draft_model_is_counted_beside_the_main_model(qwen15_path: Path, qwen_path: Path,
                                                                    backends: dict[str, Any]) -> None:
    from velollm.engine import LoadOptions
    from velollm.loading import draft_bytes, prepare

    options = LoadOptions(draft_model=str(qwen_path))
    for n_ctx in (2048, 16384):  # the draft's memory at the main model's context, as the estimate has it
        assert draft_bytes(options, n_ctx) == pytest.approx(
            estimate_needs(inspect(qwen_path), n_ctx, PlacementOptions()).total_bytes, rel=1e-6)
    # 3 GiB free: alone, the 1.5B model gets its 16k context; with the draft beside it, less
    probe = machine(ram_total=4 * GiB, ram_free=3 * GiB, cores=4)
    alone = prepare(qwen15_path, options=LoadOptions(n_ctx=16384), probe=probe).plan
    paired = prepare(qwen15_path, options=LoadOptions(n_ctx=16384, draft_model=str(qwen_path)), probe=probe).plan
    assert alone.n_ctx == 16384 and paired.n_ctx == 8192
    assert paired.ram_bytes + 512 * MiB <= 3 * GiB  # the pair fits in what the probe says is free, minus the reserve
    assert decision(paired, "draft_model").value == fmt_bytes(draft_bytes(options, 8192))
    # the pool's memory budget sees both models
    roomy = machine(ram_total=64 * GiB, ram_free=60 * GiB, cores=4)
    single = prepare(qwen15_path, options=LoadOptions(n_ctx=4096), probe=roomy).plan
    both = prepare(qwen15_path, options=LoadOptions(n_ctx=4096, draft_model=str(qwen_path)), probe=roomy).plan
    assert both.memory_bytes - single.memory_bytes == draft_bytes(options, 4096)
