"""Metrics: event counters and histograms, and store gauges read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from batchd.clock import SystemClock
from batchd.config import Priority
from batchd.metrics import Metrics
from batchd.records import NewBatch, NewFile, Outcome, Status
from batchd.store import SQLiteStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "batchd.db")
    yield s
    s.close()


def register(store: SQLiteStore, name: str, priority: Priority, n: int) -> None:
    files = tuple(NewFile(f"f{i}.csv", 10) for i in range(n))
    batch = NewBatch(name, priority, "u", f"work/{priority}/{name}", "test", files)
    store.register_batch(batch, SystemClock().now())


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value if value is not None else metrics.http_registry.get_sample_value(name, labels)


def test_store_gauges_count_files_and_batches_by_status_and_priority(store: SQLiteStore) -> None:
    """batchd_files and batchd_batches mirror the database at scrape time."""
    metrics = Metrics()
    metrics.watch_store(store)
    register(store, "a", Priority.HIGH, 2)
    register(store, "b", Priority.LOW, 3)
    now = SystemClock().now()
    task = store.claim_next(now)
    assert task is not None
    store.finish(task.file.id, Outcome(Status.COMPLETED), now)
    assert sample(metrics, "batchd_files", status="pending", priority="high") == 1
    assert sample(metrics, "batchd_files", status="completed", priority="high") == 1
    assert sample(metrics, "batchd_files", status="pending", priority="low") == 3
    assert sample(metrics, "batchd_batches", status="processing", priority="high") == 1
    assert sample(metrics, "batchd_batches", status="pending", priority="low") == 1


def test_store_gauges_export_zeros_for_every_pair(store: SQLiteStore) -> None:
    """Every status and priority pair is exported, at zero when empty."""
    metrics = Metrics()
    metrics.watch_store(store)
    values = {
        (status, priority): sample(metrics, "batchd_files", status=status, priority=priority)
        for status in ("pending", "processing", "completed", "failed")
        for priority in ("high", "normal", "low")
    }
    assert set(values.values()) == {0.0}
    assert len(values) == 12


def test_watch_store_is_idempotent(store: SQLiteStore) -> None:
    """Watching the store twice registers one collector (no duplicate series error)."""
    metrics = Metrics()
    metrics.watch_store(store)
    metrics.watch_store(store)
    assert generate_latest(metrics.http_registry).count(b"# TYPE batchd_files gauge") == 1


def test_scheduler_events_are_counted() -> None:
    """file_finished, file_retried, attempt_took, waited, set_workers and the watcher
    events land in their series."""
    metrics = Metrics()
    metrics.file_finished("completed", "high")
    metrics.file_finished("completed", "high")
    metrics.file_finished("failed", "low")
    metrics.file_retried("normal")
    metrics.attempt_took(0.3)
    metrics.waited(42.0)
    metrics.set_workers(3)
    metrics.watcher_restarted()
    metrics.rescanned()
    assert sample(metrics, "batchd_files_finished_total", status="completed", priority="high") == 2
    assert sample(metrics, "batchd_files_finished_total", status="failed", priority="low") == 1
    assert sample(metrics, "batchd_files_retried_total", priority="normal") == 1
    assert sample(metrics, "batchd_processing_seconds_count") == 1
    assert sample(metrics, "batchd_processing_seconds_bucket", le="0.5") == 1
    assert sample(metrics, "batchd_queue_wait_seconds_bucket", le="30.0") == 0
    assert sample(metrics, "batchd_queue_wait_seconds_bucket", le="60.0") == 1
    assert sample(metrics, "batchd_workers") == 3
    assert sample(metrics, "batchd_watcher_restarts_total") == 1
    assert (sample(metrics, "batchd_last_rescan_timestamp_seconds") or 0) > 0


def test_http_events_are_counted() -> None:
    """HTTP answers, busy refusals and upload outcomes are counted."""
    metrics = Metrics()
    metrics.http_answered("jobs", 200)
    metrics.http_busy()
    metrics.upload_ended("429")
    assert sample(metrics, "batchd_http_requests_total", route="jobs", code="200") == 1
    assert sample(metrics, "batchd_http_busy_refusals_total") == 1
    assert sample(metrics, "batchd_uploads_total", outcome="429") == 1


def test_each_metrics_object_has_its_own_registry() -> None:
    """Two Metrics objects never share series (tests run several daemons in one process)."""
    first, second = Metrics(), Metrics()
    first.set_workers(5)
    assert sample(second, "batchd_workers") == 0
