"""``velollm.plugins.llamacpp.bench``: statistics on known samples, summaries, prompt files, and the JSON report of
``velollm bench --output`` from a real (small) run."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest

from velollm.errors import InvalidRequest
from velollm.plugins.llamacpp.bench import (
    SCHEMA,
    BenchConfig,
    BenchPrompt,
    BenchReport,
    Ratio,
    Sample,
    Stats,
    agreement,
    first_difference,
    mean_ratio,
    read_prompts,
    speedup,
    summarize,
)


def test_stats_of_known_samples() -> None:
    s = Stats.of([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.mean, s.min, s.max) == (4, 2.5, 1.0, 4.0)
    assert s.stddev == pytest.approx(math.sqrt(5 / 3))  # sample sd: Σ(x-μ)² = 5, n-1 = 3
    one = Stats.of([7.0])
    assert one.stddev == 0.0 and one.mean == 7.0
    with pytest.raises(ValueError):
        Stats.of([])


def test_speedup_propagates_relative_errors() -> None:
    spec = Stats(n=5, mean=30.0, stddev=3.0, min=26.0, max=34.0)
    vanilla = Stats(n=5, mean=20.0, stddev=1.0, min=19.0, max=21.0)
    r = speedup(spec, vanilla)
    assert r.value == pytest.approx(1.5)
    assert r.stddev == pytest.approx(1.5 * math.sqrt(0.1**2 + 0.05**2))  # = 0.16771
    assert r.stddev == pytest.approx(0.167705, abs=1e-6)
    assert speedup(spec, Stats(n=1, mean=0.0, stddev=0.0, min=0.0, max=0.0)) == Ratio(value=0.0, stddev=0.0)


def test_mean_of_ratios_adds_errors_in_quadrature() -> None:
    m = mean_ratio([Ratio(value=1.2, stddev=0.3), Ratio(value=1.4, stddev=0.4)])
    assert m.value == pytest.approx(1.3) and m.stddev == pytest.approx(0.25)  # √(0.09+0.16)/2


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference("abc", "abd") == 2


def sample(prompt: str, it: int, mode: str, tps: float, text: str = "same", **spec: float) -> Sample:
    return Sample(prompt=prompt, iteration=it, mode=mode, tokens_per_s=tps, ttft_s=0.1, total_s=1.0,
                  completion_tokens=10, finish_reason="length", text=text, speculation=dict(spec))


def test_summarize_and_agreement_on_synthetic_samples() -> None:
    config = BenchConfig(main_model="m", prompts=[BenchPrompt(name="a", text="x", category="code"),
                                                  BenchPrompt(name="b", text="y", category="prose")])
    samples = [
        sample("a", 0, "vanilla", 10.0), sample("a", 0, "auto", 15.0, drafted=10, accepted=8, predicted_speedup=1.4),
        sample("a", 1, "vanilla", 10.0), sample("a", 1, "auto", 13.0, drafted=10, accepted=6, predicted_speedup=1.2),
        sample("b", 0, "vanilla", 20.0, text="abcdefghij"),
        sample("b", 0, "auto", 20.0, text="abcdXfghij"),
    ]
    summary = summarize(config, samples)
    a, b = summary.prompts
    assert a.speedup is not None and a.speedup.value == pytest.approx(1.4)
    assert a.speedup.stddev == pytest.approx(1.4 * (math.sqrt(2.0) / 14.0))  # vanilla sd 0
    assert a.acceptance_rate == pytest.approx(14 / 20) and a.predicted_speedup == pytest.approx(1.3)
    assert a.agreement is not None and a.agreement.identical == 2 and a.agreement.agreement_rate == 1.0
    assert b.agreement is not None and b.agreement.identical == 0 and b.agreement.first_difference == 4
    assert b.agreement.agreement_rate == pytest.approx(0.4)
    assert (b.agreement.near_ties, b.agreement.decisive) == (0, 0)  # not replayed: nothing classified
    samples[-1].parting_gap = 0.08
    assert (agreement(samples[4:5], samples[5:]).near_ties, agreement(samples[4:5], samples[5:]).decisive) == (1, 0)
    samples[-1].parting_gap = 1.3
    assert agreement(samples[4:5], samples[5:]).decisive == 1
    assert summary.by_category["code"].value == pytest.approx(1.4) and summary.by_category["prose"].value == 1.0
    assert summary.speedup is not None and summary.speedup.value == pytest.approx(1.2)
    assert agreement([], samples[1:2]).compared == 0


def test_read_prompts_json_and_text(tmp_path: Path) -> None:
    j = tmp_path / "p.json"
    j.write_text(json.dumps(["one", {"name": "edit", "prompt": "two", "category": "code"}]))
    got = read_prompts(j)
    assert [(p.name, p.text, p.category) for p in got] == [("prompt1", "one", ""), ("edit", "two", "code")]
    t = tmp_path / "p.txt"
    t.write_text("first\nprompt\n---\nsecond\n---\n\n")
    assert [p.text for p in read_prompts(t)] == ["first\nprompt", "second"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(InvalidRequest):
        read_prompts(bad)


def test_bench_command_writes_the_documented_json(gemma_path: Path, tmp_path: Path, isolated_host,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from velollm.cli import main

    out = tmp_path / "results.json"
    rc = main(["bench", "--main-model", str(gemma_path), "--mode", "lookup", "--n-draft", "3", "--raw",
               "-p", "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3,", "-p", "The cat sat on the",
               "-n", "8", "--iterations", "2", "--warmup", "0", "--ctx", "512", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert set(data) == {"schema", "timestamp", "config", "machine", "speculation", "samples", "summary"}
    assert data["schema"] == SCHEMA
    assert dt.datetime.fromisoformat(data["timestamp"]).tzinfo is not None
    assert data["config"]["main_model"] == str(gemma_path) and data["config"]["iterations"] == 2
    assert [p["text"] for p in data["config"]["prompts"]][1] == "The cat sat on the"
    assert "loadavg" in data["machine"] and "cpu" in data["machine"] and data["machine"]["llama_cpp_python"]
    assert data["speculation"]["batch_cost"][0] == 1.0 and len(data["speculation"]["batch_cost"]) == 4
    assert len(data["samples"]) == 2 * 2 * 2  # prompts x modes x iterations
    for s in data["samples"]:
        assert s["mode"] in ("vanilla", "lookup") and s["completion_tokens"] == 8 and s["tokens_per_s"] > 0
        assert s["ttft_s"] > 0 and s["total_s"] >= s["ttft_s"]
        if s["mode"] == "lookup":
            keys = {"drafted", "accepted", "acceptance_rate", "gamma_trace", "predicted_speedup"}
            assert keys <= set(s["speculation"])
    first = data["summary"]["prompts"][0]
    for mode in ("vanilla", "speculative"):
        assert set(first[mode]) == {"tokens_per_s", "ttft_s", "total_s"}
        assert set(first[mode]["tokens_per_s"]) == {"n", "mean", "stddev", "min", "max"}
    assert set(first["speedup"]) == {"value", "stddev"} and first["speedup"]["value"] > 0
    assert first["agreement"]["compared"] == 2
    for p in data["summary"]["prompts"]:  # differing runs (if any) were replayed: only near ties may differ
        assert p["agreement"]["decisive"] == 0, p["agreement"]
    assert first["drafted"] > 0  # the counting prompt repeats itself: lookup drafts
    BenchReport.model_validate(data)  # and it reads back into the typed report
    printed = capsys.readouterr().out
    assert "speedup (mean over prompts)" in printed and "batch cost" in printed
    # paired interleaved runs: the per-pair ratio's SE, the total-time speedup and the cost model's verdict
    summary = data["summary"]
    assert summary["paired_speedup"]["n"] == 4 and summary["paired_speedup"]["se"] >= 0
    assert summary["total_speedup"]["value"] > 0 and summary["verdict"]
    assert "paired interleaved runs" in printed and "total-time speedup" in printed and "verdict:" in printed


def test_a_differing_run_is_replayed_and_where_it_parts_is_recorded(gemma_path: Path) -> None:
    from velollm.engine import LoadOptions
    from velollm.plugins.llamacpp import LlamaCppBackend
    from velollm.plugins.llamacpp.bench import _request, check_partings

    engine = LlamaCppBackend("cpu").load(gemma_path, LoadOptions(n_ctx=256))
    try:
        config = BenchConfig(main_model=str(gemma_path), chat=False, n_predict=8,
                             prompts=[BenchPrompt(name="p", text="The cat sat on the")])
        engine.reset_cache()
        greedy = engine.generate(_request(config, config.prompts[0], "vanilla")).text
        samples = [sample("p", 0, "vanilla", 1.0, text=greedy), sample("p", 0, "lookup", 1.0, text=greedy),
                   sample("p", 1, "vanilla", 1.0, text=greedy), sample("p", 1, "lookup", 1.0, text="\u2603" + greedy)]
        check_partings(engine, config, samples)
    finally:
        engine.close()
    assert samples[1].parting_gap is None  # the same text: not replayed
    assert samples[3].parting_gap is not None and samples[3].parting_gap >= 0.0  # parts at its first token
    counted = agreement(samples[::2], samples[1::2])
    assert counted.near_ties + counted.decisive == 1 and counted.identical == 1
