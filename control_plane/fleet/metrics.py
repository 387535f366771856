"""The figures behind GET /metrics (served by api_metrics.py), in Prometheus' text format.

Histograms are observed as things happen (dispatch, completion), labelled by account; the
gauges are read from the registry and the database at each scrape. A scrape shows only what
its token may see: an account's operator token its own account, an ``admin`` token every
account. Runners are named, never listed by tag or id; accounts by name. Every app has its
own registry, so two control planes in one process (tests) never share figures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import datetime

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from control_plane.fleet.registry import AgentConnection
from control_plane.model.figures import FleetFigures


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.dispatch_latency = Histogram(
            "comfyfleet_dispatch_latency_seconds",
            "From a workflow becoming ready to run to its job being sent to a runner",
            ["account"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.execution_duration = Histogram(
            "comfyfleet_execution_duration_seconds",
            "From a workflow starting to run on ComfyUI to its completion",
            ["account"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )


class _Scrape(Collector):
    def __init__(
        self,
        metrics: Metrics,
        figures: FleetFigures,
        conns: list[AgentConnection],
        now: datetime,
    ) -> None:
        self.metrics, self.figures, self.conns, self.now = metrics, figures, conns, now

    def _name(self, account_id: str) -> str:
        return self.figures.account_names.get(account_id, account_id)

    def collect(self) -> Iterator[Metric]:
        yield from self._runners()
        workflows = GaugeMetricFamily(
            "comfyfleet_workflows", "Workflows by status", labels=["account", "status"]
        )
        for account_id, status, count in self.figures.workflows:
            workflows.add_metric([self._name(account_id), status], count)
        yield workflows
        length = GaugeMetricFamily(
            "comfyfleet_queue_length", "Workflows waiting for a runner", labels=["account"]
        )
        oldest = GaugeMetricFamily(
            "comfyfleet_queue_oldest_age_seconds",
            "Age of the oldest workflow waiting for a runner",
            labels=["account"],
        )
        for account_id, count, first in self.figures.waiting:
            length.add_metric([self._name(account_id)], count)
            oldest.add_metric([self._name(account_id)], (self.now - first).total_seconds() if first else 0.0)
        yield length
        yield oldest
        yield from self._histograms()

    def _runners(self) -> Iterator[Metric]:
        online = GaugeMetricFamily("comfyfleet_runners_online", "Connected runners", labels=["account"])
        for account_id, count in Counter(c.account_id for c in self.conns).items():
            online.add_metric([self._name(account_id)], count)
        yield online
        labels = ["account", "runner", "gpu"]
        gauges = {
            "utilization_pct": GaugeMetricFamily(
                "comfyfleet_gpu_utilization_percent", "GPU utilisation a runner reported", labels=labels
            ),
            "memory_used_bytes": GaugeMetricFamily(
                "comfyfleet_gpu_memory_used_bytes", "GPU memory in use a runner reported", labels=labels
            ),
            "memory_total_bytes": GaugeMetricFamily(
                "comfyfleet_gpu_memory_total_bytes", "GPU memory a runner reported in all", labels=labels
            ),
        }
        for conn in self.conns:
            for gpu in conn.capacity.gpus:
                for key, gauge in gauges.items():
                    value = getattr(gpu, key)
                    if value is not None:
                        gauge.add_metric([self._name(conn.account_id), conn.name, str(gpu.index)], value)
        yield from gauges.values()

    def _histograms(self) -> Iterator[Metric]:
        """The fleet's histograms, with only the accounts this scrape may show, by name."""
        for family in self.metrics.registry.collect():
            shown = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                account_id = sample.labels.get("account")
                if account_id in self.figures.account_names:
                    labels = {**sample.labels, "account": self._name(account_id)}
                    shown.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
            yield shown


def render(metrics: Metrics, figures: FleetFigures, conns: list[AgentConnection], now: datetime) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(metrics, figures, conns, now))
    return generate_latest(registry)


METRICS_KEY = web.AppKey("metrics", Metrics)
