"""``Row``: one request inside the engine, and the one home of everything decided per row.

Both schedulers drive rows the same way: the model picks a token for a row, ``take`` hands it
over and says whether its tokens alone end the row, ``settle`` follows its text. Here, and
nowhere else, live:

- the row's limits: its end-of-sequence tokens (not part of the output), ``max_new_tokens``;
- its stop strings, scanned as its text settles (``stops.py``);
- cancellation (the caller went away) and abortion (the daemon stopped it, with an error);
- its stream: text deltas that never split a character nor show a possible stop string, so
  that they concatenate to exactly the unary text, sent as they settle;
- its seed, fixed at creation, so that a batch retried after a fault (or a request sent
  again with the same seed) draws the same tokens (its other sampling settings go to the
  slot it runs in: ``sampling_slots.py``);
- its end tokens: the model's (finish reason EOS) and its own ``stop_token_ids`` (STOP),
  neither part of its output;
- its grammar, when it asks for structured output: ``matcher`` follows its tokens (the
  sampler masks each step's choice with it), and the row ends, finish reason STOP, once its
  output is complete and nothing but an end token may follow (or when an end token comes
  where the output is complete); a matcher in error ends it with that error;
- the logprobs of its tokens, when asked.

``take`` is cheap (ids and counts); ``settle`` is the text's work (decoding, stop strings,
the stream), which the continuous engine does while the device runs the next step. A row
that a stop string ended in ``settle`` may so be given one more token: it takes no more once
it has ended.

A row outlives a failed batch: its tokens so far stay, a retry continues after them, and its
stream never sends a token twice.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lmserve_server.engine.detokenizer import Decode, IncrementalDetokenizer
from lmserve_server.engine.stops import StopScan
from lmserve_server.engine.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
)
from lmserve_server.errors import InvalidArgumentError

DeltaSink = Callable[[TextDelta], object]


class Row:
    """A request's live state. ``take`` and ``settle`` run on the engine thread; ``cancel``
    and ``abort`` may come from any thread (a plain attribute: a late read costs one step)."""

    def __init__(
        self,
        request: GenerationRequest,
        *,
        decode: Decode,
        end_token_ids: frozenset[int],
        on_delta: DeltaSink | None = None,
    ) -> None:
        self.request = request
        self.tokens: list[int] = []  # generated so far, end-of-sequence tokens excluded
        self.logprobs: list[TokenLogprob] = []  # one per token, when the request asks
        self.finish_reason: FinishReason | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.cached_prompt_tokens = 0  # of its prompt, taken from the prefix cache
        seed = request.sampling.seed
        self.seed: int = seed if seed is not None else random.getrandbits(63)
        self._decode = decode
        self._end_token_ids = end_token_ids
        self._stop_token_ids = frozenset(request.stop_token_ids) - end_token_ids
        self._on_delta = on_delta
        # Text is followed token by token only when a stream or a stop string needs it.
        self._text = IncrementalDetokenizer(decode) if on_delta or request.stop else None
        self._stops = StopScan(request.stop) if request.stop else None
        # The grammar's position (structured output): the sampler reads it each step.
        self.matcher = request.grammar.matcher() if request.grammar is not None else None
        self._stop_at: int | None = None  # where the text is cut, before a stop string
        self._settled = 0  # tokens whose text has been followed
        self._sent_chars = 0
        self._sent_tokens = 0

    # ---- state ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Finished, failed, aborted or cancelled: the row takes no more tokens."""
        return self.finish_reason is not None or self.error is not None or self.cancelled

    @property
    def generated(self) -> int:
        return len(self.tokens)

    def cancel(self) -> None:
        """Its caller has gone away: the row stops at the next step, nobody gets a result."""
        self.cancelled = True

    def abort(self, error: Exception) -> None:
        """The daemon stops the row: its caller gets ``error`` instead of a result."""
        if self.error is None:
            self.error = error

    # ---- a new token ------------------------------------------------------------------------

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """``take`` then ``settle``; returns whether the row has ended."""
        self.take(token, logprob)
        self.settle()
        return self.done

    def take(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Takes the token chosen for this row (with its logprob when the row asked for
        them); returns whether its tokens end the row (a stop string shows in ``settle``)."""
        if self.done:
            return True
        matcher = self.matcher
        if token in self._end_token_ids:
            # Under a grammar an end token is allowed only where the output is complete.
            complete = matcher is not None and matcher.is_accepting()
            self.finish_reason = FinishReason.STOP if complete else FinishReason.EOS
            return True
        if token in self._stop_token_ids:
            self.finish_reason = FinishReason.STOP
            return True
        if matcher is not None and matcher.failure is not None:
            self.abort(InvalidArgumentError(f"structured_output: {matcher.failure}"))
            return True
        if matcher is not None and not matcher.accept(token):
            # Masked tokens only come here: the grammar went past a limit of the library
            # ("Too many items"), the request's to fix.
            self.abort(InvalidArgumentError(f"structured_output: {matcher.error}"))
            return True
        self.tokens.append(token)
        if logprob is not None and self.request.logprobs is not None:
            self.logprobs.append(logprob)
        if matcher is not None and matcher.is_finished():
            self.finish_reason = FinishReason.STOP  # complete: only an end token could follow
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
        return self.finish_reason is not None

    def settle(self) -> None:
        """Follows the text of the tokens taken since the last call: a stop string ends the
        row (its text cut before it); a stream gets what no stop string can take back."""
        if self._text is None or self.cancelled or self.error is not None:
            self._settled = len(self.tokens)
            return
        while self._settled < len(self.tokens) and self._stop_at is None:
            token = self.tokens[self._settled]
            self._settled += 1
            settled_before = len(self._text.text)
            piece = self._text.push(token)
            if piece and self._stops is not None:
                cut = self._stops.feed(piece, settled_before)
                if cut is not None:
                    self._stop_at = cut
                    self.finish_reason = FinishReason.STOP
                    # The token that completed it is the last one the row keeps.
                    del self.tokens[self._settled :]
                    del self.logprobs[self._settled :]
        if self.finish_reason is None:
            self._stream()

    def _stream(self) -> None:
        """Sends the settled text that no stop string can take back, with its tokens."""
        if self._on_delta is None or self._text is None:
            return
        text = self._text.text
        safe = len(text) - (self._stops.held if self._stops is not None else 0)
        if safe <= self._sent_chars:
            return
        delta = TextDelta(
            text[self._sent_chars : safe],
            tuple(self.tokens[self._sent_tokens :]),
            tuple(self.logprobs[self._sent_tokens :]),
        )
        self._sent_chars, self._sent_tokens = safe, len(self.tokens)
        self._on_delta(delta)

    # ---- the result -------------------------------------------------------------------------

    def output(self) -> GenerationOutput:
        """The continuation: tokens (through the one that completed a stop string) and text
        (cut before the stop string)."""
        self.settle()
        if self._text is None:
            text = self._decode(self.tokens)
        else:
            self._text.flush()
            text = self._text.text
            if self._stop_at is not None:
                text = text[: self._stop_at]
        return GenerationOutput(
            token_ids=tuple(self.tokens),
            text=text,
            finish_reason=self.finish_reason or FinishReason.LENGTH,
            logprobs=tuple(self.logprobs),
            cached_prompt_tokens=self.cached_prompt_tokens,
        )
