"""The model engine: loads a causal LM with its tokenizer and runs one ``generate`` per batch.

It knows nothing of gRPC or queues. Batches are left-padded with the EOS token and always
passed an explicit attention mask: GPT-2 has no pad token, and with pad == eos a mask
inferred from the ids would hide real EOS tokens; right padding (as GPT-2 tutorials often
show) would put pad tokens between a prompt and its continuation. Left padding plus the
mask (from which ``generate`` derives position ids) keeps a row's greedy tokens independent
of what it was batched with.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteriaList,
)

# EngineConfig lives in the torch-free config module; imported here under its old name too.
from lmserve_server.config import EngineConfig
from lmserve_server.errors import ModelLoadError, OutOfMemoryError
from lmserve_server.modelpath import local_model_problem
from lmserve_server.packing import pack_linears
from lmserve_server.rows import RowSampler, RowStopping, RowStreamer
from lmserve_server.types import FinishReason, GenerationOutput, GenerationRequest

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


class Engine:
    """A loaded model and tokenizer; ``generate_batch`` is blocking and not thread-safe."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.eos_token_id: int = int(tokenizer.eos_token_id)
        embeddings: Any = model.get_input_embeddings()
        self.input_device: torch.device = embeddings.weight.device
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(
            getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        )

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Loads as the GPT-2 tutorial does, done right for batched serving."""
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        model_kwargs: dict[str, Any] = {"dtype": dtype}
        if device.startswith("cuda"):
            # accelerate places the weights (and shards a model too large for one GPU).
            model_kwargs["device_map"] = "auto" if device == "cuda" else device
        problem = local_model_problem(config.model)
        if problem is not None:  # a missing directory, not a Hub name: say so, skip the Hub
            raise ModelLoadError(problem)
        try:
            # The cache first: an offline machine must not spend a minute on Hub retries.
            local_only = os.path.isdir(config.model) or _in_hub_cache(config.model)
            if not local_only:
                _check_hub_reachable(config.model)
            tokenizer = AutoTokenizer.from_pretrained(
                config.model, padding_side="left", local_files_only=local_only
            )
            model = AutoModelForCausalLM.from_pretrained(
                config.model, local_files_only=local_only, **model_kwargs
            )
        except Exception as err:  # OSError, ValueError, SafetensorError (a corrupt file), ...
            raise ModelLoadError(_load_failure_message(config.model, err)) from err
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"model {config.model!r}: its tokenizer has no EOS token")
        # GPT-2 has no pad token: pad with EOS, on the tokenizer and on the model alike.
        tokenizer.pad_token = tokenizer.eos_token
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.eos_token_id
        if "device_map" not in model_kwargs:
            model.to(torch.device(device))  # type: ignore[arg-type]
        model.eval()
        if config.pack_weights:
            pack_linears(model)  # float32 on CPU only; anything else is left as it is
        engine = cls(model, tokenizer, config.model)
        log.info(
            "loaded %s on %s as %s (context %d tokens)",
            config.model,
            engine.device,
            engine.dtype,
            engine.max_context,
        )
        return engine

    @property
    def device(self) -> str:
        return str(self.input_device)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def warm_up(self) -> None:
        """One padded batch through ``generate`` so the first real request pays no set-up."""
        self.generate_batch(
            [
                GenerationRequest(prompt_ids=tuple(self.tokenize("Hello")), max_new_tokens=2),
                GenerationRequest(prompt_ids=tuple(self.tokenize("Hello World")), max_new_tokens=2),
            ]
        )

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """Runs one ``generate`` for the whole batch; every row keeps its own settings."""
        input_ids, attention_mask = self._left_pad([r.prompt_ids for r in requests])  # (B, T)
        prompt_len = input_ids.shape[1]
        stopping = RowStopping(prompt_len, requests, self.tokenizer, self.input_device)
        sampler = RowSampler(requests, self.input_device)
        streamer = RowStreamer(requests, self.eos_token_id)
        max_new_tokens = max(r.max_new_tokens for r in requests)
        try:
            with torch.inference_mode():
                output = self.model.generate(  # type: ignore[operator]
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,  # greedy argmax; RowSampler already sampled sampling rows
                    pad_token_id=self.eos_token_id,
                    eos_token_id=self.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([stopping]),
                    logits_processor=LogitsProcessorList([sampler] if sampler.active else []),
                    streamer=streamer if streamer.active else None,
                )
        except torch.OutOfMemoryError as err:
            # Give the cached blocks back before the batcher retries smaller halves.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"out of device memory for {len(requests)} row(s) of {prompt_len} prompt + "
                f"{max_new_tokens} new tokens"
            ) from err
        new_tokens = output[:, prompt_len:].tolist()  # (B, N)
        return [self.finish_row(row, r) for row, r in zip(new_tokens, requests, strict=True)]

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = [[self.eos_token_id] * (width - len(p)) + list(p) for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        return (
            torch.tensor(ids, dtype=torch.long, device=self.input_device),
            torch.tensor(mask, dtype=torch.long, device=self.input_device),
        )

    def finish_row(self, tokens: list[int], request: GenerationRequest) -> GenerationOutput:
        """Cuts a row to its own limit, its first EOS, or its first stop string."""
        tokens = tokens[: request.max_new_tokens]
        reason = FinishReason.LENGTH
        if self.eos_token_id in tokens:
            tokens = tokens[: tokens.index(self.eos_token_id)]
            reason = FinishReason.EOS
        text = self.decode(tokens)
        if request.stop:
            cut = _earliest_stop(text, request.stop)
            if cut is not None:
                text = text[:cut]
                tokens = self._tokens_through_stop(tokens, request.stop)
                reason = FinishReason.STOP
        return GenerationOutput(token_ids=tuple(tokens), text=text, finish_reason=reason)

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def _tokens_through_stop(self, tokens: list[int], stops: Sequence[str]) -> list[int]:
        """The shortest prefix of ``tokens`` whose text shows a stop string.

        Searched from the end: generation stops a token or so after the stop string appears.
        """
        end = len(tokens)
        while end > 1 and _earliest_stop(self.decode(tokens[: end - 1]), stops) is not None:
            end -= 1
        return tokens[:end]


def _earliest_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _in_hub_cache(model: str) -> bool:
    try:
        AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def _check_hub_reachable(model: str, timeout_s: float = 3.0) -> None:
    """Fails at once when the Hub can't be reached, instead of after its retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise OSError("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise OSError(
            f"it is not in the Hugging Face cache and {host} can't be reached ({err})"
        ) from err


def _load_failure_message(model: str, err: Exception) -> str:
    """One line (newlines in library messages included) saying what failed and what to do."""
    reason = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, OSError):
        reason = f"{type(err).__name__}: {reason}"
    if os.path.isdir(model):
        if type(err).__name__ == "SafetensorError":  # safetensors' own; not imported here
            reason += " (a weights file is truncated or corrupt: copy or save it again)"
        return f"could not load the model from the directory {model!r}: {reason}"
    return (
        f"could not load model {model!r}: {reason}. "
        "If this machine is offline, the weights must already be in the Hugging Face cache "
        f"(fetch them on a connected machine with `hf download {model}`, then copy "
        "~/.cache/huggingface) or --model must name a local directory saved with "
        "save_pretrained. To try lmserve offline: `lmserve make-test-model ./tiny-gpt2` "
        "then `lmserve serve --model ./tiny-gpt2`."
    )
