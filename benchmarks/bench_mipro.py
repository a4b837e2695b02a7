"""MIPROv2 (``auto="light"``) on Qwen2.5-Coder-1.5B through velollm: does an optimizer's run fit?

    .venv/bin/python benchmarks/bench_mipro.py [--model qwen2.5-coder-1.5b-instruct] [--parallel 4]
                                               [--train 16] [--val 16] [--threads 4]

MIPROv2 writes long prompts (dataset summaries, program code, candidate instructions, demos) that
outgrow a 4096-token context. With ``parallel > 1`` placement gives the shared KV cache the model's
trained context where memory allows, so the run should finish without a ``ContextOverflow``.
Reports the wall time, LM calls, the longest prompt seen, and the compiled program's accuracy on
the validation set against the uncompiled program's. The sentiment task is bench_parallel's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import dspy

sys.path.insert(0, os.path.dirname(__file__))
from bench_parallel import Sentiment, dataset, metric  # noqa: E402


def main() -> None:
    import velollm
    from velollm.models import resolve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--train", type=int, default=16)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4, help="DSPy threads")
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()
    print(f"start: load average {os.getloadavg()}", flush=True)
    lm = velollm.LM(str(resolve(args.model).path), parallel=args.parallel, max_tokens=args.max_tokens, cache=False)
    _, examples = dataset(args.train + args.val)
    train, val = examples[: args.train], examples[args.train:]
    dspy.configure(lm=lm, adapter=velollm.Adapter())
    evaluate = dspy.Evaluate(devset=val, metric=metric, num_threads=args.threads, display_progress=False)
    program = dspy.Predict(Sentiment)
    before = evaluate(program).score
    start = time.perf_counter()
    optimizer = dspy.MIPROv2(metric=metric, auto="light", num_threads=args.threads, verbose=False)
    compiled = optimizer.compile(program, trainset=train, valset=val, max_bootstrapped_demos=2,
                                 max_labeled_demos=2)
    wall = time.perf_counter() - start
    after = evaluate(compiled).score
    prompts = [entry.get("usage", {}).get("prompt_tokens", 0) or 0 for entry in lm.history]
    print(f"MIPROv2 auto=light on {args.model}: {wall:.0f} s, {len(lm.history)} LM calls, longest prompt "
          f"{max(prompts, default=0)} tokens; accuracy before {before:.1f}, after {after:.1f}")
    print(f"end: load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
