"""The engine's Prometheus metrics: served as text at the server's `/metrics`, and read back as
vLLM's metric objects by `LLM.get_metrics()` (`snapshot`).

Two sources: the engine's `EngineStats`, snapshot on the loop thread at each scrape (gauges of
running / waiting / swapped requests, KV cache usage, prefix-cache hit rate; counters of prompt
tokens computed, tokens generated and preemptions), and every finished request, observed on the
loop thread as it finishes (time to first token, time per output token and end-to-end latency
histograms, and finished requests by finish reason, aborted ones included). Each server has its
own registry, so several can live in one process. Names follow vLLM's with the `jpaged:` prefix.
Host-side: no jax here.
"""

from __future__ import annotations

from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jpaged.engine_client import EngineStats
from jpaged.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0)


@dataclass
class Metric:
    """One metric of `snapshot` (vLLM's `vllm.v1.metrics.reader.Metric`): its name (`jpaged:...`;
    a counter's without `_total`) and labels."""

    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    """A count that only grows."""

    value: int


@dataclass
class Gauge(Metric):
    """A value that goes up and down."""

    value: float


@dataclass
class Histogram(Metric):
    """Observations by bucket: `buckets` maps each bucket's upper bound, as Prometheus writes it
    (`"0.5"`, ..., `"+Inf"`), to the observations at or below it (cumulative, so `"+Inf"` holds
    `count`); `sum` adds up the observed values."""

    count: int
    sum: float
    buckets: dict[str, int]


class Metrics:
    """An engine's registry. `observe_finished` is thread-safe; `render` and `snapshot` take a
    fresh snapshot of the engine's `EngineStats`."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self._labels = {"model_name": model_name}
        self._stats: EngineStats | None = None
        labels = list(self._labels)
        self.ttft = prometheus_client.Histogram(
            "jpaged:time_to_first_token_seconds", "Time from arrival to the first token, seconds", labels,
            buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = prometheus_client.Histogram(
            "jpaged:time_per_output_token_seconds", "Mean time between output tokens of a request, seconds", labels,
            buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = prometheus_client.Histogram(
            "jpaged:e2e_request_latency_seconds", "Time from arrival to finish, seconds", labels,
            buckets=E2E_BUCKETS, registry=self.registry)
        self.finished = prometheus_client.Counter(
            "jpaged:request_success", "Requests finished, by finish reason", [*labels, "finished_reason"],
            registry=self.registry)
        self.registry.register(_EngineCollector(self))
        for histogram in (self.ttft, self.tpot, self.e2e):  # exported from the start, at 0, as vLLM's
            histogram.labels(**self._labels)
        for reason in FINISH_REASONS:
            self.finished.labels(**self._labels, finished_reason=reason)

    def observe_finished(self, output: RequestOutput) -> None:
        """Record a finished request's latencies (once per request) and each sample's finish reason."""
        metrics = output.metrics
        if metrics is not None:
            if metrics.time_to_first_token is not None:
                self.ttft.labels(**self._labels).observe(metrics.time_to_first_token)
            if metrics.time_per_output_token is not None:
                self.tpot.labels(**self._labels).observe(metrics.time_per_output_token)
            if metrics.finished_time is not None:
                self.e2e.labels(**self._labels).observe(metrics.finished_time - metrics.arrival_time)
        samples = output.outputs if isinstance(output.outputs, list) else [output.outputs]
        for sample in samples:  # each of `n` samples counts, as vLLM counts its child requests
            reason = getattr(sample, "finish_reason", "stop")  # an embedding (no samples) ends as "stop"
            self.finished.labels(**self._labels, finished_reason=reason or "unknown").inc()

    def observe_aborted(self, request_id: str) -> None:
        """Count a request the server aborted (its client left, or a step failed) as finished by "abort"."""
        self.finished.labels(**self._labels, finished_reason="abort").inc()

    def render(self, stats: EngineStats) -> bytes:
        """Prometheus text exposition of every metric, the engine's from `stats`."""
        self._stats = stats
        return generate_latest(self.registry)

    def snapshot(self, stats: EngineStats) -> list[Metric]:
        """Every metric's current value, as vLLM's `LLM.get_metrics()` returns them: a `Counter`,
        `Gauge` or `Histogram` per metric and label set, the engine's from `stats`."""
        self._stats = stats
        metrics: list[Metric] = []
        for family in self.registry.collect():
            if family.type == "histogram":
                metrics.extend(_histograms(family))
                continue
            kind = {"counter": Counter, "gauge": Gauge}[family.type]
            for sample in family.samples:
                if family.type == "counter" and not sample.name.endswith("_total"):
                    continue  # the `_created` timestamps
                value = int(sample.value) if kind is Counter else sample.value
                metrics.append(kind(family.name, dict(sample.labels), value))
        return metrics


def _histograms(family) -> list[Histogram]:
    """One `Histogram` per label set of a Prometheus histogram family."""
    by_labels: dict[tuple, Histogram] = {}
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        key = tuple(sorted(labels.items()))
        histogram = by_labels.setdefault(key, Histogram(family.name, labels, 0, 0.0, {}))
        if sample.name.endswith("_bucket"):
            histogram.buckets[sample.labels["le"]] = int(sample.value)
        elif sample.name.endswith("_count"):
            histogram.count = int(sample.value)
        elif sample.name.endswith("_sum"):
            histogram.sum = sample.value
    return list(by_labels.values())


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

    def __init__(self, metrics: Metrics):
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
