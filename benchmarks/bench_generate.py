"""velollm's llama.cpp backend vs raw llama-cpp-python on the same model, interleaved in one run.

    python benchmarks/bench_generate.py [--model gemma3-270m] [--n 64] [--iterations 5]

Measures decode tok/s ((tokens - 1) / time after the first token) and TTFT for:
  raw      llama_cpp.Llama.create_completion(stream=True), same file, same threads, greedy
  engine   velollm's Engine.stream (what `velollm generate` runs)
  cli      `velollm generate` in a subprocess, its own stderr report
Prints mean ± sd and the ratio to raw. The goal is engine/raw and cli/raw >= 0.90.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

from velollm.engine import GenerationRequest, LoadOptions
from velollm.hardware import default_threads
from velollm.models import resolve
from velollm.plugins.llamacpp import LlamaCppBackend

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def raw_run(llama, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    first, count = None, 0
    for _ in llama.create_completion(PROMPT, max_tokens=n, temperature=0.0, stream=True):
        if first is None:
            first = time.perf_counter()
        count += 1
    end = time.perf_counter()
    return (count - 1) / (end - first), first - start


def engine_run(engine, n: int) -> tuple[float, float]:
    final = None
    for chunk in engine.stream(GenerationRequest(prompt=PROMPT, max_tokens=n, temperature=0.0)):
        final = chunk
    return final.timings.decode_tokens_per_s, final.timings.ttft_s


def cli_run(model: str, n: int, threads: int) -> tuple[float, float]:
    result = subprocess.run([sys.executable, "-m", "velollm.cli", "generate", model, "-p", PROMPT, "-n", str(n),
                             "--temp", "0", "--threads", str(threads)], capture_output=True, text=True, check=True)
    speed = float(re.search(r"([\d.]+) tok/s", result.stderr).group(1))
    ttft = float(re.search(r"TTFT (\d+) ms", result.stderr).group(1)) / 1000
    return speed, ttft


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):7.1f} ± {sd:5.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()

    import llama_cpp

    path = resolve(args.model).path
    threads = default_threads()
    llama = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=threads, verbose=False)
    engine = LlamaCppBackend("cpu").load(path, LoadOptions(n_ctx=2048, n_threads=threads))
    raw_run(llama, 8), engine_run(engine, 8)  # warm up both

    samples: dict[str, list[tuple[float, float]]] = {"raw": [], "engine": [], "cli": []}
    for _ in range(args.iterations):  # interleaved so drift on a shared machine hits all three alike
        samples["raw"].append(raw_run(llama, args.n))
        samples["engine"].append(engine_run(engine, args.n))
        samples["cli"].append(cli_run(args.model, args.n, threads))
    raw_mean = statistics.mean(s for s, _ in samples["raw"])
    print(f"model {args.model}, {args.n} tokens, greedy, {threads} threads, {args.iterations} iterations")
    print(f"{'path':8} {'decode tok/s':>16} {'TTFT ms':>10} {'vs raw':>8}")
    for name, rows in samples.items():
        speeds, ttfts = [s for s, _ in rows], [t * 1000 for _, t in rows]
        ratio = statistics.mean(speeds) / raw_mean
        print(f"{name:8} {summary(speeds):>16} {statistics.mean(ttfts):10.1f} {ratio:8.3f}")
    engine.close()
    llama.close()


if __name__ == "__main__":
    main()
