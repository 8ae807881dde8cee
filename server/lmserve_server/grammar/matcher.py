"""``CompiledGrammar`` (a compiled spec, shared by every request that asks for it) and
``RowMatcher`` (one row's place in it): the small interface the batched sampler uses.

Per step, for the rows that have a grammar: ``fill_bitmasks`` writes each row's allowed
tokens into its row of a preallocated int32 buffer (``bitmask.allocate_bitmask``), the
buffer goes to the logits' device and ``bitmask.BitmaskApplier.apply`` sets the others to
-inf; after sampling, each row's ``accept(token)``. A row whose matcher ``is_finished()``
can take no token but an end token: its output is complete.

Per-token budget: a row's mask fill is timed (the engine thread's CPU time, which the other
threads and processes don't inflate); a fill over ``mask_budget_s`` marks the row's matcher
``failure``, and the row ends with that reason at its next token, so a grammar that passed
the compile's probe yet turns costly later holds its batch up for one step, not for every
step of its output.

Thread-safety: a ``RowMatcher`` belongs to one row and is used by one thread at a time (the
engine thread); different rows' matchers may fill in parallel (``fill_bitmasks`` with an
executor does, in the library's own threads, without the GIL). ``CompiledGrammar.matcher()``
may be called from any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import llguidance
import torch

from lmserve_server.grammar.backend import TokenizerIndex, short_reason
from lmserve_server.grammar.spec import GrammarSpec


class CompiledGrammar:
    """A spec compiled for the served tokenizer: what ``GenerationRequest.grammar`` holds.
    Immutable once made; ``matcher()`` starts a row at its beginning."""

    def __init__(
        self,
        spec: GrammarSpec,
        template: llguidance.LLMatcher,
        index: TokenizerIndex,
        mask_budget_s: float = float("inf"),
    ) -> None:
        self.spec = spec
        self.vocab_size = index.vocab_size  # the masks' width in tokens
        self.end_token_ids = index.end_token_ids  # allowed once the grammar is complete
        self.mask_budget_s = mask_budget_s  # the most one token's mask may cost a row
        self._template = template
        self._lock = threading.Lock()

    def matcher(self) -> RowMatcher:
        """A new row's matcher: a copy of the template (microseconds; the template's first
        mask, already computed, is not recomputed from scratch)."""
        with self._lock:  # the template is one library object: one copy at a time
            return RowMatcher(self._template.deep_copy(), self.vocab_size, self.mask_budget_s)

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.spec.kind}, {len(self.spec.text)} chars)"


class RowMatcher:
    """One row's position in its grammar."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, mask_budget_s: float = float("inf")
    ) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size  # its masks' width in tokens
        self._mask_budget_s = mask_budget_s
        # Why the row must end though its tokens are allowed: a mask over the budget.
        self.failure: str | None = None

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Writes the tokens allowed next into row ``index`` of ``bitmask`` (a CPU,
        contiguous ``(rows, ceil(vocab_size / 32))`` int32 tensor, ``vocab_size`` the
        grammar's: the library refuses any other width): bit ``t % 32`` of word ``t // 32``
        set when token ``t`` is allowed. Once finished, only end tokens are."""
        _check_buffer(bitmask)
        row = bitmask[index]
        started = time.thread_time()
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        spent = time.thread_time() - started
        if spent > self._mask_budget_s and self.failure is None:
            from lmserve_server.grammar.probe import mask_over_budget

            self.failure = mask_over_budget(spent, self._mask_budget_s)

    def accept(self, token: int) -> bool:
        """Advances past ``token``; False when the grammar does not allow it (the matcher
        is then in error and stays there: ``error`` says why)."""
        return bool(self._matcher.consume_token(token))

    def is_finished(self) -> bool:
        """The output so far is complete and nothing but an end token can follow: the row
        ends here. Also true in error."""
        return bool(self._matcher.is_stopped())

    def is_accepting(self) -> bool:
        """The output so far is complete (an end token is allowed), though it may go on
        (``a+`` after ``a``)."""
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str | None:
        """Why the matcher is in error (a token the grammar refused, or a limit reached);
        None when it is not."""
        return short_reason(self._matcher.get_error()) or None


def _check_buffer(bitmask: torch.Tensor) -> None:
    # The library writes through a raw pointer (llguidance.torch's own fill does the same
    # but imports torch's compiler, 2 s at start-up): check what it will write into.
    if not (
        bitmask.dtype == torch.int32
        and bitmask.device.type == "cpu"
        and bitmask.dim() == 2
        and bitmask.is_contiguous()
    ):
        raise ValueError("a bitmask is a contiguous 2-D int32 CPU tensor (allocate_bitmask)")


def fill_bitmasks(rows: Sequence[tuple[RowMatcher, int]], bitmask: torch.Tensor) -> None:
    """Each ``(matcher, index)``'s mask into row ``index`` of ``bitmask``, one after the
    other on this thread (on a 2-core CPU a 16-row fill is faster here than on the
    library's own threads: ``benchmarks/grammar_libs.py``)."""
    for matcher, index in rows:
        matcher.fill_bitmask(bitmask, index)
