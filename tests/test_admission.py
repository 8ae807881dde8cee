"""What a daemon admits and when it lets go, over real gRPC: the continuous scheduler's KV
cache (a request waits while no row or block is free, is refused at once if it could never
fit),
and the drain deadline (running requests stop with a clear status, in both schedulers)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import lmserve
from lmserve import Client
from tests.conftest import RunningDaemon
from tests.test_engine import PROMPTS


def test_a_request_that_could_never_fit_the_kv_cache_is_refused_at_once(make_daemon) -> None:  # type: ignore[no-untyped-def]
    small: RunningDaemon = make_daemon(
        scheduler="continuous", max_batch_size=2, kv_cache_tokens=128
    )
    with Client(small.address) as client:
        info = client.model_info()
        # One request may hold the whole pool (rows share it; they hold no slot each).
        assert (info.kv_cache_tokens, info.max_request_tokens) == (128, 128)
        with pytest.raises(lmserve.InvalidArgumentError, match="--kv-cache-tokens"):
            client.generate("Hello", max_new_tokens=128)  # 1 + 128 tokens: one too many
        assert client.generate("Hello", max_new_tokens=127).completion_tokens == 127


def test_requests_wait_for_a_free_slot_then_run(make_daemon) -> None:  # type: ignore[no-untyped-def]
    small: RunningDaemon = make_daemon(
        scheduler="continuous", max_batch_size=2, kv_cache_tokens=256
    )
    with Client(small.address, timeout=60) as client:
        alone = [client.generate(p, max_new_tokens=40) for p in PROMPTS[:5]]
        with ThreadPoolExecutor(5) as pool:
            together = list(pool.map(lambda p: client.generate(p, max_new_tokens=40), PROMPTS[:5]))
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert max(r.batch_size for r in together) == 2, "never more rows than slots"
    waited = sorted(r.queue_ms for r in together)
    # Two slots for five requests: the last ones waited for others to finish.
    assert waited[-1] > min(r.compute_ms for r in together) / 2


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_at_the_drain_deadline_running_requests_stop_with_a_clear_status(
    make_daemon,  # type: ignore[no-untyped-def]
    scheduler: str,
) -> None:
    running: RunningDaemon = make_daemon(scheduler=scheduler)
    # No retries, to see the daemon's own status (the default client would retry it on
    # another replica: UNAVAILABLE is what a draining replica answers).
    with (
        Client(running.address, timeout=120, balance=False) as client,
        ThreadPoolExecutor(3) as pool,
    ):
        calls = [pool.submit(client.generate, p, max_new_tokens=1000) for p in PROMPTS[:2]]
        deadline = time.monotonic() + 10
        while not running.daemon.scheduler.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        started = time.monotonic()
        running.call(running.daemon.stop(grace=1.0))
        stopped_in = time.monotonic() - started
        for call in calls:
            with pytest.raises(lmserve.UnavailableError, match="shut down before"):
                call.result()
    # 1000 tokens take far longer than the 1 s drain: the rows stopped at the deadline.
    assert stopped_in < 1.0 + 2.5 + 2.0, stopped_in  # + a step + the reply flush


def test_kv_cache_blocks_are_exported_while_rows_hold_them(make_daemon) -> None:  # type: ignore[no-untyped-def]
    from tests.ops_support import free_port, scrape

    port = free_port()
    small: RunningDaemon = make_daemon(
        scheduler="continuous", max_batch_size=4, kv_cache_tokens=4096, metrics_port=port
    )
    usage = ("lmserve_kv_cache_usage", ())
    free = ("lmserve_kv_cache_free_blocks", ())
    m = scrape(port)
    assert (m[usage], m[("lmserve_kv_cache_blocks", ())], m[free]) == (0.0, 128, 128)
    assert m[("lmserve_preemptions_total", ())] == 0
    with Client(small.address, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        long = pool.submit(client.generate, "Hello", max_new_tokens=600)
        deadline = time.monotonic() + 10
        while not small.daemon.scheduler.busy:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        m = scrape(port)
        long.result()
    # One row holds the blocks of its tokens so far: a few of 128, not a slot of 1024.
    held = round(m[usage] * 128)
    assert 1 <= held <= 20 and m[free] == 128 - held
    assert scrape(port)[usage] == 0.0
