"""Linear layers with their weights prepacked for oneDNN, the CPU's matmul library.

On a CPU, a decode step multiplies a few rows of activations by every weight matrix of the
model. A plain ``addmm`` repacks each weight matrix into the library's blocked layout on
every call, so at 2-256 rows it moves the weights through memory more than once (12 of this
machine's 31 GB/s at 16 rows). Packing each matrix once at load (``_reorder_linear_weight``,
the op PyTorch's own compiler uses for CPU linears) makes those calls 20-30% faster, and
from about 500 rows both are compute-bound and equal.

Every row count takes the same packed kernel, one row included, and a row's result is then
bitwise the same whatever rows share the call (``tests/test_packing.py``): the plain
matrix-vector product of a lone row sums in another order, so a request decoding alone got
logits a few 1e-6 off those it got in company, enough to change a seeded draw from a flat
distribution now and then. (At one row the packed call costs about the same as the plain
one on this project's CPU: 37-38 ms for a 124M-parameter model's decode step.) The flag is
``--pack-weights``.

An MLP's activation runs inside its first matmul (oneDNN's post-op, as PyTorch's compiler
fuses it): GPT-2's tanh GELU as five elementwise passes over the (rows, 3072) activations
cost 2.5 ms of a 57 ms 16-row decode step and 15 ms of a 256-token prefill on this machine's
CPU; fused, the values are the same function rounded once instead of at every pass.
``_FUSED_MLPS`` names the MLPs whose forward is ``linear -> activation -> ...`` (module and
attribute names of transformers' models: ``tests/test_packing.py`` checks each family's
fused model against the plain one).

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


# oneDNN post-op (attribute, algorithm) by the activation module's class name
# (transformers.activations, torch.nn).
_TANH_GELU = ("gelu", "tanh")
_ACTIVATIONS: dict[str, tuple[str, str]] = {
    "NewGELUActivation": _TANH_GELU,  # gpt2's "gelu_new"
    "GELUTanh": _TANH_GELU,  # "gelu_pytorch_tanh"
    "FastGELUActivation": _TANH_GELU,  # "gelu_fast": the same formula, factored
    "GELUActivation": ("gelu", "none"),  # exact (erf) GELU
    "ReLU": ("relu", ""),
}

# MLPs whose forward starts ``activation(linear(x))``: class name -> (linear, activation).
_FUSED_MLPS = {
    "GPT2MLP": ("c_fc", "act"),
    "GPTNeoXMLP": ("dense_h_to_4h", "act"),
    "OPTDecoderLayer": ("fc1", "activation_fn"),
}


class PackedLinear(torch.nn.Module):
    """``y = x @ W + b`` with ``W`` (in, out) prepacked. With ``activation`` (a key of
    ``_ACTIVATIONS``), ``y`` is that function of it, computed in the matmul's epilogue."""

    packed_weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight_in_out: torch.Tensor,
        bias: torch.Tensor | None,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        self.activation = activation
        self._post_op, self._algorithm = "none", ""
        if activation is not None:
            self._post_op, self._algorithm = _ACTIVATIONS[activation]
        self.in_features, self.out_features = weight_in_out.shape
        weight = weight_in_out.detach().t().contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        y = torch.ops.mkldnn._linear_pointwise(
            rows, self.packed_weight, self.bias, self._post_op, [], self._algorithm
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
    (in, out)) of ``model`` with a ``PackedLinear``, fusing the activations of the MLPs of
    ``_FUSED_MLPS``. Returns how many linears were packed."""
    if not can_pack(model):
        return 0
    fused = _fuse_activations(model)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
    ]
    for name, module in targets:
        # Conv1D stores its weight (in, out), nn.Linear (out, in).
        weight = module.weight if isinstance(module, Conv1D) else module.weight.t()
        packed = PackedLinear(weight, module.bias, fused.get(name))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
    log.info(
        "packed %d linear layers for oneDNN, %d with their activation (--pack-weights)",
        len(targets),
        len(fused),
    )
    return len(targets)


def _fuse_activations(model: Any) -> dict[str, str]:
    """Takes the activation out of every fusable MLP (its module becomes ``Identity``);
    returns, by the name of the linear before it, the activation that linear must apply."""
    fused = {}
    for name, module in model.named_modules():
        parts = _FUSED_MLPS.get(type(module).__name__)
        if parts is None:
            continue
        linear_name, act_name = parts
        linear, act = getattr(module, linear_name, None), getattr(module, act_name, None)
        if not isinstance(linear, (torch.nn.Linear, Conv1D)):
            continue
        kind = type(act).__name__
        if kind not in _ACTIVATIONS:
            continue
        setattr(module, act_name, torch.nn.Identity())
        fused[f"{name}.{linear_name}" if name else linear_name] = kind
    return fused
