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

from lmserve_server import cli
from lmserve_server.engine import model
from lmserve_server.engine.rows import Row
from lmserve_server.engine.types import FinishReason, GenerationOutput


class StaticEngine(model.Engine):
    """``Engine`` whose every row generates the batch's largest ``max_new_tokens``."""

    MARKER = "static batching engine loaded"

    @classmethod
    def load(cls, *args: Any, **kwargs: Any) -> model.Engine:
        loaded = super().load(*args, **kwargs)
        # The harness checks for this line, so a refactored CLI that stops loading the
        # model through lmserve_server.engine.model.Engine can't silently benchmark lmserve
        # twice.
        print(cls.MARKER, file=sys.stderr, flush=True)
        return loaded

    def generate_batch(self, rows: Sequence[Row]) -> list[GenerationOutput | Exception]:
        longest = max(r.request.max_new_tokens for r in rows)
        padded = [self.new_row(replace(r.request, max_new_tokens=longest)) for r in rows]
        outcomes = super().generate_batch(padded)
        return [self._cut(o, r.request.max_new_tokens) for o, r in zip(outcomes, rows, strict=True)]

    def _cut(
        self, outcome: GenerationOutput | Exception, limit: int
    ) -> GenerationOutput | Exception:
        if isinstance(outcome, Exception) or len(outcome.token_ids) <= limit:
            return outcome
        tokens = outcome.token_ids[:limit]
        return GenerationOutput(tokens, self.decode(tokens), FinishReason.LENGTH)


if __name__ == "__main__":
    # The CLI looks Engine up in lmserve_server.engine.model when it loads the model, so
    # this one assignment makes `serve` load a StaticEngine (Engine.load is a classmethod).
    model.Engine = StaticEngine  # type: ignore[misc]
    sys.exit(cli.main(sys.argv[1:]))
