"""Load options that placement plans reach llama.cpp: KV cache types, the multi-GPU split, NUMA strategies.

The KV type is read back from llama.cpp itself (its load log names the K and V types and the
buffer size, and the context's state grows by the bytes the cache really holds); the tensor split
and NUMA strategy are checked where they enter ``Llama(...)``, with an injected two-GPU probe, so
no GPU is needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from velollm.engine import GenerationRequest, LoadOptions
from velollm.errors import InvalidRequest, UnsupportedFeature, VeloError
from velollm.hardware import CpuInfo, HardwareProbe, MemoryInfo
from velollm.placement import KV_CACHE_TYPES, PlacementOptions, estimate_needs

MiB, GiB = 1 << 20, 1 << 30
_KV_LINE = re.compile(r"K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB")


def _load_and_measure(path: Path, **options: Any) -> tuple[set[tuple[str, str]], float, int]:
    """(K/V types llama.cpp logged, KV MiB it allocated, state bytes after a 100-token prompt)."""
    import llama_cpp

    from velollm.plugins.llamacpp import LlamaCppBackend
    from velollm.plugins.llamacpp import log as llamacpp_log

    with llamacpp_log.capture() as log:
        engine = LlamaCppBackend("cpu").load(path, LoadOptions(n_ctx=1024, n_threads=1, **options))
    try:
        found = _KV_LINE.findall("".join(log))
        engine.generate(GenerationRequest.of(prompt="hello " * 100, max_tokens=1, temperature=0.0))
        state = llama_cpp.llama_state_get_size(engine._llama._ctx.ctx)
    finally:
        engine.close()
    assert found, "llama.cpp logged no KV cache line"
    return {(k, v) for k, _, v, _ in found}, sum(float(k) + float(v) for _, k, _, v in found), state


def test_kv_cache_type_reaches_the_context_and_shrinks_it(gemma_path: Path) -> None:
    types16, mib16, state16 = _load_and_measure(gemma_path, flash_attn=True)
    types8, mib8, state8 = _load_and_measure(gemma_path, flash_attn=True, type_k="q8_0", type_v="q8_0")
    assert types16 == {("f16", "f16")} and types8 == {("q8_0", "q8_0")}
    # q8_0 holds 34 bytes per 32 elements, f16 64: about 0.53 of the memory
    assert 0.45 < mib8 / mib16 < 0.6, (mib8, mib16)
    assert state8 < 0.7 * state16, (state8, state16)  # the cached tokens really take less room
    mixed, _, _ = _load_and_measure(gemma_path, type_k="q4_0")  # a quantised K alone needs no flash attention
    assert mixed == {("q4_0", "f16")}


def test_quantised_v_cache_without_flash_attention_is_refused(gemma_path: Path) -> None:
    from velollm.plugins.llamacpp import LlamaCppBackend

    with pytest.raises(InvalidRequest, match="flash_attn"):
        LlamaCppBackend("cpu").load(gemma_path, LoadOptions(type_v="q8_0"))


def test_native_refuses_a_quantised_kv_cache(gemma_path: Path) -> None:
    from velollm.plugins.native import NativeBackend

    with pytest.raises(UnsupportedFeature, match="type_k=q8_0"):
        NativeBackend().load(gemma_path, LoadOptions(type_k="q8_0"))


def test_placement_sizes_the_kv_cache_it_will_get(gemma_path: Path) -> None:
    from velollm.gguf.info import inspect

    info = inspect(gemma_path)
    f16 = PlacementOptions.from_load_options(LoadOptions())
    q8 = PlacementOptions.from_load_options(LoadOptions(type_k="q8_0", type_v="q8_0", flash_attn=True))
    mixed = PlacementOptions.from_load_options(LoadOptions(type_k="q8_0"))
    assert (f16.kv_types, q8.kv_types, mixed.kv_types) == ("f16", "q8_0", "q8_0/f16")
    assert mixed.kv_bytes_per_element == pytest.approx((KV_CACHE_TYPES["q8_0"] + 2.0) / 2)
    kv16, kv8 = (estimate_needs(info, 4096, o).kv_bytes for o in (f16, q8))
    assert kv8 == pytest.approx(kv16 * 34 / 64, rel=0.01)


# --- the multi-GPU split and NUMA reach Llama(...) ----------------------------------------------------
class _Recorded(Exception):
    pass


@pytest.fixture
def llama_kwargs(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace ``llama_cpp.Llama`` by a recorder: what the engine would construct it with, nothing loaded."""
    import llama_cpp

    seen: dict[str, Any] = {}

    def record(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Recorded

    monkeypatch.setattr(llama_cpp, "Llama", record)
    return seen


def _two_gpus(free0: int = 4 * GiB, free1: int = 4 * GiB) -> HardwareProbe:
    cpu = {"name": "CPU", "description": "test CPU", "type": "cpu", "backend": "CPU", "free_bytes": 24 * GiB,
           "total_bytes": 32 * GiB}
    gpus = [{"name": f"CUDA{i}", "description": "NVIDIA test", "type": "gpu", "backend": "CUDA",
             "free_bytes": free, "total_bytes": 8 * GiB} for i, free in enumerate((free0, free1))]
    return HardwareProbe(os="test", cpu=CpuInfo(model="test CPU", arch="x86_64", physical_cores=4, logical_cores=8,
                                                flags=["avx2"]),
                         memory=MemoryInfo(total_bytes=32 * GiB, available_bytes=24 * GiB),
                         extras={"ggml": {"backends": ["CPU", "CUDA"], "devices": [cpu, *gpus], "error": None}})


def test_a_two_gpu_plan_reaches_llama_as_tensor_split(gemma_path: Path, llama_kwargs: dict[str, Any]) -> None:
    from velollm.gguf import info as gguf_info
    from velollm.host import get_host
    from velollm.loading import prepare
    from velollm.placement import estimate_needs

    # the first GPU also holds the compute buffer and the last the output head (llama.cpp puts it
    # with the highest layers): give each that much more, so the layers spread over both
    plan = prepare(gemma_path, backend="llamacpp-cuda", probe=_two_gpus()).plan
    head = estimate_needs(gguf_info.inspect(gemma_path), plan.n_ctx).output_bytes
    probe = _two_gpus(GiB + plan.compute_bytes, GiB + head)
    prepared = prepare(gemma_path, backend="llamacpp-cuda", probe=probe)
    plan = prepared.plan
    by_id = {d.id: d for d in plan.devices}
    assert set(by_id) == {"CUDA0", "CUDA1"} and all(d.layers for d in by_id.values())
    expected = [by_id[f"CUDA{i}"].layers + by_id[f"CUDA{i}"].output_head for i in range(2)]
    assert plan.tensor_split == expected and sum(expected) == plan.n_gpu_layers
    assert prepared.load_options.tensor_split == expected
    with pytest.raises(_Recorded):
        get_host().backend("llamacpp-cuda").load(prepared.resolved.path, prepared.load_options)
    assert llama_kwargs["tensor_split"] == expected
    assert llama_kwargs["n_gpu_layers"] == plan.n_gpu_layers
    # a split the user gives wins over the plan's
    mine = prepare(gemma_path, backend="llamacpp-cuda", probe=probe, options=LoadOptions(tensor_split=[3, 1]))
    assert mine.load_options.tensor_split == [3, 1]


def test_one_device_plans_no_split(gemma_path: Path) -> None:
    from velollm.loading import prepare

    plan = prepare(gemma_path, backend="llamacpp-cpu").plan
    assert plan.tensor_split is None and prepare(gemma_path, backend="llamacpp-cpu").load_options.tensor_split is None


@pytest.mark.parametrize(("numa", "strategy"), [(False, 0), (True, 1), ("distribute", 1), ("isolate", 2),
                                                ("numactl", 3), ("mirror", 4)])
def test_numa_strategy_reaches_llama(gemma_path: Path, llama_kwargs: dict[str, Any], numa: Any,
                                     strategy: int) -> None:
    import llama_cpp

    from velollm.plugins.llamacpp import LlamaCppBackend

    with pytest.raises(_Recorded):
        LlamaCppBackend("cpu").load(gemma_path, LoadOptions(numa=numa))
    assert llama_kwargs["numa"] == strategy
    names = ["DISABLED", "DISTRIBUTE", "ISOLATE", "NUMACTL", "MIRROR"]
    assert getattr(llama_cpp, f"GGML_NUMA_STRATEGY_{names[strategy]}") == strategy


def test_unknown_numa_strategy_and_bad_split_are_refused() -> None:
    from velollm.errors import validated

    for bad in ({"numa": "interleave"}, {"tensor_split": [0, 0]}, {"tensor_split": [-1, 2]}, {"type_k": "q3"}):
        with pytest.raises(VeloError):
            validated(LoadOptions, bad, "load options")


def test_unknown_llama_arguments_in_extra_are_refused(gemma_path: Path, llama_kwargs: dict[str, Any]) -> None:
    from velollm.plugins.llamacpp import LlamaCppBackend

    # Llama(**kwargs) would swallow a misspelt name without a word
    with pytest.raises(InvalidRequest, match="rope_freq_bas"):
        LlamaCppBackend("cpu").load(gemma_path, LoadOptions(extra={"rope_freq_bas": 10000.0}))
    with pytest.raises(_Recorded):  # a real Llama argument passes through
        LlamaCppBackend("cpu").load(gemma_path, LoadOptions(extra={"rope_freq_base": 10000.0}))
    assert llama_kwargs["rope_freq_base"] == 10000.0
