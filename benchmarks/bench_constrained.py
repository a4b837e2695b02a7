"""Constrained (JSON schema) greedy decoding: velollm's check-the-argmax grammar path vs
llama-cpp-python's whole-vocabulary grammar sampler, on one engine, interleaved in one run.

    .venv/bin/python benchmarks/bench_constrained.py [--models gemma3-270m qwen2.5-coder-0.5b-instruct]
                                                     [--iterations 3] [--max-tokens 64] [--threads 2]

``extra={"grammar_check": "full"}`` forces llama-cpp-python's own path on the same engine. Prints
decode tok/s mean ± sd for each, the ratio, and whether the outputs are identical (they must be;
every run starts from a cold KV cache so both paths see the same numerics).
"""

from __future__ import annotations

import argparse
import statistics

from velollm.engine import GenerationRequest, LoadOptions
from velollm.models import resolve
from velollm.plugins.llamacpp import LlamaCppBackend, _default_threads

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "skills": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "skills"]}
PROMPTS = [
    [{"role": "user", "content": "Describe the engineer Ada Lovelace as JSON with name, age and skills."}],
    [{"role": "user", "content": "Invent a chef and give name, age and skills as JSON."}],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="> 0: sampled (seeded) decoding; outputs then differ by design, only speed compares")
    args = parser.parse_args()
    threads = args.threads or _default_threads()
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    print(f"JSON schema, {how}, max_tokens={args.max_tokens}, {threads} threads, {args.iterations} iterations")
    print(f"{'model':30} {'llama-cpp-python tok/s':>24} {'velollm tok/s':>16} {'ratio':>7}  same output")
    for name in args.models:
        engine = LlamaCppBackend("cpu").load(resolve(name).path, LoadOptions(n_ctx=2048, n_threads=threads))
        rates: dict[str, list[float]] = {"full": [], "fast": []}
        same = True
        try:
            for i in range(args.iterations + 1):  # the first round warms up
                for messages in PROMPTS:
                    texts = {}
                    for check in (("full", "fast") if i % 2 else ("fast", "full")):
                        # a cold cache for both: a reused prefix changes batch numerics, and near-ties flip
                        engine.reset_cache()
                        c = engine.generate(GenerationRequest.of(
                            messages=messages, temperature=args.temperature, seed=i, max_tokens=args.max_tokens,
                            json_schema=PERSON,
                            extra={"grammar_check": check}))
                        texts[check] = c.text
                        if i:
                            rates[check].append(c.timings.decode_tokens_per_s)
                    same = same and texts["full"] == texts["fast"]
        finally:
            engine.close()
        full, fast = statistics.mean(rates["full"]), statistics.mean(rates["fast"])
        print(f"{name:30} {full:14.1f} ± {statistics.stdev(rates['full']):5.1f} "
              f"{fast:8.1f} ± {statistics.stdev(rates['fast']):5.1f} {fast / full:7.2f}  "
              f"{same if args.temperature == 0 else '(sampled)'}")


if __name__ == "__main__":
    main()
