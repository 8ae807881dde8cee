"""The engine core: everything that touches the model, free of gRPC and of queues.

- ``loading``: the model and tokenizer from disk or the Hugging Face cache;
- ``model``: ``Engine``, the loaded pair and what the daemon asks of it;
- ``rows``: ``Row``, one request's live state and every per-row rule (limits, stop strings,
  cancellation, streaming through ``detokenizer``);
- ``sampling``: every row's next token at once, per-row settings as tensors;
- ``kv_cache``: the continuous engine's KV cache, allocated once, a slot per row;
- ``attention``: the one adapter to transformers' internals, a packed step's attention;
- ``runner``: ``ModelRunner``, one continuous step from persistent buffers;
- ``static``: one ``generate`` per batch, its hooks adapters over ``rows`` and ``sampling``.
"""
