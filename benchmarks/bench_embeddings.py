"""Which catalogue model and pooling embed best? Side by side in one run, on the same texts.

    python benchmarks/bench_embeddings.py [--models gemma3-270m qwen2.5-coder-0.5b-instruct ...]
                                          [--poolings mean last cls] [--json]

The catalogue holds only generative models; llama.cpp can still pool their last hidden layer.
For each (model, pooling) this measures:
  pairs     share of triples where sim(anchor, paraphrase) > sim(anchor, unrelated); several
            unrelated sentences share words with the anchor, so word overlap alone fails them
  gap       mean of sim(anchor, paraphrase) - sim(anchor, unrelated)
  top1/mrr  retrieval of the right document of examples/rag_docs/ for 14 paraphrased questions
  texts/s   embedding throughput on those documents and questions, batched (one call)
  1by1      the same texts one call each: the batching speed-up is texts/s ÷ 1by1
  maxdiff   largest |batched - one-by-one| over all vector components (normalised vectors)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from velollm.engine import LoadOptions
from velollm.models import resolve
from velollm.plugins.llamacpp import LlamaCppBackend

DOCS = Path(__file__).resolve().parent.parent / "examples" / "rag_docs"

#: (anchor, paraphrase, unrelated)
TRIPLES = [
    ("The cat sat on the mat.", "A kitten was sitting on the rug.", "The stock market fell sharply today."),
    ("How do I bake bread at home?", "What is a good recipe for homemade bread?", "The rocket launched into orbit."),
    ("The doctor examined the patient.", "The physician checked the sick person.", "The train departs at noon."),
    ("It is raining heavily in London.", "There is a lot of rain in London today.", "She plays the violin well."),
    ("The bank approved my loan.", "My mortgage application was accepted.", "We had a picnic on the river bank."),
    ("He fixed the bug in the code.", "The software defect was repaired by him.", "A bug crawled across the table."),
    ("The match was cancelled because of rain.", "Bad weather called off the game.",
     "He lit a match to start the fire."),
    ("I need to charge my phone.", "My mobile battery is almost empty.", "The police will charge the suspect."),
    ("The children played in the park.", "Kids were having fun on the playground.",
     "Parking in the city centre is expensive."),
    ("Water boils at 100 degrees Celsius.", "At sea level water turns to steam at 100 °C.",
     "The degree ceremony is at the university."),
    ("She is learning to play the piano.", "She takes keyboard lessons to learn music.",
     "They are learning about the solar system."),
    ("The company hired ten new engineers.", "Ten engineers joined the firm this month.",
     "The engine of the car needs new oil."),
]

#: (question, document stem)
QUESTIONS = [
    ("How far do runners go in a marathon?", "marathon"),
    ("Where does the length of the Olympic long-distance race come from?", "marathon"),
    ("Why does the sea level rise and fall twice a day?", "tides"),
    ("When is the difference between high and low water largest?", "tides"),
    ("How do bees tell each other where flowers are?", "honeybees"),
    ("What does the dance of an insect forager mean?", "honeybees"),
    ("Why don't my Python threads use all CPU cores?", "python_gil"),
    ("What stops two threads from running bytecode at once?", "python_gil"),
    ("At what temperature should I bake my loaf?", "sourdough"),
    ("How do I make bread rise without packaged yeast?", "sourdough"),
    ("Which Italian mountain erupts frequently?", "etna"),
    ("What is the tallest active volcano in Europe?", "etna"),
    ("How long can I keep a borrowed drill?", "tool_library"),
    ("When is the tool library open on Saturday?", "tool_library"),
]


def load(model: str, pooling: str):
    path = resolve(model).path
    options = LoadOptions(n_ctx=2048, extra={"embedding": True, "pooling_type": pooling})
    return LlamaCppBackend("cpu").load(path, options)


def measure(engine) -> dict[str, float]:
    docs = sorted(DOCS.glob("*.md"))
    names = [d.stem for d in docs]
    doc_texts = [d.read_text() for d in docs]
    flat = [t for triple in TRIPLES for t in triple]
    e = np.asarray(engine.embed(flat))
    sims = [(float(e[3 * i] @ e[3 * i + 1]), float(e[3 * i] @ e[3 * i + 2])) for i in range(len(TRIPLES))]
    texts = doc_texts + [q for q, _ in QUESTIONS]
    start = time.perf_counter()
    batched = np.asarray(engine.embed(texts))
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    single = np.asarray([engine.embed([t])[0] for t in texts])
    single_s = time.perf_counter() - start
    d, q = batched[: len(docs)], batched[len(docs):]
    ranks = []
    for qi, (_, want) in enumerate(QUESTIONS):
        order = list(np.argsort(-(d @ q[qi])))
        ranks.append(order.index(names.index(want)) + 1)
    return {
        "pairs": sum(a > b for a, b in sims) / len(sims),
        "gap": float(np.mean([a - b for a, b in sims])),
        "top1": sum(r == 1 for r in ranks) / len(ranks),
        "mrr": float(np.mean([1 / r for r in ranks])),
        "texts_per_s": len(texts) / batch_s,
        "one_by_one_per_s": len(texts) / single_s,
        "maxdiff": float(np.abs(batched - single).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-coder-0.5b-instruct",
                                                        "qwen2.5-coder-1.5b-instruct"])
    parser.add_argument("--poolings", nargs="+", default=["mean", "last", "cls"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for pooling in args.poolings:
            engine = load(model, pooling)
            try:
                rows.append({"model": model, "pooling": pooling, **measure(engine)})
            finally:
                engine.close()
            if not args.json:
                print(f"... {model} {pooling} done", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':30} {'pooling':7} {'pairs':>6} {'gap':>6} {'top1':>6} {'mrr':>6} {'texts/s':>8} "
          f"{'1by1/s':>7} {'speedup':>7} {'maxdiff':>8}")
    for r in rows:
        print(f"{r['model']:30} {r['pooling']:7} {r['pairs']:6.2f} {r['gap']:6.3f} {r['top1']:6.2f} {r['mrr']:6.2f} "
              f"{r['texts_per_s']:8.1f} {r['one_by_one_per_s']:7.1f} {r['texts_per_s'] / r['one_by_one_per_s']:7.2f} "
              f"{r['maxdiff']:8.1e}")


if __name__ == "__main__":
    main()
