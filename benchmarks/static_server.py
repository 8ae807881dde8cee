"""The baseline of benchmark 4: lmserve's daemon with a plain *static* batcher's engine.

A static batcher pads every request of a batch to the batch's longest: the prompts to the
longest prompt (left padding, as lmserve does) and the generation to the largest
``max_new_tokens`` of the batch, every row running every step; each caller then gets its
own ``max_new_tokens`` worth of tokens cut from its row. Everything else (gRPC, the
queue, the batch-forming policy, the flags) is lmserve's, so the comparison isolates the
engine. Run it exactly like ``lmserve``: ``python benchmarks/static_server.py serve ...``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lmserve_server import cli, engine
from lmserve_server.types import FinishReason, GenerationOutput, GenerationRequest


class StaticEngine(engine.Engine):
    """``Engine`` whose every row generates the batch's largest ``max_new_tokens``."""

    MARKER = "static batching engine loaded"

    @classmethod
    def load(cls, *args: Any, **kwargs: Any) -> engine.Engine:
        loaded = super().load(*args, **kwargs)
        # The harness checks for this line, so a refactored CLI that stops loading the
        # model through lmserve_server.engine.Engine can't silently benchmark lmserve twice.
        print(cls.MARKER, file=sys.stderr, flush=True)
        return loaded

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        longest = max(r.max_new_tokens for r in requests)
        padded = [replace(r, max_new_tokens=longest) for r in requests]
        outputs = super().generate_batch(padded)
        return [self._cut(o, r) for o, r in zip(outputs, requests, strict=True)]

    def _cut(self, output: GenerationOutput, request: GenerationRequest) -> GenerationOutput:
        if len(output.token_ids) <= request.max_new_tokens:
            return output
        tokens = output.token_ids[: request.max_new_tokens]
        return GenerationOutput(tokens, self.decode(tokens), FinishReason.LENGTH)


if __name__ == "__main__":
    # The CLI looks Engine up in lmserve_server.engine when it loads the model, so this
    # one assignment makes `serve` load a StaticEngine (Engine.load is a classmethod).
    engine.Engine = StaticEngine
    sys.exit(cli.main(sys.argv[1:]))
