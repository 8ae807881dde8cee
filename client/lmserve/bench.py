"""``lmserve-client bench``: the bundled load tester of an lmserve daemon.

This module is the command line and the one-call API (``run_bench``); the load generator is
``bench_load``, the workloads and the Poisson schedule ``bench_workload``, the statistics
and the table ``bench_stats``, the optional PNG and its rolling throughput ``bench_plot``.
Only grpcio and protobuf are needed (matplotlib for ``--plot``). Exit status: 0 when every
request succeeded, 1 when any failed or the run was cut short (unreachable server, no
streaming), 2 on bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from lmserve.argtypes import non_negative_int, positive_float, positive_int
from lmserve.bench_load import LoadConfig, RunResult, run_load
from lmserve.bench_plot import check_available, plot_report
from lmserve.bench_stats import format_report
from lmserve.bench_workload import (
    ChatWorkload,
    FixedWorkload,
    MixedWorkload,
    Workload,
    load_prompts_file,
)

DEFAULT_PROMPT = "The future of AI is"
DEFAULT_REQUESTS = 100

__all__ = ["LoadConfig", "RunResult", "add_parser", "run", "run_bench"]


def run_bench(config: LoadConfig) -> RunResult:
    """Runs one bench (blocking) and returns its report and per-request records."""
    return asyncio.run(run_load(config))


def _range(value: str) -> tuple[int, int]:
    """``LOW:HIGH`` (inclusive), or ``N`` for exactly N."""
    low, _, high = value.partition(":")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH, got {value!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"need 1 <= LOW <= HIGH, got {value!r}")
    return pair


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Adds ``bench`` (with ``--target``/``--timeout`` from ``common``) to ``subparsers``."""
    parser = subparsers.add_parser(
        "bench",
        parents=[common],
        help="load-test a daemon: throughput, latency, batching",
        description="Send many Generate calls and report requests/s, generated tokens/s, "
        "latency percentiles, the daemon's queue_ms / compute_ms / batch_size distributions "
        "and errors by status code. Every call has the --timeout deadline.",
        epilog=(
            "examples:\n"
            "  lmserve-client bench --concurrency 16 --requests 200\n"
            "  lmserve-client bench --rate 4 --duration 60 --mixed --json out.json\n"
            "  lmserve-client bench --prompts-file prompts.jsonl --plot bench.png\n"
            "exit status: 0 all requests succeeded, 1 some failed or the run was cut "
            "short, 2 bad options"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        metavar="N",
        type=positive_int,
        default=8,
        help="closed loop: requests in flight (default: %(default)s); with --rate, how "
        "many warm-up requests go at once",
    )
    load.add_argument(
        "--rate", metavar="R", type=positive_float, help="open loop: Poisson arrivals, R req/s"
    )
    load.add_argument(
        "--requests",
        metavar="N",
        type=positive_int,
        help=f"stop after N requests (default: {DEFAULT_REQUESTS} unless --duration is set)",
    )
    load.add_argument(
        "--duration", metavar="S", type=positive_float, help="stop sending after S seconds"
    )
    load.add_argument(
        "--warmup",
        metavar="N",
        type=non_negative_int,
        help="uncounted requests first (default: the concurrency; 1 with --rate)",
    )
    load.add_argument(
        "--seed",
        metavar="N",
        type=non_negative_int,
        default=0,
        help="seed of the arrival schedule and the mixed workload (default: 0)",
    )
    work = parser.add_argument_group("workload (one of --prompt, --prompts-file, --mixed)")
    source = work.add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT", help=f"one fixed prompt ({DEFAULT_PROMPT!r})")
    source.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="one prompt a line; *.jsonl: objects with prompt and optional max_new_tokens",
    )
    source.add_argument(
        "--mixed", action="store_true", help="random prompt lengths and max_new_tokens (seeded)"
    )
    work.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=non_negative_int,
        default=32,
        help="per request, unless the JSONL line says (default: %(default)s; 0: server's)",
    )
    work.add_argument(
        "--prompt-tokens",
        metavar="LOW:HIGH",
        type=_range,
        default=(8, 128),
        help="--mixed: prompt length range in GPT-2 tokens (default: 8:128)",
    )
    work.add_argument(
        "--new-tokens",
        metavar="LOW:HIGH",
        type=_range,
        default=(8, 64),
        help="--mixed: max_new_tokens range (default: 8:64)",
    )
    work.add_argument(
        "--chat",
        action="store_true",
        help="send each text prompt as a user message, rendered by the model's chat template "
        "(an instruct model then answers and ends its turn)",
    )
    work.add_argument("--temperature", metavar="T", type=float, help="sample (default: greedy)")
    work.add_argument(
        "--cache-salt",
        metavar="SALT",
        help="every request's cache_salt (the server shares cached prompt prefixes only "
        "between requests with the same salt)",
    )
    work.add_argument(
        "--stream",
        action="store_true",
        help="use GenerateStream: also time to first token and inter-token latency",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json",
        metavar="FILE",
        help="write the report as JSON (- for stdout; the table then goes to stderr)",
    )
    output.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw latency (and time to first token with --stream) and throughput over a "
        "rolling window (needs matplotlib: the lmserve plot extra)",
    )
    output.add_argument(
        "--no-progress", action="store_true", help="no progress bar (off when not a terminal)"
    )
    parser.set_defaults(handler=run)


def _workload(args: argparse.Namespace) -> Workload:
    workload: Workload
    if args.prompts_file:
        workload = load_prompts_file(args.prompts_file, args.max_new_tokens)
    elif args.mixed:
        workload = MixedWorkload(args.prompt_tokens, args.new_tokens, seed=args.seed)
    else:
        workload = FixedWorkload(args.prompt or DEFAULT_PROMPT, args.max_new_tokens)
    return ChatWorkload(workload) if args.chat else workload


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """The ``LoadConfig`` of a parsed ``bench`` command line (ValueError/OSError if bad)."""
    requests = args.requests
    if requests is None and args.duration is None:
        requests = DEFAULT_REQUESTS
    warmup = args.warmup
    if warmup is None:
        warmup = 1 if args.rate is not None else args.concurrency
    return LoadConfig(
        target=args.target,
        workload=_workload(args),
        concurrency=args.concurrency,
        rate=args.rate,
        requests=requests,
        duration_s=args.duration,
        warmup=warmup,
        timeout_s=args.timeout,
        stream=args.stream,
        temperature=args.temperature,
        cache_salt=args.cache_salt,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
        # The security options of the common parser, when this client has them and they
        # are set; unset ones are left out so an older AsyncClient is not given them.
        client_options={
            name: value
            for name in ("tls_ca", "tls_cert", "tls_key", "token")
            if (value := getattr(args, name, None)) is not None
        },
    )


def run(args: argparse.Namespace) -> int:
    """The ``bench`` handler: run, print the table, write --json/--plot; the exit code."""
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plot and (hint := check_available()):
        print(f"error: {hint}", file=sys.stderr)
        return 2
    result = run_bench(config)
    report = result.report
    text = format_report(report)
    if args.json == "-":
        print(json.dumps(report, indent=2))
        print(text, file=sys.stderr)
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot_report(report, result.records, args.plot)
    failed = report["aborted"] is not None or report["requests"]["errors"] > 0
    return 1 if failed else 0
