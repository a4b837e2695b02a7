"""Stop sequences and UTF-8 safety, independent of any model."""

from __future__ import annotations

import pytest

from velollm.textstream import StopMatcher, TokenTextStream


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    if not m.stopped:
        out.append(m.flush())
    return out, m.stopped


def test_no_stops_passes_everything_through() -> None:
    assert run([], ["a", "b"]) == (["a", "b", ""], False)


def test_stop_inside_one_piece() -> None:
    assert run(["END"], ["abcENDxyz"]) == (["abc"], True)


def test_stop_split_across_pieces_is_held_then_cut() -> None:
    out, stopped = run(["</s>"], ["hello <", "/", "s> tail"])
    assert "".join(out) == "hello " and stopped
    assert out[0] == "hello "  # '<' held back: it could start the stop


def test_false_alarm_is_released() -> None:
    out, stopped = run(["</s>"], ["a <", "b"])
    assert "".join(out) == "a <b" and not stopped


def test_earliest_of_several_stops_wins() -> None:
    assert "".join(run(["C", "B"], ["xxABC"])[0]) == "xxA"


def test_nothing_after_stop() -> None:
    m = StopMatcher(["."])
    assert m.feed("end. more") == "end"
    assert m.feed("ignored") == "" and m.flush() == ""


@pytest.mark.parametrize("text", ["café", "日本語", "🎉 party", "mixed ü 字 🙂"])
def test_bytes_split_anywhere_give_whole_characters(text: str) -> None:
    data = text.encode()
    for cut in range(1, len(data)):
        stream = TokenTextStream([])
        first, second = stream.feed(data[:cut]), stream.feed(data[cut:])
        assert first + second + stream.finish() == text
        first.encode("utf-8")
        assert "\ufffd" not in first


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_an_incomplete_tail_is_dropped_not_replaced(cut: int) -> None:
    stream = TokenTextStream([])
    assert stream.feed(b"ok" + "🎉".encode()[:cut]) == "ok"
    assert stream.finish() == ""


def test_held_stop_prefix_is_still_released_after_an_incomplete_tail() -> None:
    stream = TokenTextStream(["END"])
    assert stream.feed(b"ab EN") == "ab "
    assert stream.feed("é".encode()[:1]) == ""
    assert stream.finish() == "EN"


def test_invalid_bytes_inside_the_text_still_become_replacement_chars() -> None:
    stream = TokenTextStream([])
    assert stream.feed(b"a\xffb") + stream.finish() == "a\ufffdb"
