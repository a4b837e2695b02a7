"""Speculative decoding under a JSON-schema constraint, against constrained plain decoding, side by side.

    python benchmarks/bench_spec_constrained.py [--main qwen2.5-coder-1.5b-instruct]
        [--draft qwen2.5-coder-0.5b-instruct] [--iterations 3] [--modes off,lookup,auto] [--n-draft 8]

Extraction tasks whose answers copy spans of the input (an email, a bug report, a contract clause).
Per task and mode, interleaved on one engine (cold prompt cache each run): decode tok/s (after the
first token), total seconds, and whether the JSON equals the non-speculative answer. Speculation
drafts along the grammar: the tokens it forces (keys, punctuation) joined with prompt lookup's copy
of the input (``ConstraintState.walk``); the cost model keeps only drafts it expects to pay on this
machine's measured batch costs. Target: >= 1.3x decode tok/s on Qwen 1.5B, same output.

"Same output" is checked twice. ``same=k/n``: runs whose text equals the plain run's. And every run
against greedy decoding replayed one token at a time (:mod:`velollm.plugins.llamacpp.agreement`):
where a text differs, the replay's top-2 logit gap at the first differing byte says whether that was
a near tie (< 0.25; a verified batch rounds differently from one token, as another CPU would) or a
decisive token (a speculation bug). The last line counts both.

``--no-tiled`` sets ``GGML_CPU_TILED_MM=0`` for the process: llama.cpp's tiled K-quant matmul takes
every batch of >= 8 rows for the weights it does not repack (Q6_K here: the output head, half the
ffn_down and attn_v), and on a 2-core AVX-512 machine it made a batch of 8 cost ~6.1x one token
where the stock kernels take ~4.8x (it pays off on long prompts: prefill ~18 % faster with it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from velollm.engine import GenerationRequest, LoadOptions
from velollm.hardware import default_threads
from velollm.models import resolve
from velollm.plugins.llamacpp import LlamaCppBackend
from velollm.plugins.llamacpp.agreement import first_divergence, greedy_steps

EMAIL = """From: Margaret Okonkwo-Lindqvist <m.okonkwo@harborlight-logistics.com>
Subject: Delayed shipment PO-2024-11873
Hello team, our order PO-2024-11873 for 340 units of the Model K-19 thermal coupler was due at the
Rotterdam warehouse (Keilestraat 44, 3029 BP Rotterdam) on 14 March but has not arrived. Please call
me on +31 10 555 0192 or reply to this mail. The carrier tracking number is HLX-77-0042-9931.
Regards, Margaret Okonkwo-Lindqvist, Procurement Lead, Harborlight Logistics B.V."""

BUG = """Title: Export to CSV silently drops rows whose description contains a line break
Reporter: daniel.ferreira@quillstack.io
Version: Quillstack Desktop 4.12.3 on Windows 11 Pro 23H2
Steps: Open the sample workspace "Q3 Inventory", select the table "Warehouse Items", choose File > Export >
CSV with the default options, and open the exported file in a text editor.
Expected: every one of the 1,204 rows appears in the exported file, with multi-line descriptions quoted.
Actual: the export finishes without any warning but the file holds only 1,187 rows; each missing row has
a line break inside its description field.
Error in the log: WARN csv_writer: skipped record 88 (unterminated quoted field at column 7)"""

CLAUSE = """12.4 Limitation of Liability. Except for obligations arising under Section 9 (Confidentiality), neither
party shall be liable to the other for any indirect, incidental, special or consequential damages, including
loss of profits or revenue, arising out of or in connection with this Agreement, even if advised of the
possibility of such damages. The aggregate liability of the Supplier under this Agreement shall not exceed
the total fees paid by the Customer in the twelve (12) months preceding the event giving rise to the claim.
This Agreement is governed by the laws of the State of New York, and the parties submit to the exclusive
jurisdiction of the state and federal courts located in New York County."""


def _strings(*names: str) -> dict:
    return {"type": "object", "additionalProperties": False, "required": list(names),
            "properties": {n: {"type": "string"} for n in names}}


TASKS = [
    ("email", EMAIL, _strings("sender_name", "sender_email", "company", "job_title", "order_number", "product",
                              "warehouse_address", "phone", "tracking_number")),
    ("bug-report", BUG, _strings("title", "reporter", "version", "steps", "expected", "actual", "log_line")),
    ("contract", CLAUSE, _strings("section", "exception", "excluded_damages", "liability_cap", "governing_law",
                                  "jurisdiction")),
]


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Extract the fields of this text as JSON. Copy every value verbatim "
                                        "from the text.\n\n" + text}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--modes", default="off,lookup,auto")
    parser.add_argument("--n-draft", type=int, default=None, help="longest draft (default: velollm's)")
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--no-tiled", action="store_true", help="GGML_CPU_TILED_MM=0 (see above)")
    args = parser.parse_args()
    if args.no_tiled:  # read by llama.cpp at its first K-quant matmul of the process
        os.environ["GGML_CPU_TILED_MM"] = "0"
    modes = args.modes.split(",")
    threads = args.threads or default_threads()
    print(f"load average {os.getloadavg()}; {threads} threads")
    engine = LlamaCppBackend("cpu").load(resolve(args.main).path, LoadOptions(
        n_ctx=2048, n_threads=threads, speculative="auto", prompt_lookup=True, draft_model=args.draft,
        n_draft=args.n_draft))
    info = engine.speculation
    print(f"batch cost b=1..{len(info['batch_cost'])}: {info['batch_cost']}; draft cost {info['draft_cost']}")
    results: dict = {}
    for name, text, schema in TASKS:
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        request = GenerationRequest(messages=ask(text), json_schema=schema, temperature=0.0, max_tokens=args.max_tokens)
        for it in range(args.iterations + 1):  # iteration 0 warms up (and teaches the acceptance models)
            for mode in modes:
                engine.reset_cache()
                c = engine.generate(request.model_copy(update={"extra": {"speculative": mode}}))
                json.loads(c.text)  # a constrained answer always parses
                if it:
                    extra = c.timings.extra or {}
                    runs[mode].append({"text": c.text, "tokens": c.usage.completion_tokens,
                                       "decode_tok_s": c.timings.decode_tokens_per_s, "total_s": c.timings.total_s,
                                       "acceptance": extra.get("acceptance_rate"), "by_source": extra.get("by_source")})
        base = runs[modes[0]]
        reference = greedy_steps(engine, request)  # one token at a time: where do differing answers part?
        for mode in modes:
            for x in runs[mode]:
                divergence = first_divergence(reference, x["text"])
                x["parts"] = None if divergence is None else {"gap": round(divergence.gap, 4),
                                                              "near_tie": divergence.near_tie,
                                                              "describe": divergence.describe()}
        row = {}
        for mode in modes:
            r = runs[mode]
            ratios = [x["decode_tok_s"] / b["decode_tok_s"] for x, b in zip(r, base, strict=True)]
            totals = [b["total_s"] / x["total_s"] for x, b in zip(r, base, strict=True)]
            row[mode] = {"decode_tok_s": statistics.fmean(x["decode_tok_s"] for x in r),
                         "total_s": statistics.fmean(x["total_s"] for x in r),
                         "decode_speedup": statistics.fmean(ratios), "total_speedup": statistics.fmean(totals),
                         "same_output": all(x["text"] == b["text"] for x, b in zip(r, base, strict=True)),
                         "same_runs": sum(x["text"] == b["text"] for x, b in zip(r, base, strict=True)),
                         "parted": [x["parts"] for x in r if x["parts"]],
                         "tokens": r[0]["tokens"], "acceptance": r[0]["acceptance"], "by_source": r[0]["by_source"]}
            print(f"{name:11} {mode:7} {row[mode]['decode_tok_s']:6.2f} tok/s  {row[mode]['total_s']:6.2f} s  "
                  f"decode x{row[mode]['decode_speedup']:.2f} total x{row[mode]['total_speedup']:.2f}  "
                  f"same={row[mode]['same_runs']}/{len(r)} tokens={row[mode]['tokens']} "
                  f"acceptance={row[mode]['acceptance'] or 0:.2f} by_source={row[mode]['by_source']}",
                  flush=True)
            for parts in row[mode]["parted"]:
                print(f"{'':19} {parts['describe']}")
        results[name] = row
    for mode in modes[1:]:
        ratios = [results[t][mode]["decode_speedup"] for t in results]
        print(f"geomean decode speedup {mode}: x{statistics.geometric_mean(ratios):.2f}")
    parted = [p for t in results.values() for m in modes for p in t[m]["parted"]]
    n_runs = len(results) * len(modes) * args.iterations
    print(f"greedy agreement ({n_runs} runs, replayed one token at a time): {n_runs - len(parted)} identical, "
          f"{sum(p['near_tie'] for p in parted)} parted at a near tie (gaps "
          f"{sorted(p['gap'] for p in parted if p['near_tie'])}), {sum(not p['near_tie'] for p in parted)} decisive")
    engine.close()
    print(f"load average {os.getloadavg()}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
