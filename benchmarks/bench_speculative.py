"""Vanilla vs speculative decoding on code-edit and prose prompts, side by side in one run.

    python benchmarks/bench_speculative.py [--main qwen2.5-coder-1.5b-instruct]
        [--draft qwen2.5-coder-0.5b-instruct] [--iterations 3] [--n-predict 192] [--output spec.json]

1. ``auto`` (prompt lookup and the draft model both offered; the cost model decides) against
   vanilla, interleaved on one engine (``velollm.plugins.llamacpp.bench.run``): tok/s mean ± sd, speedup ± σ,
   acceptance, the cost model's prediction, greedy agreement. Targets on a 2-core CPU:
   >= 1.25x on code edits, >= 0.97x on prose.
2. Forced ``lookup`` and ``draft`` modes: their greedy output against vanilla's.
3. Batch numerics: where greedy outputs differ, is it the drafts or float results of batched
   evaluation? Vanilla with a different ``n_batch`` (no draft at all), and the target fed its own
   vanilla output in batches of b (perfect drafts) with the logit gap where its argmax flips.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

import numpy as np

from velollm.engine import GenerationRequest, LoadOptions
from velollm.hardware import default_threads
from velollm.models import resolve
from velollm.plugins.llamacpp import LlamaCppBackend, bench
from velollm.plugins.llamacpp.runner import LlamaRunner

INVOICE = '''import logging

def compute_total(items, tax_rate, discount=None):
    """Return the invoice total for a list of items."""
    subtotal = 0
    for item in items:
        if item.quantity <= 0:
            raise ValueError(f"bad quantity for {item.name}: {item.quantity}")
        subtotal += item.price * item.quantity
    if discount is not None:
        subtotal -= subtotal * discount.rate
    tax = subtotal * tax_rate
    logging.info("invoice subtotal=%s tax=%s", subtotal, tax)
    return round(subtotal + tax, 2)
'''

CONFIG = '''def parse_config(path):
    settings = {}
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise SyntaxError(f"{path}:{number}: expected key = value")
            key, value = line.split("=", 1)
            key, value = key.strip(), value.strip()
            if value.isdigit():
                value = int(value)
            elif value.lower() in ("true", "false"):
                value = value.lower() == "true"
            settings[key] = value
    return settings
'''

STATS = '''def summarize(values):
    if not values:
        return None
    count = len(values)
    mean = sum(values) / count
    ordered = sorted(values)
    middle = count // 2
    if count % 2:
        median = ordered[middle]
    else:
        median = (ordered[middle - 1] + ordered[middle]) / 2
    variance = sum((v - mean) ** 2 for v in values) / count
    print("count", count)
    print("mean", mean)
    return {"count": count, "mean": mean, "median": median, "stdev": variance ** 0.5}
'''

PROMPTS = [
    bench.BenchPrompt(name="rename-invoice", category="code-edit", text=(
        "Rename the function compute_total to calculate_invoice_total and the variable subtotal to "
        "net_amount. Reply with the complete updated code only.\n\n```python\n" + INVOICE + "```")),
    bench.BenchPrompt(name="rename-config", category="code-edit", text=(
        "Rename parse_config to load_settings and the variable settings to options. Keep everything "
        "else exactly as it is. Reply with the full code only.\n\n```python\n" + CONFIG + "```")),
    bench.BenchPrompt(name="refactor-stats", category="code-edit", text=(
        "Refactor this function: rename it to describe_values and replace the print calls with "
        "logging.debug calls. Reply with the full code only.\n\n```python\n" + STATS + "```")),
    bench.BenchPrompt(name="story", category="prose", text=(
        "Write a short story about a lighthouse keeper who finds a message in a bottle.")),
    bench.BenchPrompt(name="vaccines", category="prose", text=(
        "Explain in plain language how vaccines train the immune system.")),
]


def table(report: bench.BenchReport) -> None:
    print(f"\n{'prompt':16} {'vanilla tok/s':>15} {'auto tok/s':>15} {'speedup':>15} {'pred':>6} {'accept':>7}"
          f"  greedy agreement")
    for p in report.summary.prompts:
        a = p.agreement
        agree = ("identical" if a and a.identical == a.compared
                 else f"{a.identical}/{a.compared} identical, first diff @{a.first_difference} ({a.agreement_rate:.0%})"
                 if a else "-")
        print(f"{p.prompt:16} {str(p.vanilla.tokens_per_s):>15} {str(p.speculative.tokens_per_s):>15} "
              f"{str(p.speedup):>15} {p.predicted_speedup:6.2f} {p.acceptance_rate:7.0%}  {agree}")
    for category, ratio in report.summary.by_category.items():
        print(f"  {category:12} speedup {ratio}")


def forced_agreement(engine: Any, config: bench.BenchConfig, vanilla: list[bench.Sample], mode: str) -> dict:
    forced = bench.run(engine, config.model_copy(update=dict(mode=mode, skip_vanilla=True, iterations=1,
                                                                  warmup=0)))
    out = {}
    for prompt in config.prompts:
        van = [s for s in vanilla if s.prompt == prompt.name and s.iteration == 0]
        got = [s for s in forced.samples if s.prompt == prompt.name]
        a = bench.agreement(van, got, engine.tokenize)
        speed = statistics.fmean(s.tokens_per_s for s in got) / statistics.fmean(s.tokens_per_s for s in van)
        acc = [s.speculation.get("acceptance_rate", 0.0) for s in got]
        out[prompt.name] = {"agreement": a.model_dump(), "speed_vs_vanilla": speed, "acceptance": acc[0]}
        first = ("identical" if a.identical == a.compared
                 else f"first diff @{a.first_difference} ({a.agreement_rate:.0%})")
        print(f"  {mode:6} {prompt.name:16} {first:32} speed {speed:5.2f}x (1 run)  acceptance {acc[0]:.0%}")
    return out


def greedy_tokens(engine: Any, prompt: bench.BenchPrompt, n: int) -> list[int]:
    c = engine.generate(GenerationRequest(messages=[{"role": "user", "content": prompt.text}], max_tokens=n,
                                          temperature=0.0, extra={"speculative": "off"}))
    return engine.tokenize(c.text, add_special=False)


def teacher_forced_flips(engine: Any, prompt: bench.BenchPrompt, tokens: list[int], b: int) -> list[tuple[int, float]]:
    """Feed the vanilla output back in batches of b: positions where the target's argmax differs
    from what vanilla (one token at a time) produced, with the top-2 logit gap vanilla saw there."""
    spec = engine._speculator
    runner: LlamaRunner = spec.runner
    engine.reset_cache()
    prompt_tokens = engine.prompt_tokens(GenerationRequest(messages=[{"role": "user", "content": prompt.text}]))
    runner.refresh()
    runner.sync(prompt_tokens)
    flips = []
    pending, i = tokens[0], 1  # token 0 comes from the prompt's logits; pending: the next token not yet cached
    while i < len(tokens):
        drafts = tokens[i:i + b - 1]
        runner.feed([pending, *drafts], all_logits=True)
        for j, expected in enumerate(tokens[i:i + len(drafts) + 1]):
            row = runner.logits(j)
            if int(np.argmax(row)) != expected:
                top2 = np.partition(row, -2)[-2:]
                flips.append((i + j, float(abs(top2[1] - top2[0]))))
        i += len(drafts)
        if i < len(tokens):
            pending = tokens[i]
            i += 1
    engine.reset_cache()
    return flips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--n-predict", type=int, default=192)
    parser.add_argument("--only", choices=["code-edit", "prose"], default=None)
    parser.add_argument("--skip-forced", action="store_true")
    parser.add_argument("--skip-numerics", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    prompts = [p for p in PROMPTS if args.only is None or p.category == args.only]
    threads = args.threads or default_threads()
    print(f"load average {os.getloadavg()}; {threads} threads")
    engine = LlamaCppBackend("cpu").load(resolve(args.main).path, LoadOptions(
        n_ctx=2048, n_threads=threads, speculative="auto", prompt_lookup=True, draft_model=args.draft))
    info = engine.speculation
    print(f"batch cost table b=1..{len(info['batch_cost'])}: {info['batch_cost']} (unit {info['unit_ms']} ms)")
    print(f"draft cost per token: {info['draft_cost']} main tokens; ceilings (all drafts accepted): "
          f"{info['ceiling']}")
    config = bench.BenchConfig(main_model=args.main, draft_model=args.draft, mode="auto", n_predict=args.n_predict,
                               iterations=args.iterations, warmup=args.warmup, threads=threads, n_ctx=2048,
                               prompts=prompts)
    report = bench.run(engine, config, progress=lambda label: print(f"  {label}", flush=True))
    table(report)
    results: dict[str, Any] = {"auto": json.loads(report.to_json())}

    if not args.skip_forced:
        print("\nforced modes vs vanilla (greedy output):")
        vanilla = [s for s in report.samples if s.mode == "vanilla"]
        results["forced"] = {m: forced_agreement(engine, config, vanilla, m) for m in ("lookup", "draft")}

    if not args.skip_numerics:
        print("\nbatch numerics (no draft involved):")
        other = LlamaCppBackend("cpu").load(resolve(args.main).path, LoadOptions(
            n_ctx=2048, n_threads=threads, n_batch=8, prompt_lookup=True))
        results["numerics"] = {}
        try:
            for prompt in prompts:
                base = greedy_tokens(engine, prompt, args.n_predict)
                small = greedy_tokens(other, prompt, args.n_predict)
                diff = bench.first_difference(base, small)
                flips = {b: teacher_forced_flips(engine, prompt, base, b) for b in (2, 4, 8)}
                results["numerics"][prompt.name] = {"n_batch_8_first_difference": diff,
                                                    "teacher_forced_flips": flips}
                shown = {b: [(pos, round(gap, 3)) for pos, gap in f[:3]] for b, f in flips.items()}
                print(f"  {prompt.name:16} vanilla n_batch=512 vs 8: "
                      f"{'identical' if diff is None else f'first diff @{diff}'}; argmax flips when fed its own "
                      f"output in batches of b (position, top-2 logit gap): {shown}")
        finally:
            other.close()
    engine.close()
    print(f"load average {os.getloadavg()}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
