"""Token bitmasks: one bit per vocabulary entry, 1 = allowed, packed in int32 words.

The layout is the grammar libraries' own (xgrammar's and llguidance's alike): token ``t`` of
a row is bit ``t % 32`` of word ``t // 32``, so a matcher fills its row of a preallocated
``(rows, words)`` int32 buffer in place and nothing is converted.

``BitmaskApplier`` turns the bits into -inf logits with a handful of tensor ops over the rows
that have a grammar: a lookup of each mask byte in a 256-entry table of eight additive biases
(0 or -inf), added into those rows with ``index_add_``. No Python loop over rows or over the
vocabulary, the same kernels on CPU and GPU, and rows without a grammar are never touched, so
their logits stay bit-for-bit what they were (batch invariance).
"""

from __future__ import annotations

import torch

# A word's four bytes, low byte first: bit t % 32 of word t // 32 is token t.
_BYTE_SHIFTS = (0, 8, 16, 24)


def bitmask_words(vocab_size: int) -> int:
    """int32 words a row's mask needs for ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


def allocate_bitmask(
    rows: int, vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A ``(rows, ceil(vocab_size / 32))`` int32 buffer with every token allowed; on the
    CPU, where the matchers fill it (pinned there when CUDA is present would be a later
    optimisation: the fill is the host's work either way)."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32, device=device)


class BitmaskApplier:
    """``apply(scores, rows, bitmask)``: the tokens a row's mask leaves out get -inf.

    One per (device, dtype) of the logits, holding the byte table and shifts there, so a step
    uploads only its bitmask."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype) -> None:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        self._table = torch.where(bits == 0, float("-inf"), 0.0).to(device=device, dtype=dtype)
        self._shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.int32, device=device)

    def bias(self, bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``(M, vocab_size)``: 0 where ``bitmask`` allows the token, -inf elsewhere. Tokens
        past the mask's width (a model whose logits are wider than its tokenizer's
        vocabulary) are not allowed; mask bits past ``vocab_size`` are ignored."""
        rows, words = bitmask.shape
        # Shifts on the int32 words, not a byte view: the same on any byte order.
        byte_values = ((bitmask.unsqueeze(-1) >> self._shifts) & 0xFF).view(-1).to(torch.int64)
        bias = self._table.index_select(0, byte_values).view(rows, words * 32)
        if words * 32 >= vocab_size:
            return bias[:, :vocab_size].contiguous()
        padding = bias.new_full((rows, vocab_size - words * 32), float("-inf"))
        return torch.cat([bias, padding], dim=1)

    def apply(self, scores: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
        """In place: for each ``i``, row ``rows[i]`` of ``scores`` (R, V) keeps the logits of
        the tokens bit-set in ``bitmask[i]`` and gets -inf for the others.

        ``rows`` (M,) int64 must be distinct; ``bitmask`` (M, W) int32 on ``scores``'s device.
        Adding 0 leaves a logit exactly as it was and adding -inf makes it -inf (logits are
        never +inf: the model's are finite and logit_bias is bounded)."""
        if rows.numel() == 0:
            return
        scores.index_add_(0, rows, self.bias(bitmask, scores.shape[1]))
