"""Which batch sizes give one-token decoding's logits bit for bit, and what each load setting costs.

    python benchmarks/bench_batch_invariance.py [--model qwen2.5-coder-1.5b-instruct] [--tokens 24]

Speculation verifies a draft in one batch; it can only promise plain decoding's exact output if a
batch of b rows computes what b single-token decodes do. llama.cpp's CPU kernels change with the
number of rows (repacked K-quant matmul in blocks of 4 rows, tiled matmul from 8, attention without
flash attention through a batched matmul). Per setting this feeds the same continuation once a token
at a time and once in chunks of b (cold prefix evaluated alike), and prints the largest logit
difference for each b (0.0: identical to the bit), then the cost of a batch of b with logits for every
row, relative to one token (median of interleaved rounds). Settings: llama.cpp's defaults, flash
attention on, and flash attention on with the repacked weights off (``use_extra_bufts=False``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np

from velollm.models import resolve

CONTINUATION = (' {"section": "12.4 Limitation of Liability", "excluded_damages": "indirect, incidental, special '
                'or consequential damages", "governing_law": "the laws of the State of New York"}')
PROMPT = ("Extract the fields of this contract clause as JSON. 12.4 Limitation of Liability. Neither party shall be "
          "liable for any indirect, incidental, special or consequential damages. This Agreement is governed by the "
          "laws of the State of New York.")
SIZES = (2, 3, 4, 7, 8, 12)


def load(path: str, threads: int, flash: bool | None, repack: bool) -> Any:
    import llama_cpp
    from llama_cpp import Llama

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = repack
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params  # Llama(...) has no keyword for it
    try:
        kwargs = {} if flash is None else {"flash_attn": flash}
        return Llama(model_path=path, n_ctx=1024, n_threads=threads, logits_all=True, verbose=False, **kwargs)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def study(llama: Any, rounds: int) -> tuple[dict[int, float], dict[int, float], float]:
    prefix = llama.tokenize(PROMPT.encode())
    tokens = llama.tokenize(CONTINUATION.encode(), add_bos=False)[:24]
    llama.reset()
    llama.eval(prefix)
    n0 = llama.n_tokens

    def run(chunk: int) -> tuple[np.ndarray, float]:
        """Logits of every token fed in chunks of ``chunk``; seconds per full chunk."""
        llama.n_tokens = n0
        full: list[float] = []
        for i in range(0, len(tokens), chunk):
            start = time.perf_counter()
            llama.eval(tokens[i:i + chunk])
            if len(tokens) - i >= chunk:
                full.append(time.perf_counter() - start)
        return llama.scores[n0:n0 + len(tokens)].copy(), statistics.fmean(full)

    one, _ = run(1)
    diffs = {b: float(np.abs(run(b)[0] - one).max()) for b in SIZES}
    times: dict[int, list[float]] = {b: [] for b in (1, *SIZES)}
    for r in range(rounds):
        for b in (1, *SIZES) if r % 2 == 0 else (*reversed(SIZES), 1):
            times[b].append(run(b)[1])
    unit = statistics.median(times[1])
    return diffs, {b: statistics.median(t) / unit for b, t in times.items()}, unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    path = str(resolve(args.model).path)
    print(f"load average {os.getloadavg()}; {args.threads} threads; {args.model}")
    for name, flash, repack in (("defaults", None, True), ("flash attention", True, True),
                                ("flash attention, no repack", True, False)):
        llama = load(path, args.threads, flash, repack)
        diffs, costs, unit = study(llama, args.rounds)
        llama.close()
        print(f"{name:27} max|logit diff| " + " ".join(f"b{b}={d:.3g}" for b, d in diffs.items()))
        relative = " ".join(f"b{b}={c:.2f}" for b, c in costs.items())
        print(f"{'':27} one token {unit * 1000:.1f} ms; a batch of b, in tokens: {relative}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
