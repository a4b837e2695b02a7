"""A DSPy task suite over every output type: velollm (velollm.LM + velollm.Adapter) against DSPy's
JSONAdapter on plain llama-cpp-python, same model, greedy, DSPy's cache off, in one run.

    .venv/bin/python benchmarks/dspy_suite.py [--model qwen2.5-coder-0.5b-instruct] [--only velollm]
                                              [--backend native-cpu] [--max-tokens 512] [--cases 41]

Per output type (str, Literal, int, float, bool, list[int], list[str], dict[str, int], pydantic
model, nested model, two outputs, ChainOfThought) the table shows correct answers; per system the
parse failures, LM calls per prediction and the slowest prediction. Report `uptime` with the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from typing import Any, Literal

import dspy
import pydantic

sys.path.insert(0, os.path.dirname(__file__))
from adapter_suite import Case, CityFacts, Person, Sentiment, run_case  # noqa: E402


class Address(pydantic.BaseModel):
    city: str
    country: str


class Employee(pydantic.BaseModel):
    name: str
    address: Address


class Topic(dspy.Signature):
    """Classify the topic of the headline."""

    headline: str = dspy.InputField()
    topic: Literal["sports", "politics", "technology", "food"] = dspy.OutputField()


def has(*words: str) -> Any:
    return lambda v: isinstance(v, str) and all(w in v.lower() for w in words)


def eq(value: Any) -> Any:
    return lambda v: v == value and type(v) is type(value)


def approx(value: float) -> Any:
    return lambda v: isinstance(v, float) and abs(v - value) < 1e-6


def P(sig: Any) -> Any:  # noqa: N802 - a short builder name keeps the case table readable
    return lambda: dspy.Predict(sig)


def case(kind: str, build: Any, inputs: dict[str, Any], checks: dict[str, Any]) -> Case:
    return Case(kind, build, inputs, checks)


CASES: list[Case] = [
    case("str", P("question -> answer"), {"question": "What is the capital of France?"}, {"answer": has("paris")}),
    case("str", P("question -> answer"), {"question": "Which planet is known as the red planet?"},
         {"answer": has("mars")}),
    case("str", P("word -> antonym"), {"word": "hot"}, {"antonym": has("cold")}),
    case("str", P("text -> language"), {"text": "Bonjour, comment allez-vous ?"}, {"language": has("french")}),
    case("Literal", P(Sentiment), {"review": "I absolutely loved this film, it was wonderful!"},
         {"sentiment": eq("positive")}),
    case("Literal", P(Sentiment), {"review": "Terrible service, cold food, never again."},
         {"sentiment": eq("negative")}),
    case("Literal", P(Topic), {"headline": "Local team wins the championship final 3-1"}, {"topic": eq("sports")}),
    case("Literal", P(Topic), {"headline": "New smartphone chip doubles battery life"}, {"topic": eq("technology")}),
    case("int", P("question -> answer: int"), {"question": "What is 12 + 30?"}, {"answer": eq(42)}),
    case("int", P("question -> answer: int"), {"question": "How many legs does a spider have?"}, {"answer": eq(8)}),
    case("int", P("question -> answer: int"), {"question": "What is 9 times 7?"}, {"answer": eq(63)}),
    case("int", P("text -> count: int"), {"text": "How many words are in: 'the cat sat down'?"}, {"count": eq(4)}),
    case("float", P("question -> answer: float"), {"question": "What is 7 divided by 2?"}, {"answer": approx(3.5)}),
    case("float", P("question -> answer: float"), {"question": "What is 0.5 plus 0.25?"}, {"answer": approx(0.75)}),
    case("float", P("question -> answer: float"), {"question": "What is 10 percent of 45?"}, {"answer": approx(4.5)}),
    case("bool", P("question -> answer: bool"), {"question": "Is 10 an even number?"}, {"answer": eq(True)}),
    case("bool", P("question -> answer: bool"), {"question": "Is the sun a planet?"}, {"answer": eq(False)}),
    case("bool", P("question -> answer: bool"), {"question": "Is water wet?"}, {"answer": eq(True)}),
    case("bool", P("question -> answer: bool"), {"question": "Is 7 greater than 12?"}, {"answer": eq(False)}),
    case("list[int]", P("text -> numbers: list[int]"), {"text": "The scores were 3, 7 and 12."},
         {"numbers": eq([3, 7, 12])}),
    case("list[int]", P("question -> primes: list[int]"), {"question": "List the prime numbers below 10."},
         {"primes": eq([2, 3, 5, 7])}),
    case("list[int]", P("question -> numbers: list[int]"), {"question": "List the even numbers from 2 to 10."},
         {"numbers": eq([2, 4, 6, 8, 10])}),
    case("list[str]", P("text -> fruits: list[str]"), {"text": "I bought apples, bananas and cherries."},
         {"fruits": lambda v: isinstance(v, list) and {f.lower().rstrip("s") for f in v} >= {"apple", "banana"}}),
    case("list[str]", P("question -> colors: list[str]"), {"question": "Name the three primary colors of paint."},
         {"colors": lambda v: isinstance(v, list) and {"red", "blue", "yellow"} <= {c.lower() for c in v}}),
    case("list[str]", P("text -> names: list[str]"), {"text": "Alice met Bob and Carol at the station."},
         {"names": lambda v: isinstance(v, list) and {"alice", "bob", "carol"} <= {n.lower() for n in v}}),
    case("dict[str,int]", P("text -> ages: dict[str, int]"), {"text": "Ann is 31 and Ben is 45."},
         {"ages": lambda v: isinstance(v, dict) and {k.lower(): x for k, x in v.items()} == {"ann": 31, "ben": 45}}),
    case("dict[str,int]", P("text -> counts: dict[str, int]"), {"text": "We have 3 cats and 2 dogs."},
         {"counts": lambda v: isinstance(v, dict) and sorted(v.values()) == [2, 3]}),
    case("dict[str,int]", P("text -> prices: dict[str, int]"), {"text": "Tea costs 4 dollars and cake costs 6."},
         {"prices": lambda v: isinstance(v, dict) and sorted(v.values()) == [4, 6]}),
    case("pydantic", P("text -> person: Person"), {"text": "Maria is a 34 year old engineer from Spain."},
         {"person": lambda v: isinstance(v, Person) and v.name == "Maria" and v.age == 34}),
    case("pydantic", P("text -> person: Person"), {"text": "Tom, aged 52, runs a bakery."},
         {"person": lambda v: isinstance(v, Person) and v.name == "Tom" and v.age == 52}),
    case("pydantic", P("text -> person: Person"), {"text": "The new intern, Li, just turned 21."},
         {"person": lambda v: isinstance(v, Person) and v.name == "Li" and v.age == 21}),
    case("nested", P("text -> employee: Employee"), {"text": "Sara works from Lyon, France."},
         {"employee": lambda v: isinstance(v, Employee) and v.name == "Sara" and v.address.city == "Lyon"}),
    case("nested", P("text -> employee: Employee"), {"text": "Ken lives in Osaka, Japan and works remotely."},
         {"employee": lambda v: isinstance(v, Employee) and v.name == "Ken" and v.address.country == "Japan"}),
    case("nested", P("text -> employee: Employee"), {"text": "Our Toronto office in Canada is run by Priya."},
         {"employee": lambda v: isinstance(v, Employee) and v.name == "Priya" and v.address.city == "Toronto"}),
    case("two outputs", P(CityFacts), {"city": "Tokyo"}, {"country": has("japan"), "continent": eq("Asia")}),
    case("two outputs", P(CityFacts), {"city": "Paris"}, {"country": has("france"), "continent": eq("Europe")}),
    case("two outputs", P("question -> answer: int, unit"), {"question": "How long is a marathon, roughly, in km?"},
         {"answer": lambda v: v in (42, 42.195) or v == 42, "unit": has("k")}),
    case("ChainOfThought", lambda: dspy.ChainOfThought("question -> answer: int"),
         {"question": "Tom has 3 apples and buys 5 more. How many apples does he have now?"}, {"answer": eq(8)}),
    case("ChainOfThought", lambda: dspy.ChainOfThought("question -> answer: int"),
         {"question": "A box holds 6 eggs. How many eggs are in 4 boxes?"}, {"answer": eq(24)}),
    case("ChainOfThought", lambda: dspy.ChainOfThought("question -> answer: int"),
         {"question": "Sam had 20 dollars and spent 8. How much is left?"}, {"answer": eq(12)}),
    case("ChainOfThought", lambda: dspy.ChainOfThought("question -> answer: float"),
         {"question": "A pizza is cut into 8 slices and I eat 2. What fraction is left, as a decimal?"},
         {"answer": approx(0.75)}),
]


class LlamaCppPythonLM(dspy.BaseLM):
    """DSPy on plain llama-cpp-python: ``create_chat_completion``, ``json_object`` response format."""

    def __init__(self, path: str, *, max_tokens: int, n_threads: int | None) -> None:
        from llama_cpp import Llama

        super().__init__(model="llama-cpp-python/" + os.path.basename(path), temperature=0.0, max_tokens=max_tokens,
                         cache=False, num_retries=0)
        self.llama = Llama(model_path=path, n_ctx=4096, n_threads=n_threads or 2, n_threads_batch=n_threads or 2,
                           verbose=False)

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        import litellm

        options = {**self.kwargs, **kwargs}
        fmt = options.get("response_format")
        response = self.llama.create_chat_completion(
            messages=messages or [{"role": "user", "content": prompt}], temperature=0.0,
            max_tokens=options.get("max_tokens"), response_format={"type": "json_object"} if fmt else None)
        return litellm.ModelResponse(**response)


def systems(model: str, max_tokens: int, threads: int | None, backend: str | None) -> dict[str, Any]:
    import velollm
    from velollm.models import resolve

    return {
        "velollm": lambda: (velollm.LM(model, cache=False, temperature=0.0, max_tokens=max_tokens, n_threads=threads,
                                       backend=backend), velollm.Adapter()),
        "JSONAdapter on llama-cpp-python": lambda: (LlamaCppPythonLM(str(resolve(model).path), max_tokens=max_tokens,
                                                                     n_threads=threads), dspy.JSONAdapter()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--backend", default=None, help="velollm backend (e.g. native-cpu)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="systems (substring match)")
    parser.add_argument("--cases", type=int, default=len(CASES))
    args = parser.parse_args(argv)
    print(f"load before: {os.getloadavg()} (a shared 2-core machine)", file=sys.stderr)
    results: dict[str, list[Any]] = {}
    for label, make in systems(args.model, args.max_tokens, args.threads, args.backend).items():
        if args.only and not any(o in label for o in args.only):
            continue
        lm, adapter = make()
        outcomes = []
        for c in CASES[: args.cases]:
            start = time.perf_counter()
            try:
                o = run_case(c, lm, adapter)
            except Exception as exc:  # noqa: BLE001 - a crash is a failed prediction, reported
                o = type("Outcome", (), {"case": c.name, "correct": False, "parse_failure": True, "lm_calls": 1,
                                         "seconds": time.perf_counter() - start, "values": {}, "error": repr(exc)})()
            outcomes.append(o)
            mark = "ok " if o.correct else ("PARSE" if o.parse_failure else "wrong")
            print(f"  [{label}] {o.case:15s} {mark} calls={o.lm_calls} {o.seconds:5.1f}s {o.values or o.error}",
                  file=sys.stderr, flush=True)
        results[label] = outcomes
    n = min(args.cases, len(CASES))
    print(f"\nmodel {args.model}{' on ' + args.backend if args.backend else ''}, greedy, {n} predictions, "
          f"DSPy cache off, max_tokens {args.max_tokens}; load after: {os.getloadavg()}\n")
    kinds = list(dict.fromkeys(c.name for c in CASES[:n]))
    print("| system | correct | parse failures | LM calls/prediction | max s/prediction | " + " | ".join(kinds) + " |")
    print("|---" * (5 + len(kinds)) + "|")
    for label, outcomes in results.items():
        per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for o in outcomes:
            per[o.case][0] += o.correct
            per[o.case][1] += 1
        cells = " | ".join(f"{per[k][0]}/{per[k][1]}" for k in kinds)
        print(f"| {label} | {sum(o.correct for o in outcomes)}/{n} | {sum(o.parse_failure for o in outcomes)} | "
              f"{sum(o.lm_calls for o in outcomes) / n:.2f} | {max(o.seconds for o in outcomes):.1f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
