"""Prometheus metrics: counters fed by request records, gauges read at scrape time.

One registry per application (no module-level global), so tests and several managers in
one process never share counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.models.runtime import State
from llm_manager.models.supervisor import Supervisor
from llm_manager.store.usage import RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Metrics:
    def __init__(self, supervisor: Supervisor, monitor: DeviceMonitor) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llm_manager_requests",
            "Forwarded requests by model, endpoint and status code.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "llm_manager_tokens",
            "Tokens by model and kind (prompt, completion), as the model server reported.",
            ["model", "kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "llm_manager_request_duration_seconds",
            "Forwarded request duration, arrival to the last byte.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "llm_manager_time_to_first_byte_seconds",
            "Arrival to the first byte of the answer relayed.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.overhead = Histogram(
            "llm_manager_gateway_overhead_seconds",
            "Time spent in the gateway itself before the answer starts (waits excluded).",
            buckets=_OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveState(supervisor, monitor))

    def observe(self, record: RequestRecord) -> None:
        """Called once per forwarded request, with its finished record."""
        model = record.model
        self.requests.labels(model, record.endpoint, str(record.status)).inc()
        if record.prompt_tokens:
            self.tokens.labels(model, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            self.tokens.labels(model, "completion").inc(record.completion_tokens)
        self.duration.labels(model).observe(record.duration_ms / 1000)
        if record.ttfb_ms is not None:
            self.ttfb.labels(model).observe(record.ttfb_ms / 1000)
        if record.overhead_ms is not None:
            self.overhead.observe(record.overhead_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState(Collector):
    """Gauges read from the supervisor and the latest device snapshot at each scrape."""

    def __init__(self, supervisor: Supervisor, monitor: DeviceMonitor) -> None:
        self._supervisor = supervisor
        self._monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runtimes = self._supervisor.runtimes
        pending = GaugeMetricFamily(
            "llm_manager_pending_requests",
            "Requests waiting for or using a model.",
            labels=["model"],
        )
        queued = GaugeMetricFamily(
            "llm_manager_queued_requests",
            "Requests waiting for a max_concurrency slot.",
            labels=["model"],
        )
        state = GaugeMetricFamily(
            "llm_manager_model_state", "1 for the model's current state.", labels=["model", "state"]
        )
        starts = GaugeMetricFamily(
            "llm_manager_model_starts",
            "Successful starts since the manager began.",
            labels=["model"],
        )
        crashes = GaugeMetricFamily(
            "llm_manager_model_crashes",
            "Times the model process died by itself while serving.",
            labels=["model"],
        )
        start_seconds = GaugeMetricFamily(
            "llm_manager_model_last_start_seconds",
            "Duration of the model's last successful start.",
            labels=["model"],
        )
        for r in runtimes:
            pending.add_metric([r.name], r.pending)
            queued.add_metric([r.name], r.gate.waiting)
            for s in State:
                state.add_metric([r.name, s.value], 1.0 if r.state is s else 0.0)
            starts.add_metric([r.name], r.start_count)
            crashes.add_metric([r.name], r.crash_count)
            if r.last_start_seconds is not None:
                start_seconds.add_metric([r.name], r.last_start_seconds)
        yield from (pending, queued, state, starts, crashes, start_seconds)
        used = GaugeMetricFamily(
            "llm_manager_device_memory_used_mib", "Device memory in use.", labels=["device", "name"]
        )
        free = GaugeMetricFamily(
            "llm_manager_device_memory_free_mib", "Device memory free.", labels=["device", "name"]
        )
        snapshot = self._monitor.latest
        if snapshot is not None:
            for device in snapshot.devices:
                used.add_metric([device.key, device.name], device.memory_used)
                free.add_metric([device.key, device.name], device.memory_free)
        yield from (used, free)
