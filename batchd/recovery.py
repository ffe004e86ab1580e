"""Start-up recovery: reconcile ``work/``, the database and the outbox after any stop.

A crash can stop batchd between any two steps of a file's way (claim
rename, registration, result write, commit, input move, status.json).
:func:`recover` runs once at start, before the workers and the watcher, and
puts every such leftover back on its way; :func:`adopt_orphans` does the
same, while running, for claims a dead cluster node left unregistered, and
:func:`settle_dead_uploads` for what a dead HTTP process left;
:func:`check_node_id` refuses to start under a node id a live node uses.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from batchd.clock import parse_iso
from batchd.config import Priority
from batchd.errors import AlreadyRegistered, ConfigError, StoreError
from batchd.fsutil import owner_name
from batchd.intake import Intake
from batchd.outbox import Outbox
from batchd.records import Status
from batchd.spool import Claimed, Spool
from batchd.store import Store

# The daemon's logger: recovery's events were always the daemon's.
log = structlog.get_logger("batchd.daemon")

#: In a cluster, an upload folder unchanged this long belonged to a node that
#: died mid-upload (a live upload writes to it all the time).
STALE_UPLOAD_SECONDS = 3600.0


def recover(spool: Spool, store: Store, outbox: Outbox, intake: Intake) -> dict[str, int]:
    """Reconcile ``work/``, the database and the outbox after any stop.

    * files left ``processing`` go back to ``pending`` (no attempt spent);
      in a cluster only this node's (the store knows whose they are);
    * a folder in ``work/`` with no batch (crash between claim and
      registration) is registered now, under the name it was claimed with;
      in a cluster another node may register it first, which is fine;
    * finished files still in ``work/`` get their result and move on;
      finished batches leave ``work/``;
    * half-received uploads and processor scratch folders are removed; in a
      cluster only those no live node can still be using.
    """
    spool.finish_cross_device()
    if spool.settings.database.url:
        # Other nodes share these folders and may be using them right now: a
        # scratch folder goes only once its file is not processing anywhere,
        # an upload folder once nothing in it changed for STALE_UPLOAD_SECONDS.
        cutoff = time.time() - STALE_UPLOAD_SECONDS
        spool.clear_scratch(keep=lambda entry: _file_running(store, entry.name))
        spool.clear_uploads(keep=lambda entry: _newest_mtime(entry) >= cutoff)
    else:
        spool.clear_uploads()
        spool.clear_scratch()
    # Batches with files cut off mid-run: their status.json says "processing"
    # and must be rewritten; the others are rewritten only if something moves.
    was_running = set(store.batches_with_files_in([Status.PROCESSING]))
    requeued = store.requeue_stale()
    registered = reconciled = 0
    for priority, entry in spool.work_entries():
        rel = spool.rel(entry)
        batch = store.batch_by_work_path(rel)
        if batch is None:
            if entry.is_dir() and not any(entry.iterdir()):
                entry.rmdir()  # crash between mkdir and the rename of a loose file
                continue
            try:
                if intake.register_claimed(_orphan_claim(spool, priority, entry)) is not None:
                    registered += 1
            except StoreError:
                raise  # no database: start-up cannot go on anyway
            except Exception as exc:
                # One orphan that cannot be registered must not stop every
                # start (a restart loop): it goes to failed/ as it is.
                log.error("orphan_not_registered", path=str(entry), error=repr(exc))
                spool.refuse_whole(rel, spool.unique_name(entry.name, store.name_taken))
            continue
        if not batch.status.done:
            # Its last file may have committed without deriving it (a node
            # SIGKILLed between Store.finish_file's commit and the derivation).
            settled = store.settle_batch(batch.id, datetime.now(UTC))
            batch = settled.batch if settled is not None else batch
        outbox.remove_stray_temporaries(batch)
        try:
            outbox.reconcile(batch, force_status=batch.id in was_running)
        except OSError as exc:
            # A full or read-only archive/outbox must not stop start-up: the
            # inputs stay in work/ (nothing is lost) and the next start retries.
            log.error("recovery_reconcile_failed", batch_id=batch.id, error=str(exc))
            continue
        reconciled += 1
    for batch in store.unfinished_batches():
        if not (spool.root / batch.work_path).exists():
            # Re-queued by an operator after it had finished: its status.json
            # must say it runs again.
            outbox.reconcile(batch)
    summary = {"requeued": requeued, "registered": registered, "reconciled": reconciled}
    log.info("recovery_done", **summary)
    return summary


def _orphan_claim(spool: Spool, priority: Priority, entry: Path) -> Claimed:
    """A folder found in ``work/`` with no batch, as a claim to register."""
    return Claimed(
        entry, entry.name, priority, f"recovered:{spool.rel(entry)}", owner_name(entry.lstat())
    )


def _file_running(store: Store, file_id: str) -> bool:
    file = store.get_file(file_id)
    return file is not None and file.status == Status.PROCESSING


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def check_node_id(store: Store, lease_seconds: float) -> None:
    """Refuse to start under a node id another live process is using.

    Two nodes under one id would renew each other's leases and requeue each
    other's files at start: a configuration error (exit 78), not a race to
    lose files in.
    """
    me = (socket.gethostname(), os.getpid())
    for node in store.nodes():
        if node.node_id != store.node_id or (node.host, node.pid) == me:
            continue
        try:
            age = time.time() - parse_iso(node.last_heartbeat).timestamp()
        except ValueError:
            continue
        if age > lease_seconds:
            continue  # its heartbeat stopped: a node that died or stopped
        if node.host == me[0] and not _pid_alive(node.pid):
            continue
        raise ConfigError(
            f"cluster.node_id {node.node_id!r} is in use by a live node"
            f" (host {node.host}, pid {node.pid}, last heartbeat {age:.0f} s ago);"
            " give each node its own cluster.node_id"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def adopt_orphans(spool: Spool, store: Store, intake: Intake, lease_seconds: float) -> None:
    """Register claims a dead node left in ``work/`` before registering them.

    A node killed between its claim rename and its registration leaves a
    folder no batch points to; start-up recovery of *some* node would
    find it, but in a cluster nodes rarely restart. A folder unchanged
    for longer than a lease is no live node's claim in progress.
    """
    cutoff = time.time() - lease_seconds
    for priority, entry in spool.work_entries():
        try:
            if entry.lstat().st_mtime > cutoff:
                continue
            if store.batch_by_work_path(spool.rel(entry)) is not None:
                continue
            with intake.lock:
                batch = intake.register_claimed(_orphan_claim(spool, priority, entry))
        except FileNotFoundError:
            continue  # finished and cleared meanwhile
        except (OSError, StoreError, AlreadyRegistered) as exc:
            log.warning("orphan_adopt_failed", path=str(entry), error=str(exc))
            continue
        if batch is not None:
            log.warning("orphan_claim_registered", batch=batch.name, batch_id=batch.id)


def settle_dead_uploads(spool: Spool, store: Store, intake: Intake) -> dict[str, int]:
    """What an HTTP process that died left, put on its way while the daemon runs on.

    Uploads are registered in the HTTP process (:mod:`batchd.httpproc`): one
    killed between moving an upload into ``work/`` and registering it leaves
    a folder no batch points to, and one killed mid-upload leaves its
    half-received folder; start-up recovery would find both, but the daemon
    does not restart with its HTTP process. Single node only, called before
    the next HTTP process starts: then no upload is in progress, and under
    the intake's lock no claim of the watcher is either, so every folder of
    ``work/`` without a batch is a dead upload (or a claim deferred by a
    database outage, which :meth:`Intake.retry_deferred` keeps). In a
    cluster another node's claims and uploads are in the same folders:
    :func:`adopt_orphans` registers the orphans after a lease there.
    """
    if spool.settings.database.url:
        return {"registered": 0}
    spool.clear_uploads()
    registered = 0
    with intake.lock:
        deferred = intake.deferred_paths()
        for priority, entry in spool.work_entries():
            if entry in deferred or store.batch_by_work_path(spool.rel(entry)) is not None:
                continue
            try:
                if entry.is_dir() and not any(entry.iterdir()):
                    entry.rmdir()  # reserved, never filled
                    continue
                batch = intake.register_claimed(_orphan_claim(spool, priority, entry))
            except FileNotFoundError:
                continue
            except (OSError, StoreError, AlreadyRegistered) as exc:
                log.warning("orphan_adopt_failed", path=str(entry), error=str(exc))
                continue
            if batch is not None:
                registered += 1
                log.warning("orphan_upload_registered", batch=batch.name, batch_id=batch.id)
    return {"registered": registered}
