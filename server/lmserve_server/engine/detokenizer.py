"""Text from a growing list of token ids, with O(1) work per token, and the stop-string scan
over it.

``IncrementalDetokenizer`` keeps two offsets into the token list, as TGI and vLLM do: the
text up to ``read`` is settled, and each new token is decoded together with the tokens since
``prefix`` only (a handful), never the whole list. New text is released once it does not end
in U+FFFD, i.e. once a multi-byte character split across tokens is whole. Decoding from a
token boundary where the text was settled gives the same characters as decoding everything
(UTF-8 resynchronises after a complete character), and decoding the window with its context
keeps tokenizers that strip a leading space at the start of a text (SentencePiece) right.

The stop-string helpers look only at the tail that a new piece of text can affect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that are not (yet) a character


class IncrementalDetokenizer:
    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        self.text = ""  # the settled text of tokens[:read]
        self._prefix = 0  # tokens[prefix:read] are decoded again as the next token's context
        self._read = 0
        self._prefix_text = ""  # decode(tokens[prefix:read])

    def push(self, token: int) -> str:
        """Adds a token; returns the text it settled (often "", while a character is split)."""
        self.tokens.append(token)
        return self._settle(final=False)

    def flush(self) -> str:
        """Settles whatever is pending, an incomplete character included (the row ended)."""
        if self._read == len(self.tokens):
            return ""
        return self._settle(final=True)

    def _settle(self, *, final: bool) -> str:
        window_text = self._decode(self.tokens[self._prefix :])
        if not final and (
            len(window_text) <= len(self._prefix_text) or window_text.endswith(REPLACEMENT)
        ):
            return ""
        delta = window_text[len(self._prefix_text) :]
        self.text += delta
        self._prefix, self._read = self._read, len(self.tokens)
        self._prefix_text = self._decode(self.tokens[self._prefix : self._read])
        return delta


def find_stop(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """Where the earliest stop string in ``text`` begins, looking only at matches that end
    at or after ``new_from`` (the text before it was scanned already); None if none."""
    found = None
    for stop in stops:
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at >= 0 and (found is None or at < found):
            found = at
    return found


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The longest tail of ``text`` that a stop string begins with: a stream holds it back,
    since the unary text is cut before a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
