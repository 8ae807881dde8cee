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

A packed matmul runs at a fixed set of row counts (``ROW_BUCKETS``): a step of 37 rows is
padded to 40, one of 600 goes through in pieces of 256. oneDNN compiles a kernel per row
count and keeps it, about 0.6 MB each whatever the matrix's size
(``benchmarks/packed_kernels.py``), so with the raw counts of continuous steps (every count
from 1 to ``--max-step-tokens``, times each linear's shape) the daemon's memory grew by
hundreds of MB under mixed load (460 -> 979 MB in 4 minutes on the tiny model). With 27
counts per shape the kernels are few, ``warm_up_packed`` compiles them all before the daemon
serves, and its memory stays where it was once warm. The padding costs at most a quarter
more rows (37 -> 40: 8%), against a packed matmul 1.2-3x faster than the plain one here.

Whether a row's result is the same at every row count is the kernels' choice, not
PyTorch's: oneDNN picks how to split a matmul across threads by its row count, and on some
CPUs (seen on an AVX-512/AMX Xeon) it splits the inner dimension of small calls across
threads and adds the partial sums, so a row computed with few companions sums in another
order than in a large call, and a seeded request's tokens changed with its company. So the
daemon does not assume it: ``warm_up_packed`` checks, for each kind of layer, that sample
rows give the same bits at every row count as alone, and where some small counts differ it
raises the layer's least row count (``min_rows``) to the first count from which every
larger one agrees; calls with fewer rows are padded up to it. On this project's AVX2 CPU
every count agrees (``min_rows`` stays 2); a CPU whose kernels differ pays some padding on
small steps instead of giving a request other tokens in company.

Only for float32 models on the CPU, where oneDNN is available; elsewhere ``pack_linears``
changes nothing. The packed path computes the same products in another summation order, so
its results can differ from the plain one's in the last bits (as between two BLAS
libraries); both schedulers use the same packed model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)

# The row count oneDNN picks its packed layout for; any count works with it. Measured on
# GPT-2 shapes: 16 gives the best decode steps (8-32 rows) and prefills alike.
BATCH_HINT = 16

# The most rows of one packed matmul; more go through in pieces of this many. From about
# 256 rows a matmul is compute-bound, so the pieces cost what one call would.
MAX_ROWS = 256


def row_bucket(rows: int) -> int:
    """The row count a packed matmul of ``rows`` rows (2..MAX_ROWS) runs at: ``rows`` itself
    up to 8, then the next multiple of a quarter of its power of two (10, 12, 14, 16, 20,
    24, 28, 32, 40, ...), so no more than a quarter of the rows are padding."""
    if rows <= 8:
        return rows
    step = 1 << ((rows - 1).bit_length() - 3)
    return -(-rows // step) * step


# Every row count a packed matmul runs at (27): the kernels oneDNN compiles and keeps.
ROW_BUCKETS = tuple(sorted({row_bucket(n) for n in range(2, MAX_ROWS + 1)}))


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
    # The fewest rows a call runs at (``warm_up_packed`` raises it where this CPU's kernels
    # give a row other bits at small counts). A lone row runs as two: one row alone takes
    # another kernel.
    min_rows: int = 2

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
        if rows.shape[0] <= MAX_ROWS:
            y = self._packed(rows)
        else:  # each row's result is the same in any company, so pieces change nothing
            y = torch.cat([self._packed(piece) for piece in rows.split(MAX_ROWS)])
        return y.view(*x.shape[:-1], self.out_features)

    def _packed(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (1..MAX_ROWS of them) through the packed weight at their bucket's count."""
        count = rows.shape[0]
        return self.run_at(rows, max(row_bucket(count), self.min_rows))[:count]

    def run_at(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """``rows`` through the packed weight in one call of exactly ``count`` rows (zero
        rows below: their results are computed and returned too)."""
        if rows.shape[0] != count:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, count - rows.shape[0]))
        return torch.ops.mkldnn._linear_pointwise(
            rows, self.packed_weight, self.bias, self._post_op, [], self._algorithm
        )  # (count, out)


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


def warm_up_packed(model: Any) -> int:
    """Runs each kind of packed layer of ``model`` (its shape, bias and activation) at every
    count of ``ROW_BUCKETS``, so that oneDNN compiles every kernel the model will use now,
    before serving, and the daemon's memory does not grow later; and sets each kind's
    ``min_rows`` to the least count from which a row's result does not depend on its
    company on this CPU (``invariant_min_rows``). Returns how many kinds there were (0 when
    nothing is packed)."""
    kinds: dict[tuple[int, int, str | None, bool], list[PackedLinear]] = {}
    for module in model.modules():
        if isinstance(module, PackedLinear):
            key = (module.in_features, module.out_features, module.activation, module.bias is None)
            kinds.setdefault(key, []).append(module)
    with torch.inference_mode():
        for (rows_in, rows_out, activation, _), layers in kinds.items():
            least = invariant_min_rows(layers[0].run_at, rows_in)
            if least is None:
                log.warning(
                    "this CPU's matmul kernels give a row of the packed %dx%d layer other bits "
                    "in company at every row count: seeded sampling may depend on a "
                    "request's company here (try --pack-weights false or another "
                    "ONEDNN_MAX_CPU_ISA)",
                    rows_in,
                    rows_out,
                )
                continue
            if least > layers[0].min_rows:
                log.warning(
                    "this CPU's matmul kernels give a row of the packed %dx%d%s layer other "
                    "bits at fewer than %d rows: its calls are padded to %d rows so that a "
                    "request's tokens do not depend on its company",
                    rows_in,
                    rows_out,
                    f" ({activation})" if activation else "",
                    least,
                    least,
                )
            for layer in layers:
                layer.min_rows = max(layer.min_rows, least)
    return len(kinds)


# Rows whose results the invariance check compares, at every count above them.
_PROBE_POSITIONS = (0, 1, 2, 3, 5, 7, 9, 15, 17, 31, 63, 127, 255)


def invariant_min_rows(
    run_at: Callable[[torch.Tensor, int], torch.Tensor], in_features: int
) -> int | None:
    """The least count of ``ROW_BUCKETS`` at which ``run_at`` (rows, count) -> (count, out)
    gives each sample row, alone in a call of that count, the same bits as in a call of any
    larger count at any sampled position; None when no count does. Calls every count once
    (which also compiles its kernel) and a few more per count it rejects."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(MAX_ROWS, in_features, generator=generator)
    together = {count: run_at(x[:count], count) for count in ROW_BUCKETS}
    for least in ROW_BUCKETS:
        larger = [count for count in ROW_BUCKETS if count >= least]

        def agrees(r: int, least: int = least, larger: list[int] = larger) -> bool:
            alone = run_at(x[r : r + 1], least)[0]
            return all(torch.equal(alone, together[count][r]) for count in larger if count > r)

        if all(agrees(r) for r in _PROBE_POSITIONS):
            return least
    return None


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
