"""The daemon's settings, frozen dataclasses filled by the CLI (flags or LMSERVE_* env vars).

Nothing here imports torch: ``lmserve --help`` and a client-only install must not need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULERS = ("static", "continuous")
CHAT_SPECIAL_TOKENS = ("parse", "literal")

# Settings whose flag is not --<field name with dashes>, or that have two ways in.
_FLAGS = {"drain_timeout_s": "--drain-timeout"}
_SETTINGS = {"auth_token": "--auth-token-file (LMSERVE_AUTH_TOKEN_FILE) or LMSERVE_AUTH_TOKEN"}


def setting(name: str) -> str:
    """How an operator sets the field ``name``: its flag and its environment variable."""
    if name in _SETTINGS:
        return _SETTINGS[name]
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    return f"{flag} ({env_name(flag)})"


def env_name(flag: str) -> str:
    """The environment variable that sets ``flag``: ``--max-batch-size`` is
    ``LMSERVE_MAX_BATCH_SIZE``."""
    return "LMSERVE_" + flag.removeprefix("--").replace("-", "_").upper()


@dataclass(frozen=True)
class EngineConfig:
    """What ``Engine.load`` loads, and how (plain data: no torch here, so ``lmserve --help``
    stays fast)."""

    model: str = "gpt2"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32
    pack_weights: bool = True  # prepack linear weights for oneDNN (float32 on CPU only)


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 50051
    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 1024
    default_max_new_tokens: int = 64
    max_new_tokens_cap: int = 1024
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_prompt_chars: int = 100_000  # refused before tokenizing
    scheduler: str = "static"  # static: one engine call per batch | continuous: per decode step
    # static: how a batch runs: generate (left-padded) | steps (the continuous runner's,
    # graphed on CUDA) | auto: steps on CUDA, generate elsewhere
    static_engine: str = "auto"
    group_similar: bool = True  # static: when more wait than fit, batch alike requests
    max_batch_tokens: int = (
        0  # static: padded (prompt + max_new_tokens) x rows per batch; 0 = no cap
    )
    max_step_tokens: int = 256  # continuous: tokens through the model per step (prefill chunks)
    kv_cache_tokens: int = 0  # continuous: KV cache size in tokens; 0 = by memory (below)
    kv_cache_memory: float = 0.5  # continuous on CUDA, with kv_cache_tokens 0: share of free memory
    kv_cache_host_memory: float = 0.03  # the same on a CPU: share of the host's memory
    cuda_graphs: bool = True  # continuous on CUDA: decode steps replayed as CUDA graphs
    # a capture that fails: False stops the start, True serves with eager decode steps
    allow_eager_fallback: bool = False
    # continuous (and static steps): keep prompt prefixes' keys and values for later requests
    prefix_cache: bool = True
    prefix_cache_tokens: int = 0  # the most of the KV cache the prefix cache keeps; 0 = all
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC's receive limit for one request
    drain_timeout_s: float = 30.0
    reflection: bool = True
    warm_up: bool = True
    log_format: str = "text"  # text | json
    metrics_port: int = 0  # Prometheus /metrics on metrics_host:metrics_port; 0 = off
    http_port: int = 0  # the OpenAI-compatible HTTP API on host:http_port; 0 = off
    served_model_name: str | None = None  # the HTTP API's model name; None = engine.model
    # Loopback unless asked: /metrics need not follow --host onto the network.
    metrics_host: str = "127.0.0.1"
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, the port speaks TLS
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA; clients must present a certificate it signed
    auth_token: str | None = field(default=None, repr=False)  # bearer token; None = no auth
    # Structured output: a compile that takes longer is INVALID_ARGUMENT; compiled grammars
    # (and refused ones) kept, least recently used out first.
    grammar_compile_timeout_s: float = 5.0
    grammar_cache_size: int = 256
    grammar_cache_memory: int = 512 * 1024 * 1024  # bytes the compiled grammars may hold
    # the most one token's mask may cost a row (CPU ms); over it the request is refused
    grammar_mask_budget_ms: float = 20.0
    chat_template: str | None = None  # a Jinja file replacing the model's chat template
    # special-token text inside chat messages: parse (control tokens, as vLLM and
    # transformers do) | literal (plain text: a message can't forge a turn)
    chat_special_tokens: str = "parse"

    def __post_init__(self) -> None:
        problems = [
            f"{setting(name)} {value!r}: {reason}" for name, value, reason in self._problems()
        ]
        if problems:
            raise ValueError("; ".join(problems))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    def _problems(self) -> list[tuple[str, object, str]]:
        """(field, its value, what is wrong with it) for each bad setting."""
        checks: list[tuple[str, bool, str]] = [
            ("max_batch_size", self.max_batch_size >= 1, "must be at least 1"),
            ("max_wait_ms", self.max_wait_ms >= 0, "must be 0 or more"),
            ("max_queue", self.max_queue >= 1, "must be at least 1"),
            ("max_new_tokens_cap", self.max_new_tokens_cap >= 1, "must be at least 1"),
            ("max_prompt_chars", self.max_prompt_chars >= 1, "must be at least 1"),
            ("max_batch_tokens", self.max_batch_tokens >= 0, "must be 0 (no limit) or more"),
            (
                "max_step_tokens",
                self.scheduler != "continuous" or self.max_step_tokens > self.max_batch_size,
                f"must exceed --max-batch-size ({self.max_batch_size}) with --scheduler "
                "continuous: a step first gives every running row its next token, then "
                "prefills prompts with what is left",
            ),
            ("kv_cache_tokens", self.kv_cache_tokens >= 0, "must be 0 (a full context) or more"),
            ("kv_cache_memory", 0.0 < self.kv_cache_memory <= 1.0, "must be in (0, 1]"),
            (
                "kv_cache_host_memory",
                0.0 < self.kv_cache_host_memory <= 1.0,
                "must be in (0, 1]",
            ),
            (
                "prefix_cache_tokens",
                self.prefix_cache_tokens >= 0,
                "must be 0 (a quarter of the KV cache's tokens) or more",
            ),
            ("scheduler", self.scheduler in SCHEDULERS, f"choose {' or '.join(SCHEDULERS)}"),
            (
                "static_engine",
                self.static_engine in ("auto", "generate", "steps"),
                "choose auto, generate or steps",
            ),
            ("max_message_bytes", self.max_message_bytes >= 1024, "must be at least 1024"),
            (
                "default_max_new_tokens",
                1 <= self.default_max_new_tokens <= self.max_new_tokens_cap,
                f"must be from 1 to --max-new-tokens-cap ({self.max_new_tokens_cap})",
            ),
            ("port", 0 <= self.port <= 65535, "must be from 0 (any free port) to 65535"),
            ("drain_timeout_s", self.drain_timeout_s >= 0, "must be 0 or more (seconds)"),
            ("log_format", self.log_format in ("text", "json"), "choose text or json"),
            ("metrics_port", 0 <= self.metrics_port <= 65535, "must be from 0 (off) to 65535"),
            ("http_port", 0 <= self.http_port <= 65535, "must be from 0 (off) to 65535"),
            (
                "grammar_compile_timeout_s",
                self.grammar_compile_timeout_s > 0,
                "must be more than 0 (seconds)",
            ),
            ("grammar_cache_size", self.grammar_cache_size >= 1, "must be at least 1"),
            (
                "grammar_cache_memory",
                self.grammar_cache_memory >= 1024 * 1024,
                "must be at least 1 MiB",
            ),
            (
                "grammar_mask_budget_ms",
                self.grammar_mask_budget_ms > 0,
                "must be more than 0 (milliseconds)",
            ),
            (
                "chat_special_tokens",
                self.chat_special_tokens in CHAT_SPECIAL_TOKENS,
                f"choose {' or '.join(CHAT_SPECIAL_TOKENS)}",
            ),
        ]
        problems = [(name, getattr(self, name), reason) for name, ok, reason in checks if not ok]
        if self.auth_token is not None and not self.auth_token.strip():
            problems.append(("auth_token", "", "the token is empty"))
        return problems

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
