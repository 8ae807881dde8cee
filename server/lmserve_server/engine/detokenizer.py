"""Text from a growing list of token ids, with O(1) work per token, and the stop-string scan
over it.

``IncrementalDetokenizer`` keeps two offsets into the token list, as TGI and vLLM do: the
text up to ``read`` is settled, and each new token is decoded together with the tokens since
``prefix`` only (a handful), never the whole list. New text is released once it does not end
in U+FFFD, i.e. once a multi-byte character split across tokens is whole. Decoding from a
token boundary where the text was settled gives the same characters as decoding everything
(UTF-8 resynchronises after a complete character), and decoding the window with its context
keeps tokenizers that strip a leading space at the start of a text (SentencePiece) right.
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
