"""One registry load tool, guidellm, against lmserve's OpenAI-compatible HTTP API and its
peers, with the same load, side by side in one run.

    python benchmarks/openai_load.py --model models/gpt2-random --guidellm PATH/guidellm

guidellm is not a dependency of lmserve (it brings datasets, pandas, sanic and more, and an
unpinned torch), so it goes in a virtual environment of its own, the CPU torch first so that
it pulls no CUDA build:

    python -m venv /tmp/guidellm && /tmp/guidellm/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/pin.txt && /tmp/guidellm/bin/pip install -c /tmp/pin.txt guidellm

The load: guidellm's synthetic text prompts of ``--prompt-tokens`` tokens (by the model's own
tokenizer), ``max_tokens`` ``--output-tokens`` each (a random-weight model almost never ends
sooner; throughput counts the tokens guidellm counts), streamed over
``/v1/completions``, ``--streams`` concurrent clients until ``--requests`` are done. The
servers, each started, measured and stopped in turn (rounds alternate their order, so a
slow spell of a shared machine hits all alike):

- lmserve ``--scheduler continuous`` with ``--http-port``;
- lmserve ``--scheduler static`` with ``--http-port``;
- ``transformers serve --continuous-batching`` (needs ``transformers[serving]``);
- llama.cpp's ``llama-server`` when it is on PATH and ``--gguf`` names the same model as a
  GGUF file (left out otherwise, and said so).

Printed: per server the medians over rounds of output tokens/s, request latency p50 and
p99, time to first token p50 and inter-token latency p50, and each server's throughput as a
ratio of the first one's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon, say, stop_process, wait_for_quiet
from peer import peer_server

Server = Callable[[], AbstractContextManager[str]]  # yields the base URL (no /v1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def lmserve(setup: Setup, *flags: str) -> Iterator[str]:
    port = free_port()
    with daemon(setup, "--http-port", str(port), *flags):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def llama_server(gguf: str, binary: str) -> Iterator[str]:
    port = free_port()
    command = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", "16"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, "llama-server")
        yield url
    finally:
        stop_process(proc, grace_s=30)


def _wait_healthy(url: str, proc: subprocess.Popen[Any], name: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            assert proc.poll() is None, f"{name} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{name} did not come up"
            time.sleep(0.5)


def run_guidellm(guidellm: str, url: str, model: str, args: argparse.Namespace) -> dict[str, float]:
    """One guidellm run against ``url``; its figures."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [
            guidellm,
            "run",
            "--backend",
            # max_tokens set here, not by the data's output_tokens: with those guidellm also
            # sends vLLM's ignore_eos, which transformers serve refuses (422).
            f"kind=openai_http,target={url},model={model},request_format=/v1/completions,"
            f"max_tokens={args.output_tokens}",
            "--data",
            f"kind=synthetic_text,prompt_tokens={args.prompt_tokens}",
            "--tokenizer",
            f"kind=huggingface_auto,model={args.model}",
            "--profile",
            f"kind=concurrent,streams={args.streams}",
            "--constraint",
            f"kind=max_requests,count={args.requests}",
            "--output",
            f"kind=json,path={report}",
            "--disable-console",
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("OMP_NUM_THREADS", None)  # --server-threads is the servers' alone
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
        if done.returncode != 0 or not report.exists():
            raise RuntimeError(f"guidellm failed ({done.returncode}): {done.stderr[-2000:]}")
        (benchmark,) = json.loads(report.read_text())["benchmarks"]
    metrics = benchmark["metrics"]
    totals = metrics["request_totals"]
    if totals.get("errored") or totals.get("incomplete"):
        raise RuntimeError(f"guidellm saw failed requests at {url}: {totals}")

    def successful(name: str) -> dict[str, Any]:
        result: dict[str, Any] = metrics[name]["successful"]
        return result

    return {
        "output_tok_s": successful("output_token_count")["total_sum"] / benchmark["duration"],
        "latency_p50_s": successful("request_latency")["percentiles"]["p50"],
        "latency_p99_s": successful("request_latency")["percentiles"]["p99"],
        "ttft_p50_ms": successful("time_to_first_token_ms")["percentiles"]["p50"],
        "itl_p50_ms": successful("inter_token_latency_ms")["percentiles"]["p50"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/gpt2-random", help="a local model directory")
    parser.add_argument("--guidellm", default=shutil.which("guidellm") or "guidellm")
    parser.add_argument("--gguf", help="the same model as a GGUF file, for llama-server")
    parser.add_argument("--llama-server", default=shutil.which("llama-server"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument(
        "--server-threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of every server (not of guidellm); 0: their defaults",
    )
    parser.add_argument("--only", nargs="*", default=(), help="servers to run, by name")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if shutil.which(args.guidellm) is None and not Path(args.guidellm).exists():
        say(f"no guidellm at {args.guidellm!r}: install it as this script's docstring says")
        return 2
    if args.server_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.server_threads)
    setup = Setup(model=args.model)
    servers: list[tuple[str, Server]] = [
        (
            "lmserve continuous",
            lambda: lmserve(setup, "--scheduler", "continuous", "--kv-cache-tokens", "16384"),
        ),
        ("lmserve static", lambda: lmserve(setup, "--scheduler", "static")),
        ("transformers serve CB", lambda: peer_server(setup)),
    ]
    if args.llama_server and args.gguf:
        binary, gguf = args.llama_server, args.gguf
        servers.append(("llama.cpp server", lambda: llama_server(gguf, binary)))
    else:
        say("llama.cpp server: left out (needs llama-server on PATH and --gguf)")
    if args.only:
        servers = [s for s in servers if s[0] in args.only]
    say(
        f"guidellm: {args.requests} requests of {args.prompt_tokens} prompt tokens and "
        f"{args.output_tokens} new tokens, {args.streams} concurrent streams, "
        f"/v1/completions streamed; {args.rounds} rounds; server threads: "
        f"{args.server_threads or 'their defaults'}"
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in servers}
    for round_index in range(args.rounds):
        order = servers if round_index % 2 == 0 else servers[::-1]
        for name, start in order:
            wait_for_quiet()
            with start() as url:
                figures = run_guidellm(args.guidellm, url, args.model, args)
            results[name].append(figures)
            say(f"  round {round_index + 1} {name}: {figures['output_tok_s']:.1f} tok/s")
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
        if runs
    }
    first = next(iter(medians.values()))["output_tok_s"]
    say()
    say("| server | output tok/s | vs first | latency p50 / p99 | TTFT p50 | ITL p50 |")
    say("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, m in medians.items():
        say(
            f"| {name} | {m['output_tok_s']:.1f} | {m['output_tok_s'] / first:.2f}x | "
            f"{m['latency_p50_s']:.2f} / {m['latency_p99_s']:.2f} s | "
            f"{m['ttft_p50_ms']:.0f} ms | {m['itl_p50_ms']:.1f} ms |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": medians, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
