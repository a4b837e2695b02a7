"""Native (numpy) engine vs llama.cpp: decode and prefill speed, same model, same machine, one run.

Also measures, in the same run, the bound the native decode cannot beat: one pass of numpy
float32 matrix-vector products over exactly the weight matrices a decode step reads (memory
bandwidth through BLAS sgemv). Decode time and the bound are medians (per token, per sweep), so
a burst of load from other processes on a shared machine skews neither side. Target: native
decode >= 80 % of that bound, native prefill >= 0.5x llama.cpp's. Then logit parity on three
prompts, next to llama.cpp's own noise floor (its logits for the same prompt evaluated batched
vs token by token). Both engines get the same thread count (llama.cpp for prompts too).

    .venv/bin/python benchmarks/bench_native.py [--model REF] [--threads N] [--decode N]
                                                [--prompt-tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from velollm.engine import LoadOptions
from velollm.models import pull
from velollm.plugins.native import NativeBackend
from velollm.plugins.native.engine import NativeEngine, _blas_threads
from velollm.plugins.native.model import KVCache

PARAGRAPH = ("The history of computing is a story of abstraction: each generation of engineers hides the "
             "details of the last behind a simpler interface, and builds something larger on top. ")
PARITY_PROMPTS = ["def quicksort(arr):", "The three primary colors are", "Once upon a time, in a small village,"]


def best_of(n: int, fn: Any) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidth_pass(engine: NativeEngine, repeats: int) -> tuple[float, int]:
    """Median seconds of one sweep of W @ x over every cached 2-D weight, in the order a decode
    step reads them: the time a token cannot beat."""
    mats = [w for w in engine.store._f32.values() if w.ndim == 2]
    xs = [np.random.default_rng(0).standard_normal(w.shape[1]).astype(np.float32) for w in mats]
    nbytes = sum(w.nbytes for w in mats)
    times = []
    with _blas_threads(engine.threads):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for w, x in zip(mats, xs, strict=True):
                w @ x
            times.append(time.perf_counter() - start)
    return float(np.median(times[1:])), nbytes


def native_speed(engine: NativeEngine, prompt: list[int], n_decode: int) -> dict[str, float]:
    cfg = engine.config
    with _blas_threads(engine.threads):
        def prefill() -> None:
            engine._forward_chunks(prompt, KVCache(cfg, engine.context_length), "last")

        t_prefill = best_of(2, prefill)
        cache = KVCache(cfg, engine.context_length)
        logits = engine._forward_chunks(prompt, cache, "last")[-1]
        steps = []
        for _ in range(n_decode):
            start = time.perf_counter()
            token = int(np.argmax(logits))
            logits = engine.model.forward([token], cache)[-1]
            steps.append(time.perf_counter() - start)
    t_token = float(np.median(steps))
    return {"prefill_tok_s": len(prompt) / t_prefill, "decode_tok_s": 1.0 / t_token,
            "decode_ms_per_token": 1000 * t_token}


def last_logits(llama: Any) -> np.ndarray:
    """The last evaluated token's logits, straight from the context (no logits_all needed)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),))


def llama_speed(llama: Any, prompt: list[int], n_decode: int) -> dict[str, float]:
    def prefill() -> None:
        llama.reset()
        llama.eval(prompt)

    t_prefill = best_of(2, prefill)
    llama.reset()
    llama.eval(prompt)
    steps = []
    for _ in range(n_decode):
        start = time.perf_counter()
        token = int(np.argmax(last_logits(llama)))
        llama.eval([token])
        steps.append(time.perf_counter() - start)
    t_token = float(np.median(steps))
    return {"prefill_tok_s": len(prompt) / t_prefill, "decode_tok_s": 1.0 / t_token,
            "decode_ms_per_token": 1000 * t_token}


def parity(engine: NativeEngine, llama: Any) -> list[dict[str, Any]]:
    rows = []
    for text in PARITY_PROMPTS:
        ids = engine.tokenize(text, add_special=True, parse_special=True)
        llama.reset()
        llama.eval(ids)
        batched = np.array(llama.scores[len(ids) - 1], dtype=np.float32)
        llama.reset()
        for t in ids:
            llama.eval([t])
        sequential = np.array(llama.scores[llama.n_tokens - 1], dtype=np.float32)
        mine = engine.logits(ids)

        def stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
            return float(np.abs(a - b).max()), float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

        d, c = stats(mine, batched)
        d0, c0 = stats(batched, sequential)
        rows.append({"prompt": text, "max_abs_diff": d, "cosine": c, "same_argmax": int(np.argmax(mine)) == int(
            np.argmax(batched)), "llama_self_max_abs_diff": d0, "llama_self_cosine": c0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--threads", type=int, default=1, help="threads for both engines (default 1: the "
                        "machine is shared; 2 threads spin against other load)")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--numerics", default="ggml", choices=["ggml", "exact"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from llama_cpp import Llama

    path = pull(args.model)
    n_ctx = max(512, args.prompt_tokens + args.decode + 16)
    t0 = time.perf_counter()
    engine = NativeBackend().load(path, LoadOptions(n_ctx=n_ctx, n_threads=args.threads,
                                                    extra={"numerics": args.numerics}))
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.logits(engine.tokenize("warm up"))  # dequantizes every weight once
    t_dequant = time.perf_counter() - t0
    # logits for every prompt position would add a vocabulary-sized product per token to llama.cpp's
    # prefill: the speed run keeps only the last position, like the native engine
    llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                  n_batch=512, verbose=False)

    prompt = engine.tokenize(PARAGRAPH * 40)[: args.prompt_tokens]
    t_pass, nbytes = bandwidth_pass(engine, 7)
    mine = native_speed(engine, prompt, args.decode)
    theirs = llama_speed(llama, prompt, args.decode)
    llama.close()
    llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                  logits_all=True, verbose=False)
    par = parity(engine, llama)
    weight_bytes = engine.store.cached_bytes
    bound = 1.0 / t_pass
    result = {
        "model": args.model, "threads": args.threads, "numerics": args.numerics,
        "prompt_tokens": len(prompt), "decode_tokens": args.decode,
        "open_s": t_open, "first_use_dequant_s": t_dequant,
        "float32_weight_bytes": weight_bytes, "decode_stream_bytes": nbytes,
        "matvec_gb_s": nbytes / t_pass / 1e9, "bandwidth_bound_tok_s": bound,
        "native": mine, "llamacpp": theirs,
        "decode_vs_bound": mine["decode_tok_s"] / bound,
        "decode_vs_llamacpp": mine["decode_tok_s"] / theirs["decode_tok_s"],
        "prefill_vs_llamacpp": mine["prefill_tok_s"] / theirs["prefill_tok_s"],
        "matvec_share_of_decode": (t_pass * 1000) / mine["decode_ms_per_token"],
        "parity": par,
    }
    engine.close()
    llama.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model {args.model}, {args.threads} thread(s), numerics {args.numerics}; "
          f"open {t_open:.2f} s, first-use dequantization {t_dequant:.1f} s, "
          f"float32 weights {weight_bytes / 1e9:.2f} GB")
    print(f"bandwidth bound: {nbytes / 1e9:.2f} GB of float32 weights per token at {result['matvec_gb_s']:.1f} GB/s "
          f"-> {bound:.1f} tok/s")
    print()
    print(f"{'':24}{'native':>12}{'llama.cpp':>12}{'ratio':>8}")
    for key, label in (("decode_tok_s", "decode tok/s"), ("prefill_tok_s", f"prefill tok/s ({len(prompt)})")):
        print(f"{label:24}{mine[key]:12.1f}{theirs[key]:12.1f}{mine[key] / theirs[key]:8.2f}")
    print(f"{'decode / bound':24}{100 * result['decode_vs_bound']:11.0f}%")
    print(f"{'matvec share of decode':24}{100 * result['matvec_share_of_decode']:11.0f}%")
    print()
    print("last-position logits vs llama.cpp (and llama.cpp batched vs token-by-token, its own noise):")
    for row in par:
        print(f"  {row['prompt'][:34]!r:38} max|diff| {row['max_abs_diff']:.3f} cos {row['cosine']:.6f} "
              f"argmax {'same' if row['same_argmax'] else 'DIFFERENT'} | llama self: max|diff| "
              f"{row['llama_self_max_abs_diff']:.3f} cos {row['llama_self_cosine']:.6f}")


if __name__ == "__main__":
    main()
