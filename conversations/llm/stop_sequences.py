"""Stop sequences (OpenAI's `stop`): a reply ends where one of them first appears, without it.

Works on any engine's stream: text that could be the start of a stop sequence is held back
until the next pieces show whether it is one, so a listener never receives text that is then
taken back. The engine is stopped as soon as a sequence appears.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from .interface import FinishReason, Generation, StreamingReply


def stop_at(stream: StreamingReply, stops: tuple[str, ...]) -> StreamingReply:
    """`stream`, ended at the first of `stops` (itself when there are none)."""
    return _StopAtSequences(stream, stops) if stops else stream


class _StopAtSequences:
    def __init__(self, stream: StreamingReply, stops: tuple[str, ...]) -> None:
        self._stream = stream
        self._stops = tuple(s for s in stops if s)
        self._text = ""  # all the engine wrote
        self._cut: int | None = None  # where the first stop sequence begins, once seen

    @property
    def result(self) -> Generation | None:
        result = self._stream.result
        if result is None:
            return None
        if self._cut is None:
            return result
        return dataclasses.replace(
            result, text=self._text[: self._cut], finish_reason=FinishReason.STOP
        )

    def cancel(self) -> None:
        self._stream.cancel()

    def __iter__(self) -> Iterator[str]:
        sent = 0
        for piece in self._stream:
            self._text += piece
            # A sequence may begin in text held back earlier, never in text already sent.
            found = [i for s in self._stops if (i := self._text.find(s, sent)) >= 0]
            if found:
                self._cut = min(found)
                if self._cut > sent:
                    yield self._text[sent : self._cut]
                self._stream.cancel()
                for _ in self._stream:  # the engine ends the reply within a step
                    pass
                return
            safe = len(self._text) - self._held_back()
            if safe > sent:
                yield self._text[sent:safe]
                sent = safe
        if len(self._text) > sent:
            yield self._text[sent:]

    def _held_back(self) -> int:
        """How many characters at the end of the text could begin a stop sequence."""
        text = self._text
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
