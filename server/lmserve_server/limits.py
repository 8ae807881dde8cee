"""Limits that more than one part of the server reads: the request validator, which refuses
a request over them with a message naming the setting, and the schedulers and buffers that
are sized by them. Each has its one definition here, so the two sides can't disagree."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve_server.errors import InvalidArgumentError

# The most logprobs (top alternatives per token) a request may ask for, as OpenAI allows:
# the validator's limit and the width of the runner's download buffer alike.
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class RequestTokenLimit:
    """The most tokens (prompt + max_new_tokens) one request may hold, and the setting that
    decides it (``Capacity.request_tokens``); 0 tokens: any length up to the context."""

    tokens: int = 0
    flag: str = "--max-batch-tokens"

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raises InvalidArgumentError when the request could never be scheduled."""
        total = prompt_tokens + max_new_tokens
        if self.tokens and total > self.tokens:
            raise InvalidArgumentError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                f"exceeds the server's limit of {self.tokens} tokens per request ({self.flag})"
            )
