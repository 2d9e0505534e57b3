"""Stop sequences on any engine's stream (llm/stop_sequences.py): the reply ends where one first
appears, without it, and no text is sent that is then taken back."""

import pytest

from conversations.llm.interface import FinishReason, Generation
from conversations.llm.stop_sequences import stop_at


class ScriptedStream:
    """Gives the pieces it is told, then the result; records a cancel."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.cancelled = False
        self.read = 0
        self.result: Generation | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self):
        for piece in self.pieces:
            if self.cancelled:
                break
            self.read += 1
            yield piece
        reason = FinishReason.CANCELLED if self.cancelled else FinishReason.STOP
        self.result = Generation("".join(self.pieces[: self.read]), 3, self.read, 1, 2, reason)


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Hel", "lo wo", "rld"], ("o w",), "Hell"),
        (["Hello", " world"], ("world", "lo"), "Hel"),
        (["a", "b", "c"], ("bc",), "a"),
        (["abc"], ("a",), ""),
        (["ab", "cd"], ("x",), "abcd"),
        (["ab", "c"], ("cde",), "abc"),  # the start of a sequence, never finished: sent at the end
        (["a\n\n", "User:"], ("\n\nUser:",), "a"),
    ],
)
def test_the_reply_ends_before_the_first_stop_sequence(pieces, stops, expected):
    engine = ScriptedStream(pieces)
    stream = stop_at(engine, stops)

    sent = list(stream)

    assert "".join(sent) == expected
    assert stream.result.text == expected
    found = any(stop in "".join(pieces) for stop in stops)
    assert engine.cancelled == found
    assert stream.result.finish_reason == FinishReason.STOP
    if found:  # no piece was read after the one that completed a sequence
        completed = next(
            k for k in range(1, len(pieces) + 1) if any(s in "".join(pieces[:k]) for s in stops)
        )
        assert engine.read == completed


def test_text_that_may_begin_a_sequence_is_held_until_it_is_known():
    engine = ScriptedStream(["one ", "tw", "o three"])
    sent = []
    for piece in stop_at(engine, ("two!",)):
        sent.append(piece)
    assert sent == ["one ", "two three"]


def test_without_stop_sequences_the_stream_is_the_engines():
    engine = ScriptedStream(["a"])
    assert stop_at(engine, ()) is engine


def test_cancelling_reaches_the_engine():
    engine = ScriptedStream(["a", "b", "c"])
    stream = stop_at(engine, ("zz",))
    pieces = iter(stream)
    assert next(pieces) == "a"
    stream.cancel()
    assert list(pieces) == []
    assert stream.result.finish_reason == FinishReason.CANCELLED
