"""Turns a row's token stream into text deltas that never split a character or leak a
stop string, and whose concatenation is exactly the unary ``Generate`` text.

Two things are held back until they resolve: bytes of a multi-byte UTF-8 character that
spans tokens (the decoded text ends in U+FFFD until its last byte arrives), and a tail that
could be the start of a stop string (the unary text is cut before a stop string, so the
stream must not have sent it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextDeltas:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._tokens: list[int] = []
        self.sent_text = ""
        self.sent_tokens = 0

    def push(self, token: int) -> tuple[str, list[int]]:
        """Adds a token; returns the text and token ids that are safe to send now."""
        self._tokens.append(token)
        safe = self._safe_prefix(self._decode(self._tokens))
        if len(safe) <= len(self.sent_text) or not safe.startswith(self.sent_text):
            return "", []
        delta = safe[len(self.sent_text) :]
        tokens = self._tokens[self.sent_tokens :]
        self.sent_text, self.sent_tokens = safe, len(self._tokens)
        return delta, tokens

    def finish(self, text: str, token_ids: Sequence[int]) -> tuple[str, list[int]]:
        """The rest of the row's final text and tokens, after everything already sent."""
        if not text.startswith(self.sent_text):  # never expected; the final text wins
            raise RuntimeError("streamed text is not a prefix of the final text")
        return text[len(self.sent_text) :], list(token_ids[self.sent_tokens :])

    def _safe_prefix(self, text: str) -> str:
        end = len(text)
        while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            end -= 1
        for stop in self._stop:
            found = text.find(stop)
            if 0 <= found < end:
                end = found
            # Hold back the longest tail that a stop string starts with.
            for size in range(min(len(stop) - 1, end), 0, -1):
                if text[end - size : end] == stop[:size]:
                    end -= size
                    break
        return text[:end]
