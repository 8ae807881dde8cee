"""Packed linear layers (``--pack-weights``): the same model, faster matmuls, and rows whose
results don't depend on the rows computed with them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmserve_server.config import EngineConfig
from lmserve_server.engine.model import Engine
from lmserve_server.engine.packing import (
    MAX_ROWS,
    ROW_BUCKETS,
    PackedLinear,
    can_pack,
    invariant_min_rows,
    pack_linears,
    row_bucket,
)
from tests.test_engine import PROMPTS, generate, request


def test_every_linear_layer_is_packed(engine: Engine) -> None:
    model = engine.model
    assert can_pack(model)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    n_layer = model.config.n_layer
    assert len(layers) == 4 * n_layer + 1  # c_attn, c_proj, c_fc, mlp c_proj; the LM head
    assert pack_linears(model) == 0, "packing twice finds nothing left to pack"


def test_packed_model_computes_what_the_plain_one_does(
    engine: Engine, plain_engine: Engine
) -> None:
    assert not any(isinstance(m, PackedLinear) for m in plain_engine.model.modules())
    ids = torch.tensor([engine.tokenize(PROMPTS[2])])
    with torch.inference_mode():
        packed = engine.model(input_ids=ids).logits
        plain = plain_engine.model(input_ids=ids).logits
    assert torch.allclose(plain, packed, atol=1e-4, rtol=1e-4)
    prompts = [request(engine, p, 10) for p in PROMPTS]
    assert generate(engine, prompts) == generate(plain_engine, prompts)


def test_packed_rows_do_not_depend_on_their_companions() -> None:
    """A packed row's result is bitwise the same in any batch, one row alone included (a
    request's tokens must not depend on its company)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 256), torch.randn(256)  # (in, out), like Conv1D
    layer = PackedLinear(weight, bias)
    rows = torch.randn(2 * MAX_ROWS + 37, 64)  # in three pieces: 256, 256, 37 (as 40)
    together = layer(rows)
    assert torch.allclose(together, rows @ weight + bias, atol=1e-4)
    for count in (1, 2, 3, 13, 36, 37, 40, 255, 256, 257, 300):
        assert torch.equal(layer(rows[:count]), together[:count]), count
    assert torch.equal(layer(rows[5:7]), together[5:7])
    assert torch.equal(layer(rows[20:21]), together[20:21])


def test_row_counts_fall_in_few_buckets_of_little_padding() -> None:
    assert len(ROW_BUCKETS) == 27 and ROW_BUCKETS[0] == 2 and ROW_BUCKETS[-1] == MAX_ROWS
    for rows in range(2, MAX_ROWS + 1):
        bucket = row_bucket(rows)
        assert bucket in ROW_BUCKETS and rows <= bucket <= rows * 1.25, rows
        assert bucket == min(b for b in ROW_BUCKETS if b >= rows), rows


# Run in a fresh interpreter: the RSS of this one holds whatever the other tests compiled.
MEMORY_PROBE = """
import sys, torch
from lmserve_server.config import EngineConfig
from lmserve_server.engine.model import Engine

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

engine = Engine.load(EngineConfig(model=sys.argv[1]))
engine.warm_up()
ids = torch.randint(0, 50257, (32, 300))
with torch.inference_mode():
    engine.model(input_ids=ids[:1, :64], logits_to_keep=1)
    warm = rss_mb()
    for _ in range(2):
        # Every step length of the continuous scheduler (--max-step-tokens 256 and more),
        # and every count of rows sampled at once (the LM head's rows), twice.
        for tokens in range(1, 301):
            engine.model(input_ids=ids[:1, :tokens], logits_to_keep=1)
        for rows in range(1, 33):
            engine.model(input_ids=ids[:rows, :1], logits_to_keep=1)
print(warm, rss_mb())
"""


def test_memory_stays_flat_over_every_step_shape_once_warm(tiny_model_dir: Path) -> None:
    """oneDNN keeps a kernel (and its 0.85 MB) per new row count, so without the row
    buckets a daemon under mixed load grows by hundreds of MB. Warm, forwards of 300
    lengths and of 32 batch sizes, twice, must leave the RSS about where it was (+15 MB
    measured with the buckets, +616 MB without)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_PROBE), str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    warm, after = map(float, done.stdout.split())
    assert after - warm < 50, f"RSS {warm:.0f} MB warm, {after:.0f} MB after every shape"


# The families whose MLP activation runs in its first matmul (``_FUSED_MLPS``).
FUSED = {"gpt2": "NewGELUActivation", "gpt_neox": "GELUActivation", "opt": "ReLU"}


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt", "llama"])
def test_fused_activations_compute_what_the_plain_model_does(
    family: str, family_model_dirs: dict[str, Path]
) -> None:
    """Fails when transformers renames an MLP's parts (nothing fused) or puts something
    between its first linear and its activation (the logits differ)."""
    path = str(family_model_dirs[family])
    packed = Engine.load(EngineConfig(model=path)).model
    plain = Engine.load(EngineConfig(model=path, pack_weights=False)).model
    fused = [m.activation for m in packed.modules() if isinstance(m, PackedLinear) and m.activation]
    layers = packed.config.num_hidden_layers
    assert fused == ([FUSED[family]] * layers if family in FUSED else [])
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13] * 3])
    with torch.inference_mode():
        for rows in (ids[:, :1], ids):  # the one-row path and the packed one
            assert torch.allclose(
                packed(input_ids=rows).logits, plain(input_ids=rows).logits, atol=1e-4, rtol=1e-4
            )


def _split_below(rows_split: int, weight: torch.Tensor):  # type: ignore[no-untyped-def]
    """A matmul (rows, count) -> (count, out) whose calls of fewer than ``rows_split`` rows
    give other bits, as a kernel that splits small calls' inner dimension across threads
    does. Exact otherwise: inputs are small integers, so every summation order of a large
    call gives the same bits (a real BLAS's own choices by row count would blur the test),
    and small calls round their two partial sums to bfloat16 before adding them."""
    half = weight.shape[0] // 2

    def run_at(rows: torch.Tensor, count: int) -> torch.Tensor:
        rows = torch.nn.functional.pad((rows * 16).round(), (0, 0, 0, count - rows.shape[0]))
        if count < rows_split:
            low, high = rows[:, :half] @ weight[:half], rows[:, half:] @ weight[half:]
            return low.bfloat16().float() + high.bfloat16().float()
        return rows @ weight

    return run_at


def test_the_least_invariant_row_count_is_found_on_a_kernel_that_splits_small_calls() -> None:
    torch.manual_seed(0)
    weight = torch.randint(-8, 8, (64, 96)).float()
    run_at = _split_below(6, weight)
    x = torch.randn(4, 64)
    assert not torch.equal(run_at(x[:1], 2)[0], run_at(x, 8)[0]), "the stand-in differs"
    assert invariant_min_rows(run_at, 64) == 6
    assert invariant_min_rows(_split_below(0, weight), 64) == ROW_BUCKETS[0]


def test_this_cpus_packed_kernels_need_no_padding(engine: Engine) -> None:
    """On this machine every row count agrees, so no call pays padding; where a CPU's
    kernels differ, the warm-up raises ``min_rows`` (the test above) and says so."""
    layers = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
    assert {layer.min_rows for layer in layers} == {2}
    for layer in layers[:3]:
        assert invariant_min_rows(layer.run_at, layer.in_features) == 2


def test_a_raised_least_row_count_pads_small_calls_and_keeps_results() -> None:
    torch.manual_seed(0)
    layer = PackedLinear(torch.randn(64, 256), torch.randn(256))
    rows = torch.randn(24, 64)
    before = layer(rows)
    layer.min_rows = 16
    assert torch.equal(layer(rows[:3]), layer.run_at(rows[:3], 16)[:3])
    assert torch.allclose(layer(rows), before, atol=1e-5)
    assert torch.equal(layer(rows[:1])[0], layer(rows[:16])[0])
