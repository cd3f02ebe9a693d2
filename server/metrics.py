"""Prometheus metrics shared by the HTTP and inference processes (multiprocess mode).

PROMETHEUS_MULTIPROC_DIR must be set before this module is first imported (server/__main__.py
does it): prometheus_client picks its file-backed value class at import time. Every process the
server starts (forked HTTP servers, spawned inference workers) inherits the variable and writes
its samples there; GET /metrics merges them.
"""
from __future__ import annotations

import os

from collections.abc import Mapping

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest, multiprocess)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .settings import METRICS_DIR_ENV

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

REQUESTS = Counter("radiodiff_requests", "HTTP requests by endpoint and status code",
                   ["endpoint", "code"])
REQUEST_SECONDS = Histogram("radiodiff_request_duration_seconds",
                            "HTTP request latency, body read to response", ["endpoint"],
                            buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("radiodiff_requests_in_flight", "HTTP requests being served", ["endpoint"],
                  multiprocess_mode="livesum")
MODEL_SECONDS = Histogram("radiodiff_model_duration_seconds",
                          "Inference time of one worker batch", ["endpoint"],
                          buckets=LATENCY_BUCKETS)
BATCH_REQUESTS = Histogram("radiodiff_batch_requests", "Requests merged into one worker batch",
                           ["endpoint"], buckets=SIZE_BUCKETS)
BATCH_SIZE = Histogram("radiodiff_batch_size", "Maps (or latents) per forward pass",
                       ["endpoint"], buckets=SIZE_BUCKETS)
MAPS = Counter("radiodiff_maps_processed", "Maps (or latents) processed", ["endpoint"])
REJECTION_REASONS = ("over_budget", "over_memory", "queue_full", "client_share", "deadline",
                     "deadline_running", "deadline_unreachable", "disconnected",
                     "disconnected_upload", "slow_upload", "no_memory",
                     "worker_crashed")  # docs/server.md says what each is
REJECTIONS = Counter("radiodiff_rejections", "Requests refused or given up on, by endpoint and "
                     f"reason ({', '.join(REJECTION_REASONS)})", ["endpoint", "reason"])

WORKER_RESTARTS = Counter("radiodiff_worker_restarts", "Inference workers that died after they "
                          "were ready, by endpoint (each is restarted, or the server stops)",
                          ["endpoint"])


def reject(endpoint: str, reason: str) -> None:
    REJECTIONS.labels(endpoint, reason).inc()


def expose_rejections(endpoint: str) -> None:
    """Publish `endpoint`'s rejection counters at 0, so that they exist before the first."""
    for reason in REJECTION_REASONS:
        REJECTIONS.labels(endpoint, reason)


class _QueueDepth(Collector):
    """The requests waiting per endpoint, read from the shared queue at scrape time (a gauge
    that each process set would be stale as soon as another process changed the queue)."""

    def __init__(self, depths: Mapping[str, int]):
        self.depths = depths

    def collect(self):
        family = GaugeMetricFamily("radiodiff_queue_depth", "Requests admitted and waiting for "
                                   "an inference worker", labels=["endpoint"])
        for endpoint, depth in sorted(self.depths.items()):
            family.add_metric([endpoint], depth)
        yield family


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (its counters stay counted)."""
    if os.environ.get(METRICS_DIR_ENV):
        multiprocess.mark_process_dead(pid)


def render(queue_depths: Mapping[str, int]) -> tuple[bytes, str]:
    """The Prometheus text exposition of every process's metrics and of the queue depths, and
    its content type."""
    if os.environ.get(METRICS_DIR_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    queues = CollectorRegistry()
    queues.register(_QueueDepth(queue_depths))
    return generate_latest(registry) + generate_latest(queues), CONTENT_TYPE_LATEST
