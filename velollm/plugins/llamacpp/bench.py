"""Vanilla vs speculative decoding, measured side by side: statistics, the run loop, the JSON report.

Both modes run on ONE loaded engine (vanilla requests pass ``extra={"speculative": "off"}``, which
takes the engine's plain decode path), interleaved prompt by prompt and with the order flipped on
alternate iterations, so drift on a shared machine hits both alike. Each run starts from a cold KV
cache (``engine.reset_cache()``), so TTFT includes prompt evaluation in both modes.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from velollm.engine import Completion, Engine, GenerationRequest
from velollm.errors import InvalidRequest, UnsupportedFeature
from velollm.plugins.llamacpp.agreement import NEAR_TIE, first_divergence, greedy_steps

SCHEMA = "velollm.plugins.llamacpp.bench/1"


# --- statistics ---------------------------------------------------------------------------------
class Stats(BaseModel):
    """Mean, sample standard deviation (n-1), min and max of one measured quantity."""

    n: int
    mean: float
    stddev: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no samples")
        values = [float(v) for v in values]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(n=len(values), mean=statistics.fmean(values), stddev=sd, min=min(values), max=max(values))

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.stddev:.2f}"


class Ratio(BaseModel):
    """A ratio of two means with its propagated standard deviation."""

    value: float
    stddev: float

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.stddev:.3f}"


def speedup(spec: Stats, vanilla: Stats) -> Ratio:
    """s = μ₁/μ₂ with σ = s·√((σ₁/μ₁)² + (σ₂/μ₂)²) (independent errors, first order)."""
    if vanilla.mean <= 0 or spec.mean <= 0:
        return Ratio(value=0.0, stddev=0.0)
    s = spec.mean / vanilla.mean
    return Ratio(value=s, stddev=s * math.hypot(spec.stddev / spec.mean, vanilla.stddev / vanilla.mean))


class Paired(BaseModel):
    """A speedup from paired runs: the mean of per-pair ratios and its standard error (SE = sd/√n).

    The two modes of a pair ran back to back on one engine, so machine drift (a busy neighbour)
    hits both; the per-pair ratio cancels it, where the ratio of two means carries it twice.
    """

    value: float
    se: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.se:.3f} (SE, {self.n} pairs)"


def paired(ratios: Sequence[float]) -> Paired | None:
    """Mean and standard error of per-pair ratios (None without a pair)."""
    values = [float(r) for r in ratios if r > 0 and math.isfinite(r)]
    if not values:
        return None
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return Paired(value=statistics.fmean(values), se=se, n=len(values))


def pair_ratios(vanilla: Sequence[Sample], spec: Sequence[Sample]) -> tuple[list[float], list[float]]:
    """Per iteration: (speculative / vanilla decode tok/s, vanilla / speculative total seconds)."""
    by_iteration = {s.iteration: s for s in vanilla}
    decode, total = [], []
    for s in spec:
        ref = by_iteration.get(s.iteration)
        if ref is None:
            continue
        if ref.tokens_per_s > 0 and s.tokens_per_s > 0:
            decode.append(s.tokens_per_s / ref.tokens_per_s)
        if ref.total_s > 0 and s.total_s > 0:
            total.append(ref.total_s / s.total_s)
    return decode, total


def verdict(speculation: dict[str, Any] | None, measured: Paired | None = None) -> list[str]:
    """What the cost model says this machine allows, in words (and how the measurement compares)."""
    if not speculation:
        return []
    lines = []
    ceiling = speculation.get("ceiling") or {}
    best = None
    if speculation.get("draft_model") and speculation.get("draft_cost") is not None and ceiling.get("draft"):
        best = float(ceiling["draft"])
        lines.append(f"the draft {speculation['draft_model']} costs {speculation['draft_cost']:.2f} of the target per "
                     f"token; the best it can reach here (every drafted token accepted) is {best:.2f}×"
                     + ("" if best > 1 else ": drafting cannot pay on this machine"))
    if speculation.get("lookup") and ceiling.get("lookup"):
        look = float(ceiling["lookup"])
        best = max(best or 0.0, look)
        lines.append(f"prompt lookup drafts for free; verifying a batch costs what the batch-cost table says, so its "
                     f"best here is {look:.2f}×")
    if measured is not None and best:
        lines.append(f"measured {measured.value:.2f}× ± {measured.se:.2f} (SE), {measured.value / best:.0%} of that "
                     "ceiling")
    return lines


def mean_ratio(ratios: Sequence[Ratio]) -> Ratio:
    """The mean of independent ratios; σ = √(Σσᵢ²)/n."""
    if not ratios:
        return Ratio(value=0.0, stddev=0.0)
    n = len(ratios)
    return Ratio(value=sum(r.value for r in ratios) / n, stddev=math.sqrt(sum(r.stddev**2 for r in ratios)) / n)


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """The first index where two sequences differ (the shorter one's length if one extends the
    other); None if identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# --- the report ---------------------------------------------------------------------------------
class BenchPrompt(BaseModel):
    name: str
    text: str
    category: str = ""


class BenchConfig(BaseModel):
    main_model: str
    draft_model: str | None = None
    mode: str = "auto"
    lookup: bool = True
    n_draft: int | None = None
    n_predict: int = 128
    iterations: int = 5
    warmup: int = 1
    skip_vanilla: bool = False
    chat: bool = True
    temperature: float = 0.0
    seed: int | None = 1234
    n_ctx: int | None = None
    threads: int | None = None
    prompts: list[BenchPrompt] = Field(default_factory=list)


class Sample(BaseModel):
    """One completion."""

    prompt: str
    iteration: int
    mode: str  # "vanilla" or the speculative mode
    tokens_per_s: float
    ttft_s: float
    total_s: float
    completion_tokens: int
    finish_reason: str
    text: str
    speculation: dict[str, Any] = Field(default_factory=dict)
    #: greedy's top-2 logit gap where this text parts from greedy decoding replayed one token at a
    #: time (velollm.plugins.llamacpp.agreement); None: the same text, or not checked
    parting_gap: float | None = None


class ModeSummary(BaseModel):
    tokens_per_s: Stats
    ttft_s: Stats
    total_s: Stats


class Agreement(BaseModel):
    """Greedy output of speculative vs vanilla runs (tokens of the completion texts)."""

    identical: int
    compared: int
    first_difference: int | None = None  # token index of the first difference, in the first differing run
    agreement_rate: float = 1.0  # mean share of vanilla tokens before the first difference
    near_ties: int = 0  # differing runs that part from greedy where its top two were within NEAR_TIE
    decisive: int = 0  # differing runs that part from greedy at a clear choice (a speculation bug)


class PromptSummary(BaseModel):
    prompt: str
    category: str = ""
    vanilla: ModeSummary | None = None
    speculative: ModeSummary
    speedup: Ratio | None = None
    paired_speedup: Paired | None = None  # decode tok/s, per-pair ratios
    total_speedup: Paired | None = None  # wall time of the whole request (prompt included), per-pair ratios
    acceptance_rate: float = 0.0
    drafted: int = 0
    accepted: int = 0
    predicted_speedup: float = 1.0
    modelled_speedup: float = 1.0
    agreement: Agreement | None = None


class Summary(BaseModel):
    prompts: list[PromptSummary]
    speedup: Ratio | None = None  # mean of the per-prompt speedups
    paired_speedup: Paired | None = None  # decode tok/s: every pair of every prompt
    total_speedup: Paired | None = None  # total request time: every pair of every prompt
    by_category: dict[str, Ratio] = Field(default_factory=dict)
    verdict: list[str] = Field(default_factory=list)  # the cost model's reading of this machine


class BenchReport(BaseModel):
    schema_: str = Field(default=SCHEMA, alias="schema")
    timestamp: str
    config: BenchConfig
    machine: dict[str, Any]
    speculation: dict[str, Any] | None = None  # the engine's cost table, ceilings and learnt acceptance
    samples: list[Sample]
    summary: Summary

    model_config = {"populate_by_name": True}

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)


def machine_probe() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        info["loadavg"] = list(os.getloadavg())
    try:
        from velollm.hardware import probe

        facts = probe()
        info["cpu"] = facts.cpu.model_dump(mode="json")
        info["memory"] = facts.memory.model_dump(mode="json")
        info["gpus"] = [g.model_dump(mode="json") for g in facts.gpus]
    except Exception as exc:  # a probe failure must not lose the benchmark
        info["probe_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    from velollm import __version__

    info["velollm"] = __version__
    return info


# --- loading prompts ----------------------------------------------------------------------------
def read_prompts(path: Path) -> list[BenchPrompt]:
    """A JSON list (strings, or objects with ``text``/``prompt``, ``name``, ``category``), or plain
    text with prompts separated by lines holding only ``---``."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        items = json.loads(raw)
        if not isinstance(items, list):
            raise InvalidRequest(f"{path}: expected a JSON list of prompts")
        prompts = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"text": item}
            if not isinstance(item, dict) or not (item.get("text") or item.get("prompt")):
                raise InvalidRequest(f"{path}: prompt {i} has no text")
            prompts.append(BenchPrompt(name=item.get("name") or f"prompt{i + 1}",
                                       text=item.get("text") or item["prompt"], category=item.get("category", "")))
        return prompts
    blocks = [b.strip("\n") for b in raw.replace("\r\n", "\n").split("\n---\n")]
    return [BenchPrompt(name=f"prompt{i + 1}", text=b) for i, b in enumerate(blocks) if b.strip()]


# --- running ------------------------------------------------------------------------------------
def _request(config: BenchConfig, prompt: BenchPrompt, mode: str) -> GenerationRequest:
    fields: dict[str, Any] = dict(max_tokens=config.n_predict, temperature=config.temperature, seed=config.seed,
                                  extra={"speculative": "off" if mode == "vanilla" else mode})
    if config.chat:
        fields["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        fields["prompt"] = prompt.text
    return GenerationRequest.of(**fields)


def _sample(prompt: BenchPrompt, iteration: int, mode: str, c: Completion) -> Sample:
    t = c.timings
    return Sample(prompt=prompt.name, iteration=iteration, mode=mode, tokens_per_s=t.decode_tokens_per_s,
                  ttft_s=t.ttft_s, total_s=t.total_s, completion_tokens=c.usage.completion_tokens,
                  finish_reason=c.finish_reason, text=c.text, speculation=dict(t.extra))


def run(engine: Engine, config: BenchConfig, *, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Warm up, then run every prompt ``iterations`` times in each mode, interleaved."""
    if getattr(engine, "speculation", None) is None:
        raise UnsupportedFeature(f"{engine.name} was loaded without speculative decoding (backend "
                                 f"{getattr(engine, 'backend', '?')}): nothing to compare")
    if not config.prompts:
        raise InvalidRequest("no prompts to benchmark")
    modes = [config.mode] if config.skip_vanilla else ["vanilla", config.mode]
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    machine = machine_probe()
    reset = getattr(engine, "reset_cache", None)

    def once(prompt: BenchPrompt, mode: str) -> Completion:
        if reset is not None:
            reset()
        return engine.generate(_request(config, prompt, mode))

    for _ in range(config.warmup):
        for prompt in config.prompts:
            for mode in modes:
                once(prompt, mode)
                if progress:
                    progress(f"warm-up {prompt.name} {mode}")
    samples: list[Sample] = []
    for iteration in range(config.iterations):
        order = modes if iteration % 2 == 0 else modes[::-1]
        for prompt in config.prompts:
            for mode in order:
                samples.append(_sample(prompt, iteration, mode, once(prompt, mode)))
                if progress:
                    progress(f"{prompt.name} {mode} #{iteration + 1}")
    machine["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if config.temperature == 0 and not config.skip_vanilla:
        check_partings(engine, config, samples)
    tokenize = getattr(engine, "tokenize", None)
    summary = summarize(config, samples, tokenize)
    summary.verdict = verdict(engine.speculation, summary.paired_speedup)
    return BenchReport(timestamp=started, config=config, machine=machine, speculation=engine.speculation,
                       samples=samples, summary=summary)


def summarize(config: BenchConfig, samples: Sequence[Sample],
              tokenize: Callable[..., list[int]] | None = None) -> Summary:
    """Per prompt: stats per mode, speedup ± σ, acceptance, predicted vs measured, greedy agreement."""
    out: list[PromptSummary] = []
    all_decode: list[float] = []
    all_total: list[float] = []
    for prompt in config.prompts:
        van = [s for s in samples if s.prompt == prompt.name and s.mode == "vanilla"]
        spec = [s for s in samples if s.prompt == prompt.name and s.mode != "vanilla"]
        if not spec:
            continue
        spec_summary = _mode_summary(spec)
        van_summary = _mode_summary(van) if van else None
        decode, total = pair_ratios(van, spec)
        all_decode += decode
        all_total += total
        drafted = sum(s.speculation.get("drafted", 0) for s in spec)
        accepted = sum(s.speculation.get("accepted", 0) for s in spec)
        out.append(PromptSummary(
            prompt=prompt.name, category=prompt.category, vanilla=van_summary, speculative=spec_summary,
            speedup=speedup(spec_summary.tokens_per_s, van_summary.tokens_per_s) if van_summary else None,
            paired_speedup=paired(decode), total_speedup=paired(total),
            acceptance_rate=accepted / drafted if drafted else 0.0, drafted=drafted, accepted=accepted,
            predicted_speedup=statistics.fmean(s.speculation.get("predicted_speedup", 1.0) for s in spec),
            modelled_speedup=statistics.fmean(s.speculation.get("modelled_speedup", 1.0) for s in spec),
            agreement=agreement(van, spec, tokenize) if van and config.temperature == 0 else None,
        ))
    ratios = [p.speedup for p in out if p.speedup is not None]
    categories: dict[str, list[Ratio]] = {}
    for p in out:
        if p.speedup is not None and p.category:
            categories.setdefault(p.category, []).append(p.speedup)
    return Summary(prompts=out, speedup=mean_ratio(ratios) if ratios else None, paired_speedup=paired(all_decode),
                   total_speedup=paired(all_total), by_category={c: mean_ratio(r) for c, r in categories.items()})


def _mode_summary(samples: Sequence[Sample]) -> ModeSummary:
    return ModeSummary(tokens_per_s=Stats.of([s.tokens_per_s for s in samples]),
                       ttft_s=Stats.of([s.ttft_s for s in samples]), total_s=Stats.of([s.total_s for s in samples]))


def agreement(vanilla: Sequence[Sample], spec: Sequence[Sample],
              tokenize: Callable[..., list[int]] | None = None) -> Agreement:
    """Compare each speculative run with the vanilla run of the same iteration (greedy: same text expected)."""
    by_iteration = {s.iteration: s for s in vanilla}
    identical, compared, first, rates = 0, 0, None, []
    for s in spec:
        ref = by_iteration.get(s.iteration)
        if ref is None:
            continue
        compared += 1
        a = tokenize(ref.text, add_special=False) if tokenize else list(ref.text)
        b = tokenize(s.text, add_special=False) if tokenize else list(s.text)
        diff = first_difference(a, b)
        if diff is None:
            identical += 1
            rates.append(1.0)
        else:
            first = diff if first is None else first
            rates.append(diff / max(len(a), 1))
    gaps = [s.parting_gap for s in spec if s.parting_gap is not None]
    return Agreement(identical=identical, compared=compared, first_difference=first,
                     agreement_rate=statistics.fmean(rates) if rates else 1.0,
                     near_ties=sum(g < NEAR_TIE for g in gaps), decisive=sum(g >= NEAR_TIE for g in gaps))


def check_partings(engine: Engine, config: BenchConfig, samples: Sequence[Sample]) -> None:
    """Set ``parting_gap`` on every speculative sample whose text differs from its iteration's vanilla
    one: where it parts from greedy replayed one token at a time (one replay per prompt)."""
    for prompt in config.prompts:
        vanilla = {s.iteration: s.text for s in samples if s.prompt == prompt.name and s.mode == "vanilla"}
        differing = [s for s in samples if s.prompt == prompt.name and s.mode != "vanilla"
                     and s.iteration in vanilla and s.text != vanilla[s.iteration]]
        if not differing:
            continue
        try:
            steps = greedy_steps(engine, _request(config, prompt, "vanilla"))
        except UnsupportedFeature:  # an engine the replay cannot drive: leave them unclassified
            return
        for s in differing:
            parting = first_divergence(steps, s.text)
            s.parting_gap = None if parting is None else parting.gap
