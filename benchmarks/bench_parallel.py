"""Parallel decoding under DSPy: a few-shot program under ``dspy.Evaluate`` at several ``num_threads``.

Two routes on the same model file, side by side in one run, DSPy's cache off on both:

* **velollm**: ``velollm.LM(parallel=P)`` + ``velollm.Adapter``: DSPy threads become sequences of
  one continuous batch (velollm/plugins/llamacpp/batch.py) and share the cached demo prefix;
* **plain**: one ``llama_cpp.Llama`` behind a lock (it is not thread-safe) as a ``dspy.BaseLM``, with
  DSPy's ``JSONAdapter`` (``response_format={"type": "json_object"}``, which llama-cpp-python
  turns into a JSON grammar).

The program is a sentiment classifier with 8 demos, so every call shares a long prompt prefix.
Reported per route and thread count: wall seconds, examples/s, the speedup over num_threads=1 and
the accuracy. Then the prefix cache: time to first token of a request whose demo prefix is cold,
then warm (another question after the same demos), interleaving two programs with different demos.

    .venv/bin/python benchmarks/bench_parallel.py [--examples 32] [--threads-list 1 2 4 8]
                                                  [--n-threads 2] [--only velollm|plain] [--json]

The machine this ran on is shared: quote ``uptime`` with the numbers (printed at start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any, Literal

import dspy

MODEL = "qwen2.5-coder-0.5b-instruct"

POSITIVE = [
    "I loved every minute of it.", "The staff were kind and quick.", "Best purchase I made this year.",
    "The food was delicious and fresh.", "What a wonderful surprise!", "It works perfectly, thank you.",
    "The concert was amazing.", "I would happily come back.", "Great value for the price.",
    "The view from the room was stunning.", "My kids adored the show.", "Setup took two minutes, brilliant.",
    "The book kept me smiling.", "Such a friendly neighbourhood.", "The new update is fantastic.",
    "Our guide was funny and smart.", "The coffee here is excellent.", "I feel great after the class.",
    "The garden looks beautiful.", "A truly delightful evening.",
]
NEGATIVE = [
    "The room was dirty and loud.", "It broke after one day.", "I waited an hour for cold food.",
    "Worst customer service ever.", "The movie was boring and long.", "I want my money back.",
    "The app crashes every time.", "The train was late again.", "Nobody answered my emails.",
    "The shoes hurt my feet.", "The soup was far too salty.", "Terrible battery life.",
    "The hotel lost our booking.", "It smells awful in here.", "The instructions make no sense.",
    "Rude staff and high prices.", "The screen cracked on arrival.", "I regret buying this.",
    "The noise kept me awake all night.", "A complete waste of time.",
]
#: more labelled sentences: BootstrapFewShot trains on these, so its train set never overlaps the dev set
MORE_POSITIVE = [
    "The nurse made me feel safe.", "This blender is a joy to use.", "The hike was breathtaking.",
    "Delivery came a day early.", "The teacher explained it so clearly.", "Fresh bread every morning, lovely.",
    "The team fixed it in minutes.", "I am thrilled with the result.", "The seats were comfy and roomy.",
    "What a charming little café.", "The sound quality is superb.", "She gave the best advice.",
    "Everything arrived in perfect shape.", "The festival was pure fun.", "This jacket keeps me warm and dry.",
    "The pasta tasted like home.",
]
MORE_NEGATIVE = [
    "The package arrived crushed.", "My order was wrong twice.", "The heating never worked.",
    "The manager ignored my complaint.", "Half the features are missing.", "The paint peeled within a week.",
    "The flight was cancelled without notice.", "The sequel was a letdown.", "The water was cold every morning.",
    "They charged me twice.", "The charger stopped working.", "The waiter spilled soup on me.",
    "The parking was a nightmare.", "The lesson was a mess.", "Customer support hung up on me.",
    "The fries were soggy and bland.",
]

#: held out for the BootstrapFewShot dev set only: with 56 sentences one example was 1.8 points of
#: accuracy, so a single greedy near-tie flip moved a route by more than the ±3 points compared
HELD_OUT_POSITIVE = [
    "The doctor listened to every question.", "Our new puppy has made the house so happy.",
    "The refund arrived the very next day.", "This is the comfiest sofa I have ever owned.",
    "The museum tour was fascinating.", "He fixed my bike for free, what a star.",
    "The soup warmed me right up.", "I finally passed my driving test!", "The wedding was perfect in every way.",
    "Checkout was fast and painless.", "The printer just works, no fuss.", "The lake was calm and gorgeous.",
    "My new glasses are so clear.", "The children's play was adorable.", "The chef came out to say hello.",
    "I slept like a baby in that bed.", "Support solved it on the first call.", "The puzzle was challenging and fun.",
    "The cake was moist and rich.", "The bus driver waited for me, so kind.", "Great battery, it lasts all week.",
    "The new park is a gem.", "The lecture was inspiring.", "I am so proud of my team.",
]
HELD_OUT_NEGATIVE = [
    "The doctor never called me back.", "The puppy chewed through my new shoes.",
    "The refund still has not arrived.", "The sofa sagged after a month.", "The museum was closed without warning.",
    "The bike shop overcharged me.", "The soup arrived lukewarm.", "I failed the test because the examiner was late.",
    "The wedding venue double-booked us.", "Checkout froze and took my money twice.",
    "The printer jams on every page.", "The lake was full of litter.", "My new glasses give me headaches.",
    "The play was so bad we left early.", "The chef ignored our allergy note.", "The mattress was lumpy and hard.",
    "Support kept me on hold for two hours.", "The puzzle was missing pieces.", "The cake was dry and stale.",
    "The bus drove straight past me.", "The battery dies by lunchtime.", "The park is always full of broken glass.",
    "The lecture was dull and confusing.", "I am so disappointed in this team.",
]


class Sentiment(dspy.Signature):
    """Classify the sentiment of a customer's sentence."""

    text: str = dspy.InputField()
    sentiment: Literal["positive", "negative"] = dspy.OutputField()


def _examples(positive: list[str], negative: list[str]) -> list[dspy.Example]:
    """Alternating labels."""
    return [dspy.Example(text=t, sentiment=s).with_inputs("text")
            for p, q in zip(positive, negative, strict=True) for t, s in ((p, "positive"), (q, "negative"))]


def dataset(n: int) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """8 demos (4 + 4) and ``n`` evaluation examples (32 distinct ones, repeated beyond that)."""
    demos = _examples(POSITIVE[:4], NEGATIVE[:4])
    rest = _examples(POSITIVE[4:], NEGATIVE[4:])
    return demos, (rest * (n // len(rest) + 1))[:n]


def bootstrap_sets(n_train: int) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """BootstrapFewShot's train set (the first ``n_train`` of the extra sentences) and a dev set of
    every other labelled sentence (demos included: the compiled program has its own), disjoint."""
    extra = _examples(MORE_POSITIVE, MORE_NEGATIVE)
    dev = _examples(POSITIVE, NEGATIVE) + extra[n_train:] + _examples(HELD_OUT_POSITIVE, HELD_OUT_NEGATIVE)
    return extra[:n_train], dev


def metric(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> bool:
    return str(getattr(prediction, "sentiment", "")).strip().lower() == example.sentiment


class PlainLlamaLM(dspy.BaseLM):
    """llama-cpp-python as DSPy would meet it without velollm: one ``Llama``, a lock, OpenAI-shaped replies."""

    supported_params = frozenset({"response_format"})
    supports_response_schema = False  # JSONAdapter then asks for {"type": "json_object"}

    def __init__(self, path: str, n_ctx: int, n_threads: int, max_tokens: int) -> None:
        from llama_cpp import Llama

        super().__init__(model="plain/llama-cpp-python", temperature=0.0, max_tokens=max_tokens, cache=False)
        self.llama = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                           verbose=False)
        self.lock = threading.Lock()

    def forward(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None, **kwargs: Any) -> Any:
        import litellm

        messages = messages or [{"role": "user", "content": prompt or ""}]
        options: dict[str, Any] = {"temperature": 0.0,
                                   "max_tokens": kwargs.get("max_tokens", self.kwargs["max_tokens"])}
        if kwargs.get("response_format", {}).get("type") == "json_object":
            options["response_format"] = {"type": "json_object"}
        with self.lock:
            reply = self.llama.create_chat_completion(messages=messages, **options)
        return litellm.ModelResponse(**reply)


def evaluate(lm: Any, adapter: Any, program: Any, examples: list[dspy.Example], threads: int) -> dict[str, Any]:
    evaluator = dspy.Evaluate(devset=examples, metric=metric, num_threads=threads, display_progress=False,
                              provide_traceback=False)
    with dspy.context(lm=lm, adapter=adapter):
        start = time.perf_counter()
        result = evaluator(program)
        wall = time.perf_counter() - start
    score = float(getattr(result, "score", result))
    return {"threads": threads, "wall_s": wall, "examples_per_s": len(examples) / wall, "accuracy": score}


def bootstrap_then_evaluate(lm: Any, adapter: Any, train: list[dspy.Example], dev: list[dspy.Example],
                            threads: int) -> dict[str, Any]:
    """BootstrapFewShot compiles a ChainOfThought classifier, then dspy.Evaluate scores it (one route)."""
    with dspy.context(lm=lm, adapter=adapter):
        start = time.perf_counter()
        optimizer = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=4, max_labeled_demos=4)
        compiled = optimizer.compile(dspy.ChainOfThought(Sentiment), trainset=train)
        compiled_s = time.perf_counter() - start
    row = evaluate(lm, adapter, compiled, dev, threads)
    return {"compile_s": compiled_s, "evaluate_s": row["wall_s"], "total_s": compiled_s + row["wall_s"],
            "accuracy": row["accuracy"], "threads": threads}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs (shared machine)"


def prefix_cache_ttft(lm: Any) -> dict[str, Any]:
    """TTFT of cold vs warm demo prefixes, two programs with different demos interleaved."""
    from velollm.engine import GenerationRequest
    from velollm.pool import get_pool

    lease = get_pool().acquire(lm.ref, **lm.engine.load_options)
    try:
        engine = lease.engine
        engine.reset_cache()
        demos_a = "\n".join(f"Text: {t}\nSentiment: positive" for t in POSITIVE[:12])
        demos_b = "\n".join(f"Text: {t}\nSentiment: negative" for t in NEGATIVE[:12])
        rows = []
        for k, (name, demos) in enumerate([("A", demos_a), ("B", demos_b)] * 3):
            request = GenerationRequest(prompt=f"{demos}\nText: {(POSITIVE + NEGATIVE)[20 + k]}\nSentiment:",
                                        max_tokens=1, temperature=0)
            completion = engine.generate(request)
            rows.append({"program": name, "call": k // 2 + 1, "prompt_tokens": completion.usage.prompt_tokens,
                         "cached_tokens": completion.usage.cached_tokens, "ttft_s": completion.timings.ttft_s})
        warm = [r for r in rows if r["call"] > 1]
        share = sum(r["cached_tokens"] for r in warm) / max(sum(r["prompt_tokens"] for r in warm), 1)
        cold = [r["ttft_s"] for r in rows if r["call"] == 1]
        return {"rows": rows, "cached_share_after_first": share,
                "cold_ttft_s": sum(cold) / len(cold), "warm_ttft_s": sum(r["ttft_s"] for r in warm) / len(warm)}
    finally:
        lease.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--threads-list", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--parallel", type=int, default=None,
                        help="velollm sequences (default: the largest thread count)")
    parser.add_argument("--n-threads", type=int, default=None, help="llama.cpp threads for both routes")
    parser.add_argument("--n-ctx", type=int, default=8192, help="velollm's shared KV cache (plain: 4096)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--only", choices=["velollm", "plain"])
    parser.add_argument("--no-ttft", action="store_true")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="also BootstrapFewShot(ChainOfThought) on N train examples, then Evaluate at the "
                             "largest thread count (both routes)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import velollm
    from velollm.hardware import default_threads
    from velollm.models import resolve

    n_threads = args.n_threads or default_threads()
    demos, examples = dataset(args.examples)
    program = dspy.Predict(Sentiment)
    program.demos = demos
    print(f"start: {load_average()}; {len(examples)} examples, {len(demos)} demos, llama.cpp threads {n_threads}")
    report: dict[str, Any] = {"start_load": load_average(), "n_threads": n_threads, "examples": len(examples)}
    routes: dict[str, tuple[Any, Any]] = {}
    if args.only in (None, "velollm"):
        parallel = args.parallel or max(args.threads_list)
        routes["velollm"] = (velollm.LM(args.model, cache=False, max_tokens=args.max_tokens, n_ctx=args.n_ctx,
                                        n_threads=n_threads, parallel=parallel), velollm.Adapter())
    if args.only in (None, "plain"):
        path = str(resolve(args.model).path)
        routes["plain"] = (PlainLlamaLM(path, 4096, n_threads, args.max_tokens), dspy.JSONAdapter())
    for lm, adapter in routes.values():  # warm: load the model, fill caches
        evaluate(lm, adapter, program, examples[:1], 1)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in routes}
    for threads in args.threads_list:  # routes alternate per thread count: drift hits both
        for name, (lm, adapter) in routes.items():
            row = evaluate(lm, adapter, program, examples, threads)
            row["load"] = os.getloadavg()[0]
            results[name].append(row)
            print(f"{name:8s} num_threads={threads}: {row['wall_s']:6.1f} s  {row['examples_per_s']:.2f} ex/s  "
                  f"accuracy {row['accuracy']:.1f}  (load {row['load']:.1f})", flush=True)
    for rows in results.values():
        base = rows[0]["examples_per_s"]
        for row in rows:
            row["speedup_vs_first"] = row["examples_per_s"] / base
    report["evaluate"] = results
    if "velollm" in results and "plain" in results:
        report["velollm_over_plain"] = {r["threads"]: p["wall_s"] / r["wall_s"]
                                        for r, p in zip(results["velollm"], results["plain"], strict=True)}
    if args.bootstrap:
        train, dev = bootstrap_sets(args.bootstrap)
        report["bootstrap"] = {"train": len(train), "dev": len(dev)}
        print(f"BootstrapFewShot on {len(train)} train examples, Evaluate on {len(dev)} others", flush=True)
        for name, (lm, adapter) in routes.items():
            row = bootstrap_then_evaluate(lm, adapter, train, dev, max(args.threads_list))
            report["bootstrap"][name] = row
            print(f"{name:8s} BootstrapFewShot {row['compile_s']:.1f} s + Evaluate {row['evaluate_s']:.1f} s "
                  f"= {row['total_s']:.1f} s, accuracy {row['accuracy']:.1f}", flush=True)
    if "velollm" in routes and not args.no_ttft:
        report["prefix_cache"] = prefix_cache_ttft(routes["velollm"][0])
    report["end_load"] = load_average()
    print("\nroute     threads   wall_s   ex/s  speedup  accuracy")
    for name, rows in results.items():
        for row in rows:
            print(f"{name:8s} {row['threads']:8d} {row['wall_s']:8.1f} {row['examples_per_s']:6.2f} "
                  f"{row['speedup_vs_first']:7.2f}x {row['accuracy']:8.1f}")
    if "velollm_over_plain" in report:
        print("velollm speed over plain (same thread count): " +
              ", ".join(f"{t}: {v:.2f}x" for t, v in report["velollm_over_plain"].items()))
    if "prefix_cache" in report:
        pc = report["prefix_cache"]
        for row in pc["rows"]:
            print(f"  program {row['program']} call {row['call']}: {row['prompt_tokens']} prompt tokens, "
                  f"{row['cached_tokens']} cached, TTFT {row['ttft_s']:.3f} s")
        print(f"prefix cache: {pc['cached_share_after_first']:.0%} of prompt tokens cached after each program's "
              f"first call; TTFT cold {pc['cold_ttft_s']:.3f} s, warm {pc['warm_ttft_s']:.3f} s")
    print(f"end: {report['end_load']}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
