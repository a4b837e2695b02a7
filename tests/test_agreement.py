"""Telling a near-tie flip from a real disagreement (velollm.plugins.llamacpp.agreement), pure logic."""

from __future__ import annotations

import pytest

from velollm.engine import GenerationRequest
from velollm.errors import UnsupportedFeature
from velollm.plugins.llamacpp.agreement import NEAR_TIE, Step, first_divergence, greedy_steps

STEPS = [Step(b'{"a"', 3.0), Step(b': "', 2.0), Step(b"damages", 1.5), Step(b'"', 0.04), Step(b"}", 5.0),
         Step(b"", 4.0)]


def test_the_same_text_does_not_part() -> None:
    assert first_divergence(STEPS, '{"a": "damages"}') is None


def test_a_flip_at_a_near_tie_is_told_from_a_decisive_one() -> None:
    tie = first_divergence(STEPS, '{"a": "damages, including loss"}')
    assert tie is not None and tie.near_tie
    assert (tie.offset, tie.position, tie.reference, tie.other) == (14, 3, b'"', b",")
    decisive = first_divergence(STEPS, '{"a": "damaged"}')
    assert decisive is not None and not decisive.near_tie and decisive.gap >= NEAR_TIE
    assert (decisive.offset, decisive.position) == (13, 2)
    assert "DECISIVE" in decisive.describe() and "near tie" in tie.describe()


def test_a_text_that_stops_early_or_runs_on_parts_where_one_ended() -> None:
    early = first_divergence(STEPS, '{"a": "dam')
    assert early is not None and (early.offset, early.position, early.other) == (10, 2, b"dam")
    longer = first_divergence(STEPS, '{"a": "damages"} and more')
    assert longer is not None and (longer.offset, longer.position, longer.reference) == (16, 5, b"<end>")
    assert longer.gap == 4.0


def test_only_a_llama_cpp_engine_can_be_replayed() -> None:
    with pytest.raises(UnsupportedFeature):
        greedy_steps(object(), GenerationRequest.of(prompt="x", max_tokens=1))
