"""Benchmark figures 1-3: what batching gains, what serving costs, against in-process.

1. batching gain: lmserve --max-batch-size B vs 1 against in-process batch vs one-by-one
2. serving efficiency: daemon tokens/s over in-process tokens/s on the same batches
3. overhead at low load: p50 of one request at a time, daemon (--max-wait-ms 0) minus
   in-process

Each is a ratio of two sides measured one after the other in one run. Times are the best
of ``reps`` interleaved repetitions: on a shared machine noise only ever adds time, so the
minimum is the estimate least disturbed by it.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

from harness import (
    InProcess,
    RequestSpec,
    Row,
    Setup,
    Sizes,
    daemon,
    fixed_specs,
    load,
    say,
    summary_row,
    token_count,
    verdict,
    wait_for_quiet,
)

from lmserve import Client


def batching(setup: Setup, local: InProcess, sizes: Sizes) -> list[Row]:
    """Figures 1 and 2 from the same legs, for each batch size B."""
    largest = max(sizes.batch_sizes)
    specs = fixed_specs(largest, sizes.prompt_tokens, sizes.new_tokens)
    best: dict[tuple[str, int], float] = {}
    samples: dict[tuple[str, int], list[float]] = defaultdict(list)
    batch_counts: dict[int, dict[str, int]] = {}
    tokens: dict[tuple[str, int], int] = {}
    correct: dict[int, bool] = {}
    with (
        daemon(setup, "--max-batch-size", str(largest)) as batched,
        daemon(setup, "--max-batch-size", "1") as naive,
    ):
        for b in sizes.batch_sizes:  # warm both sides' batch shapes, untimed
            local.generate(specs[:b])
            load(batched, specs[:b], requests=b, concurrency=b)
        load(naive, specs[:2], requests=2, concurrency=2)
        for rep in range(sizes.reps):
            wait_for_quiet()
            singles, single_rows = local.one_by_one(specs)
            for b in sizes.batch_sizes:
                wait_for_quiet()
                seconds, outputs = local.generate(specs[:b])
                correct[b] = outputs == single_rows[:b]
                legs = {
                    "direct one-by-one": (sum(singles[:b]), token_count(single_rows[:b])),
                    "direct batch": (seconds, token_count(outputs)),
                }
                for name, address in (
                    ("daemon max-batch B", batched),
                    ("daemon max-batch 1", naive),
                ):
                    report = load(address, specs[:b], requests=b, concurrency=b).report
                    legs[name] = (report["duration_s"], report["generated_tokens"])
                    if name == "daemon max-batch B":
                        batch_counts[b] = report["batch_size_counts"]
                for name, (secs, count) in legs.items():
                    samples[(name, b)].append(secs)
                    best[(name, b)] = min(best.get((name, b), secs), secs)
                    tokens[(name, b)] = count
                say(
                    f"  rep {rep + 1}/{sizes.reps} B={b}: "
                    + ", ".join(f"{n} {s:.2f} s" for n, (s, _) in legs.items())
                )
    rows: list[Row] = []
    for b in sizes.batch_sizes:
        direct_gain = best[("direct one-by-one", b)] / best[("direct batch", b)]
        daemon_gain = best[("daemon max-batch 1", b)] / best[("daemon max-batch B", b)]
        share = daemon_gain / direct_gain
        thr_daemon = tokens[("daemon max-batch B", b)] / best[("daemon max-batch B", b)]
        thr_direct = tokens[("direct batch", b)] / best[("direct batch", b)]
        efficiency = thr_daemon / thr_direct
        detail = {
            "best_s": {n: best[(n, bb)] for (n, bb) in best if bb == b},
            "samples_s": {n: samples[(n, bb)] for (n, bb) in samples if bb == b},
            "tokens": {n: tokens[(n, bb)] for (n, bb) in tokens if bb == b},
            "daemon_batch_size_counts": batch_counts[b],
            "batched_tokens_equal_one_by_one": correct[b],
        }
        say(
            f"[1] batching gain, {b} concurrent: daemon {daemon_gain:.2f}x, direct "
            f"{direct_gain:.2f}x -> {share:.3f} of direct (target >= 0.90) "
            f"{verdict(share, 0.90, at_least=True)}"
        )
        say(
            f"[2] serving efficiency, batch {b}: daemon {thr_daemon:.1f} tok/s / direct "
            f"{thr_direct:.1f} tok/s = {efficiency:.3f} (target >= 0.95) "
            f"{verdict(efficiency, 0.95, at_least=True)}"
        )
        say(f"    daemon batches {batch_counts[b]}; batched == one-by-one tokens: {correct[b]}")
        rows.append(
            summary_row(
                1, f"batching gain, {b} concurrent", share, ">= 0.90", share >= 0.90, detail
            )
        )
        rows[-1].update(daemon_gain=daemon_gain, direct_gain=direct_gain)
        rows.append(
            summary_row(
                2, f"serving efficiency, batch {b}", efficiency, ">= 0.95", efficiency >= 0.95
            )
        )
        rows[-1].update(daemon_tokens_per_s=thr_daemon, direct_tokens_per_s=thr_direct)
    return rows


def overhead(setup: Setup, local: InProcess, sizes: Sizes) -> list[Row]:
    """Figure 3: one request at a time, the two sides in alternating blocks."""
    rows: list[Row] = []
    with daemon(setup, "--max-wait-ms", "0") as address, Client(address, timeout=600) as client:
        round_trip = _round_trip_ms(client)
        say(
            "    context: a Tokenize call (gRPC round trip, no model) p50 "
            + ", ".join(f"{ms:.2f} ms {when}" for when, ms in round_trip.items())
        )
        for new_tokens in sizes.overhead_new_tokens:
            spec = fixed_specs(1, sizes.prompt_tokens, new_tokens)[0]
            times = _alternate(client, local, spec, sizes.overhead_pairs)
            p50 = {name: statistics.median(values) * 1000 for name, values in times.items()}
            diff = p50["daemon"] - p50["in-process"]
            paired = statistics.median(
                (d - s) * 1000 for d, s in zip(times["daemon"], times["in-process"], strict=True)
            )
            say(
                f"[3] overhead, {sizes.prompt_tokens}-token prompt, {new_tokens} new tokens: "
                f"p50 daemon {p50['daemon']:.2f} ms - in-process {p50['in-process']:.2f} ms = "
                f"{diff:.2f} ms (median paired difference {paired:.2f} ms) (target <= 2 ms) "
                f"{verdict(diff, 2.0, at_least=False)}"
            )
            detail = {
                "p50_ms": p50,
                "median_paired_diff_ms": paired,
                "tokenize_round_trip_p50_ms": round_trip,
                "samples_s": times,
            }
            rows.append(
                summary_row(
                    3,
                    f"overhead p50, {new_tokens} new tokens (ms)",
                    diff,
                    "<= 2 ms",
                    diff <= 2.0,
                    detail,
                )
            )
    return rows


def _alternate(
    client: Client, local: InProcess, spec: RequestSpec, pairs: int, block: int = 10
) -> dict[str, list[float]]:
    """``pairs`` calls on each side, one request at a time (a closed loop of one), in
    alternating blocks of ``block`` back-to-back calls; seconds of each call."""

    def via_daemon() -> float:
        started = time.perf_counter()
        client.generate(spec.prompt, max_new_tokens=spec.max_new_tokens)
        return time.perf_counter() - started

    def in_process() -> float:
        return local.generate([spec])[0]

    times: dict[str, list[float]] = {"daemon": [], "in-process": []}
    order = (("daemon", via_daemon), ("in-process", in_process))
    for i in range(0, pairs, block):
        wait_for_quiet()
        # Alternate which side goes first. The first call of a block is not counted: it
        # pays for waking the side that sat idle (its threads slept while the other ran).
        for name, call in order if (i // block) % 2 == 0 else order[::-1]:
            call()
            times[name].extend(call() for _ in range(min(block, pairs - i)))
    return times


def _round_trip_ms(client: Client, calls: int = 50) -> dict[str, float]:
    """p50 of a Tokenize call back-to-back and after 50 ms idle: the daemon's fixed cost
    without the model, and what waking its idle threads adds to it."""
    results: dict[str, float] = {}
    for when, pause in (("back-to-back", 0.0), ("after 50 ms idle", 0.05)):
        wait_for_quiet()
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            client.tokenize("Hello World")
            samples.append(time.perf_counter() - started)
            time.sleep(pause)
        results[when] = statistics.median(samples) * 1000
    return results
