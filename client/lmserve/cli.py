"""``lmserve-client``: the command line of the lmserve client (generate, tokenize, info,
health).

Each subcommand is a registrar ``add_parser(subparsers, common)`` that adds its parser
(with ``parents=[common]`` for ``--target``/``--timeout``) and sets ``handler``, a function
``(args) -> exit code``. A command from another module (e.g. ``bench``) is added by
appending its registrar in ``_registrars()``; it can build its client from ``args.target``
and ``args.timeout`` (see ``client_from_args``). ``main`` turns ``LmserveError`` into one
``error: CODE: details`` line and exit code 1, and Ctrl-C into exit code 130. With
``--wait SECONDS`` (every subcommand), ``main`` first waits for the daemon to report SERVING,
so a command can follow ``lmserve serve &`` at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeAlias

from lmserve import __version__
from lmserve.argtypes import (
    chat_message,
    json_schema_file,
    logit_bias,
    messages_file,
    non_negative_int,
    text_file,
    token_ids,
)
from lmserve.client import Client
from lmserve.errors import LmserveError, UnimplementedError
from lmserve.health import SERVICE, SERVING
from lmserve.structured import (
    Choice,
    Grammar,
    JsonObject,
    JsonSchema,
    Regex,
    StructuredOutput,
)
from lmserve.types import GenerationResult, Prompt, StreamChunk

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 60.0

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Registrar: TypeAlias = Callable[[Subparsers, argparse.ArgumentParser], None]
Handler: TypeAlias = Callable[[argparse.Namespace], int]


def _timeout(value: str) -> float | None:
    """``--timeout``: seconds; 0 means no deadline."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return seconds or None


def _wait_seconds(value: str) -> float:
    """``--wait``: seconds, 0 for not waiting."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return seconds


def common_parser() -> argparse.ArgumentParser:
    """The options every subcommand takes, as a parent parser."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--target",
        metavar="HOST:PORT",
        # Read when the parser is built (in main), so the environment of the call counts.
        default=os.environ.get("LMSERVE_TARGET", DEFAULT_TARGET),
        help="daemon address (default: $LMSERVE_TARGET, else %(default)s)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_timeout,
        # A string default goes through `type`, so a bad $LMSERVE_TIMEOUT is reported
        # like a bad --timeout instead of failing later.
        default=os.environ.get("LMSERVE_TIMEOUT", str(DEFAULT_TIMEOUT_S)),
        help="deadline of each call in seconds, 0 for none "
        f"(default: $LMSERVE_TIMEOUT, else {DEFAULT_TIMEOUT_S:g})",
    )
    group.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_wait_seconds,
        default=0.0,
        help="first wait up to SECONDS for the daemon to report SERVING (grpc.health.v1), "
        "e.g. while it starts and loads its model; then fail with exit code 1 "
        "(default: 0, no waiting)",
    )
    security = common.add_argument_group("security")
    # Client-side names (LMSERVE_CLIENT_*) so a shell holding the daemon's LMSERVE_TLS_CERT
    # does not send the server's certificate as a client certificate.
    for flag, env, what in (
        ("--tls-ca", "LMSERVE_CLIENT_TLS_CA", "PEM CA to verify the daemon with; turns TLS on"),
        ("--tls-cert", "LMSERVE_CLIENT_TLS_CERT", "PEM client certificate (mutual TLS)"),
        ("--tls-key", "LMSERVE_CLIENT_TLS_KEY", "PEM private key of --tls-cert"),
        ("--token", "LMSERVE_TOKEN", "bearer token sent as 'authorization: Bearer <token>'"),
    ):
        metavar = "TOKEN" if flag == "--token" else "PATH"
        default = os.environ.get(env) or None
        security.add_argument(flag, metavar=metavar, default=default, help=f"{what} (${env})")
    return common


def client_from_args(args: argparse.Namespace) -> Client:
    """A ``Client`` for the connection and security options of a parsed command line."""
    return Client(
        args.target,
        timeout=args.timeout,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=args.token,
    )


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False))


# --- generate ---------------------------------------------------------------------------


def _add_generate(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "generate",
        parents=[common],
        help="generate a continuation of a prompt",
        description="Generate a continuation of PROMPT and print it (the prompt is not repeated).",
        epilog=(
            "examples:\n"
            "  lmserve-client generate 'Once upon a time' --max-new-tokens 32\n"
            "  lmserve-client generate 'def fib(n):' --stream --stop $'\\n\\n'\n"
            "  echo 'Hello' | lmserve-client generate - --temperature 0.8 --seed 1 --json\n"
            "  lmserve-client generate --token-ids 15496,2159 --logprobs 5 --json\n"
            "  lmserve-client generate 'Say yes' --logit-bias 3763=5 --repetition-penalty 1.3\n"
            "  lmserve-client generate --message user='Name a colour' --choice red --choice blue\n"
            "  lmserve-client generate 'A user record:' --json-schema user.schema.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "prompt", metavar="PROMPT", nargs="?", help="the text to continue; - reads stdin"
    )
    sampling = parser.add_argument_group("generation")
    sampling.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=non_negative_int,
        default=0,
        help="most tokens to generate (default: 0, the server's default)",
    )
    sampling.add_argument(
        "--temperature", metavar="T", type=float, help="sampling temperature; unset or 0 is greedy"
    )
    sampling.add_argument(
        "--top-p", metavar="P", type=float, help="nucleus sampling mass, in (0, 1]"
    )
    sampling.add_argument(
        "--top-k", metavar="K", type=non_negative_int, help="sample from the K likeliest only"
    )
    sampling.add_argument(
        "--min-p",
        metavar="P",
        type=float,
        help="keep tokens at least P times as likely as the likeliest, in [0, 1]",
    )
    sampling.add_argument(
        "--seed",
        metavar="N",
        type=non_negative_int,
        help="sampling seed, for reproducible samples",
    )
    sampling.add_argument(
        "--stop",
        metavar="S",
        action="append",
        default=[],
        help="end when S is produced; the text is cut before it (repeatable)",
    )
    sampling.add_argument(
        "--token-ids",
        metavar="IDS",
        type=token_ids,
        help="the prompt as token ids (15496,2159) instead of PROMPT",
    )
    sampling.add_argument(
        "--stop-token-id",
        metavar="ID",
        type=non_negative_int,
        action="append",
        default=[],
        help="end at this token, which is not returned (repeatable)",
    )
    sampling.add_argument(
        "--min-new-tokens",
        metavar="N",
        type=non_negative_int,
        help="no end-of-sequence or stop token before N tokens",
    )
    sampling.add_argument(
        "--repetition-penalty",
        metavar="R",
        type=float,
        help="> 0: divides the positive logits (multiplies the negative) of seen tokens",
    )
    sampling.add_argument(
        "--presence-penalty", metavar="P", type=float, help="in [-2, 2], once per seen token"
    )
    sampling.add_argument(
        "--frequency-penalty", metavar="F", type=float, help="in [-2, 2], per occurrence"
    )
    sampling.add_argument(
        "--logit-bias",
        metavar="ID=B",
        type=logit_bias,
        action="append",
        default=[],
        help="add B (in [-100, 100]) to token ID's logit (repeatable)",
    )
    sampling.add_argument(
        "--logprobs",
        metavar="N",
        type=non_negative_int,
        help="return each token's logprob and its N likeliest alternatives (--json shows them)",
    )
    sampling.add_argument(
        "--cache-salt",
        metavar="SALT",
        help="share cached prompt prefixes only with requests sending the same SALT "
        "(one per tenant); --json shows cached_prompt_tokens",
    )
    _add_structured_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--stream", action="store_true", help="print the text as it is produced")
    output.add_argument(
        "--json",
        action="store_true",
        help="print the whole result as JSON (with --stream: one JSON object per chunk)",
    )
    parser.set_defaults(handler=_run_generate)


def _add_structured_arguments(parser: argparse.ArgumentParser) -> None:
    chat = parser.add_argument_group("chat (instead of PROMPT)")
    chat.add_argument(
        "--message",
        metavar="ROLE=CONTENT",
        type=chat_message,
        action="append",
        default=[],
        help="a message of the conversation, rendered by the model's chat template "
        "(repeatable, in order, after those of --messages): --message system='Be brief' "
        "--message user=Hi",
    )
    chat.add_argument(
        "--messages",
        metavar="FILE",
        type=messages_file,
        help='the conversation as a JSON list of {"role": ..., "content": ...}; - reads stdin',
    )
    group = parser.add_argument_group("structured output (one of them)")
    formats = group.add_mutually_exclusive_group()
    formats.add_argument(
        "--json-schema",
        metavar="FILE",
        type=json_schema_file,
        help="the output is compact JSON valid under this JSON Schema file",
    )
    formats.add_argument(
        "--json-object", action="store_true", help="the output is a compact JSON object"
    )
    formats.add_argument("--regex", metavar="PATTERN", help="the output matches PATTERN")
    formats.add_argument(
        "--choice",
        metavar="OPTION",
        action="append",
        help="the output is exactly one of the options (repeatable)",
    )
    formats.add_argument(
        "--grammar",
        metavar="FILE",
        type=text_file,
        help="the output is a sentence of this grammar (llguidance's Lark-like EBNF)",
    )


def _structured_output(args: argparse.Namespace) -> StructuredOutput | None:
    if args.json_schema is not None:
        return JsonSchema(args.json_schema)
    if args.json_object:
        return JsonObject()
    if args.regex is not None:
        return Regex(args.regex)
    if args.choice:
        return Choice(args.choice)
    if args.grammar is not None:
        return Grammar(args.grammar)
    return None


def _run_generate(args: argparse.Namespace) -> int:
    messages = [*(args.messages or ()), *args.message]
    given = sum((args.prompt is not None, args.token_ids is not None, bool(messages)))
    if given != 1:
        print(
            "lmserve-client generate: give PROMPT or --token-ids or --message/--messages "
            "(one of them)",
            file=sys.stderr,
        )
        return 2
    prompt: Prompt = (
        messages or args.token_ids or (sys.stdin.read() if args.prompt == "-" else args.prompt)
    )
    sampling: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "seed": args.seed,
        "stop": args.stop,
        "stop_token_ids": args.stop_token_id,
        "min_new_tokens": args.min_new_tokens,
        "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "logit_bias": dict(args.logit_bias),
        "logprobs": args.logprobs,
        "structured_output": _structured_output(args),
        "cache_salt": args.cache_salt,
    }
    with client_from_args(args) as client:
        if not args.stream:
            _print_result(client.generate(prompt, **sampling), as_json=args.json)
            return 0
        printed_any = False
        try:
            for chunk in client.stream(prompt, **sampling):
                _print_chunk(chunk, as_json=args.json)
                printed_any = True
        except UnimplementedError:
            # Only retry when nothing was shown yet; mid-stream it would repeat text.
            if printed_any:
                raise
            print(
                "note: the server does not implement streaming; using a unary generate",
                file=sys.stderr,
            )
            result = client.generate(prompt, **sampling)
            if args.json:
                # Keep the one-object-per-chunk shape a --stream --json reader expects.
                last = StreamChunk(  # the result's fields, all a last chunk has
                    **{f.name: getattr(result, f.name) for f in dataclasses.fields(StreamChunk)}
                )
                _print_json(_chunk_json(last))
            else:
                print(result.text)
            return 0
        finally:
            # End the streamed line, also when an error or Ctrl-C cut it short, so the
            # shell prompt or the error line starts on a line of its own.
            if printed_any and not args.json:
                print(flush=True)
    return 0


def _print_result(result: GenerationResult, *, as_json: bool) -> None:
    if as_json:
        _print_json(result.to_dict())
    else:
        print(result.text)


# How a request was served: known only at its end, so only the last chunk carries them.
_USAGE_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "batch_size",
    "queue_ms",
    "compute_ms",
    "cached_prompt_tokens",
)


def _chunk_json(chunk: StreamChunk) -> dict[str, Any]:
    """A chunk as JSON: the text, ids and logprobs, and on the last chunk only (the one with
    a finish reason) the usage fields, which on the others would read as zeros."""
    fields = chunk.to_dict()
    if chunk.finish_reason is None:
        for name in _USAGE_FIELDS:
            fields.pop(name, None)
    return fields


def _print_chunk(chunk: StreamChunk, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_chunk_json(chunk), ensure_ascii=False), flush=True)
    else:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()


# --- tokenize ---------------------------------------------------------------------------


def _add_tokenize(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "tokenize",
        parents=[common],
        help="print the token ids of a text",
        description="Print the token ids of TEXT under the served model's tokenizer, "
        "space-separated (no special tokens are added).",
    )
    parser.add_argument("text", metavar="TEXT", help="the text to tokenize; - reads stdin")
    parser.add_argument("--json", action="store_true", help="print the ids as a JSON list")
    parser.set_defaults(handler=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    with client_from_args(args) as client:
        ids = client.tokenize(text)
    if args.json:
        _print_json(ids)
    else:
        print(" ".join(map(str, ids)))
    return 0


# --- info -------------------------------------------------------------------------------


def _add_info(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "info",
        parents=[common],
        help="show the served model and the batching settings",
        description="Show the served model, where it runs, and the server's batching settings.",
    )
    parser.add_argument("--json", action="store_true", help="print the info as JSON")
    parser.set_defaults(handler=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        info = client.model_info().to_dict()
    if args.json:
        _print_json(info)
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


# --- health -----------------------------------------------------------------------------


def _add_health(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "health",
        parents=[common],
        help="print the daemon's health status; exit 0 only when SERVING",
        description="Ask the daemon's grpc.health.v1 service for the status of SERVICE and "
        "print it (SERVING once the model is loaded and warm, NOT_SERVING while it drains). "
        "Exit status 0 when SERVING, 1 otherwise, so it serves as a container's health check.",
        epilog="examples:\n"
        "  lmserve-client health\n"
        "  lmserve-client health --wait 120   # e.g. in a start-up script",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--service",
        metavar="NAME",
        default=SERVICE,
        help="the service to ask about; '' for the server as a whole (default: %(default)s)",
    )
    parser.set_defaults(handler=_run_health)


def _run_health(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == SERVING else 1


# --- main -------------------------------------------------------------------------------


def _registrars() -> list[Registrar]:
    # Commands from other modules are imported here rather than at the top, so that
    # they may import helpers (client_from_args, common_parser) from this module.
    from lmserve import bench

    return [_add_generate, _add_tokenize, _add_info, _add_health, bench.add_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``lmserve-client`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="lmserve-client",
        description="Talk to an lmserve daemon: generate text, tokenize, show the model, "
        "check its health.",
        epilog="Run 'lmserve-client COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    common = common_parser()
    for register in _registrars():
        register(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lmserve-client`` with ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        if args.wait > 0:
            with client_from_args(args) as client:
                # `health --service NAME --wait` waits for that service; the rest for ours.
                client.wait_serving(args.wait, service=getattr(args, "service", SERVICE))
        return handler(args)
    except LmserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
