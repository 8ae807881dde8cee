"""``Row``: one request inside the engine, and the one home of everything decided per row.

Both schedulers drive rows the same way: the model picks a token for a row, ``accept`` takes
it and says whether the row has ended. Here, and nowhere else, live:

- the row's limits: its end-of-sequence tokens (not part of the output), ``max_new_tokens``;
- its stop strings, scanned on the settled tail of its text only (``detokenizer.py``);
- cancellation (the caller went away) and abortion (the daemon stopped it, with an error);
- its stream: text deltas that never split a character nor show a possible stop string, so
  that they concatenate to exactly the unary text, sent as they settle;
- its sampling settings for the next token (``sampling``): its seed, fixed at creation, so
  that a batch retried after a fault (or a request sent again with the same seed) draws the
  same tokens; its end tokens suppressed until ``min_new_tokens``; its penalty history;
- its end tokens: the model's (finish reason EOS) and its own ``stop_token_ids`` (STOP),
  neither part of its output;
- the logprobs of its tokens, when asked.

A row outlives a failed batch: its tokens so far stay, a retry continues after them, and its
stream never sends a token twice.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from lmserve_server.engine.detokenizer import (
    Decode,
    IncrementalDetokenizer,
    find_stop,
    stop_prefix_length,
)
from lmserve_server.engine.sampling import RowSampling
from lmserve_server.engine.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
)

DeltaSink = Callable[[TextDelta], object]


class Row:
    """A request's live state. ``accept`` runs on the engine thread; ``cancel`` and
    ``abort`` may come from any thread (a plain attribute: a late read costs one step)."""

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
        seed = request.sampling.seed
        self.seed: int = seed if seed is not None else random.getrandbits(63)
        self._decode = decode
        self._end_token_ids = end_token_ids
        self._stop_token_ids = frozenset(request.stop_token_ids) - end_token_ids
        self._suppressed = tuple(sorted(end_token_ids | self._stop_token_ids))
        self._on_delta = on_delta
        # Text is followed token by token only when a stream or a stop string needs it.
        self._text = IncrementalDetokenizer(decode) if on_delta or request.stop else None
        self._stop_at: int | None = None  # where the text is cut, before a stop string
        self._sent_chars = 0
        self._sent_tokens = 0
        # What penalties need, kept as the row goes (O(1) per token, not a step's recount).
        self._counting = request.sampling.penalised
        self._prompt_tokens = tuple(sorted(set(request.prompt_ids))) if self._counting else ()
        self._generated_counts: Counter[int] = Counter()

    def sampling(self) -> RowSampling:
        """The settings for the row's next token."""
        request = self.request
        return RowSampling(
            params=request.sampling,
            seed=self.seed,
            counter=len(self.tokens),
            suppress=self._suppressed if len(self.tokens) < request.min_new_tokens else (),
            prompt_tokens=self._prompt_tokens,
            generated_counts=self._generated_counts,
            logprobs=request.logprobs,
        )

    # ---- state ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Finished, failed, aborted or cancelled: the row takes no more tokens."""
        return self.finish_reason is not None or self.error is not None or self.cancelled

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def plain_greedy(self) -> bool:
        """Whether the argmax of the raw logits is all the row needs."""
        request = self.request
        return (
            request.sampling.greedy
            and not request.sampling.penalised
            and not request.sampling.logit_bias
            and request.min_new_tokens == 0
            and request.logprobs is None
        )

    def cancel(self) -> None:
        """Its caller has gone away: the row stops at the next step, nobody gets a result."""
        self.cancelled = True

    def abort(self, error: Exception) -> None:
        """The daemon stops the row: its caller gets ``error`` instead of a result."""
        if self.error is None:
            self.error = error

    # ---- a new token ------------------------------------------------------------------------

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Takes the token chosen for this row (with its logprob when the row asked for
        them); returns whether the row has ended."""
        if self.done:
            return True
        if token in self._end_token_ids:
            self.finish_reason = FinishReason.EOS
            return True
        if token in self._stop_token_ids:
            self.finish_reason = FinishReason.STOP
            return True
        self.tokens.append(token)
        if self._counting:
            self._generated_counts[token] += 1
        if logprob is not None and self.request.logprobs is not None:
            self.logprobs.append(logprob)
        if self._text is not None:
            settled_before = len(self._text.text)
            if self._text.push(token) and self.request.stop:
                cut = find_stop(self._text.text, self.request.stop, settled_before)
                if cut is not None:
                    self._stop_at = cut
                    self.finish_reason = FinishReason.STOP
        if self.finish_reason is None and len(self.tokens) >= self.request.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
        if self.finish_reason is None:
            self._stream()
        return self.finish_reason is not None

    def _stream(self) -> None:
        """Sends the settled text that no stop string can take back, with its tokens."""
        if self._on_delta is None or self._text is None:
            return
        text = self._text.text
        safe = len(text) - stop_prefix_length(text, self.request.stop)
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
        )
