"""Prometheus metrics for ``GET /metrics``.

The daemon reports events here as they happen (files finished, retries,
watcher restarts); gauges that mirror the database (files and batches by
status and priority) are read from the store when scraped, so they are
right even after an operator edits the database by hand.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from batchd.clock import parse_iso
from batchd.config import PRIORITY_ORDER
from batchd.records import NodeRow, Status

# Processing runs from milliseconds (a small CSV) to processing.timeout_seconds
# (1800 by default); the default client buckets stop at 10 s.
DURATION_BUCKETS_SECONDS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip
# Queue waits can be hours when a big low-priority backlog sits behind high.
WAIT_BUCKETS_SECONDS = (
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0,
)  # fmt: skip


class CountSource(Protocol):
    """What the scrape-time collector reads (the store implements it)."""

    def counts_by_status_priority(self) -> dict[str, dict[tuple[str, str], int]]: ...

    def nodes(self) -> list[NodeRow]: ...


class StoreCollector(Collector):
    """Files and batches by status and priority, read from the store at scrape time.

    Every (status, priority) pair is exported, zeros included, so a dashboard
    query never sees a series vanish when a queue empties.
    """

    def __init__(self, store: CountSource) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.counts_by_status_priority()
        for key, help_text in (
            ("files", "Files in the database by status and priority."),
            ("batches", "Batches in the database by status and priority."),
        ):
            family = GaugeMetricFamily(f"batchd_{key}", help_text, labels=["status", "priority"])
            for status in Status:
                for priority in PRIORITY_ORDER:
                    n = counts[key].get((str(status), str(priority)), 0)
                    family.add_metric([str(status), str(priority)], n)
            yield family
        yield from self._nodes()

    def _nodes(self) -> Iterator[GaugeMetricFamily]:
        """Every node in ``nodes`` (one with SQLite): last heartbeat and running files."""
        beat = GaugeMetricFamily(
            "batchd_node_last_heartbeat_timestamp_seconds",
            "Unix time of each node's last heartbeat (several nodes share a PostgreSQL store).",
            labels=["node"],
        )
        running = GaugeMetricFamily(
            "batchd_node_processing", "Files each node is processing now.", labels=["node"]
        )
        for node in self.store.nodes():
            with contextlib.suppress(ValueError):
                beat.add_metric([node.node_id], parse_iso(node.last_heartbeat).timestamp())
            running.add_metric([node.node_id], node.processing)
        yield beat
        yield running

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without describe() the registry would call collect() (a database
        # query) once at registration just to learn the metric names.
        yield GaugeMetricFamily("batchd_files", "", labels=["status", "priority"])
        yield GaugeMetricFamily("batchd_batches", "", labels=["status", "priority"])
        yield GaugeMetricFamily("batchd_node_last_heartbeat_timestamp_seconds", "", labels=["node"])
        yield GaugeMetricFamily("batchd_node_processing", "", labels=["node"])


class Metrics:
    """Two registries per daemon (tests run several daemons in one process).

    ``registry`` holds what the daemon counts (files, workers, the watcher);
    ``http_registry`` what the HTTP server counts and the database gauges it
    reads itself. The HTTP server runs in a process of its own
    (:mod:`batchd.httpproc`): /metrics is the daemon's text followed by the
    HTTP process's, and no family is in both, so the concatenation is valid
    Prometheus text with every family once.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_registry = CollectorRegistry()
        self._store_collector: StoreCollector | None = None
        self.files_finished = Counter(
            "batchd_files_finished",
            "Files that reached a final status.",
            ["status", "priority"],
            registry=self.registry,
        )
        self.files_retried = Counter(
            "batchd_files_retried",
            "Failed attempts put back in the queue for another try.",
            ["priority"],
            registry=self.registry,
        )
        self.processing_seconds = Histogram(
            "batchd_processing_seconds",
            "Time a worker spent on one attempt.",
            buckets=DURATION_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "batchd_queue_wait_seconds",
            "Time from registration to the start of the first attempt.",
            buckets=WAIT_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self.workers = Gauge("batchd_workers", "Live worker processes.", registry=self.registry)
        self.watcher_restarts = Counter(
            "batchd_watcher_restarts",
            "Times the filesystem observer was restarted.",
            registry=self.registry,
        )
        self.last_rescan = Gauge(
            "batchd_last_rescan_timestamp_seconds",
            "Unix time of the last full inbox rescan.",
            registry=self.registry,
        )
        self.http_requests = Counter(
            "batchd_http_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "code"],
            registry=self.http_registry,
        )
        self._http_children: dict[tuple[str, int], Counter] = {}
        self.http_in_flight = Gauge(
            "batchd_http_connections",
            "HTTP client connections being served now.",
            registry=self.http_registry,
        )
        self.http_refused = Counter(
            "batchd_http_busy_refusals",
            "Connections answered 503 because every HTTP thread was busy.",
            registry=self.http_registry,
        )
        self.uploads = Counter(
            "batchd_uploads",
            "Upload attempts by outcome (accepted, or the refusal's status code).",
            ["outcome"],
            registry=self.http_registry,
        )

    def watch_store(self, store: CountSource) -> None:
        """Export files and batches by status and priority from ``store`` (once)."""
        if self._store_collector is None:
            self._store_collector = StoreCollector(store)
            self.http_registry.register(self._store_collector)

    # -- reported by the scheduler, watcher and pool ---------------------------

    def file_finished(self, status: str, priority: str) -> None:
        self.files_finished.labels(status=status, priority=priority).inc()

    def file_retried(self, priority: str) -> None:
        self.files_retried.labels(priority=priority).inc()

    def attempt_took(self, seconds: float) -> None:
        self.processing_seconds.observe(seconds)

    def waited(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def set_workers(self, n: int) -> None:
        self.workers.set(n)

    def watcher_restarted(self) -> None:
        self.watcher_restarts.inc()

    def rescanned(self) -> None:
        self.last_rescan.set(time.time())

    # -- reported by the HTTP server ---------------------------------------------

    def http_answered(self, route: str, code: int) -> None:
        # The labelled child, looked up once per (route, code): labels() takes
        # a lock and checks its arguments at every request (issue 15).
        child = self._http_children.get((route, code))
        if child is None:
            child = self._http_children[(route, code)] = self.http_requests.labels(
                route=route, code=str(code)
            )
        child.inc()

    def http_busy(self) -> None:
        self.http_refused.inc()

    def upload_ended(self, outcome: str) -> None:
        self.uploads.labels(outcome=outcome).inc()
