"""Streamed text: each chunk's delta is the choice's new cumulative text minus what was sent before.

The engine reports each choice's whole text so far at every step. A delta is the part of the new
text past what this choice has already sent, so the deltas of a stream concatenate to the final
text. Text is held back, never sent wrong, while it might still change: a trailing U+FFFD (a
multi-byte character whose remaining bytes are still to come), and, while the choice runs with
stop strings, the last `len(longest stop) - 1` characters, which could be the start of a stop
string that would be cut away. If a new text does not start with what was sent (the engine's
streamed text is meant to be a prefix of its final text), nothing is sent until one does; the
finished text's remainder goes out with the choice's last chunk.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("jpaged.server")


class TextDeltas:
    """The text one streamed choice has sent so far.

    Args:
        stop: the request's stop strings (their length sets how much text is held back).
        include_stop: whether a matched stop string stays in the output (then none is held back).
    """

    def __init__(self, stop: list[str] | None = None, include_stop: bool = False):
        self.sent = ""
        self._hold = 0 if include_stop or not stop else max(len(s) for s in stop) - 1

    def delta(self, text: str, finished: bool) -> str:
        """The text to send now, given the choice's cumulative `text`; "" when nothing is due."""
        if not text.startswith(self.sent):
            if finished:
                logger.warning("a finished choice's text does not extend the text already streamed")
            return ""
        end = len(text)
        if not finished:
            end -= self._hold
            while end > len(self.sent) and text[end - 1] == "\ufffd":
                end -= 1
        if end <= len(self.sent):
            return ""
        new = text[len(self.sent):end]
        self.sent += new
        return new
