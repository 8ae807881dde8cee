"""Packed linear layers (``--pack-weights``): the same model, faster matmuls, and rows whose
results don't depend on the rows computed with them."""

from __future__ import annotations

import torch

from lmserve_server.engine import Engine
from lmserve_server.packing import PackedLinear, can_pack, pack_linears
from tests.test_engine import PROMPTS, request


def test_every_linear_layer_is_packed(packed_engine: Engine) -> None:
    model = packed_engine.model
    assert can_pack(model)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    n_layer = model.config.n_layer
    assert len(layers) == 4 * n_layer + 1  # c_attn, c_proj, c_fc, mlp c_proj; the LM head
    assert pack_linears(model) == 0, "packing twice finds nothing left to pack"


def test_packed_model_computes_what_the_unpacked_one_does(
    engine: Engine, packed_engine: Engine
) -> None:
    ids = torch.tensor([engine.tokenize(PROMPTS[2])])
    with torch.inference_mode():
        plain = engine.model(input_ids=ids).logits
        packed = packed_engine.model(input_ids=ids).logits
    assert torch.allclose(plain, packed, atol=1e-4, rtol=1e-4)
    prompts = [request(engine, p, 10) for p in PROMPTS]
    assert packed_engine.generate_batch(prompts) == engine.generate_batch(prompts)


def test_a_packed_row_is_bitwise_the_same_alone_and_in_a_batch() -> None:
    """The unpacked CPU matmul takes another path for one row than for several, so a
    prompt's logits could change in the last bits with its batch; the packed one can't."""
    torch.manual_seed(0)
    layer = PackedLinear(torch.randn(256, 64), torch.randn(256))
    rows = torch.randn(37, 64)
    together = layer(rows)
    for count in (1, 2, 13, 36):
        assert torch.equal(layer(rows[:count]), together[:count]), count
    assert torch.equal(layer(rows[5:6]), together[5:6])
