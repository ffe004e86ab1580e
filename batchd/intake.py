"""Intake: the one path by which a batch enters batchd.

A ready drop in the inbox, a folder left in ``work/`` by a crash, and an
HTTP upload all end in :meth:`Intake.register`: scan the members, apply the
limits, register everything in one transaction, write the first
status.json. Claims are serialised by a lock so two threads never pick the
same batch name; across nodes, the ``mkdir`` reservation in
:meth:`batchd.spool.Spool.claim` and the database's unique keys do that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from batchd.clock import Clock
from batchd.config import Priority, Settings
from batchd.errors import AlreadyRegistered, BatchdError, NameTaken, StoreError
from batchd.faults import crash_point
from batchd.fsutil import printable
from batchd.members import DropRefused, NameNotText, batch_limit_error
from batchd.outbox import Outbox
from batchd.records import BatchRow, NewBatch, NewFile, Status
from batchd.spool import Claimed, ClaimRefused, Spool
from batchd.store import Store

log = structlog.get_logger("batchd.intake")

#: Names tried before giving up on a claim (each loser of a race takes the next).
MAX_NAME_TRIES = 100
#: At most this many drops ready at once are registered in one transaction
#: (the write lock is held meanwhile, and the scheduler's claims wait for it).
REGISTER_GROUP_MAX = 64


class Intake:
    """Claims drops and registers batches."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        store: Store,
        outbox: Outbox,
        clock: Clock,
        on_registered: Callable[[BatchRow], None] = lambda batch: None,
        write_status: Callable[[BatchRow], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.on_registered = on_registered
        #: writes a new batch's first status.json; the daemon hands it to the
        #: archiver thread, so a claim never waits for a disk flush.
        self.write_status = write_status or outbox.write_status
        #: serialises claims and registrations of this node's threads.
        self.lock = threading.Lock()
        self._deferred: list[Claimed] = []

    def take_drop(self, source: Path, priority: Priority) -> BatchRow | None:
        """Claim a ready drop from the inbox and register it.

        ``None`` when the drop vanished (another node claimed it first) or
        another node registered the claimed folder first (see
        :meth:`register_claimed`).
        """
        with self.lock:
            claimed = self._claim_drop(source, priority)
            if claimed is None:
                return None
            return self._register_or_defer(claimed)

    def take_drops(
        self, drops: Sequence[tuple[Path, Priority]]
    ) -> list[BatchRow | Exception | None]:
        """:meth:`take_drop` for drops that are ready at the same moment.

        Each drop is claimed (moved into ``work/``) one by one, as by
        :meth:`take_drop`; then those claimed are registered in ONE store
        transaction (:meth:`Store.register_batches`), up to
        ``REGISTER_GROUP_MAX`` at a time, instead of one each (issue 15).
        A crash between the moves and the commit leaves claimed, unregistered
        folders in ``work/``, which start-up recovery registers, as after a
        crash between a single claim and its registration.

        One entry per drop, in order: its batch, ``None`` (as
        :meth:`take_drop`), or the exception its claim raised
        (:class:`ClaimRefused`, an OSError ...): one drop's trouble does not
        stop the others.
        """
        out: list[BatchRow | Exception | None] = []
        for start in range(0, len(drops), REGISTER_GROUP_MAX):
            with self.lock:
                out.extend(self._take_group(drops[start : start + REGISTER_GROUP_MAX]))
        return out

    def _take_group(
        self, drops: Sequence[tuple[Path, Priority]]
    ) -> list[BatchRow | Exception | None]:
        results: list[BatchRow | Exception | None] = []
        claims: list[tuple[int, Claimed]] = []
        for source, priority in drops:
            try:
                claimed = self._claim_drop(source, priority)
            except Exception as exc:
                results.append(exc)
                continue
            results.append(None)
            if claimed is not None:
                claims.append((len(results) - 1, claimed))
        if len(claims) <= 1:  # nothing to group
            return self._register_each(claims, results)
        prepared: list[tuple[int, Claimed, NewBatch, list[NewFile], bool]] = []
        for index, claimed in claims:
            try:
                prepared.append((index, claimed, *self._new_batch(claimed)))
            except Exception as exc:  # as register() would raise it, for this drop alone
                results[index] = exc
        try:
            batches = self.store.register_batches([p[2] for p in prepared], self.clock.now())
        except (AlreadyRegistered, NameTaken, StoreError) as exc:
            # The group rolled back as a whole: one by one now, each with
            # register_claimed()'s handling of its own clash or outage.
            log.info(
                "batch_group_registered_singly", drops=len(prepared), reason=type(exc).__name__
            )
            return self._register_each([(p[0], p[1]) for p in prepared], results)
        for (index, _claimed, new, members, refused), batch in zip(prepared, batches, strict=True):
            crash_point("after_register")  # once per batch, as for one registered alone
            try:
                results[index] = self._registered(batch, new, members, refused)
            except Exception as exc:  # registered: the rest of the group goes on
                results[index] = exc
        return results

    def _register_each(
        self, claims: list[tuple[int, Claimed]], results: list[BatchRow | Exception | None]
    ) -> list[BatchRow | Exception | None]:
        """Register each claim on its own into ``results[index]`` (its batch or its error)."""
        for index, claimed in claims:
            try:
                results[index] = self._register_or_defer(claimed)
            except Exception as exc:
                results[index] = exc
        return results

    def _register_or_defer(self, claimed: Claimed) -> BatchRow | None:
        try:
            return self.register_claimed(claimed)
        except StoreError as exc:
            # The database is away: the claim waits in work/ and is
            # registered by retry_deferred() once the database is back.
            log.error("registration_deferred", batch=claimed.name, error=str(exc))
            self._deferred.append(claimed)
            return None

    def _claim_drop(self, source: Path, priority: Priority) -> Claimed | None:
        """Move a ready drop into ``work/`` under a free name (caller holds the lock).

        ``None`` when it vanished or the database is away (it stays in the
        inbox); raises :class:`ClaimRefused` when batchd may not move it.
        """
        self.outbox.clear_inbox_refusal(printable(source.name))
        for _ in range(MAX_NAME_TRIES):
            try:
                name = self.spool.unique_name(printable(source.name), self.store.name_taken)
            except StoreError as exc:
                # The database is away: leave the drop in the inbox, where
                # the next rescan finds it again (nothing half-done).
                log.warning("claim_postponed", path=str(source), error=str(exc))
                return None
            try:
                claimed = self.spool.claim(source, priority, name)
            except FileExistsError:
                # Another node reserved this name a moment ago: take the next.
                continue
            except ClaimRefused as exc:
                # Visible where the dropper looks for results; the watcher
                # logs it once and keeps the drop in GET /api/inbox.
                try:
                    self.outbox.write_inbox_refusal(
                        name, printable(str(source)), str(priority), exc.message
                    )
                except (OSError, BatchdError) as write_exc:
                    log.error("status_write_failed", batch=name, error=str(write_exc))
                raise
            break
        else:
            raise BatchdError(f"no free batch name for {source} after {MAX_NAME_TRIES} tries")
        if claimed is None:
            log.info("drop_vanished", path=str(source))
            return None
        log.info("batch_claimed", path=str(source), batch=name, priority=str(priority))
        crash_point("after_claim")
        return claimed

    @property
    def deferred(self) -> int:
        """Claims waiting for the database to come back."""
        return len(self._deferred)

    def deferred_paths(self) -> set[Path]:
        """The work folders of the claims waiting for the database (call under ``lock``)."""
        return {claimed.path for claimed in self._deferred}

    def retry_deferred(self) -> int:
        """Register claims whose registration failed on a database error; how many."""
        done = 0
        with self.lock:
            while self._deferred:
                claimed = self._deferred[0]
                if claimed.path.exists():
                    self.register_claimed(claimed)  # StoreError: try again later
                    done += 1
                self._deferred.pop(0)
        return done

    def take_upload(
        self, folder: Path, priority: Priority, user_id: str | None, name: str
    ) -> BatchRow:
        """Register a folder batchd assembled itself (an HTTP upload)."""
        with self.lock:
            for _ in range(MAX_NAME_TRIES):
                batch_name = self.spool.unique_name(name, self.store.name_taken)
                try:
                    target = self.spool.adopt(folder, priority, batch_name)
                except FileExistsError:
                    # Reserved a moment ago by a claim in another process: the next name.
                    continue
                break
            else:
                raise BatchdError(
                    f"no free batch name for upload {name} after {MAX_NAME_TRIES} tries"
                )
            crash_point("after_adopt")
            claimed = Claimed(target, batch_name, priority, "upload", user_id)
            batch = self.register_claimed(claimed)
            if batch is None:  # pragma: no cover - an upload's folder is ours alone
                raise BatchdError(f"upload folder {target} was registered by another node")
            return batch

    def register_claimed(self, claimed: Claimed) -> BatchRow | None:
        """:meth:`register`, tolerating the other nodes of a cluster.

        * :class:`AlreadyRegistered`: another node registered this very
          folder (its start-up recovery found our claim before we registered
          it): it owns the batch, we move on; ``None``.
        * :class:`NameTaken`: another node registered a *different* drop of
          the same name at the same instant (a different inbox priority, so
          a different work folder): rename ours to the next free name and
          register again.
        """
        for _ in range(MAX_NAME_TRIES):
            try:
                return self.register(claimed)
            except AlreadyRegistered:
                log.info("batch_registered_elsewhere", batch=claimed.name, path=str(claimed.path))
                return None
            except NameTaken:
                name = self.spool.unique_name(claimed.name, self.store.name_taken)
                try:
                    renamed = self.spool.rename_claim(claimed, name)
                except FileExistsError:
                    continue
                log.info("batch_renamed", batch=claimed.name, to=name, reason="name taken")
                claimed = renamed
        raise BatchdError(f"no free batch name for {claimed.path} after {MAX_NAME_TRIES} tries")

    def register(self, claimed: Claimed) -> BatchRow:
        """Register a claimed folder in ``work/`` as a batch and write its first documents."""
        new, members, refused = self._new_batch(claimed)
        batch = self.store.register_batch(new, self.clock.now())
        crash_point("after_register")
        return self._registered(batch, new, members, refused)

    def _new_batch(self, claimed: Claimed) -> tuple[NewBatch, list[NewFile], bool]:
        """What registering ``claimed`` inserts: the batch, its members, whether refused whole."""
        refused = False
        try:
            try:
                members = self.spool.scan(claimed.path, require_text=True)
            except NameNotText:
                # A name that is not valid UTF-8 cannot be registered: rename
                # every such name (a second walk, only then) and look again.
                self._repair_names(claimed)
                members = self.spool.scan(claimed.path)
            error = batch_limit_error(len(members), self.settings.limits)
        except DropRefused as exc:
            # Too deep or too many entries: registered as a refused batch with
            # no members, its folder moved whole to failed/ (never walked again).
            members, error, refused = [], exc.message, True
        if error is None and not members:
            error = "batch has no files to process"
        new = NewBatch(
            name=claimed.name,
            priority=claimed.priority,
            user_id=claimed.user_id,
            work_path=self.spool.rel(claimed.path),
            source=claimed.source,
            files=tuple(members),
            error=error,
        )
        return new, members, refused

    def _repair_names(self, claimed: Claimed) -> None:
        for relpath in self.spool.repair_names(claimed.path):
            log.warning(
                "name_repaired",
                batch=claimed.name,
                relpath=relpath,
                detail="the name was not valid UTF-8: its bad bytes are now written as \\xNN",
            )

    def _registered(
        self, batch: BatchRow, new: NewBatch, members: list[NewFile], refused: bool
    ) -> BatchRow:
        """After the commit: result access, the log, the first documents, the wake-up."""
        error = new.error
        try:
            self.spool.prepare_batch(batch.name, batch.user_id, refused=refused)
        except OSError as exc:
            # Registered already: say so loudly. Nothing is opened to the
            # group: restrict_to() drops the group's access before the ACL.
            log.error("result_access_failed", batch_id=batch.id, batch=batch.name, error=str(exc))
        if refused:
            self.spool.refuse_whole(new.work_path, batch.name)
        log.info(
            "batch_registered",
            batch_id=batch.id,
            batch=batch.name,
            files=batch.total_files,
            priority=str(batch.priority),
            user_id=batch.user_id,
            error=error,
        )
        if error is not None or any(m.error for m in members):
            for member in members:
                if member.error and error is None:
                    log.warning(
                        "file_refused",
                        batch_id=batch.id,
                        relpath=member.relpath,
                        error=member.error,
                    )
            if error is not None:
                log.warning("batch_rejected", batch_id=batch.id, batch=batch.name, error=error)
        try:
            if error is not None or any(m.error for m in members):
                # Refused files are final already: results, failed/ and status now.
                self.outbox.reconcile(batch)
            else:
                self.write_status(batch)
        except OSError as exc:
            # The batch is registered and will run: a full or read-only outbox
            # must not turn that into a failed claim (or a 500 to an upload
            # whose batch then runs, and runs twice if the client retries).
            # The next change rewrites status.json; start-up recovery
            # reconciles refused files.
            log.error("status_write_failed", batch_id=batch.id, batch=batch.name, error=str(exc))
        if batch.status == Status.PENDING or batch.status == Status.PROCESSING:
            self.on_registered(batch)
        return batch
