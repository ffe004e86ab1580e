"""The scheduler: the daemon's main loop.

It owns the worker pool and is the only code that moves a file from
``pending`` to ``processing`` and on to its end. Each turn of the loop:
hand due files to idle workers (priority, then FIFO), wait for worker
events, a wake-up or the next timer, then record outcomes (that part is
:mod:`batchd.outcomes`: retry or final, the fsync barrier, the grouped
commit, the database-outage guard). A free worker
gets the next file in the same turn that freed it, with no polling delay;
the ``processing.poll_seconds`` sweep only catches back-off timers and
changes other processes made to the database (an operator's re-queue).

In a cluster (PostgreSQL store) the loop also heart-beats every
``cluster.heartbeat_seconds`` (extending the leases of the files it runs),
takes back the files of nodes whose leases expired, and selects on the
store's LISTEN socket so that work registered by another node wakes it at
once.

The database may go away (restart, fail-over, network): a
:class:`StoreError` never ends the loop. Running files go on; their
outcomes wait in memory (:class:`batchd.outcomes.Outcomes`) and are
committed when the database answers again, retried with exponential back-off
up to :data:`batchd.outage.DB_RETRY_MAX_SECONDS`; no new file starts meanwhile, and /healthz
says 503 (its own ping fails).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
from collections.abc import Callable
from datetime import timedelta

import structlog

from batchd.archiver import ArchiveFile, Archiver
from batchd.attempts import Running
from batchd.clock import Clock, iso, parse_iso
from batchd.config import Settings
from batchd.errors import StoreError
from batchd.faults import crash_point, hang_point
from batchd.members import batch_limit_error
from batchd.messages import Job
from batchd.metrics import Metrics
from batchd.outage import DB_RETRY_MIN_SECONDS
from batchd.outbox import Outbox, ResultSyncer
from batchd.outcomes import Outcomes
from batchd.pool import WorkerPool, claim_deadline
from batchd.processors import choose
from batchd.records import FileRow, FileTask, Status
from batchd.safefs import UnsafePath
from batchd.spool import Spool
from batchd.store import Store
from batchd.worker import job_for

log = structlog.get_logger("batchd.scheduler")

#: How often the loop refreshes the live-workers gauge.
GAUGE_SECONDS = 0.5


class Scheduler:
    """Dispatches files to the pool; :attr:`outcomes` records how each attempt ended."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        spool: Spool,
        outbox: Outbox,
        pool: WorkerPool,
        clock: Clock,
        metrics: Metrics,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.outbox = outbox
        self.pool = pool
        self.clock = clock
        self.metrics = metrics
        self.on_tick = on_tick
        self.syncer = ResultSyncer()
        self.archiver = Archiver(spool, outbox, syncer=self.syncer)
        self.outcomes = Outcomes(
            settings, store, spool, outbox, clock, metrics, self.archiver, self.syncer
        )
        self.outcomes.refill = self._dispatch
        self.outcomes.adopt = self._adopt
        #: tokens of gone workers whose own claims are still to be looked for.
        self._gone: list[str] = []
        #: tokens of live workers whose record failed after it may have
        #: committed their claim (Done.claim_unknown): looked for, given back.
        self._unsure: list[str] = []
        #: files a worker claimed itself but could not start, and no worker was
        #: idle to take: back to the queue at the next turn (not an attempt).
        self._give_back: list[FileTask] = []
        self.outcomes.on_reconnect = self._renew_soon
        #: where this node's HTTP API listens (``nodes.address``); set by the daemon.
        self.address: str | None = None
        self._next_beat = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        #: a wake byte is on its way and the loop has not yet begun reading
        #: it: another wake can be left out (see :meth:`wake`).
        self._wake_pending = False
        self._stop_requested = threading.Event()
        # Plain flags a signal handler may set (an Event takes a lock).
        self._stop_signalled = False
        self._force_stop = False
        #: called on the loop's thread when the drain starts (False) and when
        #: a forced stop cuts it short (True): the daemon logs and notifies there.
        self.on_stop: Callable[[bool], None] = lambda forced: None
        self._reload: Callable[[], None] | None = None
        #: monotonic time of the last completed loop turn (watchdog, health).
        self.heartbeat = clock.monotonic()
        #: monotonic time by which an idle loop must turn anyway, so that
        #: ``on_tick`` runs on time (the daemon's next systemd watchdog ping).
        self.tick_by: float | None = None
        self._next_gauge = 0.0

    # -- control (any thread) ----------------------------------------------------

    def wake(self) -> None:
        """Make the loop look at the queue now (new batch registered, re-queue).

        One byte per wake-up, not per call: intake registers loose drops in
        groups of up to 64 and wakes the loop for each. A wake is left out
        only while ``_wake_pending`` says a byte is on its way or being read;
        the loop clears it after reading the bytes and looks at the queue
        after that, so the change behind a left-out wake is seen by that
        look. (Clearing before reading could eat a byte sent in between and
        leave the flag set with no byte to come.)
        """
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _drain_wakes(self) -> None:
        """Read the wake bytes (the loop's thread), then let wakes send again."""
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass
        self._wake_pending = False

    def request_stop(self) -> None:
        self._stop_requested.set()
        self.wake()

    def signal_stop(self, force: bool = False) -> None:
        """Stop (``force``: end the drain now); safe inside a signal handler."""
        self._stop_signalled = True
        if force:
            self._force_stop = True
        # At once, not at the next turn: a worker finishing now claims nothing.
        self.pool.allow_claims(False)
        self.wake()

    def request_reload(self, apply: Callable[[], None]) -> None:
        """Run ``apply`` on the scheduler's thread at the next turn."""
        self._reload = apply
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stop_signalled or self._stop_requested.is_set()

    @property
    def db_error(self) -> str | None:
        """The last database error while it lasts (None: the database answers)."""
        return self.outcomes.db_error

    @property
    def finished_count(self) -> int:
        return self.outcomes.finished_count

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings (on the scheduler's thread)."""
        self.settings = self.outcomes.settings = settings
        self.pool.configure(settings)

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        """Run until :meth:`request_stop`, then drain within the shutdown grace."""
        self.archiver.start()
        try:
            while not self.stopping:
                self.turn()
            self._drain()
        finally:
            self.archiver.stop()
            self.syncer.close()

    def turn(self) -> None:
        """One turn of the loop (``run`` repeats it; unit tests drive it directly)."""
        hang_point("scheduler_turn")
        if self._reload is not None:
            apply, self._reload = self._reload, None
            apply()
        self.outcomes.guarded(self._beat)
        self.outcomes.guarded(self.outcomes.commit)
        self.outcomes.guarded(self._dispatch)
        self.pool.allow_claims(self._claims_allowed())
        listen = self._listen_fileno()
        extra: list[object] = [self._wake_r] if listen is None else [self._wake_r, listen]
        events, ready = self.pool.wait(self._timeout(), extra)
        if self._wake_r in ready:
            self._drain_wakes()
        if listen is not None and listen in ready:
            # Work registered or requeued (by any node): the next turn's
            # dispatch, right after this one, claims it.
            self.outcomes.guarded(self.store.drain_notifications)
        for event in events:
            self.outcomes.handle(event)
        self.outcomes.guarded(self._sweep_gone)
        self.outcomes.guarded(self.outcomes.commit)
        self.outcomes.guarded(self.outcomes.flush)
        self.heartbeat = self.clock.monotonic()
        if self.heartbeat >= self._next_gauge:
            # Asking each worker process whether it lives is a system call
            # apiece: a gauge need not be fresher than this.
            self._next_gauge = self.heartbeat + GAUGE_SECONDS
            self.metrics.set_workers(self.pool.alive())
        self.on_tick()

    def _timeout(self) -> float:
        timeout = self.settings.processing.poll_seconds
        if self.tick_by is not None:
            timeout = min(timeout, max(0.0, self.tick_by - self.clock.monotonic()) + 0.001)
        if self.outcomes.dirty or self.outcomes.progress:
            timeout = min(timeout, self.settings.processing.status_interval_seconds)
        if self.outcomes.db_error is not None:
            timeout = min(
                timeout, max(0.0, self.outcomes.db_retry_at - self.clock.monotonic()) + 0.001
            )
        elif self.pool.idle():
            try:
                due = self.store.next_due()
            except StoreError as exc:
                self.outcomes.db_failed(exc)
                return min(timeout, DB_RETRY_MIN_SECONDS)
            if due is not None:
                wait = (due - self.clock.now()).total_seconds()
                timeout = min(timeout, max(0.0, wait) + 0.001)
        return timeout

    def _listen_fileno(self) -> int | None:
        """The store's wake-up socket (PostgreSQL LISTEN); None while the database is away."""
        if self.outcomes.db_error is not None:
            return None
        return self.store.listen_fileno()

    def _renew_soon(self) -> None:
        self._next_beat = 0.0

    def _beat(self) -> None:
        """Every ``cluster.heartbeat_seconds``: say this node lives, extend the
        leases of the files it runs, and requeue the files of nodes whose
        leases expired (their node died or lost the database)."""
        now_mono = self.clock.monotonic()
        if now_mono < self._next_beat:
            return
        now = self.clock.now()
        self.store.heartbeat(now, self.address, list(self.outcomes.running), self.outcomes.leases())
        requeued = self.store.requeue_expired(now)
        self._next_beat = now_mono + self.settings.cluster.heartbeat_seconds
        if requeued:
            log.warning("leases_expired_requeued", files=requeued)
        # A batch whose last file a dead node committed without deriving it
        # (Store.finish_file) would stay processing until that node starts again.
        lease = timedelta(seconds=self.settings.cluster.lease_seconds)
        for settled in self.store.settle_abandoned(now, now - lease):
            batch = settled.batch
            log.warning("abandoned_batch_ended", batch_id=batch.id)
            # The dead node's archiver may not have moved its inputs: each by
            # its own status first (a failure to failed/), as recovery does,
            # before the end sweeps what is left to archive/.
            for file in self.store.list_files(batch.id):
                if file.status.done:
                    ok = file.status == Status.COMPLETED
                    where = (batch.work_path, batch.name, file.relpath)
                    self.archiver.archive_file(ArchiveFile(file.id, batch.id, *where, ok))
            self.outcomes.batch_moved_on(batch)

    def _claims_allowed(self) -> bool:
        """Whether a worker may claim its next file itself now (the standing permit).

        Not while stopping, with the database away, or with outcomes not yet
        committed (their rows still say processing: the daemon's own claims
        wait for that commit too).
        """
        outcomes = self.outcomes
        return (
            self.settings.processing.worker_claims
            and not self.stopping
            and outcomes.db_error is None
            and not outcomes.pending
            and not outcomes.retries
            and not self._give_back
        )

    def _adopt(self, task: FileTask, job: Job | None, claimed_at: float = 0.0) -> None:
        """Follow a file a worker claimed itself in its success's commit (issue 15).

        With the job it started the file is this node's running attempt as
        if dispatched here (its deadline, lease and outcome as any other).
        Without one the worker found its input gone or its batch over a
        limit: what the daemon's own claim would do is done here.
        """
        file = task.file
        known = self.outcomes.running.get(file.id)
        if known is not None and known.task.file.lease_gen > file.lease_gen:
            # Re-queued (an operator's UPDATE) and claimed again here while the
            # worker's message was still in its pipe: that claim is stale. Stop
            # its attempt; following it would drop the new one's outcome and
            # leave the file processing with no one running it.
            if job is not None:
                self.pool.cancel(file.id, file.lease_gen)
            log.warning(
                "worker_claim_superseded",
                batch_id=file.batch_id,
                file_id=file.id,
                relpath=file.relpath,
                lease=file.lease_gen,
                current_lease=known.task.file.lease_gen,
            )
            return
        if job is None or job.delivery is None:
            if self.pool.idle() > 0 and not self.stopping:
                self._start(task)
            else:
                self._give_back.append(task)
            return
        # From the claim, as the pool's deadline (pool.claim_deadline).
        timeout = self.settings.processing.timeout_seconds
        begun = claim_deadline(self.clock.monotonic(), timeout, claimed_at) - timeout
        self.outcomes.running[file.id] = Running(
            task, job.processor, job.delivery.started_at, begun, job.delivery.result_path
        )
        self.outcomes.dirty.add(file.batch_id)
        if file.attempts == 1:
            self._waited(file)

    def _waited(self, file: FileRow) -> None:
        with contextlib.suppress(ValueError):
            wait = parse_iso(file.started_at or "") - parse_iso(file.created_at)
            self.metrics.waited(max(0.0, wait.total_seconds()))

    def _sweep_gone(self) -> None:
        """Find what gone workers claimed themselves and never reported.

        A worker killed (or dead) between the commit of its claim and its
        message leaves a row ``processing`` under its token that no one
        runs: each is an attempt lost with its worker, retried after its
        back-off (or failed once its retries are spent), as any attempt whose
        worker died. Fenced: a file this node follows under the same claim
        (reported, its worker's death handled as a Lost) is left alone.
        """
        # Kept until looked for: a database error midway leaves them for the next turn.
        self._gone += self.pool.take_dead_tokens()
        self._unsure += self.pool.take_unsure_tokens()
        while self._give_back:
            task = self._give_back[0]
            self.store.requeue([task.file.id], {task.file.id: task.file.lease_gen})
            self._give_back.pop(0)
        while self._unsure:
            # The worker lives and is idle (its record failed, so it started
            # nothing): a claim the store committed before failing is back to
            # pending, unspent, instead of processing with no one running it
            # until its lease (PostgreSQL) or the next start (SQLite) ends.
            for task in self.store.claimed_by(self._unsure[0]):
                file = task.file
                if self._follows(task):
                    continue
                log.warning(
                    "worker_claim_returned",
                    batch_id=file.batch_id,
                    file_id=file.id,
                    relpath=file.relpath,
                    lease=file.lease_gen,
                )
                self.store.requeue([file.id], {file.id: file.lease_gen})
                self.outcomes.dirty.add(file.batch_id)
            self._unsure.pop(0)
        while self._gone:
            for task in self.store.claimed_by(self._gone[0]):
                file = task.file
                if self._follows(task):
                    continue
                running = self._running(task, choose(self.settings, file.relpath))
                self.outcomes.running[file.id] = running
                self.outcomes.dirty.add(file.batch_id)
                log.warning(
                    "worker_claim_lost",
                    batch_id=file.batch_id,
                    file_id=file.id,
                    relpath=file.relpath,
                    lease=file.lease_gen,
                )
                self.outcomes.lost(
                    running,
                    "worker process died after claiming the file, before reporting the claim",
                )
            self._gone.pop(0)

    def _running(self, task: FileTask, processor: str) -> Running:
        """This node's record of an attempt at ``task``'s file, from its claim."""
        file = task.file
        return Running(
            task,
            processor,
            file.started_at or iso(self.clock.now()),
            self.clock.monotonic(),
            str(self.spool.result_path(task.batch_name, file.relpath)),
        )

    def _follows(self, task: FileTask) -> bool:
        """Whether this node follows that very claim of the file (reported to it)."""
        known = self.outcomes.running.get(task.file.id)
        return known is not None and known.task.file.lease_gen == task.file.lease_gen

    def _dispatch(self) -> None:
        while not self.stopping and self.pool.idle() > 0:
            task = self.store.claim_next(self.clock.now())
            if task is None:
                return
            self._start(task)

    def _start(self, task: FileTask) -> None:
        file = task.file
        if self.archiver.touches(file.id, file.batch_id):
            self.archiver.wait_untouched(file.id, file.batch_id)
        old = self.outcomes.running.get(file.id)
        if old is not None and old.task.file.lease_gen != file.lease_gen:
            # Claimed again while we still run it (an operator re-queued the
            # running file by SQL): the old attempt lost its claim. Stop it
            # before it writes anything.
            self.pool.cancel(file.id, old.task.file.lease_gen)
            self.outcomes.superseded(old, "claimed_again")
            # What the stopped attempt left must not pass for the new one's outputs.
            shutil.rmtree(self.spool.scratch_for(file.id), ignore_errors=True)
        unsafe = None
        try:
            path = self.spool.locate_input(task.work_path, task.batch_name, file.relpath)
        except OSError as exc:
            path = None
            log.error(
                "input_unavailable",
                batch_id=file.batch_id,
                file_id=file.id,
                relpath=file.relpath,
                error=str(exc),
            )
        except UnsafePath as exc:
            # A re-queued input whose way back from archive/failed is a link now.
            path, unsafe = None, exc.message
        processor = choose(self.settings, file.relpath)
        running = self._running(task, processor)
        self.outcomes.running[file.id] = running
        self.outcomes.dirty.add(file.batch_id)
        if path is None:
            self.outcomes.fail(
                running, unsafe or "input file is no longer in the spool (moved or deleted)"
            )
            return
        refusal = batch_limit_error(task.batch_files, self.settings.limits)
        if refusal is not None:
            # Only a re-queued member of a batch refused whole gets here (by
            # `batchd retry` or an operator's UPDATE): it keeps its refusal.
            self.outcomes.fail(running, refusal)
            return
        self.pool.submit(
            job_for(
                task,
                str(path),
                processor,
                running.started_at,
                self.spool,
                self.settings,
                may_claim=self.settings.processing.worker_claims,
            )
        )
        crash_point("after_dispatch")
        if file.attempts == 1:
            self._waited(file)
        log.debug(
            "file_started",
            batch_id=file.batch_id,
            file_id=file.id,
            relpath=file.relpath,
            processor=processor,
            attempt=file.attempts,
        )

    # -- shutdown ----------------------------------------------------------------

    def _requeue_gone_claims(self) -> None:
        """After the workers stopped: their own claims not reported back to the queue.

        A worker stopped at the end of the drain may have claimed its next
        file a moment before (its permit read just before it was withdrawn):
        cut short by us, so the attempt is not spent (as ``shutdown_requeued``).
        """
        tokens = self._gone + self._unsure + self.pool.take_dead_tokens()
        tokens += self.pool.take_unsure_tokens()
        self._gone, self._unsure = [], []
        try:
            for token in tokens:
                # Not the files followed here: requeued above, or their
                # outcome left for the next start (shutdown_outcomes_unrecorded).
                tasks = [t for t in self.store.claimed_by(token) if not self._follows(t)]
                if tasks:
                    log.warning("shutdown_requeued", files=len(tasks), claimed_by_worker=True)
                    self.store.requeue(
                        [t.file.id for t in tasks], {t.file.id: t.file.lease_gen for t in tasks}
                    )
                    for task in tasks:
                        self.outcomes.dirty.add(task.file.batch_id)
        except StoreError as exc:
            # The next start takes this node's processing files back (recovery).
            log.error("shutdown_requeue_failed", files=len(tokens), error=exc.message)

    def _drain(self) -> None:
        """Let running files finish for up to the grace period, then requeue the rest."""
        grace = self.settings.processing.shutdown_grace_seconds
        deadline = self.clock.monotonic() + grace
        self.pool.allow_claims(False)
        self.on_stop(False)
        if self.outcomes.running:
            log.info("shutdown_draining", running=len(self.outcomes.running), grace_seconds=grace)
        while self.outcomes.running and self.clock.monotonic() < deadline:
            if self._force_stop:
                self.on_stop(True)
                break
            remaining = deadline - self.clock.monotonic()
            events, ready = self.pool.wait(min(remaining, 0.5), [self._wake_r])
            if self._wake_r in ready:
                self._drain_wakes()
            for event in events:
                self.outcomes.handle(event)
            self.outcomes.guarded(self._sweep_gone)
            self.outcomes.guarded(self._beat)
            self.outcomes.guarded(self.outcomes.commit)
            self.outcomes.guarded(self.outcomes.flush)
        # One last try for outcomes the database has not taken yet.
        self.outcomes.db_error = None
        self.outcomes.guarded(self.outcomes.commit)
        unrecorded = {f.running.task.file.id for f in self.outcomes.pending}
        unrecorded |= {r.running.task.file.id for r in self.outcomes.retries}
        left = [fid for fid in self.outcomes.running if fid not in unrecorded]
        try:
            if left:
                log.warning("shutdown_requeued", files=len(left))
                self.store.requeue(left, self.outcomes.leases())
                for file_id in left:
                    self.outcomes.dirty.add(self.outcomes.running[file_id].task.file.batch_id)
        except StoreError as exc:
            left = [*left, *unrecorded]
            unrecorded = set()
            log.error("shutdown_requeue_failed", files=len(left), error=exc.message)
        if unrecorded:
            # Their results are written; the database still says processing.
            # The next start (or, in a cluster, the lease) runs them again.
            log.error(
                "shutdown_outcomes_unrecorded", files=len(unrecorded), error=self.outcomes.db_error
            )
        self.pool.stop()
        self._requeue_gone_claims()
        self.outcomes.running.clear()
        self.outcomes.guarded(lambda: self.outcomes.flush(force=True))
        with contextlib.suppress(OSError):
            self._wake_r.close()
            self._wake_w.close()
