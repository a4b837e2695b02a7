"""Load test: ``velollm serve`` vs llama-cpp-python's own server, same load, same run, loopback only.

Both servers get the same two models (Gemma 3 270M and Qwen2.5-Coder 0.5B). The client sends a
bounded number of chat requests (default 200) with bounded concurrency (default 8), alternating
the two models, greedy and short, and checks that every answer is complete (a finish reason,
text, token usage). It prints requests/s and p50/p95 latency for each server.

llama-cpp-python's server keeps one model in memory and swaps it when a request names the
other; velollm's pool keeps both loaded and runs them side by side.

    .venv/bin/python benchmarks/bench_server_load.py [--requests 200] [--concurrency 8]
                                                     [--max-tokens 8] [--only velollm|llama_cpp] [--json]

Parallel decoding (issue 16): one model, several concurrency levels, velollm with ``--parallel``:

    .venv/bin/python benchmarks/bench_server_load.py --models qwen --concurrency-list 1 4 8 \
        --parallel 8 --threads 2 --requests 40 --max-tokens 16

llama-cpp-python's server needs extras that velollm does not: ``pip install sse-starlette
starlette-context pydantic-settings`` into the venv (only for this benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

GEMMA = "gemma3-270m"
QWEN = "qwen2.5-coder-0.5b-instruct"
PROMPTS = [
    "Name a colour.",
    "Say hello.",
    "What is 2 + 3?",
    "Name a fruit.",
    "Give one word for happy.",
    "Name a planet.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Result:
    server: str
    requests: int
    concurrency: int
    errors: int = 0
    incomplete: int = 0
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    completion_tokens: int = 0
    first_error: str = ""

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return lat[min(int(p * len(lat)), len(lat) - 1)] if lat else float("nan")

        data = {k: v for k, v in asdict(self).items() if k != "latencies"}
        data.update(
            ok=len(lat),
            req_per_s=len(lat) / self.wall_s if self.wall_s else 0.0,
            p50_s=statistics.median(lat) if lat else float("nan"),
            p95_s=pct(0.95),
            max_s=lat[-1] if lat else float("nan"),
            tokens_per_s=self.completion_tokens / self.wall_s if self.wall_s else 0.0,
        )
        return data


class Process:
    """A server subprocess whose output goes to a file (never blocks on a pipe)."""

    def __init__(self, name: str, cmd: list[str], root: str) -> None:
        self.name, self.root = name, root
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, path: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log: {self.log.name}")
            try:
                if httpx.get(self.root + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout} s; log: {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def model_paths() -> dict[str, Path]:
    from velollm.models import pull

    return {GEMMA: pull(GEMMA), QWEN: pull(QWEN)}


def start_velollm(n_ctx: int, models: list[str] = [GEMMA, QWEN], parallel: int | None = None,  # noqa: B006
                  threads: int | None = None) -> tuple[Process, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "velollm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           *[arg for m in models for arg in ("-m", m)], "--ctx", str(n_ctx), "--preload", "--log-level", "warning"]
    if parallel:
        cmd += ["--parallel", str(parallel)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = Process("velollm", cmd, f"http://127.0.0.1:{port}")
    proc.wait_ready("/health")
    return proc, f"{proc.root}/v1"


def start_llama_cpp(paths: dict[str, Path], n_ctx: int, models: list[str] = [GEMMA, QWEN],  # noqa: B006
                    threads: int | None = None) -> tuple[Process, str]:
    port = free_port()
    threads = threads or os.cpu_count() or 1
    entries = {
        GEMMA: {"model": str(paths[GEMMA]), "model_alias": GEMMA, "n_ctx": n_ctx, "chat_format": "gemma",
                "n_threads": threads, "n_threads_batch": threads, "verbose": False},
        QWEN: {"model": str(paths[QWEN]), "model_alias": QWEN, "n_ctx": n_ctx, "n_threads": threads,
               "n_threads_batch": threads, "verbose": False},
    }
    config = {"host": "127.0.0.1", "port": port, "models": [entries[m] for m in models]}
    cfg = tempfile.NamedTemporaryFile("w", prefix="bench-llama-cpp-", suffix=".json", delete=False)  # noqa: SIM115
    json.dump(config, cfg)
    cfg.close()
    proc = Process("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--config_file", cfg.name],
                   f"http://127.0.0.1:{port}")
    proc.wait_ready("/v1/models")
    return proc, f"{proc.root}/v1"


def _complete(data: Any) -> tuple[bool, int]:
    try:
        choice = data["choices"][0]
        tokens = int(data["usage"]["completion_tokens"])
        ok = choice["finish_reason"] in ("stop", "length") and bool(choice["message"]["content"]) and tokens > 0
        return ok, tokens
    except (KeyError, IndexError, TypeError, ValueError):
        return False, 0


async def load(name: str, base_url: str, requests: int, concurrency: int, max_tokens: int,
               models: tuple[str, ...] = (GEMMA, QWEN)) -> Result:
    result = Result(name, requests, concurrency)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def one(i: int) -> None:
            model = models[i % len(models)]
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0}
            async with gate:
                start = time.perf_counter()
                try:
                    response = await client.post("/chat/completions", json=body)
                    elapsed = time.perf_counter() - start
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                    ok, tokens = _complete(response.json())
                except Exception as exc:
                    result.errors += 1
                    result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
                    return
                if not ok:
                    result.incomplete += 1
                    return
                result.latencies.append(elapsed)
                result.completion_tokens += tokens

        for model in models:  # load the models (and, for velollm, warm the engines) before timing
            await client.post("/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        result.wall_s = time.perf_counter() - start
    return result


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ("server", "concurrency", "ok", "errors", "incomplete", "wall_s", "req_per_s", "p50_s", "p95_s",
              "tokens_per_s")
    print(" | ".join(f"{h:>16}" for h in header))
    print("-" * (19 * len(header)))
    for row in rows:
        cells = [f"{row[h]:.2f}" if isinstance(row[h], float) else str(row[h]) for h in header]
        print(" | ".join(f"{c:>16}" for c in cells))
    for row in rows:
        if row["first_error"]:
            print(f"first error on {row['server']}: {row['first_error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--only", choices=("velollm", "llama_cpp"))
    parser.add_argument("--models", choices=("both", "qwen", "gemma"), default="both")
    parser.add_argument("--concurrency-list", type=int, nargs="+", help="run each level (overrides --concurrency)")
    parser.add_argument("--parallel", type=int, default=None, help="velollm serve --parallel N")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads for both servers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    levels = args.concurrency_list or [args.concurrency]
    if not 1 <= args.requests <= 5000 or not all(1 <= c <= 64 for c in levels):
        parser.error("keep the load bounded: 1..5000 requests, 1..64 concurrent")
    paths = model_paths()
    models = {"both": [GEMMA, QWEN], "qwen": [QWEN], "gemma": [GEMMA]}[args.models]
    rows = []
    starters = {"velollm": lambda: start_velollm(args.ctx, models, args.parallel, args.threads),
                "llama_cpp": lambda: start_llama_cpp(paths, args.ctx, models, args.threads)}
    print(f"start: load average {os.getloadavg()} (shared machine)", file=sys.stderr)
    for name, start in starters.items():
        if args.only and name != args.only:
            continue
        proc, base_url = start()
        try:
            for level in levels:
                result = asyncio.run(load(name, base_url, args.requests, level, args.max_tokens, tuple(models)))
                rows.append(result.summary())
                print(f"{name}: concurrency {level} done in {result.wall_s:.1f} s (load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr)
        finally:
            proc.stop()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"\n{args.requests} chat requests per level, concurrency {levels}, {' and '.join(models)}"
              f"{' alternating' if len(models) > 1 else ''}, max_tokens={args.max_tokens}, greedy, loopback, "
              f"velollm --parallel {args.parallel or 'default'}; end load average {os.getloadavg()}\n")
        print_table(rows)
        by = {(r["server"], r["concurrency"]): r for r in rows}
        for level in levels:
            ours, theirs = by.get(("velollm", level)), by.get(("llama_cpp", level))
            if ours and theirs and theirs["req_per_s"]:
                print(f"concurrency {level}: velollm / llama_cpp.server throughput "
                      f"{ours['req_per_s'] / theirs['req_per_s']:.2f}x")
    return 0 if all(r["errors"] == 0 and r["incomplete"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
