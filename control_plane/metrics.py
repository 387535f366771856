"""The figures behind GET /metrics (served by api_metrics.py).

Histograms are observed as things happen (dispatch, completion); the gauges are filled from
the registry and the database at scrape time. Every app gets its own CollectorRegistry, so
two control planes in one process (tests) never share figures.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.dispatch_latency = Histogram(
            "comfyfleet_dispatch_latency_seconds",
            "From a workflow becoming ready to run to its job being sent to a runner",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.execution_duration = Histogram(
            "comfyfleet_execution_duration_seconds",
            "From a workflow starting to run on ComfyUI to its completion",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.runners_online = Gauge(
            "comfyfleet_runners_online",
            "Connected runners by tag ('' for untagged runners)",
            ["tag"],
            registry=r,
        )
        self.gpu_utilization = Gauge(
            "comfyfleet_gpu_utilization_percent",
            "GPU utilisation a runner reported",
            ["runner_id", "gpu"],
            registry=r,
        )
        self.gpu_memory_used = Gauge(
            "comfyfleet_gpu_memory_used_bytes",
            "GPU memory in use a runner reported",
            ["runner_id", "gpu"],
            registry=r,
        )
        self.gpu_memory_total = Gauge(
            "comfyfleet_gpu_memory_total_bytes",
            "GPU memory a runner reported in all",
            ["runner_id", "gpu"],
            registry=r,
        )
        self.workflows = Gauge("comfyfleet_workflows", "Workflows by status", ["status"], registry=r)
        self.queue_length = Gauge("comfyfleet_queue_length", "Workflows waiting for a runner", registry=r)
        self.queue_oldest_age = Gauge(
            "comfyfleet_queue_oldest_age_seconds",
            "Age of the oldest workflow waiting for a runner",
            registry=r,
        )


METRICS_KEY = web.AppKey("metrics", Metrics)
