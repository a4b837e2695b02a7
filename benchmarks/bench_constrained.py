"""Constrained (JSON schema) greedy decoding against unconstrained decoding, on one engine, interleaved.

    .venv/bin/python benchmarks/bench_constrained.py [--models gemma3-270m qwen2.5-coder-0.5b-instruct]
                                                     [--iterations 3] [--max-tokens 64] [--threads 2]

Four paths per prompt, each from a cold KV cache (so all see the same numerics):

* ``none``  — no constraint (the speed to match);
* ``full``  — llama-cpp-python's grammar sampler over the whole vocabulary (``grammar_check: full``);
* ``gbnf``  — llama.cpp's GBNF sampler behind velollm's check-the-argmax fast path (``grammar_check: gbnf``);
* ``llg``   — velollm.constraints (llguidance) behind the same fast path: the default.

Prints decode tok/s mean ± sd of each, the constrained/unconstrained ratio, the mean constraint
overhead per token against ``none``, and whether the three constrained paths wrote the same text
(budgets and loop guards are off here, ``guards: False``, so only the engines differ).
"""

from __future__ import annotations

import argparse
import statistics

from velollm.engine import GenerationRequest, LoadOptions
from velollm.hardware import default_threads
from velollm.models import resolve
from velollm.plugins.llamacpp import LlamaCppBackend

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "skills": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "skills"]}
PROMPTS = [
    [{"role": "user", "content": "Describe the engineer Ada Lovelace as JSON with name, age and skills."}],
    [{"role": "user", "content": "Invent a chef and give name, age and skills as JSON."}],
]
PATHS = ("none", "full", "gbnf", "llg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = args.threads or default_threads()
    print(f"JSON schema, greedy, max_tokens={args.max_tokens}, {threads} threads, {args.iterations} iterations")
    print(f"{'model':28} " + " ".join(f"{p + ' tok/s':>15}" for p in PATHS) + "  llg/none  same text")
    for name in args.models:
        engine = LlamaCppBackend("cpu").load(resolve(name).path, LoadOptions(n_ctx=2048, n_threads=threads))
        rates: dict[str, list[float]] = {p: [] for p in PATHS}
        same = True
        try:
            engine.constraint_cache()  # the vocabulary is read once per engine: not part of a request
            for i in range(args.iterations + 1):  # the first round warms up
                for messages in PROMPTS:
                    texts = {}
                    order = PATHS if i % 2 else PATHS[::-1]
                    for path in order:
                        engine.reset_cache()
                        extra = {"guards": False} | ({"grammar_check": path} if path in ("full", "gbnf") else {})
                        c = engine.generate(GenerationRequest.of(
                            messages=messages, temperature=0.0, max_tokens=args.max_tokens,
                            json_schema=None if path == "none" else PERSON, extra=extra))
                        texts[path] = c.text
                        if i:
                            rates[path].append(c.timings.decode_tokens_per_s)
                    same = same and texts["full"] == texts["gbnf"] == texts["llg"]
        finally:
            engine.close()
        means = {p: statistics.mean(rates[p]) for p in PATHS}
        cells = " ".join(f"{means[p]:8.1f} ± {statistics.stdev(rates[p]):4.1f}" for p in PATHS)
        print(f"{name:28} {cells}  {means['llg'] / means['none']:8.2f}  {same}")


if __name__ == "__main__":
    main()
