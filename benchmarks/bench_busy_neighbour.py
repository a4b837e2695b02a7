"""64-token generation idle vs next to a busy neighbour, per thread count.

llama.cpp's worker threads meet at an OpenMP barrier after every operation of the graph; libgomp's
default policy spins there. When another process holds one of the cores, a spinning thread keeps
its core while the thread it waits for sits out a time slice, and a generation can get 20x slower.
velollm sets ``OMP_WAIT_POLICY=ACTIVE`` with ``GOMP_SPINCOUNT=10000`` unless the environment names
either (:mod:`velollm.plugins.llamacpp.openmp`), and its thread tuner drops to fewer threads while
they cost more. This script runs the same greedy generation with the
machine idle and with a busy loop in another process (one per ``--busy``), per thread count and
wait policy (each in a fresh process: libgomp reads the policy once), and prints busy / idle.
The default (placement's ``n_threads``, ACTIVE:10000) must keep that ratio under about 2.

    .venv/bin/python benchmarks/bench_busy_neighbour.py --threads 1 default \
        --policies ACTIVE:10000 PASSIVE ACTIVE [--parallel 4]

Report ``uptime`` with the numbers: on a machine shared with other work, "idle" is not idle.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

from velollm.engine import GenerationRequest, LoadOptions


def _spin(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    while not stop.is_set():
        for _ in range(100_000):
            pass


def _default_threads(model: str) -> int:
    from velollm import hardware, models
    from velollm.gguf.info import inspect
    from velollm.placement import place
    from velollm.plugins.llamacpp import LlamaCppBackend

    info = inspect(models.resolve(model).path)
    return place(info, hardware.probe(), None, {"llamacpp-cpu": LlamaCppBackend("cpu")}).n_threads


def _generate(model: str, threads: int, tokens: int, runs: int, parallel: int) -> list[float]:
    from velollm import models
    from velollm.plugins.llamacpp import LlamaCppBackend

    options = LoadOptions(n_ctx=512 * parallel, n_threads=threads, parallel=parallel)
    engine = LlamaCppBackend("cpu").load(models.resolve(model).path, options)
    request = GenerationRequest.of(prompt="Once upon a time", max_tokens=tokens, temperature=0.0, stop=[])
    try:
        engine.generate(request)  # warm-up (page in the weights)
        times = []
        for _ in range(runs):
            engine.reset_cache()
            start = time.perf_counter()
            done = engine.generate(request)
            times.append(time.perf_counter() - start)
            if done.usage.completion_tokens != tokens:
                print(f"  note: stopped after {done.usage.completion_tokens} tokens")
        return times
    finally:
        engine.close()


def _measure(model: str, threads: int, policy: str, tokens: int, runs: int, timeout: float, parallel: int) -> float:
    """Median seconds of ``runs`` generations in a fresh process with ``OMP_WAIT_POLICY=policy``.

    ``policy`` may carry a libgomp spin count: ``PASSIVE:30000`` also sets ``GOMP_SPINCOUNT=30000``.
    """
    policy, _, spins = policy.partition(":")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env["OMP_WAIT_POLICY"] = policy
    if spins:
        env["GOMP_SPINCOUNT"] = spins
    cmd = [sys.executable, __file__, "--worker", model, str(threads), str(tokens), str(runs), str(parallel)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return float("inf")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model, threads, tokens, runs, parallel = sys.argv[2], *map(int, sys.argv[3:7])
        print(statistics.median(_generate(model, threads, tokens, runs, parallel)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--threads", nargs="+", default=["1", "default"])
    parser.add_argument("--policies", nargs="+", default=["ACTIVE:10000", "PASSIVE", "ACTIVE"],
                        help="OMP_WAIT_POLICY values, each optionally with :GOMP_SPINCOUNT (PASSIVE:30000)")
    parser.add_argument("--busy", type=int, default=1, help="busy-loop processes beside the generation")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=1,
                        help="LoadOptions.parallel: 1 decodes alone; more takes the batch decoder (its thread tuner)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a configuration counts as inf")
    args = parser.parse_args()
    print(f"uptime: {os.popen('uptime').read().strip()}  cores: {os.cpu_count()}")
    default = _default_threads(args.model)
    print(f"placement's default n_threads here: {default}")
    for label in args.threads:
        threads = default if label == "default" else int(label)
        for policy in args.policies:
            idle = _measure(args.model, threads, policy, args.tokens, args.runs, args.timeout, args.parallel)
            stop = multiprocessing.Event()
            spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
            for p in spinners:
                p.start()
            try:
                busy = _measure(args.model, threads, policy, args.tokens, args.runs, args.timeout, args.parallel)
            finally:
                stop.set()
                for p in spinners:
                    p.join(5)
            print(f"threads={threads:<2} ({label:>7}) OMP_WAIT_POLICY={policy:<13}: idle {idle:6.2f} s  "
                  f"with {args.busy} busy: {busy:6.2f} s  ratio {busy / idle:5.1f}x  "
                  f"({args.tokens} tokens, median of {args.runs})", flush=True)
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
