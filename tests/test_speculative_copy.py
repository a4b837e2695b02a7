"""Drafting a copied value under JSON (pure logic): where the copy comes from in the prompt's text,
where it likely ends, and what the model did at such places. One "token" per byte throughout."""

from __future__ import annotations

import pytest

from velollm.plugins.llamacpp.speculative.constrained import (
    CLAUSE_END,
    ValueEnds,
    after_separator,
    closing_quote,
    opens_string,
    value_begun,
)
from velollm.plugins.llamacpp.speculative.lookup import TextLookup

BUG = (b"Title: Export to CSV drops rows\nReporter: dan@quill.io\nSteps: choose File > Export >\n"
       b"CSV with the default options.\nExpected: every row appears.")


def lookup_of(*sources: bytes, line_ends: tuple[tuple[int, ...], ...] = ()) -> TextLookup:
    lookup = TextLookup(lambda text: list(text), min_bytes=3)
    lookup.reset(*sources, line_ends=line_ends)
    return lookup


def spaced(text: bytes) -> tuple[bytes, tuple[int, ...]]:
    """The text with its line breaks as spaces, and where they were (what ConstraintDrafts builds)."""
    return text.replace(b"\n", b" "), tuple(i for i, c in enumerate(text) if c == 0x0A)


def test_text_lookup_takes_a_match_from_the_likelier_rendering_first() -> None:
    """Copies of wrapped text join lines with a space: the spaced rendering is matched first, and a
    copy that does keep the line break goes on matching in the exact one."""
    exact = b"Steps: open the file\\nand export it"
    lookup = lookup_of(exact.replace(b"\\n", b" "), exact)
    copy = lookup.propose(b"the file", 6)
    assert bytes(copy.tokens) == b" and e" and copy.matched == 8 and copy.unique
    assert bytes(lookup.propose(b"file\\n", 6).tokens) == b"and ex"


def test_a_string_opening_quote_is_told_from_an_escaped_one() -> None:
    assert opens_string(b'{"name": "')
    assert not opens_string(b'"a \\"')  # an escaped quote inside a value
    assert opens_string(b'"a \\\\"')  # an escaped backslash, then the quote
    assert not opens_string(b'"abc')
    assert closing_quote(b'ab",', False) == 2 and closing_quote(b'"x', True) == -1
    assert closing_quote(b'\\""', False) == 2
    assert after_separator(b'"name":') == b":" and after_separator(b'"a \\",') == b"" and after_separator(b"a,") == b""


def test_a_copy_is_drafted_up_to_where_a_value_may_end() -> None:
    """Under JSON the text lookup stops a copy before a clause's punctuation (the value often ends
    there); matched right at that point it proposes nothing but reports the match and the place."""
    lookup = lookup_of(b"Regards, Margaret Okonkwo, Procurement Lead (Harborlight)")
    copy = lookup.propose(b'"Margaret', 20, CLAUSE_END)
    assert bytes(copy.tokens) == b" Okonkwo" and copy.matched == 8 and copy.stop == b","
    at_end = lookup.propose(b"Okonkwo", 20, CLAUSE_END)
    assert at_end.tokens == [] and at_end.matched == 7 and at_end.unique and at_end.stop == b","
    copy = lookup.propose(b"Okonkwo,", 20, CLAUSE_END)
    assert bytes(copy.tokens) == b" Procurement Lead" and copy.stop == b"("


def test_a_copy_longer_than_the_draft_does_not_reach_its_stop() -> None:
    lookup = lookup_of(b"Regards, Margaret Okonkwo, Procurement Lead")
    copy = lookup.propose(b"Margaret", 4, CLAUSE_END)
    assert bytes(copy.tokens) == b" Oko" and copy.stop is None


def test_line_ends_stop_a_copy_where_the_caller_says_and_tell_a_record_from_wrapped_text() -> None:
    """A line followed by a labelled one (``Reporter: ...``) is a record's field: kind ``\\n:``. A line
    that wraps prose is ``\\n`` and, refused by the caller, the copy runs on through it."""
    text, ends = spaced(BUG)
    lookup = lookup_of(text, line_ends=(ends,))
    copy = lookup.propose(b"CSV drops", 20, CLAUSE_END, ends=lambda kind: kind in (b"\n:", b".\n:"))
    assert bytes(copy.tokens) == b" rows" and copy.stop == b"\n:"
    # the wrapped line ends with " >" (a bracket-like stop); past it, "CSV with ..." runs to the sentence end
    copy = lookup.propose(b"Export > CSV", 30, CLAUSE_END, ends=lambda kind: kind in (b"\n:", b".\n:"))
    assert bytes(copy.tokens) == b" with the default options" and copy.stop == b".\n:"
    refused = lookup.propose(b"CSV drops", 20, CLAUSE_END, ends=lambda kind: False)
    assert bytes(refused.tokens).startswith(b" rows Reporter") and refused.stop != b"\n:"


def test_a_short_match_is_taken_after_the_last_long_one() -> None:
    """Answers copy in the text's order: "Export" occurs twice, and after the title was copied the
    one in the steps is meant; a value's first byte is looked for at a word start after it too."""
    text, ends = spaced(BUG)
    lookup = lookup_of(text, line_ends=(ends,))
    assert bytes(lookup.propose(b'"Export', 4).tokens) == b" to "  # the first, before any long match
    lookup.propose(b"CSV drops rows", 4)  # a long match: the cursor moves past the title
    copy = lookup.propose(b'": "d', 6, value=b"d")
    assert bytes(copy.tokens) == b"an@qui" and copy.anchored and copy.matched == 1
    lookup.propose(b"dan@quill.io", 4)
    copy = lookup.propose(b'"Export', 4)
    assert bytes(copy.tokens) == b" > C" and copy.anchored  # "File > Export > CSV"


def test_a_value_that_has_only_begun_is_recognised() -> None:
    assert value_begun(b'break","reporter":"d') == b"d"
    assert value_begun(b'"a": "Ma') == b"Ma"
    assert value_begun(b'"a": "Mar') is None  # long enough for an ordinary match
    assert value_begun(b'"a": "') is None and value_begun(b'x \\"d') is None


def test_value_ends_learn_what_the_model_did_at_each_kind_of_place() -> None:
    ends = ValueEnds()
    assert ends.odds(b"\n:")["close"] > 0.5 > ends.odds(b"\n")["close"]  # the priors
    assert ends.odds(b".\n:")["after"] > ends.odds(b".\n:")["close"]
    assert ValueEnds.classify(b".\n:", b'.","next') == "after"
    assert ValueEnds.classify(b"\n:", b'","next') == "close"
    assert ValueEnds.classify(b",", b", and") == "on"
    for _ in range(6):
        ends.observe(b",", "close")
    assert ends.odds(b",")["close"] > 0.75 and ends.odds(b";")["close"] < 0.5
    for _ in range(30):
        ends.observe(b",", "on")
    assert ends.odds(b",")["on"] > 0.9  # recent behaviour wins


def test_a_walks_survival_prices_forced_copied_and_closing_tokens_apart() -> None:
    from velollm.plugins.llamacpp.speculative.speculator import FORCED_ACCEPTANCE, walk_survival

    # copy, copy, close, forced key, forced colon
    survival = walk_survival([False, False, False, True, True], {2: 0.8}, [0.9, 0.5])
    steps = [survival[0]] + [b / a for a, b in zip(survival, survival[1:], strict=False)]
    assert steps == pytest.approx([0.9, 0.5, 0.8, FORCED_ACCEPTANCE, FORCED_ACCEPTANCE])


def test_a_learnt_on_place_lets_the_copy_run_through() -> None:
    """Commas that never ended a value stop copies no more: the list of damages is drafted whole."""
    lookup = lookup_of(b"for any indirect, incidental, special or consequential damages, including loss")
    stopped = lookup.propose(b"any indirect", 20, CLAUSE_END, ends=lambda kind: True)
    assert stopped.tokens == [] and stopped.stop == b","
    through = lookup.propose(b"any indirect", 20, CLAUSE_END, ends=lambda kind: kind != b",")
    assert bytes(through.tokens).startswith(b", incidental, spec") and through.stop is None
