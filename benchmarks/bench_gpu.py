"""GPU vs CPU on the same GGUF file, one run: prefill and decode tok/s, offloaded layers, VRAM planned vs measured.

Each backend loads the model as placement plans it (the GPU one offloads everything that fits),
runs a warm-up, then a prompt of ``--prompt-tokens`` tokens in one batch (prefill) and
``--decode`` tokens one decode call each, greedy from llama.cpp's own logits; the best of
``--repeat`` runs is kept. For the GPU backend it also reports what llama.cpp says it offloaded
(its load log) and the device memory: placement's plan, llama.cpp's buffers, and NVML's
used-memory delta over the load (after a warm-up load created the CUDA context).

    .venv/bin/python benchmarks/bench_gpu.py MODEL.gguf [--backend llamacpp-cuda] [--ctx 2048]
                                             [--prompt-tokens 512] [--decode 128] [--repeat 3] [--json OUT]

Run by scripts/device-check on the GPU machine with synthetic models; elsewhere it measures the CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from velollm.engine import LoadOptions

TEXT = ("The quick brown fox jumps over the lazy dog. def quicksort(arr): return arr. "
        "Question: What is the capital of France? Answer: Paris. ")


def nvml_used() -> int | None:
    """Bytes in use on GPU 0 as the driver reports them; None without nvidia-ml-py or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    finally:
        pynvml.nvmlShutdown()


def load(path: Path, backend: str, n_ctx: int) -> tuple[Any, Any, Any]:
    """(engine, plan, llama.cpp's load report)."""
    from velollm.host import get_host
    from velollm.loading import prepare
    from velollm.plugins.llamacpp import loadreport
    from velollm.plugins.llamacpp import log as llamacpp_log

    # one sequence: the rates are the single-stream runner's, on the Llama's own full-size context
    prepared = prepare(path, backend=backend, options=LoadOptions(n_ctx=n_ctx, parallel=1))
    with llamacpp_log.capture() as lines:
        engine = get_host().backend(backend).load(path, prepared.load_options)
    return engine, prepared.plan, loadreport.parse(lines)


def rates(engine: Any, prompt: list[int], n_decode: int, repeat: int) -> dict[str, float]:
    """Best prefill and decode tok/s over ``repeat`` runs, each from an empty cache."""
    from velollm.plugins.llamacpp.runner import LlamaRunner

    runner = LlamaRunner(engine._llama)
    runner.reset()
    runner.feed(prompt[:16])  # warm-up: first-call allocations, kernel loading
    for _ in range(4):
        runner.feed([runner.argmax(-1)])
    best_prefill = best_decode = 0.0
    for _ in range(repeat):
        runner.reset()
        start = time.perf_counter()
        runner.feed(prompt)
        best_prefill = max(best_prefill, len(prompt) / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(n_decode):
            runner.feed([runner.argmax(-1)])
        best_decode = max(best_decode, n_decode / (time.perf_counter() - start))
    runner.reset()
    return {"prefill_tok_s": round(best_prefill, 1), "decode_tok_s": round(best_decode, 1)}


def measure(path: Path, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    before = nvml_used()
    engine, plan, report = load(path, backend, args.ctx)
    after_load = nvml_used()
    try:
        prompt = (engine.tokenize(TEXT * 64, add_special=False))[: args.prompt_tokens]
        row: dict[str, Any] = {"backend": backend, "n_threads": plan.n_threads, "n_ctx": plan.n_ctx,
                               "planned_n_gpu_layers": plan.n_gpu_layers, "offloaded": report.offloaded_layers,
                               "offloadable": report.offloadable_layers}
        row.update(rates(engine, prompt, args.decode, args.repeat))
        after_run = nvml_used()
        for use in plan.devices:
            row.setdefault("devices", []).append({
                "id": use.id, "planned_bytes": use.bytes, "llama_cpp_bytes": report.device_bytes(use.id),
                "model_buffer": report.model_buffers.get(use.id, 0), "kv_buffer": report.kv_buffers.get(use.id, 0),
                "compute_buffer": report.compute_buffers.get(use.id, 0),
                "nvml_delta_after_load": None if before is None or after_load is None else after_load - before,
                "nvml_delta_after_run": None if before is None or after_run is None else after_run - before})
        return row
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--backend", default=None, help="the GPU backend (default: the best usable one, if any)")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from velollm.loading import prepare

    gpu = args.backend or prepare(args.model, options=LoadOptions(n_ctx=args.ctx)).plan.backend
    backends = ["llamacpp-cpu"] + ([gpu] if gpu != "llamacpp-cpu" else [])
    if len(backends) > 1:  # create the device context first, so NVML deltas show the model alone
        warm, _, _ = load(args.model, gpu, 256)
        warm.close()
    uptime = os.getloadavg()
    results = {"model": str(args.model), "file_bytes": args.model.stat().st_size,
               "load_average": [round(x, 2) for x in uptime], "cpu_count": os.cpu_count(),
               "runs": [measure(args.model, b, args) for b in backends]}
    if len(backends) > 1:
        cpu, dev = results["runs"]
        results["decode_speedup"] = round(dev["decode_tok_s"] / cpu["decode_tok_s"], 2)
        results["prefill_speedup"] = round(dev["prefill_tok_s"] / cpu["prefill_tok_s"], 2)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
