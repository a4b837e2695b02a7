"""Decode speed of the per-request sampler chain vs llama-cpp-python's own ``Llama.generate`` loop.

The llama.cpp engine now samples through its own chain (velollm/plugins/llamacpp/sampling.py) on a
``LlamaRunner`` instead of ``Llama.generate``; this checks that costs nothing. Both run on ONE loaded
model, interleaved (order flipped every iteration), same prompt, same settings, KV cache reset
before each run; the result is the mean of per-pair tok/s ratios with its standard error.

    .venv/bin/python benchmarks/bench_sampling.py [--model gemma3-270m] [-n 64] [-i 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from velollm.engine import GenerationRequest, LoadOptions
from velollm.models import resolve
from velollm.plugins.llamacpp import LlamaCppBackend

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("-i", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    engine = LlamaCppBackend("cpu").load(resolve(args.model).path, LoadOptions(n_ctx=1024, n_threads=args.threads))
    llama = engine._llama
    prompt = engine.tokenize(PROMPT)
    fields = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1)

    def ours(seed: int) -> float:
        engine.reset_cache()
        request = GenerationRequest.of(prompt=PROMPT, max_tokens=args.n, seed=seed, **fields)
        return engine.generate(request).timings.decode_tokens_per_s

    def theirs(seed: int) -> float:
        engine.reset_cache()
        llama.set_seed(seed)
        tokens = llama.generate(prompt, top_k=40, top_p=0.95, min_p=0.05, temp=0.8, repeat_penalty=1.1)
        first = end = None
        n = 0
        for _ in tokens:
            now = time.perf_counter()
            first = first or now
            end = now
            n += 1
            if n == args.n:
                break
        tokens.close()
        return (n - 1) / (end - first) if first and end and end > first else 0.0

    ours(0), theirs(0)  # warm-up
    ratios, a, b = [], [], []
    for i in range(args.i):
        pair = (ours(i), theirs(i)) if i % 2 == 0 else tuple(reversed((theirs(i), ours(i))))
        a.append(pair[0])
        b.append(pair[1])
        ratios.append(pair[0] / pair[1])
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
    print(f"{args.model}, {args.n} tokens, {args.threads} thread(s), {args.i} pairs, load {os.getloadavg()}")
    print(f"velollm chain:        {statistics.fmean(a):.1f} tok/s")
    print(f"Llama.generate:       {statistics.fmean(b):.1f} tok/s")
    print(f"ratio (paired):       {statistics.fmean(ratios):.3f} ± {se:.3f} (SE)")
    engine.close()


if __name__ == "__main__":
    main()
