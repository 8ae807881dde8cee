"""Linear layers with their weights prepacked for oneDNN, the CPU's matmul library.

On a CPU, a decode step multiplies a few rows of activations by every weight matrix of the
model. A plain ``addmm`` repacks each weight matrix into the library's blocked layout on
every call, so at 8-32 rows it moves the weights through memory more than once and runs at
half the memory bandwidth. Packing each matrix once at load (``_reorder_linear_weight``,
the op PyTorch's own compiler uses for CPU linears) makes the GPT-2 layers' matmuls about a
third faster at decode-step sizes and a fifth faster on prefills; one call with a single
row is about as fast as before.

Only for float32 models on the CPU, where oneDNN is available; elsewhere ``pack_linears``
changes nothing. The packed layers compute the same products in a different summation
order, so results can differ from the unpacked model's in the last bits (as between two
BLAS libraries), and both schedulers use the same packed model.
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
    """``y = x @ W^T + b`` with ``W`` (out, in) prepacked once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = None if bias is None else bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self.packed_weight, self.bias, "none", [], ""
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
        if isinstance(module, Conv1D):
            packed = PackedLinear(module.weight.t(), module.bias)  # Conv1D stores (in, out)
        else:
            packed = PackedLinear(module.weight, module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
    log.info("packed %d linear layers for oneDNN", len(targets))
    return len(targets)
