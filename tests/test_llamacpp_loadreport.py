"""Reading back what llama.cpp did at load time (velollm.plugins.llamacpp.loadreport).

On the CPU build the real log carries the buffer lines (weights mapped from the file, KV cache,
compute): their sizes must be what the file and placement's KV estimate say. The offload line
only appears in GPU builds; its format is checked on llama.cpp's own wording, and for real in
tests/test_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from velollm.engine import LoadOptions
from velollm.gguf import info as gguf_info
from velollm.gguf import synthetic
from velollm.plugins.llamacpp import loadreport
from velollm.plugins.llamacpp import log as llamacpp_log

MiB = 1 << 20


def test_cpu_load_buffers_match_the_file_and_the_kv_estimate(tmp_path: Path) -> None:
    from velollm.plugins.llamacpp import LlamaCppBackend

    path = synthetic.generate(tmp_path / "m.gguf", arch="qwen2", size="tiny")
    info = gguf_info.inspect(path)
    with llamacpp_log.capture() as lines:
        engine = LlamaCppBackend("cpu").load(path, LoadOptions(n_ctx=512, n_threads=1))
    engine.close()
    report = loadreport.parse(lines)
    assert report.offloaded_layers is None  # a CPU-only build does not offload
    weights = sum(report.model_buffers.values())
    assert abs(weights - info.tensor_bytes) <= 0.01 * info.tensor_bytes + 0.01 * MiB, (report, info.tensor_bytes)
    assert sum(report.kv_buffers.values()) == pytest.approx(info.kv_cache_bytes(512), abs=0.01 * MiB)
    assert sum(report.compute_buffers.values()) > 0
    assert report.device_bytes("CUDA0") == 0


def test_gpu_log_wording_is_parsed() -> None:
    text = ("load_tensors: offloading output layer to GPU\nload_tensors: offloading 27 repeating layers to GPU\n"
            "load_tensors: offloaded 28/29 layers to GPU\n"
            "load_tensors:        CUDA0 model buffer size =   300.50 MiB\n"
            "load_tensors:   CPU_Mapped model buffer size =    50.00 MiB\n"
            "llama_kv_cache:      CUDA0 KV buffer size =    48.00 MiB\n"
            "llama_context:      CUDA0 compute buffer size =   100.25 MiB\n"
            "llama_context:  CUDA_Host compute buffer size =     9.01 MiB\n")
    report = loadreport.parse([text[:70], text[70:]])  # the callback delivers fragments
    assert (report.offloaded_layers, report.offloadable_layers) == (28, 29)
    assert report.model_buffers == {"CUDA0": round(300.5 * MiB), "CPU_Mapped": 50 * MiB}
    assert report.device_bytes("CUDA0") == round(300.5 * MiB) + 48 * MiB + round(100.25 * MiB)
    assert loadreport.parse("nothing here") == loadreport.LoadReport()
