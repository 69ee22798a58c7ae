"""Prometheus metrics of the server (GET /metrics), in a registry of its own per app."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpt2engine.engine.prefix_cache import PrefixCacheStats
from gpt2engine.engine.speculative import SpeculationStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class PrefixCacheCollector(Collector):
    """The prefix cache's counts, read from the engine's as they stand at each scrape (as vLLM's
    prefix_cache_queries / prefix_cache_hits, in tokens)."""

    def __init__(self, stats: PrefixCacheStats) -> None:
        self.stats = stats

    def collect(self):
        stats = self.stats
        yield CounterMetricFamily("gpt2engine_prefix_cache_queries",
                                  "prompt tokens looked up in the prefix cache", value=stats.queried_tokens)
        yield CounterMetricFamily("gpt2engine_prefix_cache_hits",
                                  "prompt tokens copied from the prefix cache", value=stats.hit_tokens)
        yield GaugeMetricFamily("gpt2engine_prefix_cache_bytes", "memory the prefix cache holds",
                                value=stats.bytes)
        yield GaugeMetricFamily("gpt2engine_prefix_cache_blocks", "blocks (prefill chunks) it holds",
                                value=stats.blocks)


class SpeculationCollector(Collector):
    """Speculative decoding's counts, by proposer, as they stand at each scrape (as vLLM's
    spec_decode_num_draft_tokens / num_accepted_tokens)."""

    def __init__(self, stats: SpeculationStats) -> None:
        self.stats = stats

    def collect(self):
        for name, value, what in (("proposed", self.stats.proposed, "tokens proposed and verified"),
                                  ("accepted", self.stats.accepted, "proposed tokens kept")):
            family = CounterMetricFamily(f"gpt2engine_spec_decode_{name}_tokens", what, labels=["proposer"])
            family.add_metric([self.stats.proposer], value)
            yield family


class Metrics:
    def __init__(
        self, running: Callable[[], int], waiting: Callable[[], int], max_rows: int,
        prefix_cache: PrefixCacheStats | None = None, speculation: SpeculationStats | None = None,
    ) -> None:
        self.registry = registry = CollectorRegistry()
        if prefix_cache is not None:
            registry.register(PrefixCacheCollector(prefix_cache))
        if speculation is not None:
            registry.register(SpeculationCollector(speculation))
        Gauge("gpt2engine_requests_running", "requests holding a cache row (prefilling or decoding)",
              registry=registry).set_function(running)
        Gauge("gpt2engine_requests_waiting", "requests queued for a cache row",
              registry=registry).set_function(waiting)
        Gauge("gpt2engine_cache_rows_in_use", "KV cache rows in use", registry=registry).set_function(running)
        Gauge("gpt2engine_cache_rows", "KV cache rows (--max-batch)", registry=registry).set(max_rows)
        self.time_to_first_token = Histogram(
            "gpt2engine_time_to_first_token_seconds", "from request arrival to its first token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "gpt2engine_inter_token_latency_seconds", "between consecutive tokens of a request",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e_latency = Histogram(
            "gpt2engine_e2e_request_latency_seconds", "from request arrival to its last token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("gpt2engine_prompt_tokens", "prompt tokens processed",
                                     registry=registry)
        self.generation_tokens = Counter("gpt2engine_generation_tokens", "tokens generated",
                                         registry=registry)
        self.finished = Counter("gpt2engine_requests_finished", "requests ended, by finish reason",
                                ["finish_reason"], registry=registry)
        self.aborted = Counter("gpt2engine_requests_aborted",
                               "requests aborted (client gone, shutdown)", registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
