"""Load/unload cycles through the ModelPool: does memory come back?

Each cycle acquires Gemma 3 270M from a pool with ``keep_alive=0`` (so the lease's end unloads
it), generates a couple of tokens (so the compute buffers and KV cache are really touched) and
releases it. The process's RSS is read after every unload. Growth is measured from the end of
cycle 1 (first-use costs such as imports and llama.cpp's one-time initialisation are not a leak)
to the end of the last cycle. Goal: less than 50 MB over 50 cycles.

For comparison the same cycles run side by side on the backend directly (``Backend.load`` +
``Engine.close``, no pool), so pool overhead and llama.cpp's own behaviour can be told apart.

    .venv/bin/python benchmarks/bench_pool_rss.py [--cycles 50] [--model gemma3-270m] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

from velollm.engine import GenerationRequest, LoadOptions

MB = 1_000_000
GOAL_MB = 50.0


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def run_cycles(cycles: int, one_cycle: Callable[[], None]) -> dict[str, Any]:
    samples, times = [], []
    peak = 0
    for _ in range(cycles):
        start = time.perf_counter()
        one_cycle()
        times.append(time.perf_counter() - start)
        samples.append(rss())
        peak = max(peak, psutil.Process().memory_info().rss)
    growth = (samples[-1] - samples[0]) / MB
    return {"cycles": cycles, "rss_after_first_mb": samples[0] / MB, "rss_after_last_mb": samples[-1] / MB,
            "growth_mb": growth, "max_rss_after_unload_mb": max(samples) / MB,
            "mean_cycle_s": sum(times) / len(times), "samples_mb": [round(s / MB, 1) for s in samples]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--tokens", type=int, default=2, help="tokens to generate per cycle")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from velollm.host import get_host
    from velollm.loading import prepare
    from velollm.pool import ModelPool

    request = GenerationRequest(prompt="The quick brown fox", max_tokens=args.tokens, temperature=0)
    pool = ModelPool(keep_alive=0)
    baseline = rss()

    def pooled() -> None:
        with pool.engine(args.model, n_ctx=2048) as engine:
            engine.generate(request)
        if pool.status().models:
            raise SystemExit("keep_alive=0 did not unload the model")

    prepared = prepare(args.model, options=LoadOptions(n_ctx=2048))
    backend = get_host().backend(prepared.plan.backend)

    def direct() -> None:
        engine = backend.load(prepared.resolved.path, prepared.load_options)
        engine.generate(request)
        engine.close()

    results = {"pool": run_cycles(args.cycles, pooled), "direct": run_cycles(args.cycles, direct)}
    pool_growth = results["pool"]["growth_mb"]
    summary = {"model": args.model, "backend": prepared.plan.backend, "rss_before_mb": baseline / MB,
               "pool_loads": pool.status().loads, "pool_unloads": pool.status().unloads, "goal_mb": GOAL_MB,
               "passed": pool_growth < GOAL_MB, **results}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.cycles} load/generate/unload cycles of {args.model} on {prepared.plan.backend} "
              f"(RSS before any load: {baseline / MB:.0f} MB)")
        print(f"{'path':<8} {'RSS after 1st':>14} {'after last':>11} {'growth':>9} {'max':>8} {'s/cycle':>8}")
        for name, r in results.items():
            print(f"{name:<8} {r['rss_after_first_mb']:>11.1f} MB {r['rss_after_last_mb']:>8.1f} MB "
                  f"{r['growth_mb']:>+6.1f} MB {r['max_rss_after_unload_mb']:>5.0f} MB {r['mean_cycle_s']:>8.2f}")
        print(f"pool: {summary['pool_loads']} loads, {summary['pool_unloads']} unloads; growth {pool_growth:+.1f} MB "
              f"(goal < {GOAL_MB:.0f} MB): {'PASS' if summary['passed'] else 'FAIL'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
