"""Linear layers with their weights prepacked for oneDNN, the CPU's matmul library.

On a CPU, a decode step multiplies a few rows of activations by every weight matrix of the
model. A plain ``addmm`` repacks each weight matrix into the library's blocked layout on
every call, so at 2-256 rows it moves the weights through memory more than once (12 of this
machine's 31 GB/s at 16 rows). Packing each matrix once at load (``_reorder_linear_weight``,
the op PyTorch's own compiler uses for CPU linears) makes those calls 20-30% faster. At one
row the plain call takes a matrix-vector path that the packed one can't beat (it is 30%
slower there), and from about 500 rows both are compute-bound and equal; so a packed layer
keeps its plain weight too and uses it for single rows. That costs one more copy of the
linear weights in memory: the flag is ``--pack-weights``.

Only for float32 models on the CPU, where oneDNN is available; elsewhere ``pack_linears``
changes nothing. The packed path computes the same products in another summation order, so
its results can differ from the plain one's in the last bits (as between two BLAS
libraries); both schedulers use the same packed model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)

# The row count oneDNN picks its packed layout for; any count works with it. Measured on
# GPT-2 shapes: 16 gives the best decode steps (8-32 rows) and prefills alike.
BATCH_HINT = 16


class PackedLinear(torch.nn.Module):
    """``y = x @ W + b`` with ``W`` (in, out): prepacked for two rows or more, the plain
    weight (shared with the original layer, not copied) for one."""

    plain_weight: torch.Tensor
    packed_weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight_in_out: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_in_out.shape
        plain = weight_in_out.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(plain.t().contiguous(), BATCH_HINT)
        self.register_buffer("plain_weight", plain, persistent=False)  # (in, out)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        if rows.shape[0] == 1:  # a matrix-vector product: the plain path is faster
            y = (
                rows @ self.plain_weight
                if self.bias is None
                else torch.addmm(self.bias, rows, self.plain_weight)
            )
        else:
            y = torch.ops.mkldnn._linear_pointwise(
                rows, self.packed_weight, self.bias, "none", [], ""
            )  # (N, out)
        return y.view(*x.shape[:-1], self.out_features)


def can_pack(model: Any) -> bool:
    """Whether ``model`` runs in float32 on a CPU with oneDNN's packed linear ops."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and model.dtype == torch.float32
        and model.device.type == "cpu"
    )


def pack_linears(model: Any) -> int:
    """Replaces every ``nn.Linear`` and GPT-2 ``Conv1D`` (a linear with its weight stored
    (in, out)) of ``model`` with a ``PackedLinear``. Returns how many were packed."""
    if not can_pack(model):
        return 0
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
    ]
    for name, module in targets:
        # Conv1D stores its weight (in, out), nn.Linear (out, in).
        weight = module.weight if isinstance(module, Conv1D) else module.weight.t()
        packed = PackedLinear(weight, module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
    log.info("packed %d linear layers for oneDNN (--pack-weights)", len(targets))
    return len(targets)
