"""What ``engine/attention.py`` relies on in transformers, checked on every tested family, so
that an upgrade that changes any of it fails here, by name, rather than as wrong tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from lmserve_server.engine import attention
from tests.conftest import FAMILIES

PROBE = "lmserve_probe"


class Probe:
    """An attention function that records how the model calls it, then runs SDPA."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        self.calls.append(
            {
                "layer_idx": getattr(module, "layer_idx", None),
                "query": tuple(query.shape),
                "key": tuple(key.shape),
                "mask": attention_mask,
                "marker": kwargs.get(attention.STEP_KEYWORD),
                "scaling": scaling,
            }
        )
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, k, v, is_causal=query.shape[2] > 1, scale=scaling
        )
        return out.transpose(1, 2), None


@pytest.fixture(scope="module")
def probe() -> Probe:
    recorder = Probe()
    AttentionInterface.register(PROBE, recorder)
    return recorder


@pytest.mark.parametrize("family", FAMILIES)
def test_a_packed_forward_reaches_the_attention_function_as_the_adapter_expects(
    family: str, family_model_dirs: dict[str, Path], probe: Probe
) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(family_model_dirs[family]))
    model.eval()
    model.set_attn_implementation(PROBE)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    placeholder = attention.mask_placeholder(torch.device("cpu"))
    marker = object()
    probe.calls.clear()
    ids = torch.tensor([[464, 2003, 286, 9552, 318, 11]])
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            position_ids=torch.tensor([[7, 8, 9, 0, 1, 2]]),  # two rows packed, mid-row first
            attention_mask=placeholder,
            use_cache=False,
            logits_to_keep=torch.tensor([2, 5]),
            **{attention.STEP_KEYWORD: marker},
        )
    layers = config.num_hidden_layers
    assert [c["layer_idx"] for c in probe.calls] == list(range(layers)), "module.layer_idx"
    for call in probe.calls:
        assert call["marker"] is marker, "the forward's keyword reaches the attention function"
        assert call["mask"] is placeholder, "a 4-D mask is passed through unbuilt"
        assert call["query"][:3] == (1, heads, 6), "queries (1, H, S, D)"
        assert call["key"][:3] == (1, kv_heads, 6), "keys (1, KV, S, D): before any repeat"
    assert out.logits.shape[:2] == (1, 2), "logits_to_keep takes a tensor of positions"
    assert getattr(out, "past_key_values", None) is None, "use_cache=False: no cache"


def test_install_registers_ours_and_keeps_sdpa_for_other_forwards(
    family_model_dirs: dict[str, Path],
) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(family_model_dirs["llama"]))
    model.eval()
    ids = torch.tensor([[464, 2003, 286, 9552]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        attention.install(model)
        assert model.config._attn_implementation == attention.ATTENTION
        after = model(input_ids=ids).logits  # no step: transformers' own SDPA
    torch.testing.assert_close(after, before)
    attention.install(model)  # idempotent


def test_install_refuses_a_model_without_sdpa(family_model_dirs: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        str(family_model_dirs["gpt2"]), attn_implementation="eager"
    )
    with pytest.raises(ValueError, match="SDPA"):
        attention.install(model)
