"""Cold starts of a two-model ``velollm serve`` with concurrent first requests: count the failures.

Each start runs ``velollm serve -m gemma=gemma3-270m -m qwen=qwen2.5-coder-0.5b-instruct`` on a
free port, then sends 4 first requests at once (2 per model), so both models load concurrently.
Before the load lock and per-thread log capture, about 1 start in 3 failed both Gemma requests
with 400 "llama.cpp could not load gemma-3-270m ... control token 105 is not marked as EOG".

    .venv/bin/python benchmarks/bench_cold_starts.py --starts 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_process import start_server  # noqa: E402

MODELS = ("gemma", "qwen")


def _ask(base: str, model: str) -> tuple[int, str]:
    try:
        response = httpx.post(f"{base}/completions", timeout=300,
                              json={"model": model, "prompt": "One, two, three,", "max_tokens": 4, "temperature": 0})
        return response.status_code, response.text[:300]
    except httpx.HTTPError as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--per-model", type=int, default=2, help="concurrent first requests per model")
    args = parser.parse_args()
    print(f"uptime: {os.popen('uptime').read().strip()}")
    failed_starts = failed_requests = 0
    t0 = time.perf_counter()
    for i in range(args.starts):
        server = start_server("-m", "gemma=gemma3-270m", "-m", "qwen=qwen2.5-coder-0.5b-instruct", "--ctx", "512")
        try:
            asks = [m for m in MODELS for _ in range(args.per_model)]
            with ThreadPoolExecutor(len(asks)) as pool:
                results = list(pool.map(_ask, [server.base_url] * len(asks), asks))
            alive = server.process.poll() is None
        finally:
            code, output = server.stop()
        bad = [(m, s, text) for m, (s, text) in zip(asks, results, strict=True) if s != 200]
        failed_requests += len(bad)
        if bad or not alive or code != 0:
            failed_starts += 1
            print(f"start {i + 1}: FAILED {bad} alive={alive} exit={code}\n{output[-1500:]}")
        else:
            print(f"start {i + 1}: ok ({len(asks)} first requests answered 200)")
    print(f"{failed_starts} of {args.starts} cold starts failed, {failed_requests} of "
          f"{args.starts * len(MODELS) * args.per_model} first requests failed "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
