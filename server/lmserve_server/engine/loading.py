"""Loading: a causal LM and its tokenizer from a local directory, a GGUF file or the Hugging
Face cache, on the chosen device and dtype, set up for batched serving (EOS as the pad token).

A GGUF file is loaded by transformers (``from_pretrained(dir, gguf_file=...)``): its weights
dequantized to the serving dtype, its tokenizer, EOS token and chat template taken from the
file's metadata."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmserve_server.config import EngineConfig
from lmserve_server.engine.packing import pack_linears
from lmserve_server.errors import ModelLoadError
from lmserve_server.gguf_file import GgufSummary, gguf_file_of, read_gguf
from lmserve_server.modelpath import check_hub_reachable, hub_failure_message, local_model_problem

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # fp16 halves memory traffic on a GPU; CPUs have no fast fp16 path, so fp32 there.
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"--dtype {dtype}: choose one of auto, {', '.join(_DTYPES)}") from None


def load_model(
    config: EngineConfig,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, GgufSummary | None]:
    """Loads as the GPT-2 tutorial does, done right for batched serving: left padding, EOS
    as the pad token on the tokenizer and the model alike, eval mode. The third item is the
    GGUF file's summary when the model came from one."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model_kwargs: dict[str, Any] = {"dtype": dtype}
    if device.startswith("cuda"):
        # accelerate places the weights (and shards a model too large for one GPU).
        model_kwargs["device_map"] = "auto" if device == "cuda" else device
    problem = local_model_problem(config.model)
    if problem is not None:  # a missing directory, not a Hub name: say so, skip the Hub
        raise ModelLoadError(problem)
    gguf = gguf_file_of(config.model)
    source, summary, from_file = config.model, None, {}
    if gguf is not None:
        summary = read_gguf(gguf)
        source, from_file = str(gguf.parent), {"gguf_file": gguf.name}
    try:
        # The cache first: an offline machine must not spend a minute on Hub retries.
        local_only = os.path.isdir(source) or _in_hub_cache(source)
        if not local_only:
            check_hub_reachable()
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            padding_side="left",
            local_files_only=local_only,
            **from_file,
        )
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=local_only, **from_file, **model_kwargs
        )
    except Exception as err:  # OSError, ValueError, SafetensorError (a corrupt file), ...
        raise ModelLoadError(_load_failure_message(config.model, err)) from err
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"model {config.model!r}: its tokenizer has no EOS token")
    # GPT-2 has no pad token: pad with EOS, on the tokenizer and on the model alike.
    tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.eos_token_id
    if summary is not None and summary.end_of_turn_token_ids:
        # A chat model's turn may end on a token other than EOS (Llama 3's <|eot_id|>):
        # every one the file names ends a row.
        model.generation_config.eos_token_id = sorted(
            {int(tokenizer.eos_token_id), *summary.end_of_turn_token_ids}
        )
    if "device_map" not in model_kwargs:
        model.to(torch.device(device))  # type: ignore[arg-type]
    model.eval()
    if config.pack_weights:
        pack_linears(model)  # float32 on CPU only; anything else is left as it is
    return model, tokenizer, summary


def _in_hub_cache(model: str) -> bool:
    try:
        AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def _load_failure_message(model: str, err: Exception) -> str:
    """One line (newlines in library messages included) saying what failed and what to do."""
    reason = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, OSError):
        reason = f"{type(err).__name__}: {reason}"
    if os.path.isfile(model) or os.path.isdir(model):
        if type(err).__name__ == "SafetensorError":  # safetensors' own; not imported here
            reason += " (a weights file is truncated or corrupt: copy or save it again)"
        kind = "file" if os.path.isfile(model) else "directory"
        return f"could not load the model from the {kind} {model!r}: {reason}"
    return hub_failure_message(model, reason)
