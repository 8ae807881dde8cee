"""Packed linear layers (``--pack-weights``): the same model, faster matmuls, and rows whose
results don't depend on the rows computed with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve_server.config import EngineConfig
from lmserve_server.engine.model import Engine
from lmserve_server.engine.packing import PackedLinear, can_pack, pack_linears
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
    rows = torch.randn(37, 64)
    together = layer(rows)
    assert torch.allclose(together, rows @ weight + bias, atol=1e-4)
    for count in (1, 2, 3, 13, 36):
        assert torch.equal(layer(rows[:count]), together[:count]), count
    assert torch.equal(layer(rows[5:7]), together[5:7])
    assert torch.equal(layer(rows[20:21]), together[20:21])


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
