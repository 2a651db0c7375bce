"""Prometheus metrics: counters fed by request records, gauges read at scrape time.

One registry per application (no module-level global), so tests and several managers in
one process never share counters.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from llm_manager.api.memory import memory_info
from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.models.runtime import ModelRuntime, State
from llm_manager.models.supervisor import Supervisor
from llm_manager.store.usage import RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Metrics:
    def __init__(self, supervisor: Supervisor, monitor: DeviceMonitor) -> None:
        self.registry = CollectorRegistry()
        self._requests = _RequestStats()
        self.registry.register(self._requests)
        self.registry.register(_LiveState(supervisor, monitor))
        # Called once per forwarded request, with its finished record: the counters' own
        # method, not one that calls it (a frame less per request).
        self.observe = self._requests.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Histogram:
    """Bucket counts (the last one is +Inf) and a sum: plain integers, no lock."""

    __slots__ = ("bounds", "counts", "labels", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.labels = (*map(floatToGoString, bounds), "+Inf")  # the "le" of each bucket
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets are "<= bound"
        self.total += value

    def family_sample(self) -> tuple[list[tuple[str, float]], float]:
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(self.labels, list(self.counts), strict=True):
            running += count
            buckets.append((bound, running))
        return buckets, self.total


class _RequestStats(Collector):
    """Request counters and histograms, kept as plain numbers and turned into metric
    families only when scraped.

    Why not prometheus-client's Counter and Histogram: their ``labels()`` lookups and locks
    cost about 18 us per relayed request (five label lookups, three histogram observations),
    a tenth of the relay's whole CPU budget. Updates happen on the event loop thread only;
    a scrape copies each container in one C-level step, which the GIL keeps consistent.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.duration: dict[str, _Histogram] = {}
        self.ttfb: dict[str, _Histogram] = {}
        self.overhead = _Histogram(_OVERHEAD_BUCKETS)
        self.queue_wait: dict[str, _Histogram] = {}

    def observe(self, record: RequestRecord) -> None:
        # Every relayed request: the lookups written out rather than in helper calls.
        model = record.model
        key = (model, record.endpoint, record.status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        tokens = self.tokens
        if record.prompt_tokens:
            kind = (model, "prompt")
            tokens[kind] = tokens.get(kind, 0) + record.prompt_tokens
        if record.completion_tokens:
            kind = (model, "completion")
            tokens[kind] = tokens.get(kind, 0) + record.completion_tokens
        (self.duration.get(model) or _histogram(self.duration, model)).add(
            record.duration_ms / 1000
        )
        if record.ttfb_ms is not None:
            (self.ttfb.get(model) or _histogram(self.ttfb, model)).add(record.ttfb_ms / 1000)
        if record.overhead_ms is not None:
            self.overhead.add(record.overhead_ms / 1000)
        if record.wait_ms is not None:
            (self.queue_wait.get(model) or _histogram(self.queue_wait, model)).add(
                record.wait_ms / 1000
            )

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "llm_manager_requests",
            "Forwarded requests by model, endpoint and status code.",
            labels=["model", "endpoint", "status"],
        )
        for (model, endpoint, status), count in list(self.requests.items()):
            requests.add_metric([model, endpoint, str(status)], count)
        tokens = CounterMetricFamily(
            "llm_manager_tokens",
            "Tokens by model and kind (prompt, completion), as the model server reported.",
            labels=["model", "kind"],
        )
        for (model, kind), count in list(self.tokens.items()):
            tokens.add_metric([model, kind], count)
        yield from (requests, tokens)
        yield _histogram_family(
            "llm_manager_request_duration_seconds",
            "Forwarded request duration, arrival to the last byte.",
            self.duration,
        )
        yield _histogram_family(
            "llm_manager_time_to_first_byte_seconds",
            "Arrival to the first byte of the answer relayed.",
            self.ttfb,
        )
        yield _histogram_family(
            "llm_manager_queue_wait_seconds",
            "Body read and checked to forwarded: waits for the model's turn, a max_concurrency "
            "slot, room on its devices and its start.",
            self.queue_wait,
        )
        overhead = HistogramMetricFamily(
            "llm_manager_gateway_overhead_seconds",
            "Time spent in the gateway itself before the answer starts (waits excluded).",
        )
        buckets, total = self.overhead.family_sample()
        overhead.add_metric([], buckets, total)
        yield overhead


def _histogram(by_model: dict[str, _Histogram], model: str) -> _Histogram:
    found = by_model.get(model)
    if found is None:
        found = by_model[model] = _Histogram(_LATENCY_BUCKETS)
    return found


def _histogram_family(name: str, doc: str, by_model: dict[str, _Histogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["model"])
    for model, histogram in list(by_model.items()):
        buckets, total = histogram.family_sample()
        family.add_metric([model], buckets, total)
    return family


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
        waiting = GaugeMetricFamily(
            "llm_manager_waiting_requests",
            "Requests not yet forwarded: held for the model's turn, queued for a slot, or "
            "waiting for it to start (room included).",
            labels=["model"],
        )
        blocked = GaugeMetricFamily(
            "llm_manager_model_waiting_for_room",
            "1 while the model's start waits for other models to make room.",
            labels=["model"],
        )
        for r in runtimes:
            pending.add_metric([r.name], r.pending)
            waiting.add_metric([r.name], r.waiting)
            blocked.add_metric([r.name], 1.0 if r.waiting_for else 0.0)
            queued.add_metric([r.name], r.gate.waiting)
            for s in State:
                state.add_metric([r.name, s.value], 1.0 if r.state is s else 0.0)
            starts.add_metric([r.name], r.start_count)
            crashes.add_metric([r.name], r.crash_count)
            if r.last_start_seconds is not None:
                start_seconds.add_metric([r.name], r.last_start_seconds)
        yield from (pending, queued, waiting, blocked, state, starts, crashes, start_seconds)
        yield self._memory(runtimes)
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
        if self._supervisor.cluster is not None:
            yield from self._cluster(runtimes)

    def _cluster(self, runtimes: list[ModelRuntime]) -> Iterator[GaugeMetricFamily]:
        """Cluster mode: the nodes that answered, where each model runs, node losses."""
        nodes = GaugeMetricFamily(
            "llm_manager_cluster_nodes", "Cluster nodes that answered the latest device reading."
        )
        snap = self._monitor.latest
        report = next((r for r in snap.reports if r.provider == "cluster"), None) if snap else None
        nodes.add_metric([], len(report.info.get("nodes", ())) if report is not None else 0)
        placed = GaugeMetricFamily(
            "llm_manager_model_node",
            "1 for the node the model's engine runs on.",
            labels=["model", "node"],
        )
        losses = GaugeMetricFamily(
            "llm_manager_model_node_losses",
            "Runs of the model that ended because their node left the cluster.",
            labels=["model"],
        )
        for r in runtimes:
            if r.node is not None:
                placed.add_metric([r.name, r.node], 1.0)
            losses.add_metric([r.name], r.node_losses)
        yield from (nodes, placed, losses)

    def _memory(self, runtimes: list[ModelRuntime]) -> GaugeMetricFamily:
        memory = GaugeMetricFamily(
            "llm_manager_model_memory_mib",
            "A model's memory per scheme device key (device 'host' = system memory of a "
            "scheme without a cpu key), by figure: declared, planned (what placement uses), "
            "booked (this run), now (latest reading), load_peak and serve_peak (measured "
            "over runs of this scheme definition), estimate (GGUF).",
            labels=["model", "scheme", "device", "figure"],
        )
        for r in runtimes:
            scheme = r.scheme or next(iter(r.spec.schemes))
            info = memory_info(self._supervisor, r, scheme)
            rows = dict(info["devices"])
            if info["host"] is not None:
                rows["host"] = info["host"]
            for key, row in rows.items():
                for figure in _MEMORY_FIGURES:
                    value = row.get(figure)
                    if isinstance(value, int) and not isinstance(value, bool):
                        memory.add_metric([r.name, scheme, key, figure], value)
        return memory


_MEMORY_FIGURES = ("declared", "planned", "booked", "now", "load_peak", "serve_peak", "estimate")
