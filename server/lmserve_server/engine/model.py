"""``Engine``: a loaded model and its tokenizer, and what the rest of the daemon asks of them.

It knows nothing of gRPC or queues. The static scheduler calls ``generate_batch`` (one
``generate`` per batch, ``static.py``); the continuous scheduler builds a ``ModelRunner``
over a ``KVCache`` (``continuous_runner``). Both make their rows with ``new_row``, so every
per-row rule (``rows.py``) is the same in both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmserve_server.config import EngineConfig
from lmserve_server.engine.kv_cache import KVCache, KVCacheShape
from lmserve_server.engine.loading import load_model
from lmserve_server.engine.packing import ROW_BUCKETS, warm_up_packed
from lmserve_server.engine.prefix_cache import BLOCK
from lmserve_server.engine.rows import DeltaSink, Row
from lmserve_server.engine.runner import ModelRunner
from lmserve_server.engine.static import generate_batch
from lmserve_server.engine.types import GenerationOutput, GenerationRequest
from lmserve_server.gguf_file import GgufSummary

log = logging.getLogger(__name__)


class Engine:
    """A loaded model and tokenizer. Not thread-safe: the daemon's engine thread uses it."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        gguf: GgufSummary | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        # The GGUF file the weights were dequantized from; None for a transformers checkpoint.
        self.gguf = gguf
        self.eos_token_id: int = int(tokenizer.eos_token_id)
        # Every token that ends a sequence: the tokenizer's EOS and the checkpoint's (some
        # models end on any of several).
        configured = model.generation_config.eos_token_id
        configured = configured if isinstance(configured, list) else [configured]
        self.end_token_ids = frozenset(
            {self.eos_token_id, *(int(t) for t in configured if t is not None)}
        )
        embeddings: Any = model.get_input_embeddings()
        self.input_device: torch.device = embeddings.weight.device
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(
            getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        )
        self.kv_shape = KVCacheShape.of(model.config, model.dtype)

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        model, tokenizer, gguf = load_model(config)
        engine = cls(model, tokenizer, config.model, gguf)
        log.info(
            "loaded %s%s on %s as %s (context %d tokens)",
            config.model,
            f" ({gguf.architecture}, {gguf.file_type} GGUF, dequantized)" if gguf else "",
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

    # ---- text ---------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, tokens: Sequence[int]) -> str:
        # No clean-up of spaces: it looks across token boundaries, which incremental
        # decoding can't, and a stream's text must equal the unary text.
        return str(
            self.tokenizer.decode(
                list(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def new_row(self, request: GenerationRequest, on_delta: DeltaSink | None = None) -> Row:
        """The live state of ``request`` inside the engine (``rows.py``)."""
        return Row(request, decode=self.decode, end_token_ids=self.end_token_ids, on_delta=on_delta)

    # ---- running --------------------------------------------------------------------------------

    def generate_batch(self, rows: Sequence[Row]) -> list[GenerationOutput | Exception]:
        """One ``generate`` for the rows that still need tokens (``static.py``)."""
        return generate_batch(
            self.model,
            rows,
            pad_token_id=self.eos_token_id,
            device=self.input_device,
            vocab=self.vocab_size,
            end_token_ids=self.end_token_ids,
        )

    def continuous_runner(
        self,
        *,
        slots: int,
        kv_tokens: int,
        max_step_tokens: int,
        fixed_shapes: bool = False,
        staged: bool = False,
        prefix_cache_tokens: int = 0,
    ) -> ModelRunner:
        """A ``ModelRunner`` over a new ``KVCache``: a pool of ``kv_tokens`` for at most
        ``slots`` rows at once, each at most the model's context, with a prefix cache of at
        most ``prefix_cache_tokens`` of the pool's blocks (0: none)."""
        cache = KVCache(
            self.kv_shape,
            slots=slots,
            tokens=kv_tokens,
            device=self.input_device,
            row_tokens=self.max_context,
            prefix_tokens=prefix_cache_tokens,
        )
        log.info(
            "KV cache: %d tokens in %d blocks of %d, for up to %d rows of up to %d tokens "
            "(%.1f MB)",
            cache.tokens,
            cache.blocks,
            BLOCK,
            slots,
            cache.row_tokens,
            cache.nbytes / 2**20,
        )
        if cache.prefixes is not None:
            log.info(
                "prefix cache: up to %d tokens of the KV cache's blocks",
                cache.prefixes.index.capacity * BLOCK,
            )
        return ModelRunner(
            self.model,
            cache,
            vocab=self.vocab_size,
            end_token_ids=self.end_token_ids,
            max_step_tokens=max_step_tokens,
            fixed_shapes=fixed_shapes,
            staged=staged,
        )

    def warm_up_rows(self) -> list[Row]:
        """Two short requests of unlike lengths (a padded batch, a chunk of each kind), for a
        scheduler to run before it serves, so the first real request pays no set-up."""
        requests = [
            GenerationRequest(prompt_ids=tuple(self.tokenize(text)), max_new_tokens=2)
            for text in ("Hello", "Hello World")
        ]
        return [self.new_row(r) for r in requests]

    def warm_up_kernels(self) -> None:
        """Every kernel of the packed layers compiled now (``packing.warm_up_packed``), so the
        memory they hold is held from the start instead of growing under load."""
        kinds = warm_up_packed(self.model)
        if kinds:
            log.info(
                "compiled the packed layers' kernels: %d shapes x %d row counts",
                kinds,
                len(ROW_BUCKETS),
            )

    def warm_up(self) -> None:
        """The kernels, then one padded batch through ``generate`` (the static scheduler's
        engine)."""
        self.warm_up_kernels()
        self.generate_batch(self.warm_up_rows())
