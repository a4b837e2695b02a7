"""Speculative decoding for one llama.cpp model: plan a draft, verify it in one batch, keep the agreed part.

Every step the cost model (:mod:`velollm.plugins.llamacpp.speculative.costmodel`) weighs each offered drafter
against plain decoding, using the batch-cost table measured at load and the acceptance it has
seen. Prompt lookup's acceptance is learnt for free: every proposal it makes is checked against
the tokens that actually follow, whether or not it was used. Verification keeps a draft token only
if the target would have produced it at that position (greedy: its argmax; sampling: the token
sampled from the target), so the output is the target's own.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from velollm.plugins.llamacpp.runner import ContextRunner, LlamaRunner
from velollm.plugins.llamacpp.speculative.constrained import (
    CLAUSE_END,
    CLOSE_MIN,
    HABIT_ACCEPTANCE,
    STOP_MIN,
    ConstraintDrafts,
    ValueEnds,
    opens_string,
    value_begun,
)
from velollm.plugins.llamacpp.speculative.costmodel import (
    PLAIN,
    AcceptanceModel,
    Choice,
    CostTable,
    ceiling,
    choose_gamma,
    measure_batch_costs,
    paired_ratio,
)
from velollm.plugins.llamacpp.speculative.draft import DraftModel
from velollm.plugins.llamacpp.speculative.lookup import PromptLookup, TextLookup

Mode = Literal["auto", "draft", "lookup", "off"]
MODES: tuple[str, ...] = ("auto", "draft", "lookup", "off")
Source = Literal["plain", "lookup", "draft", "forced", "walk"]

#: a drafter is used in "auto" only when its expected rate beats plain decoding by this factor
MIN_GAIN = 1.05
DEFAULT_MAX_GAMMA = 8
#: output tokens whose text is matched against the prompt's by text lookup
TAIL_TOKENS = 8
#: a text match this long that occurs once in the prompt is an unambiguous copy
UNIQUE_BYTES = 6
#: how often the target keeps a token the grammar forces (it may spell the same text in other tokens),
#: before evidence: each speculator learns its own rate from every forced token a walk drafted
FORCED_ACCEPTANCE = 0.95
#: steps a drafter may go unused before its acceptance estimate is pulled back toward its prior
EXPLORE_AFTER = 64

_FILLER = ("def measure(batch):\n    # time one evaluation of a small batch of tokens\n"
           "    return sum(len(item) for item in batch) / max(len(batch), 1)\n") * 3


@dataclass
class RunStats:
    """Per-completion speculation metrics (they end up in ``Timings.extra``)."""

    mode: str
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    gamma_trace: list[list[Any]] = field(default_factory=list)  # run-length: [source, gamma, steps]
    expected_tokens: float = 0.0
    expected_cost: float = 0.0
    produced: int = 0
    table_cost: float = 0.0
    draft_evaluated: int = 0
    stepped_aside: int = 0  # batch steps shared with other sequences, where speculation stepped aside

    def record(self, source: Source, choice: Choice, drafted: int, accepted: int, table_cost: float) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.produced += accepted + 1
        self.expected_tokens += choice.expected_tokens
        self.expected_cost += choice.cost
        self.table_cost += table_cost
        if drafted:
            counts = self.by_source.setdefault(source, {"steps": 0, "drafted": 0, "accepted": 0})
            counts["steps"] += 1
            counts["drafted"] += drafted
            counts["accepted"] += accepted
        trace = self.gamma_trace
        if trace and trace[-1][0] == source and trace[-1][1] == drafted:
            trace[-1][2] += 1
        else:
            trace.append([source, drafted, 1])

    def as_dict(self) -> dict[str, Any]:
        return {
            "speculative": self.mode,
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "by_source": self.by_source,
            "gamma_trace": self.gamma_trace,
            # tokens per single-token decode time the cost model expected when it chose each step...
            "predicted_speedup": self.expected_tokens / self.expected_cost if self.expected_cost else 1.0,
            # ...and what its cost table makes of the acceptance that actually happened
            "modelled_speedup": self.produced / self.table_cost if self.table_cost else 1.0,
            "draft_evaluated": self.draft_evaluated,
            "stepped_aside": self.stepped_aside,
        }


@dataclass
class _Pending:
    """A lookup proposal waiting for the tokens that show how much of it the target would have kept."""

    pos: int
    tokens: list[int]
    ngram: int


@dataclass
class _Walk:
    """A walk along the constraint waiting for the tokens that show how much of its copy the target kept."""

    pos: int
    tokens: list[int]
    forced: list[bool]
    ngram: int
    copy_end: int | None = None  # where the drafted close of its copied value starts
    #: places its copy could have ended: (offset in ``tokens``, kind, see :class:`ValueEnds`)
    ends: list[tuple[int, bytes]] = field(default_factory=list)


class GreedyPicker:
    """The target's argmax at output ``i``: exactly what greedy vanilla decoding picks."""

    def __init__(self, runner: LlamaRunner) -> None:
        self.argmax = runner.argmax

    def __call__(self, i: int) -> int:
        return self.argmax(i)


class ChainPicker:
    """A token sampled by the request's own llama.cpp sampler chain (penalties, grammar, temperature).

    ``llama_sampler_sample`` also accepts the token into the chain, and only output tokens are
    ever sampled, so the chain sees exactly the history vanilla decoding would show it.
    """

    def __init__(self, runner: LlamaRunner, chain: Any) -> None:
        import llama_cpp

        self._sample = llama_cpp.llama_sampler_sample
        self._chain = chain  # keep the Python owner alive
        self._ptr = chain.sampler
        self._ctx = runner.ctx

    def __call__(self, i: int) -> int:
        return int(self._sample(self._ptr, self._ctx, i))


class ConstraintPicker:
    """The target's choice under a constraint (velollm.constraints): argmax or the request's chain,
    checked against the constraint, which advances with every picked token. Only picked tokens are
    output, so a rejected draft never touches the constraint's state. ``drafts``: drafting that obeys
    the constraint (:class:`ConstraintDrafts`), verified like any other draft."""

    def __init__(self, runner: LlamaRunner, state: Any, chain: Any = None) -> None:
        self.runner, self.state, self.chain = runner, state, chain
        self._buf: dict[str, Any] = {}
        self.drafts = ConstraintDrafts(state)

    def __call__(self, i: int) -> int:
        from velollm.plugins.llamacpp.grammar import constrained_pick

        token = constrained_pick(self.state, self.runner.logits(i), self.chain, self._buf)
        self.drafts.note(token)
        self.state.advance(token)
        return token


def walk_survival(forced: Sequence[bool], odds: dict[int, float], rates: Sequence[float],
                  forced_rate: float = FORCED_ACCEPTANCE) -> list[float]:
    """P(the target keeps the walk's first j tokens), j = 1..len: a forced token is near-certain, a
    copied one as likely as copies were that far into their copy, a drafted close (and the spacing
    after it) as likely as ``odds`` says."""
    survival, p, run = [], 1.0, 0
    for i, by_grammar in enumerate(forced):
        if i in odds and not by_grammar:
            p *= odds[i]
            run = 0
        else:
            p *= forced_rate if by_grammar else rates[min(run, len(rates) - 1)]
            run = 0 if by_grammar else run + 1
        survival.append(p)
    return survival


def verify(draft: Sequence[int], pick_row: Callable[[int], Sequence[int] | None]) -> None:
    """Let the target pick at output row 0, then at row r as long as the r tokens it picked so far
    this step are the draft's first r (row r's logits follow them): the first disagreement, the
    token after a fully agreed draft, or the end of the sequence ends the step. ``pick_row(r)``
    picks (advancing the picker's state, so it must only see tokens that stay) and returns every
    token picked this step, or None once the sequence ended. Shared by :meth:`Speculator.run` and
    the batch decoder (:mod:`velollm.plugins.llamacpp.batch`)."""
    row = 0
    while (picked := pick_row(row)) is not None and row < len(picked) <= len(draft) \
            and list(picked) == list(draft[:len(picked)]):
        row = len(picked)


def _pick_into(pick: Callable[[int], int], out: list[int], is_end: Callable[[int], bool], row: int) -> list[int] | None:
    token = pick(row)
    out.append(token)
    return None if is_end(token) else out


class Speculator:
    """Owned by one engine: the batch-cost table, the drafters and the acceptance learnt across
    completions. :meth:`run` speculates on the ``Llama``'s own context, one completion at a time (the
    engine's lock guarantees it); the batch decoder speculates for a lone sequence of its own
    context through a :class:`Session` of the same planning and bookkeeping."""

    def __init__(self, llama: Any, table: CostTable, *, mode: Mode, lookup: bool, draft: DraftModel | None,
                 draft_cost: float = 0.0, max_gamma: int = DEFAULT_MAX_GAMMA, n_draft: int | None = None,
                 max_ngram: int = 3, min_gain: float = MIN_GAIN) -> None:
        self.runner = LlamaRunner(llama)
        self.table = table
        self.mode: Mode = mode
        self.offers_lookup = lookup
        self.draft = draft
        self.draft_cost = draft_cost
        self.max_gamma = max(0, min(max_gamma, table.max_batch - 1, self.runner.n_batch - 1))
        self.n_draft = n_draft
        self.min_gain = min_gain
        self.max_ngram = max_ngram
        # before evidence: a longer n-gram match is a better bet (a 1-token match is often chance)
        self.lookup_acceptance = {n: AcceptanceModel(self.max_gamma, prior=min(0.15 + 0.1 * n, 0.5))
                                  for n in range(1, max_ngram + 1)}
        self.draft_acceptance = AcceptanceModel(self.max_gamma, prior=0.6)
        # drafts walked along a constraint: values copied from the prompt are mostly kept to their end
        # (per n-gram size: deep in a copy, a 3-gram match, the copy tends to run on)
        self.walk_acceptance = {n: AcceptanceModel(self.max_gamma, prior=0.7 + 0.05 * n)
                                for n in range(1, max_ngram + 1)}
        self._draft_idle = 0
        self.spellings: dict[bytes, int] = {}  # forced text -> how the model began it (ConstraintDrafts)
        self.closes: dict[bytes, list[int]] = {}  # how the model closes a value (ConstraintDrafts)
        self.value_ends = ValueEnds()  # where copied values end
        # forced text drafted as the model spelled it before: kept nearly always (scored per token)
        self.forced_acceptance = AcceptanceModel(1, prior=FORCED_ACCEPTANCE, prior_weight=20.0, decay=0.99)
        self.last: RunStats | None = None

    def _encode(self, text: bytes) -> list[int]:
        return self.runner.llama.tokenize(text, add_bos=False, special=False)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def build(cls, llama: Any, *, mode: Mode, lookup: bool, draft: DraftModel | None,
              max_gamma: int = DEFAULT_MAX_GAMMA, n_draft: int | None = None, repeats: int = 3,
              costs_on: ContextRunner | None = None) -> Speculator:
        """Measure the batch-cost table (and the draft's cost per token) and build the speculator.

        ``costs_on``: the context sequence to time batches on (the batch decoder's, when it holds the
        KV cache); the ``Llama``'s own context by default."""
        runner = LlamaRunner(llama)
        timed = runner if costs_on is None else costs_on
        max_batch = max(1, min(max_gamma + 1, timed.n_batch))  # n_batch 1 leaves nothing to verify with
        table = cached_costs(timed, max_batch, repeats + 2)
        draft_cost = 0.0
        if draft is not None:
            draft_cost = cached_draft_cost(runner, draft.runner, repeats + 2)
        return cls(llama, table, mode=mode, lookup=lookup, draft=draft, draft_cost=draft_cost,
                   max_gamma=max_gamma, n_draft=n_draft)

    def describe(self) -> dict[str, Any]:
        """The configuration and what was measured at load, for reports."""
        return {
            "mode": self.mode,
            "lookup": self.offers_lookup,
            "draft_model": self.draft.name if self.draft else None,
            "max_gamma": self.max_gamma,
            "n_draft": self.n_draft,
            "batch_cost": self.table.ratios(),
            "unit_ms": round(self.table.unit_s * 1000, 2),
            "draft_cost": round(self.draft_cost, 3) if self.draft else None,
            "ceiling": {
                "lookup": round(ceiling(self.table, max_gamma=self.max_gamma).rate, 3) if self.max_gamma else 1.0,
                "draft": round(ceiling(self.table, draft_cost=self.draft_cost, max_gamma=self.max_gamma).rate, 3)
                if self.draft and self.max_gamma else None,
            },
            "acceptance": {
                **{f"lookup_{n}gram": m.snapshot() for n, m in self.lookup_acceptance.items()},
                "draft": self.draft_acceptance.snapshot(),
                **{f"walk_{n}gram": m.snapshot() for n, m in self.walk_acceptance.items()},
                "forced": self.forced_acceptance.snapshot(),
            },
        }

    def reset(self) -> None:
        """Forget the KV caches (benchmarks measure cold prompts); learnt acceptance is kept."""
        self.runner.reset()
        if self.draft is not None:
            self.draft.reset()

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()

    def session(self, prompt: Sequence[int], mode: Mode, drafts: ConstraintDrafts | None = None) -> Session:
        """One completion's speculation (``drafts``: when a constraint picks its tokens)."""
        return Session(self, prompt, mode, drafts)

    # --- one completion on the Llama's own context ----------------------------------------------
    def run(self, prompt: Sequence[int], pick: Callable[[int], int], mode: Mode, max_new: int,
            is_end: Callable[[int], bool]) -> Iterator[list[int]]:
        """Yield the completion's tokens, in groups (one group per verification step).

        The caller stops consuming whenever it likes (stop sequence, end of generation); closing
        the generator leaves the KV cache and the ``Llama``'s state consistent.
        """
        runner = self.runner
        session = self.session(prompt, mode, pick.drafts if isinstance(pick, ConstraintPicker) else None)
        self.last = session.stats
        runner.refresh()
        seq = list(prompt)
        try:
            runner.sync(seq)
            token = pick(-1)
            seq.append(token)
            yield [token]
            produced = 1
            while produced < max_new and not is_end(seq[-1]):
                draft = session.plan(seq, min(self.max_gamma, max_new - produced - 1))
                n_past = len(runner.kv)
                batch = [seq[-1], *draft]
                elapsed = runner.feed(batch, all_logits=bool(draft))
                self.table.observe(len(batch), elapsed)
                new: list[int] = []
                verify(draft, functools.partial(_pick_into, pick, new, is_end))
                accepted = len(new) - 1
                runner.truncate(n_past + 1 + accepted)
                seq.extend(new)
                session.settle(seq, accepted)
                produced += len(new)
                yield new
        finally:
            session.finish(seq)

    def _observe_draft_cost(self, seconds: float, evaluated: int) -> None:
        """Refine the draft's cost per token from real drafting (log-space EMA, steps capped at ±10 %):
        a cost mismeasured at load on a busy machine corrects itself, and auto turns the draft off."""
        if not 0 < evaluated <= self.max_gamma + 2:  # a catch-up over a whole prompt runs batched: not typical
            return
        observed = seconds / evaluated / self.table.unit_s
        current = math.log(max(self.draft_cost, 1e-6))
        step = max(-0.1, min(0.1, 0.2 * (math.log(observed) - current)))
        self.draft_cost = math.exp(current + step)

    def _choose(self, survival: list[float], draft_cost: float, limit: int, forced: bool) -> Choice:
        if forced and self.n_draft:
            return self._fixed(survival, draft_cost, min(self.n_draft, limit))
        return choose_gamma(self.table, survival, draft_cost=draft_cost, max_gamma=limit, min_gain=self.min_gain,
                            force=forced)

    def _fixed(self, survival: list[float], draft_cost: float, gamma: int) -> Choice:
        if gamma <= 0:
            return PLAIN
        tokens = 1.0 + sum(survival[:gamma])
        cost = self.table.relative(gamma + 1) + draft_cost * gamma
        return Choice(gamma, tokens / cost, tokens, cost)


class Session:
    """One completion's speculation: the drafters' indexes of its tokens, the lookup proposals waiting
    for their outcome, its metrics. Each step: :meth:`plan` drafts (the cost model picks the drafter
    and γ), the caller verifies the draft in one batch (:func:`verify`), :meth:`settle` records what
    was kept. The acceptance it learns goes to its :class:`Speculator`, shared by later completions."""

    def __init__(self, spec: Speculator, prompt: Sequence[int], mode: Mode, drafts: ConstraintDrafts | None) -> None:
        self.spec = spec
        self.mode: Mode = mode
        self.use_lookup = mode == "lookup" or (mode == "auto" and spec.offers_lookup)
        self.use_draft = spec.draft is not None and mode in ("auto", "draft")
        self.drafts = drafts
        if drafts is not None and drafts.merges is not spec.spellings:  # spellings learnt carry over
            spec.spellings.update(drafts.merges)
            drafts.merges = spec.spellings
            spec.closes.update(drafts.closes)
            drafts.closes = spec.closes
        self.lookup = PromptLookup(max_ngram=spec.max_ngram)
        self.lookup.reset(prompt if self.use_lookup else ())
        self.text_lookup = TextLookup(spec._encode)
        if self.use_lookup and drafts is not None:
            sources, line_ends = drafts.copy_sources(spec.runner.llama.detokenize(list(prompt), special=True))
            self.text_lookup.reset(*sources, line_ends=line_ends)
        self.pending: list[_Pending] = []
        self.stats = RunStats(mode=mode)
        self.walks: list[_Walk] = []  # walks whose copy awaits scoring
        self._step: tuple[Source, Choice, list[int]] = ("plain", PLAIN, [])

    def _catch_up(self, seq: list[int]) -> None:
        """Index the tokens ``seq`` gained since the last call and score the proposals they settle."""
        if self.walks:
            self.walks = [w for w in self.walks if not self._score_walk(w, seq)]
        if self.use_lookup and len(seq) > len(self.lookup.tokens):
            self.lookup.extend(seq[len(self.lookup.tokens):])
            self.pending = self._resolve(self.pending, seq)

    def plan(self, seq: list[int], cap: int) -> list[int]:
        """The draft for the step after ``seq`` (at most ``cap`` tokens; [] = plain decoding)."""
        self._catch_up(seq)
        proposal: list[int] = []
        ngram = 0
        if self.use_lookup:
            proposal, ngram = self.lookup.propose(self.spec.max_gamma)
            if proposal:
                self.pending.append(_Pending(len(seq), proposal, ngram))
        if self.drafts is not None:
            self._step = self._plan_constrained(self.drafts, seq, cap, proposal, ngram)
        else:
            self._step = self._plan(seq, cap, proposal, ngram)
        return self._step[2]

    def settle(self, seq: list[int], accepted: int) -> None:
        """The planned step kept ``accepted`` draft tokens; ``seq`` is every token so far."""
        spec = self.spec
        source, choice, draft = self._step
        self._step = ("plain", PLAIN, [])
        self.stats.record(source, choice, len(draft), accepted, spec.table.relative(len(draft) + 1)
                          + (spec.draft_cost * len(draft) if source == "draft" else 0.0))
        if source == "draft":
            spec.draft_acceptance.observe(len(draft), accepted)
        self._catch_up(seq)

    def finish(self, seq: list[int]) -> RunStats:
        """The completion ended with ``seq``: score the proposals still open; its metrics."""
        if self.use_lookup:
            self._resolve(self.pending, seq, final=True)
            self.pending = []
        for walk in self.walks:
            self._score_walk(walk, seq, final=True)
        self.walks = []
        return self.stats

    def _score_walk(self, walk: _Walk, seq: list[int], final: bool = False) -> bool:
        """Score a walk's copy (its first run of free tokens, up to a drafted close) against the tokens
        that followed, whether or not the walk was drafted, or only as far as it was (deep positions
        are learnt for free, as prompt lookup's are), and what the model wrote at each place the copy
        could have ended. False while the outcome is still open."""
        avail = min(len(walk.tokens), len(seq) - walk.pos)
        agreed = 0
        while agreed < avail and seq[walk.pos + agreed] == walk.tokens[agreed]:
            agreed += 1
        waiting: list[tuple[int, bytes]] = []
        for offset, kind in walk.ends:
            if agreed < offset:  # the output left the copy before it got there, or has not got there yet
                if agreed == avail and not final:
                    waiting.append((offset, kind))
                continue
            written = seq[walk.pos + offset:walk.pos + offset + 2]
            if len(written) < 2 and not final:
                waiting.append((offset, kind))
            elif written:
                text = self.spec.runner.llama.detokenize(written)
                self.spec.value_ends.observe(kind, ValueEnds.classify(kind, text))
        walk.ends = waiting
        if (waiting or agreed == avail < len(walk.tokens)) and not final:
            return False
        forced = walk.forced
        for j in range(min(agreed + 1, avail)):  # every forced token the output reached
            if forced[j]:
                self.spec.forced_acceptance.observe(1, int(j < agreed))
        start = forced.index(False) if False in forced else len(forced)
        end = start
        while end < len(forced) and not forced[end] and end != walk.copy_end:
            end += 1
        seen = min(end, avail)
        if seen > start and agreed >= start:
            self.spec.walk_acceptance[walk.ngram].observe(seen - start, min(agreed, seen) - start)
        return True

    def _plan(self, seq: list[int], cap: int, proposal: list[int], ngram: int) -> tuple[Source, Choice, list[int]]:
        """Pick the drafter and γ for this step, and draft."""
        if cap <= 0:
            return "plain", PLAIN, []
        spec = self.spec
        forced = self.mode != "auto"
        best: tuple[Source, Choice] = ("plain", PLAIN)
        if self.use_lookup and proposal:
            limit = min(cap, len(proposal))
            survival = spec.lookup_acceptance[ngram].survival()
            choice = spec._choose(survival, 0.0, limit, forced)
            if choice.gamma and (forced or choice.rate > best[1].rate):
                best = ("lookup", choice)
        if self.use_draft and (forced or ceiling(spec.table, draft_cost=spec.draft_cost,
                                                 max_gamma=min(cap, spec.max_gamma)).rate >= spec.min_gain):
            choice = spec._choose(spec.draft_acceptance.survival(), spec.draft_cost, cap, forced)
            if choice.gamma and (choice.rate > best[1].rate or forced):
                best = ("draft", choice)
            spec._draft_idle = 0 if best[0] == "draft" else spec._draft_idle + 1
            if spec._draft_idle >= EXPLORE_AFTER:  # unobserved for long: doubt the old verdict again
                spec.draft_acceptance.forget()
                spec._draft_idle = 0
        source, choice = best
        if source == "lookup":
            return source, choice, proposal[: choice.gamma]
        if source == "draft" and spec.draft is not None:
            evaluated, start = spec.draft.runner.evaluated, time.perf_counter()
            drafted = spec.draft.draft(seq, choice.gamma, spec.runner.n_vocab)
            evaluated = spec.draft.runner.evaluated - evaluated
            self.stats.draft_evaluated += evaluated
            spec._observe_draft_cost(time.perf_counter() - start, evaluated)
            if len(drafted) != choice.gamma:  # the draft got unsure early: account for what it did draft
                choice = spec._fixed(spec.draft_acceptance.survival(), spec.draft_cost, len(drafted))
            return source, choice, drafted
        return "plain", PLAIN, []

    def _plan_constrained(self, drafts: ConstraintDrafts, seq: list[int], cap: int, proposal: list[int],
                          ngram: int) -> tuple[Source, Choice, list[int]]:
        """Under a constraint, draft along the grammar: the tokens it forces (free and near-certain)
        joined with prompt lookup's copy wherever it forces none, cut at the first token it refuses.
        An extraction answer alternates forced keys with values copied from the prompt, so one step
        can carry a key and its whole value. Falls back to :meth:`_plan` when the walk has nothing."""
        spec = self.spec
        matched = [0]
        at_value = [False]  # the walk stopped at a value's first token
        odds: dict[int, float] = {}  # offset in the walk -> the odds of a drafted close (and its spacing)
        ends: dict[int, bytes] = {}  # offset -> the kind of place where the copy could have ended

        def stops(kind: bytes) -> bool:  # a place where the copy stops (the value may end there)
            return spec.value_ends.odds(kind)["on"] <= 1.0 - STOP_MIN

        def close_at(ahead: list[int], copied: list[int], kind: bytes) -> list[int]:
            """Note a place the copy may end; draft the value's close there when that is likely."""
            at = len(ahead) + len(copied)
            ends.setdefault(at, kind)
            chances = spec.value_ends.odds(kind)
            outcome = "after" if chances["after"] > chances["close"] else "close"
            if chances[outcome] < CLOSE_MIN:
                return []
            close = drafts.close(kind.partition(b"\n")[0] if outcome == "after" else b"")
            for i in range(len(close)):
                odds[at + i] = chances[outcome] if i == 0 else HABIT_ACCEPTANCE
            return close

        def propose(ahead: list[int]) -> list[int]:
            if not self.use_lookup:
                return []
            if not ahead and (separator := drafts.separator()):
                return separator  # no detokenizing needed: the picked tokens say it
            tail = spec.runner.llama.detokenize([*seq[-TAIL_TOKENS:], *ahead])
            if ahead and (separator := drafts.separator(tail)):
                odds[len(ahead)] = HABIT_ACCEPTANCE
                return separator
            if drafts.state.json and opens_string(tail):
                at_value[0] = True
                # a value's first token: which span it copies is anyone's guess (lookup would propose
                # what followed the last such opening: another field's value). Leave it to the target:
                # it comes free as the token after the forced key it ends.
                return []
            stop = CLAUSE_END if drafts.state.json else None
            copy = self.text_lookup.propose(tail, spec.max_gamma, stop, ends=stops if stop else None,
                                            value=value_begun(tail) if stop else None)
            if copy.tokens or (copy.matched and (copy.unique or copy.anchored)):
                # rank a text match like a token n-gram: 3 when it is long and unambiguous
                sure = copy.unique or copy.anchored
                matched[0] = matched[0] or (3 if sure and copy.matched >= UNIQUE_BYTES else 2 if sure else 1)
                if copy.stop is None or not drafts.state.json:
                    return copy.tokens
                return [*copy.tokens, *close_at(ahead, copy.tokens, copy.stop)]
            tokens, n = (proposal, ngram) if not ahead else self.lookup.propose(spec.max_gamma, ahead)
            matched[0] = matched[0] or n
            return tokens

        walk, forced = drafts.walk(propose, cap)
        copy_end = min((i for i in odds if i < len(walk) and not forced[i]), default=None)
        if walk:
            self.walks.append(_Walk(len(seq), walk, forced, max(matched[0], 1), copy_end,
                                    [(i, k) for i, k in sorted(ends.items()) if i <= len(walk)]))
            survival = walk_survival(forced, odds, spec.walk_acceptance[max(matched[0], 1)].rates(),
                                     spec.forced_acceptance.rates()[0])
            copies = not all(forced)
            choice = choose_gamma(spec.table, survival, max_gamma=len(walk), min_gain=spec.min_gain,
                                  force=self.mode == "lookup" and copies)
            if at_value[0] and len(walk) < cap and choice.gamma < len(walk):
                # a walk that ends where a value's first token comes (nothing is proposed there): cut
                # short, the free token that verifying all of it yields would take a plain step later
                tokens, cost = 1.0 + sum(survival), spec.table.relative(len(walk) + 1)
                if tokens / cost >= (choice.expected_tokens + 1.0) / (choice.cost + 1.0):
                    choice = Choice(len(walk), tokens / cost, tokens, cost)
            if choice.gamma:
                return ("forced" if all(forced[: choice.gamma]) else "walk"), choice, walk[: choice.gamma]
        if proposal and drafts.state.json and opens_string(spec.runner.llama.detokenize(seq[-TAIL_TOKENS:])):
            proposal, ngram = [], 0  # a value's first token (see propose)
        return self._plan(seq, cap, proposal, ngram)

    def _resolve(self, pending: list[_Pending], seq: list[int], final: bool = False) -> list[_Pending]:
        """Score lookup proposals whose outcome the generated tokens now show (free acceptance data)."""
        still: list[_Pending] = []
        size = len(seq)
        for p in pending:
            avail = min(len(p.tokens), size - p.pos)
            agreed = 0
            while agreed < avail and seq[p.pos + agreed] == p.tokens[agreed]:
                agreed += 1
            if agreed < avail or avail == len(p.tokens):
                self.spec.lookup_acceptance[p.ngram].observe(len(p.tokens), agreed)
            elif final:
                if avail:
                    self.spec.lookup_acceptance[p.ngram].observe(avail, avail)
            else:
                still.append(p)
        return still


_measured: dict[tuple[Any, ...], CostTable] = {}


def cached_costs(runner: ContextRunner, max_batch: int, repeats: int) -> CostTable:
    """Measure once per model file, threads, batch size and kind of context in a process (later loads reuse it)."""
    llama = runner.llama
    key = (str(llama.model_path), getattr(llama, "n_threads", None), runner.n_batch, max_batch, type(runner).__name__)
    table = _measured.get(key)
    if table is None:
        table = _measured[key] = measure_costs(runner, max_batch, repeats)
    return CostTable(list(table.seconds))


def cached_draft_cost(main: LlamaRunner, draft: LlamaRunner, repeats: int) -> float:
    """The draft's cost per token in main-model tokens, timed in back-to-back pairs."""
    key = (str(main.llama.model_path), str(draft.llama.model_path), getattr(main.llama, "n_threads", None))
    if key not in _draft_costs:
        _draft_costs[key] = measure_relative(main, draft, repeats)
    return _draft_costs[key]


_draft_costs: dict[tuple[Any, ...], float] = {}


def _single_token_timer(runner: LlamaRunner) -> Callable[[], float]:
    filler = runner.llama.tokenize(_FILLER.encode(), add_bos=False, special=False)
    runner.reset()
    runner.feed(filler[:32])

    def one() -> float:
        elapsed = runner.feed(filler[32:33])
        runner.truncate(32)
        return elapsed

    return one


def measure_relative(main: LlamaRunner, draft: LlamaRunner, repeats: int) -> float:
    try:
        main_one, draft_one = _single_token_timer(main), _single_token_timer(draft)
        main_one(), draft_one()  # warm up
        return paired_ratio(main_one, draft_one, repeats)
    finally:
        main.reset()
        draft.reset()


def measure_costs(runner: ContextRunner, max_batch: int, repeats: int) -> CostTable:
    """Time batches of 1..max_batch tokens after a short prefix, then leave the KV cache empty."""
    filler = runner.llama.tokenize(_FILLER.encode(), add_bos=False, special=False)
    while len(filler) < max_batch + 32:
        filler = filler + filler
    prefix = filler[:32]
    runner.reset()
    runner.feed(prefix)

    def decode(b: int) -> float:
        elapsed = runner.feed(filler[32:32 + b], all_logits=True)
        runner.truncate(len(prefix))
        return elapsed

    try:
        return measure_batch_costs(decode, max_batch, repeats)
    finally:
        runner.reset()
