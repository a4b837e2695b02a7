"""What velollm's DSPy layers cost: ``dspy.Predict`` through velollm.LM + velollm.Adapter versus the
very same prompt sent straight to llama-cpp-python's ``create_chat_completion`` on the same model
file (greedy, same max_tokens, same n_threads and n_ctx, DSPy cache off).

For each question the DSPy side runs first; the exact messages it sent (and, constrained, its
JSON schema as llama-cpp-python's ``response_format``) then go to a plain ``Llama``. Both sides
reuse their KV cache for the shared system prompt, and the order alternates between rounds so
drift on a shared machine hits both. Reported: total seconds per side, the ratio, and the
per-call time velollm spends outside llama.cpp's generation (DSPy formatting, parsing, pool,
conversion), which is the overhead itself and stable even when the machine is noisy.

    .venv/bin/python benchmarks/bench_adapter_overhead.py [--rounds 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "Which planet is closest to the Sun?",
    "What gas do plants absorb from the air?",
    "Who wrote Romeo and Juliet?",
    "What is the largest ocean on Earth?",
    "How many continents are there?",
]


def run(args: argparse.Namespace, constrained: bool) -> dict[str, Any]:
    import dspy
    from llama_cpp import Llama

    import velollm
    from velollm.models import resolve

    path = resolve(args.model).path
    lm = velollm.LM(args.model, cache=False, temperature=0.0, max_tokens=args.max_tokens,
                    n_ctx=args.n_ctx, n_threads=args.threads)
    adapter = velollm.Adapter(constrained=constrained)
    program = dspy.Predict("question -> answer")
    direct = Llama(model_path=str(path), n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                   verbose=False)

    def via_velollm(question: str) -> tuple[float, float, str, int]:
        start = time.perf_counter()
        with dspy.context(lm=lm, adapter=adapter):
            program(question=question)
        total = time.perf_counter() - start
        entry = lm.history[-1]
        engine_s = entry["response"].provider_data["velollm"]["timings"]["total_s"]
        return total, engine_s, entry["outputs"][0], entry["usage"]["completion_tokens"]

    def straight(messages: list[dict[str, str]], schema: dict | None) -> tuple[float, str, int]:
        kwargs: dict[str, Any] = {}
        if schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
        start = time.perf_counter()
        out = direct.create_chat_completion(messages=messages, temperature=0.0, max_tokens=args.max_tokens, **kwargs)
        return time.perf_counter() - start, out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]

    # warm both (model load, grammar compile, system prompt in the KV cache)
    via_velollm(QUESTIONS[0])
    first = lm.history[-1]
    schema = first["kwargs"].get("response_format", {}).get("json_schema", {}).get("schema")
    straight(first["messages"], schema)

    ours, theirs, layers, same_text, tokens = [], [], [], 0, 0
    for r in range(args.rounds):
        for i, question in enumerate(QUESTIONS):
            if (r + i) % 2:  # alternate who goes first: the second run of a pair never gets a warmer cache
                total, engine_s, text, n = via_velollm(question)
                sent = lm.history[-1]["messages"]
                direct_s, direct_text, direct_n = straight(sent, schema)
            else:
                # same prompt as velollm will send: build it with the adapter, then run velollm
                with dspy.context(lm=lm, adapter=adapter):
                    plan = adapter.plan(lm, {}, program.signature)
                sent = _messages(adapter, program, question, plan[0])
                direct_s, direct_text, direct_n = straight(sent, schema)
                total, engine_s, text, n = via_velollm(question)
                assert lm.history[-1]["messages"] == sent, "the two sides must send the same prompt"
            ours.append(total)
            theirs.append(direct_s)
            layers.append(total - engine_s)
            same_text += text == direct_text
            tokens += n
            if n != direct_n:
                print(f"note: {question!r}: velollm {n} tokens {text!r}, llama-cpp {direct_n} {direct_text!r}")
    direct.close()
    return {
        "mode": "constrained JSON" if constrained else "markers (unconstrained)",
        "calls": len(ours),
        "completion_tokens": tokens,
        "identical_outputs": f"{same_text}/{len(ours)}",
        "velollm_s": sum(ours),
        "llama_cpp_s": sum(theirs),
        "ratio": sum(ours) / sum(theirs),
        "median_pair_ratio": statistics.median(o / t for o, t in zip(ours, theirs, strict=True)),
        "layer_ms_per_call": 1000 * statistics.median(layers),
        "layer_share": sum(layers) / sum(ours),
    }


def _messages(adapter: Any, program: Any, question: str, fmt: str) -> list[dict[str, str]]:
    from velollm.adapters.dspy.adapter import _FORMAT

    token = _FORMAT.set(fmt)
    try:
        return adapter.format(program.signature, [], {"question": question})
    finally:
        _FORMAT.reset(token)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    results = [run(args, constrained=False), run(args, constrained=True)]
    print(f"\n{args.model}, greedy, max_tokens={args.max_tokens}, n_threads={args.threads}, n_ctx={args.n_ctx}\n")
    print("| mode                    | calls | tokens | same text | velollm s | llama-cpp s | ratio | median pair "
          "| velollm layers ms/call | layers share |")
    print("|-------------------------|-------|--------|-----------|-----------|-------------|-------|-------------"
          "|------------------------|--------------|")
    for r in results:
        print(f"| {r['mode']:23s} | {r['calls']:5d} | {r['completion_tokens']:6d} | {r['identical_outputs']:>9s} "
              f"| {r['velollm_s']:9.2f} | {r['llama_cpp_s']:11.2f} | {r['ratio']:5.3f} "
              f"| {r['median_pair_ratio']:11.3f} "
              f"| {r['layer_ms_per_call']:22.1f} | {100 * r['layer_share']:11.1f}% |")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
