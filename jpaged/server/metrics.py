"""Prometheus metrics of the server, served as text at `/metrics`.

Two sources: the engine's `EngineStats`, snapshot on the loop thread at each scrape (gauges of
running / waiting / swapped requests, KV cache usage, prefix-cache hit rate; counters of prompt
tokens computed, tokens generated and preemptions), and every finished request, observed on the
loop thread as it finishes (time to first token, time per output token and end-to-end latency
histograms, and finished requests by finish reason, aborted ones included). Each server has its
own registry, so several can live in one process. Names follow vLLM's with the `jpaged:` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jpaged.engine_client import EngineStats
from jpaged.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0)


class ServerMetrics:
    """The server's registry. `observe_finished` is thread-safe; `render` takes a fresh snapshot."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self._labels = {"model_name": model_name}
        self._stats: EngineStats | None = None
        labels = list(self._labels)
        self.ttft = Histogram("jpaged:time_to_first_token_seconds", "Time from arrival to the first token, seconds",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("jpaged:time_per_output_token_seconds",
                              "Mean time between output tokens of a request, seconds", labels,
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("jpaged:e2e_request_latency_seconds", "Time from arrival to finish, seconds",
                             labels, buckets=E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("jpaged:request_success", "Requests finished, by finish reason",
                                [*labels, "finished_reason"], registry=self.registry)
        self.registry.register(_EngineCollector(self))

    def observe_finished(self, output: RequestOutput) -> None:
        """Record a finished request's latencies and finish reason (first sample's)."""
        metrics = output.metrics
        if metrics is not None:
            if metrics.time_to_first_token is not None:
                self.ttft.labels(**self._labels).observe(metrics.time_to_first_token)
            if metrics.time_per_output_token is not None:
                self.tpot.labels(**self._labels).observe(metrics.time_per_output_token)
            if metrics.finished_time is not None:
                self.e2e.labels(**self._labels).observe(metrics.finished_time - metrics.arrival_time)
        first = output.outputs[0] if isinstance(output.outputs, list) and output.outputs else output.outputs
        reason = getattr(first, "finish_reason", "stop")  # an embedding (no samples) ends as "stop"
        self.finished.labels(**self._labels, finished_reason=reason or "unknown").inc()

    def observe_aborted(self, request_id: str) -> None:
        """Count a request the server aborted (its client left, or a step failed) as finished by "abort"."""
        self.finished.labels(**self._labels, finished_reason="abort").inc()

    def render(self, stats: EngineStats) -> bytes:
        """Prometheus text exposition of every metric, the engine's from `stats`."""
        self._stats = stats
        return generate_latest(self.registry)


class _EngineCollector:
    """Yields the engine's gauges and counters from the latest `EngineStats` snapshot."""

    GAUGES = (("num_requests_running", "num_running", "Requests running in the engine"),
              ("num_requests_waiting", "num_waiting", "Requests waiting to be scheduled"),
              ("num_requests_swapped", "num_swapped", "Requests swapped out to host memory"),
              ("kv_cache_usage_perc", "kv_cache_usage", "Share of KV cache blocks in use, 0 to 1"),
              ("prefix_cache_hit_rate", "prefix_cache_hit_rate",
               "Share of looked-up prompt tokens found in the prefix cache, 0 to 1"))
    COUNTERS = (("prompt_tokens", "num_prompt_tokens_computed", "Prompt tokens computed (prefix-cache hits excluded)"),
                ("generation_tokens", "num_generated_tokens", "Tokens generated"),
                ("num_preemptions", "num_preemptions", "Sequences preempted"),
                ("spec_decode_num_draft_tokens", "num_draft_tokens", "Speculative draft tokens checked"),
                ("spec_decode_num_accepted_tokens", "num_accepted_draft_tokens",
                 "Speculative draft tokens the model's own choices confirmed"))

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def collect(self):
        stats, labels = self._metrics._stats, self._metrics._labels
        if stats is None:
            return
        for name, field, doc in self.GAUGES:
            family = GaugeMetricFamily(f"jpaged:{name}", doc, labels=list(labels))
            family.add_metric(list(labels.values()), float(getattr(stats, field)))
            yield family
        for name, field, doc in self.COUNTERS:
            family = CounterMetricFamily(f"jpaged:{name}", doc, labels=list(labels))
            family.add_metric(list(labels.values()), float(getattr(stats, field)))
            yield family
