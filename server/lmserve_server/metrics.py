"""Prometheus metrics of one daemon, in a registry of its own, served on ``--metrics-port``.

``Metrics`` holds the series and the small recording methods the daemon calls: per batch
(``observe_batch``, from ``Daemon._run_batch``), per call (``observe_call``, from the
request interceptor, which sees every outcome including refusals), per served request
(``observe_served``: queue time and prompt tokens, unary and streamed alike) and per
streamed token (``observe_stream_token``: time to the first token, then between tokens),
the last two from the servicer. The queue depth and the prefix cache's counters are
sampled when Prometheus scrapes, through callbacks. Several daemons in one process (as in
the tests) each have their own registry, so their series never clash.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from lmserve_server.engine.prefix_cache import BLOCK
from lmserve_server.engine.types import KVCacheBlocks, PrefixCacheStats
from lmserve_server.network import grpc_address

log = logging.getLogger(__name__)

# Seconds: from a millisecond tokenize to a minutes-long generation on a CPU.
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Between two tokens of a stream: one decode step, from a GPU's milliseconds to a CPU's tenths.
_TOKEN_GAPS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
# A grammar's compile: a millisecond for most, up to the compile timeout.
_COMPILE_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The daemon's series; ``serve(host, port)`` exposes them at ``/metrics``."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        kv_cache_blocks: Callable[[], KVCacheBlocks] | None = None,
        prefix_cache: Callable[[], PrefixCacheStats] | None = None,
        grammar_cache_bytes: Callable[[], float] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_KVCacheCollector(kv_cache_blocks or KVCacheBlocks))
        r.register(_PrefixCacheCollector(prefix_cache or PrefixCacheStats))
        self.queue_depth = Gauge(
            "lmserve_queue_depth", "Requests waiting for a batch (sampled at scrape)", registry=r
        )
        self.queue_depth.set_function(queue_depth)
        self.batch_size = Histogram(
            "lmserve_batch_size",
            "Requests per batch: per generate() call (static), per step (continuous)",
            buckets=_BATCH_SIZES,
            registry=r,
        )
        self.batch_compute = Histogram(
            "lmserve_batch_compute_seconds",
            "Wall time of one batch: its generate() call (static), its step (continuous)",
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_failures = Counter(
            "lmserve_batch_failures",
            "Batches (static) or steps (continuous) that raised; their rows were retried apart",
            registry=r,
        )
        self.queue_time = Histogram(
            "lmserve_queue_seconds",
            "Time a served request (Generate or GenerateStream) waited from submission to the "
            "start of its batch",
            buckets=_SECONDS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lmserve_prompt_tokens", "Prompt tokens of the requests served", registry=r
        )
        self.time_to_first_token = Histogram(
            "lmserve_time_to_first_token_seconds",
            "GenerateStream: time from receiving the call to its first generated token",
            buckets=_SECONDS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "lmserve_inter_token_latency_seconds",
            "GenerateStream: time between two consecutive generated tokens of a call",
            buckets=_TOKEN_GAPS,
            registry=r,
        )
        self.latency = Histogram(
            "lmserve_request_duration_seconds",
            "Time from receiving a call to its last response, by method",
            ["method"],
            buckets=_SECONDS,
            registry=r,
        )
        self.requests = Counter(
            "lmserve_requests",
            "Finished calls by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.tokens = Counter(
            "lmserve_generated_tokens", "Tokens generated (continuations only)", registry=r
        )
        self.grammar_compile = Histogram(
            "lmserve_grammar_compile_seconds",
            "Structured output: wall time of a grammar's compile (not served from the cache), "
            "by kind; refused grammars included",
            ["kind"],
            buckets=_COMPILE_SECONDS,
            registry=r,
        )
        self.grammar_cache_hits = Counter(
            "lmserve_grammar_cache_hits",
            "Structured output: grammars served from the compile cache (a refused one too)",
            registry=r,
        )
        self.grammar_cache_bytes = Gauge(
            "lmserve_grammar_cache_bytes",
            "Structured output: what the compiled grammars kept weigh, in bytes (the heap each "
            "took to compile, its text, refusals); at most --grammar-cache-memory (sampled at "
            "scrape)",
            registry=r,
        )
        self.grammar_cache_bytes.set_function(grammar_cache_bytes or (lambda: 0.0))
        self.model = Info("lmserve_model", "The served model", registry=r)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def set_model(self, model: str, device: str, dtype: str) -> None:
        self.model.info({"model": model, "device": device, "dtype": dtype})

    def observe_batch(self, size: int, compute_s: float, tokens: int, failed: bool) -> None:
        self.batch_size.observe(size)
        self.batch_compute.observe(compute_s)
        if failed:
            self.batch_failures.inc()
        else:
            self.tokens.inc(tokens)

    def observe_call(self, method: str, code: grpc.StatusCode, latency_s: float) -> None:
        self.requests.labels(method=method, code=code.name).inc()
        self.latency.labels(method=method).observe(latency_s)

    def observe_served(self, prompt_tokens: int, queue_s: float) -> None:
        """A request whose batch ran: its prompt and its wait in the queue."""
        self.prompt_tokens.inc(prompt_tokens)
        self.queue_time.observe(queue_s)

    def observe_stream_tokens(self, since_s: float, count: int, *, first: bool) -> None:
        """A stream message of ``count`` tokens, ``since_s`` after the call's start (the
        first message) or the previous message. The first token's wait is the time to first
        token; every other token counts one inter-token latency, the message's gap shared by
        its tokens (a split character or a possible stop string holds tokens back together)."""
        if first:
            self.time_to_first_token.observe(since_s)
            count -= 1
            since_s = 0.0  # the first message's other tokens came with its first
        for _ in range(count):
            self.inter_token_latency.observe(since_s / count)

    def observe_grammar_compile(self, kind: str, seconds: float) -> None:
        """A grammar compiled (on a compile thread)."""
        self.grammar_compile.labels(kind=kind).observe(seconds)

    def grammar_cache_hit(self) -> None:
        self.grammar_cache_hits.inc()

    # ---- the HTTP endpoint --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port ``/metrics`` is served on; 0 when it is not served."""
        return int(self._server.server_port) if self._server is not None else 0

    def serve(self, host: str, port: int) -> int:
        """Serves ``/metrics`` on ``host:port`` from a background thread; returns the port."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise OSError(
                f"--metrics-port {port}: cannot listen on {grpc_address(host, port)}: {err}"
            ) from None
        log.info("metrics on http://%s/metrics", grpc_address(host, self.port))
        return self.port

    def close(self) -> None:
        """Stops the HTTP endpoint (blocks up to half a second; call it off the event loop)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _KVCacheCollector(Collector):
    """The KV cache's series, read from the scheduler when Prometheus scrapes (the continuous
    scheduler's, or a static one's running its batches through steps; all 0 under static
    generate, whose cache is per batch)."""

    def __init__(self, read: Callable[[], KVCacheBlocks]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return self._families(None)

    def collect(self) -> list[Metric]:
        return self._families(self._read())

    @staticmethod
    def _families(blocks: KVCacheBlocks | None) -> list[Metric]:
        def value(field: str) -> float | None:
            return None if blocks is None else float(getattr(blocks, field))

        return [
            GaugeMetricFamily(
                "lmserve_kv_cache_usage",
                "Share of the KV cache's blocks held by running requests",
                value=None if blocks is None else blocks.usage,
            ),
            GaugeMetricFamily(
                "lmserve_kv_cache_blocks",
                f"The KV cache's size in blocks of {BLOCK} tokens",
                value=value("total"),
            ),
            GaugeMetricFamily(
                "lmserve_kv_cache_free_blocks",
                "KV cache blocks a request may take now: free, or cached prompt blocks no "
                "request holds",
                value=value("available"),
            ),
            CounterMetricFamily(
                "lmserve_preemptions",
                "Running requests that gave their KV cache blocks back for older ones to go "
                "on, and resumed later by computing their tokens again",
                value=value("preemptions"),
            ),
        ]


class _PrefixCacheCollector(Collector):
    """The prefix cache's series, read from the scheduler when Prometheus scrapes (the
    engine thread keeps the counts; nothing is pushed from it)."""

    def __init__(self, read: Callable[[], PrefixCacheStats]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return self._families(None)

    def collect(self) -> list[Metric]:
        return self._families(self._read())

    @staticmethod
    def _families(stats: PrefixCacheStats | None) -> list[Metric]:
        def value(field: str) -> float | None:
            return None if stats is None else float(getattr(stats, field))

        return [
            CounterMetricFamily(
                "lmserve_prefix_cache_queries",
                "Prompt tokens of the requests admitted with the prefix cache on, looked up in it",
                value=value("queries"),
            ),
            CounterMetricFamily(
                "lmserve_prefix_cache_hits",
                "Of those prompt tokens, the ones taken from the prefix cache (not computed)",
                value=value("hits"),
            ),
            GaugeMetricFamily(
                "lmserve_prefix_cache_tokens",
                "Prompt tokens whose keys and values the prefix cache holds now",
                value=value("tokens"),
            ),
            GaugeMetricFamily(
                "lmserve_prefix_cache_capacity_tokens",
                "The prefix cache's size in tokens (--prefix-cache-tokens; 0: no cache)",
                value=value("capacity_tokens"),
            ),
            CounterMetricFamily(
                "lmserve_prefix_cache_evicted_tokens",
                "Tokens evicted from the prefix cache to make room (least recently used first)",
                value=value("evicted_tokens"),
            ),
        ]
