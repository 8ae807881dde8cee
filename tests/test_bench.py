"""``lmserve-client bench``: its maths alone, then smoke runs against a real daemon.

The smoke runs go through ``lmserve.cli.main`` (what a user types) against the tiny GPT-2
daemon of conftest.py, in closed and open loop, with each workload, and check the JSON
report's counts; a dead address and a server without streaming must end the run quickly
with the reason reported, never hang.
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from lmserve import ChatMessage, cli
from lmserve.bench_plot import plot_report, plot_title, rolling_rates, rolling_window_s
from lmserve.bench_progress import Progress
from lmserve.bench_stats import (
    RequestRecord,
    build_report,
    format_report,
    percentile,
    summarize,
    timeline,
)
from lmserve.bench_workload import (
    WORDS,
    ChatWorkload,
    ListWorkload,
    MixedWorkload,
    RequestSpec,
    load_prompts_file,
    poisson_arrivals,
    prompt_of_length,
)
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from tests.conftest import RunningDaemon

# --- maths and workloads, no server -------------------------------------------------------


def test_percentile_interpolates_linearly_between_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4
    assert percentile([7.0], 99) == 7.0
    values = list(range(1, 101))  # 1..100: rank 0.9 * 99 = 89.1 -> 90.1
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    with pytest.raises(ValueError):
        percentile([], 50)
    stats = summarize([0.001, 0.002, 0.003], scale=1000.0)
    assert stats is not None
    assert (stats["count"], stats["min"], stats["p50"], stats["max"]) == (3, 1.0, 2.0, 3.0)
    assert stats["mean"] == pytest.approx(2.0)
    assert summarize([]) is None


def test_poisson_arrivals_have_exponential_gaps_of_mean_one_over_rate() -> None:
    arrivals = list(itertools.islice(poisson_arrivals(50.0, random.Random(3)), 20001))
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 50.0, rel=0.03)
    # An exponential's standard deviation equals its mean (a fixed-interval schedule's is 0).
    assert statistics.pstdev(gaps) == pytest.approx(1 / 50.0, rel=0.05)
    again = poisson_arrivals(50.0, random.Random(3))
    assert [next(again) for _ in range(100)] == arrivals[:100]
    with pytest.raises(ValueError):
        next(poisson_arrivals(0.0, random.Random(0)))


def test_mixed_workload_is_seeded_per_index_and_within_its_ranges() -> None:
    workload = MixedWorkload((8, 16), (2, 5), seed=7)
    specs = [workload.spec(i) for i in range(50)]
    assert [workload.spec(i) for i in reversed(range(50))][::-1] == specs  # order-free
    assert all(8 <= len(s.prompt.split()) <= 16 and 2 <= s.max_new_tokens <= 5 for s in specs)
    assert len({s.max_new_tokens for s in specs}) > 1 and len({s.prompt for s in specs}) == 50
    assert MixedWorkload((8, 16), (2, 5), seed=8).spec(0) != specs[0]


def test_the_chat_workload_sends_text_prompts_as_a_user_message() -> None:
    mixed = MixedWorkload((8, 16), (2, 5), seed=7)
    chat = ChatWorkload(mixed)
    for i in range(5):
        plain, wrapped = mixed.spec(i), chat.spec(i)
        assert wrapped.prompt == (ChatMessage("user", plain.prompt),)
        assert wrapped.max_new_tokens == plain.max_new_tokens
    ids = ListWorkload([RequestSpec((1, 2), 3)])
    assert ChatWorkload(ids).spec(0) == ids.spec(0)  # token ids are sent as they are
    assert chat.describe() == {**mixed.describe(), "chat": True}


def test_every_word_is_one_gpt2_token_so_prompt_lengths_are_exact(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert all(len(tokenizer.encode(" " + word)) == 1 for word in WORDS)
    assert len(tokenizer.encode(prompt_of_length(37))) == 37
    spec = MixedWorkload((20, 40), (1, 1), seed=1).spec(5)
    assert len(tokenizer.encode(spec.prompt)) == len(spec.prompt.split())


def test_prompts_files_plain_and_jsonl(tmp_path: Path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("Hello there\n\n{not json} is fine in a text file\n")
    workload = load_prompts_file(text, 9)
    assert [(s.prompt, s.max_new_tokens) for s in workload.specs] == [
        ("Hello there", 9),
        ("{not json} is fine in a text file", 9),
    ]
    assert workload.spec(2) == workload.spec(0)  # cycled
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a b", "max_new_tokens": 3}\n{"prompt": "c"}\n')
    assert [s.max_new_tokens for s in load_prompts_file(jsonl, 9).specs] == [3, 9]
    jsonl.write_text('{"prompt": "a", "max_new_tokens": -1}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: max_new_tokens"):
        load_prompts_file(jsonl, 9)
    jsonl.write_text("plain line\n")
    with pytest.raises(ValueError, match="not JSON"):
        load_prompts_file(jsonl, 9)


def test_report_counts_errors_by_code_and_builds_a_timeline() -> None:
    records = [
        RequestRecord(0, 0.0, 0.5, prompt_tokens=4, completion_tokens=10, batch_size=2),
        RequestRecord(1, 0.1, 1.5, prompt_tokens=4, completion_tokens=6, batch_size=2),
        RequestRecord(2, 0.2, 1.6, error_code="RESOURCE_EXHAUSTED", error_details="full"),
    ]
    report = build_report(records, duration_s=2.0, settings={"target": "x"})
    assert report["requests"] == {"sent": 3, "ok": 2, "errors": 1}
    assert report["errors_by_code"] == {"RESOURCE_EXHAUSTED": 1}
    assert report["throughput"]["tokens_per_s"] == 8.0
    assert report["throughput"]["requests_per_s"] == 1.0
    assert report["latency_ms"]["max"] == pytest.approx(1400.0)
    assert report["batch_size_counts"] == {"2": 2}
    assert report["ttft_ms"] is None
    rows = timeline(records, 1.0)
    assert [(r["requests_per_s"], r["tokens_per_s"], r["errors_per_s"]) for r in rows] == [
        (1, 10, 0),
        (1, 6, 1),
    ]
    report.update(load_description="closed", workload_description="fixed", model=None)
    table = format_report(report)
    assert "RESOURCE_EXHAUSTED x1: full" in table and "latency ms" in table


def bursty_steady_load(
    seconds: float, batch: int = 16, every_s: float = 1.5, stall: tuple[float, float] | None = None
) -> list[RequestRecord]:
    """A steady load as a batching daemon serves it: ``batch`` requests of 20 tokens finish
    together every ``every_s`` seconds (a few ms apart); none finish during ``stall``."""
    records: list[RequestRecord] = []
    burst = 1
    while burst * every_s <= seconds:
        done = burst * every_s
        if stall is None or not stall[0] <= done < stall[1]:
            for i in range(batch):
                start = done - every_s
                records.append(
                    RequestRecord(len(records), start, done + i * 0.001, completion_tokens=20)
                )
        burst += 1
    return records


def test_the_plotted_throughput_of_a_steady_bursty_load_has_no_zero_gaps() -> None:
    records = bursty_steady_load(60.0)
    true_rate = 16 / 1.5
    # What the plot drew before: 1 s buckets, mostly zeros and spikes for this load.
    buckets = [row["requests_per_s"] for row in timeline(records, 1.0)]
    assert buckets.count(0) > len(buckets) / 4 and max(buckets) > true_rate

    window = rolling_window_s(records, 60.0)
    assert 1.5 < window < 6.0  # over at least one burst gap, far under the run
    series = rolling_rates(records, window)
    assert series[0].t == pytest.approx(window) and series[-1].t == pytest.approx(records[-1].end)
    assert len(series) > 50
    for point in series:
        assert 0.5 * true_rate < point.requests_per_s < 1.6 * true_rate, point
        assert point.tokens_per_s == pytest.approx(20 * point.requests_per_s)
        assert point.errors_per_s == 0
    mean = statistics.fmean(p.requests_per_s for p in series)
    assert mean == pytest.approx(true_rate, rel=0.1)


def test_a_real_stall_still_reaches_zero_and_errors_have_their_own_rate() -> None:
    records = bursty_steady_load(60.0, stall=(20.0, 35.0))
    series = rolling_rates(records, rolling_window_s(records, 60.0))
    stalled = [p for p in series if 27.0 <= p.t <= 33.0]
    assert stalled and all(p.requests_per_s == 0 for p in stalled)
    failed = [RequestRecord(0, 0.0, 1.0, error_code="UNAVAILABLE"), *records]
    assert max(p.errors_per_s for p in rolling_rates(failed, 2.0)) == 0.5
    assert rolling_rates([], 1.0) == []
    (only,) = rolling_rates(records[:1], 10.0)  # a run shorter than the window: one point
    assert only.t == records[0].end and only.requests_per_s == 0.1


def test_plot_draws_time_to_first_token_for_streams(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = bursty_steady_load(10.0, batch=4, every_s=0.5)
    unary = build_report(records, duration_s=10.0, settings={"load_description": "unary"})
    drawn = plot_report(unary, records, tmp_path / "unary.png")
    assert drawn.panels == ["latency distribution", "throughput over time"]
    assert drawn.ttft_ms == [] and drawn.throughput == rolling_rates(records, drawn.window_s)

    for n, record in enumerate(records):
        record.ttft_s = 0.05 + 0.001 * n
    streamed = build_report(records, duration_s=10.0, settings={"load_description": "streamed"})
    drawn = plot_report(streamed, records, tmp_path / "stream.png")
    assert drawn.panels == ["latency distribution", "time to first token", "throughput over time"]
    assert drawn.title == "lmserve bench: streamed"  # no server info: the load only
    assert drawn.ttft_ms == pytest.approx([r.ttft_s * 1000.0 for r in records])  # type: ignore[operator]
    assert (tmp_path / "stream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_line_shows_done_total_rate_and_errors() -> None:
    class Sink:
        def write(self, _: str) -> None: ...

        def flush(self) -> None: ...

    progress = Progress(Sink(), total=10, duration_s=None)  # type: ignore[arg-type]
    for i in range(4):
        progress.add(RequestRecord(i, 0.0, 0.1, error_code="UNAVAILABLE" if i == 3 else None))
    line = progress.line(time.perf_counter() + 0.01)
    assert "4/10" in line and "1 errors" in line and "req/s" in line


# --- against a real daemon ----------------------------------------------------------------


def bench(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], float]:
    """Runs ``lmserve-client bench ARGS --json FILE``: exit code, report, seconds taken."""
    out = tmp_path / f"report-{time.monotonic_ns()}.json"
    started = time.monotonic()
    code = cli.main(["bench", "--no-progress", "--json", str(out), *args])
    return code, json.loads(out.read_text()), time.monotonic() - started


def check_ok(report: dict[str, Any], asked: int) -> None:
    assert report["aborted"] is None
    assert report["requests"] == {"sent": asked, "ok": asked, "errors": 0}
    assert report["errors_by_code"] == {}
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["throughput"]["requests_per_s"] > 0
    assert report["throughput"]["tokens_per_s"] > 0
    assert sum(report["batch_size_counts"].values()) == asked
    assert report["queue_ms"]["count"] == report["compute_ms"]["count"] == asked
    assert report["model"]["max_batch_size"] == 32


def test_closed_loop_against_the_daemon(
    daemon: RunningDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _ = bench(
        tmp_path, "--target", daemon.address, "--concurrency", "4", "--requests", "12",
        "--max-new-tokens", "4", "--warmup", "4",
    )  # fmt: skip
    assert code == 0
    check_ok(report, 12)
    assert (report["mode"], report["concurrency"], report["warmup"]) == ("closed", 4, 4)
    assert report["generated_tokens"] == 12 * 4
    assert max(int(size) for size in report["batch_size_counts"]) > 1, "4 in flight must batch"
    assert "requests by batch size" in capsys.readouterr().out


def test_open_loop_with_the_mixed_workload(daemon: RunningDaemon, tmp_path: Path) -> None:
    code, report, _ = bench(
        tmp_path, "--target", daemon.address, "--rate", "40", "--requests", "10", "--mixed",
        "--prompt-tokens", "4:24", "--new-tokens", "2:6", "--seed", "3",
    )  # fmt: skip
    assert code == 0
    check_ok(report, 10)
    assert report["mode"] == "open" and report["rate"] == 40
    assert report["workload"] == {
        "kind": "mixed", "prompt_tokens": [4, 24], "max_new_tokens": [2, 6], "seed": 3,
    }  # fmt: skip
    expected = [MixedWorkload((4, 24), (2, 6), seed=3).spec(i).max_new_tokens for i in range(10)]
    assert report["generated_tokens"] <= sum(expected)
    assert report["max_send_lag_ms"] is not None


def test_prompts_files_and_per_request_max_new_tokens(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    jsonl = tmp_path / "p.jsonl"
    lines = [
        '{"prompt": "Hello", "max_new_tokens": 2}',
        '{"prompt": "The sky", "max_new_tokens": 5}',
    ]
    jsonl.write_text("\n".join(lines) + "\n")
    code, report, _ = bench(
        tmp_path, "--target", daemon.address, "--prompts-file", str(jsonl), "--requests", "6",
        "--concurrency", "2", "--duration", "30",
    )  # fmt: skip
    assert code == 0
    check_ok(report, 6)
    assert report["completion_tokens"]["max"] <= 5
    text = tmp_path / "p.txt"
    text.write_text("Once upon a time\nIn a galaxy far away\n")
    code, report, _ = bench(
        tmp_path, "--target", daemon.address, "--prompts-file", str(text), "--requests", "4",
        "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0
    check_ok(report, 4)
    assert report["workload"]["prompts"] == 2


def test_duration_bound_stops_sending(daemon: RunningDaemon, tmp_path: Path) -> None:
    code, report, seconds = bench(
        tmp_path, "--target", daemon.address, "--duration", "0.5", "--concurrency", "2",
        "--max-new-tokens", "2", "--warmup", "0",
    )  # fmt: skip
    assert code == 0 and report["requests"]["ok"] >= 1
    assert report["requests_asked"] is None and report["duration_asked_s"] == 0.5
    assert seconds < 10


def test_stream_measures_time_to_first_token_when_the_daemon_streams(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    code, report, _ = bench(
        tmp_path, "--target", daemon.address, "--stream", "--requests", "4",
        "--concurrency", "2", "--max-new-tokens", "6",
    )  # fmt: skip
    if report["aborted"] and "UNIMPLEMENTED" in report["aborted"]:
        pytest.skip("this daemon does not stream yet")
    assert code == 0 and report["requests"]["ok"] == 4
    assert 0 < report["ttft_ms"]["p50"] <= report["latency_ms"]["max"]
    assert report["itl_ms"]["count"] > 0 and report["generated_tokens"] > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nobody listens there


def test_a_dead_address_is_reported_at_once(tmp_path: Path) -> None:
    code, report, seconds = bench(
        tmp_path, "--target", f"127.0.0.1:{free_port()}", "--requests", "50", "--timeout", "30"
    )
    assert code == 1
    assert seconds < 10
    assert "UNAVAILABLE" in report["aborted"]
    assert report["requests"] == {"sent": 0, "ok": 0, "errors": 0}


class _NoStreaming(lmserve_pb2_grpc.GeneratorServicer):
    """Answers GetModelInfo; GenerateStream keeps the generated UNIMPLEMENTED."""

    def GetModelInfo(self, request: Any, context: Any) -> lmserve_pb2.ModelInfo:
        return lmserve_pb2.ModelInfo(model="fake", device="cpu", dtype="float32", max_batch_size=1)


@pytest.fixture
def no_streaming_server() -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    lmserve_pb2_grpc.add_GeneratorServicer_to_server(_NoStreaming(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_stream_against_a_server_without_streaming_stops_and_says_so(
    no_streaming_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, seconds = bench(
        tmp_path, "--target", no_streaming_server, "--stream", "--requests", "100",
        "--concurrency", "2",
    )  # fmt: skip
    assert code == 1 and seconds < 10
    assert "does not implement GenerateStream" in report["aborted"]
    assert report["requests"]["sent"] == 0  # the warm-up already found out
    assert report["warmup_errors"] >= 1
    assert "ABORTED" in capsys.readouterr().out


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_plot_writes_a_png(daemon: RunningDaemon, tmp_path: Path, stream: bool) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    code, report, _ = bench(
        tmp_path, "--target", daemon.address, "--requests", "6", "--concurrency", "3",
        "--max-new-tokens", "2", "--plot", str(png), *(["--stream"] if stream else []),
    )  # fmt: skip
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report["ttft_ms"] is not None) is stream  # what the TTFT panel is drawn from
    # A plot read alone (pasted in a ticket) says what it measured.
    model = report["model"]
    assert plot_title(report).splitlines()[0] == (
        f"{model['model']} on cpu (float32), static scheduler, max batch {model['max_batch_size']}"
    )


def test_plot_draws_requests_and_tokens_on_axes_of_their_own(tmp_path: Path) -> None:
    """On twin axes tokens/s (a constant times requests/s) would draw on top of
    requests/s; each rate has its own panel, one above the other, each scaled alike."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = bursty_steady_load(10.0, batch=4, every_s=0.5)
    report = build_report(records, duration_s=10.0, settings={"load_description": "unary"})
    drawn: dict[str, object] = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):  # type: ignore[no-untyped-def]
        drawn["figure"] = fig
        return real_savefig(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Figure, "savefig", keep)
        plot_report(report, records, tmp_path / "rates.png")
    axes = drawn["figure"].axes  # type: ignore[attr-defined]
    rate_axes = [a for a in axes if a.get_ylabel() in ("requests/s", "generated tokens/s")]
    assert [a.get_ylabel() for a in rate_axes] == ["requests/s", "generated tokens/s"]
    top, bottom = (a.get_position() for a in rate_axes)
    assert top.y0 >= bottom.y1  # one above the other, not overlaid
    assert rate_axes[0].get_shared_x_axes().joined(*rate_axes)  # one time axis


def test_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--prompts-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--mixed", "--prompt-tokens", "9:3"])
    assert exc.value.code == 2
