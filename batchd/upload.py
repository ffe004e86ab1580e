"""Uploads: a multipart POST streamed into a new batch (SPEC section 6).

The body is parsed by python-multipart as it arrives; each file part goes
straight to its own file in a private folder under ``work/.uploads``, and
the upload is cut off as soon as a limit is passed (413 for size and count,
415 for a refused type, 400 for a malformed body, 429 past the per-user
rate, 408 for a body slower than ``http.min_upload_bytes_per_second``).
Nothing of a refused upload is kept.

Nothing is written before the rate limit is checked (issue 12.8): the user
is known before the first file byte, from the user's own token, else the
``X-Batchd-User`` header, else a ``user_id`` field sent before the first
file part (a file part with none before it makes the upload ``anonymous``;
a ``user_id`` after it is refused). Before the body is read the upload
takes a slot and its Content-Length from the in-flight budget
(:meth:`~batchd.httpserver.Server.upload_slot`) and must leave
``limits.min_free_bytes`` free on the spool (else 507). An accepted folder is handed to
:meth:`Intake.take_upload`, the same registration path a folder drop takes.

:class:`Upload` is all :mod:`batchd.httproutes` calls: it takes the request's
headers and body stream and returns the answer's data, or raises
:class:`~batchd.errors.Refusal`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from contextlib import AbstractContextManager
from datetime import timedelta
from email.message import Message
from io import BufferedIOBase
from pathlib import Path
from typing import Any, Protocol

import structlog
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from batchd.clock import Clock, parse_iso
from batchd.config import LimitsSettings, Settings
from batchd.diskspace import free_space_problem
from batchd.errors import ClientGone, Refusal
from batchd.fsutil import fsync_dir
from batchd.httpguard import Identity, parse_user_id
from batchd.httpserver import READ_CHUNK_BYTES, DeadlineReader
from batchd.intake import Intake
from batchd.metrics import Metrics
from batchd.spool import Spool
from batchd.store import Store
from batchd.uploadform import USER_HEADER, UploadReceiver, parse_priority

log = structlog.get_logger("batchd.upload")

#: Room for one part's boundary and headers when bounding a whole upload body.
PART_OVERHEAD_BYTES = 16 * 1024
RATE_WINDOW = timedelta(hours=1)


# -- the request -------------------------------------------------------------


def upload_length(headers: Message, limits: LimitsSettings) -> int:
    """The upload's Content-Length, checked against what the limits could ever allow."""
    if "Transfer-Encoding" in headers:
        raise Refusal(
            411, "send the upload with a Content-Length (chunked bodies are not accepted)"
        )
    text = headers.get("Content-Length")
    if text is None:
        raise Refusal(411, "send the upload with a Content-Length header")
    try:
        length = int(text)
    except ValueError:
        length = -1
    if length < 0:
        raise Refusal(400, f"Content-Length must be a byte count, not {text!r}")
    most = limits.max_files_per_batch * (limits.max_file_bytes + PART_OVERHEAD_BYTES)
    most += 4 * PART_OVERHEAD_BYTES  # the priority and user_id fields, the closing boundary
    if length > most:
        raise Refusal(
            413,
            f"upload of {length} bytes is over what the limits allow"
            f" ({limits.max_files_per_batch} files of limits.max_file_bytes ="
            f" {limits.max_file_bytes} bytes)",
        )
    return length


class UploadSlots(Protocol):
    """Where an upload takes its thread and its share of the bytes in flight."""

    def upload_slot(self, client: str, length: int) -> AbstractContextManager[None]: ...


class UploadHost(Protocol):
    """What an upload needs from the server that received it.

    Read at each use, not copied: a reconfigure mid-upload applies at once,
    as it does for every other request.
    """

    @property
    def settings(self) -> Settings: ...
    @property
    def store(self) -> Store: ...
    @property
    def spool(self) -> Spool: ...
    @property
    def intake(self) -> Intake: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def clock(self) -> Clock: ...


class Upload:
    """One upload request: read its body, register its batch, or refuse it.

    :meth:`receive` returns the data of the 201 answer or raises
    :class:`Refusal`; either way nothing of a refused upload is left on disk
    when it returns. :attr:`consumed` tells the caller whether the whole body
    was read: if not, the connection cannot serve another request.
    """

    def __init__(
        self,
        host: UploadHost,
        headers: Message,
        rfile: BufferedIOBase,
        identity: Identity,
        client: str = "",
        reader: DeadlineReader | None = None,
        slots: UploadSlots | None = None,
    ) -> None:
        self.host = host
        self.headers = headers
        self.rfile = rfile
        self.identity = identity
        self.client = client
        self.reader = reader
        self.slots = slots
        self.consumed = False

    def _header_user(self) -> str | None:
        """The user named before the body: the user's token, else ``X-Batchd-User``."""
        named = self.headers.get(USER_HEADER)
        user = parse_user_id(named) if named is not None else None
        if self.identity.user is None:
            return user
        if user is not None and user != self.identity.user:
            raise Refusal(
                403,
                f"{USER_HEADER} {user!r} is not the user of your token"
                f" ({self.identity.user!r}); leave it out",
            )
        return self.identity.user

    def receive(self) -> dict[str, Any]:
        owner = self.host
        folder: Path | None = None
        receiver: UploadReceiver | None = None
        try:
            ctype, opts = parse_options_header(self.headers.get("Content-Type", ""))
            boundary = opts.get(b"boundary")
            if ctype != b"multipart/form-data" or not boundary:
                raise Refusal(
                    415, "upload must be multipart/form-data (fields: file, priority, user_id)"
                )
            length = upload_length(self.headers, owner.settings.limits)
            settings = owner.settings
            known = self._header_user()
            if known is not None:
                self._check_rate(known, record=False)
            problem = free_space_problem(owner.spool.root, settings.limits.min_free_bytes, length)
            if problem is not None:
                log.warning("upload_no_space", reason=problem)
                raise Refusal(507, f"upload refused: {problem}")
            slot: AbstractContextManager[None] = (
                self.slots.upload_slot(self.client, length)
                if self.slots is not None
                else contextlib.nullcontext()
            )
            with slot:
                folder = owner.spool.new_upload_folder()
                receiver = UploadReceiver(
                    folder,
                    settings.limits,
                    lambda name: owner.spool.ignored(name) or name == settings.watch.marker,
                    lambda user: self._check_rate(user, record=False),
                )
                receiver.user = known
                try:
                    self._read_body(receiver, boundary, length)
                finally:
                    receiver.close()
            if not receiver.finished:
                raise Refusal(400, "malformed multipart body: it ends before its closing boundary")
            if not receiver.files:
                raise Refusal(400, "no files: send each file as a form field named file")
            priority = parse_priority(receiver.fields.get("priority", ""))
            user_id = receiver.user or "anonymous"
            for item in receiver.files:
                problem = owner.spool.check_file(item.path, item.path.stat())
                if problem is not None:
                    raise Refusal(415, f"file {item.name!r} refused: {problem}")
            fsync_dir(folder)
            self._check_rate(user_id, record=True)
            batch = owner.intake.take_upload(folder, priority, user_id, f"upload-{folder.name[:8]}")
            files = owner.store.list_files(batch.id)
            owner.metrics.upload_ended("accepted")
            log.info("upload_accepted", batch_id=batch.id, user_id=user_id, files=len(files))
            return {
                "batchId": batch.id,
                "name": batch.name,
                "totalFiles": batch.total_files,
                "status": str(batch.status),
                "files": [
                    {
                        "id": f.id,
                        "filename": f.filename,
                        "fileSize": f.file_size,
                        "status": str(f.status),
                    }
                    for f in files
                ],
            }
        except Refusal as exc:
            # Delete before answering: once the client reads the refusal, nothing is kept.
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            owner.metrics.upload_ended(str(exc.status))
            log.info("upload_refused", status=exc.status, error=exc.message)
            raise
        finally:
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)

    def _read_body(self, receiver: UploadReceiver, boundary: bytes, length: int) -> None:
        """Feed the body to the parser; 408 when it arrives slower than the minimum rate.

        A per-read timeout alone lets a client send one byte every few
        seconds and hold its thread for hours: after a grace of
        ``http.socket_timeout_seconds`` the body must have arrived at
        ``http.min_upload_bytes_per_second`` on average, and the socket's
        deadline is set to the moment it would fall behind.
        """
        http = self.host.settings.http
        rate = http.min_upload_bytes_per_second
        grace = http.socket_timeout_seconds
        started = time.monotonic()
        got = 0
        remaining = length
        try:
            parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
            while remaining > 0:
                if self.reader is not None and rate > 0:
                    self.reader.deadline = started + grace + got / rate
                try:
                    chunk = self.rfile.read1(min(READ_CHUNK_BYTES, remaining))
                except TimeoutError:
                    raise Refusal(
                        408,
                        f"upload body too slow: {got} of {length} bytes in"
                        f" {time.monotonic() - started:.1f} s, under"
                        f" http.min_upload_bytes_per_second ({rate}); connection closed",
                    ) from None
                if not chunk:
                    raise ClientGone()
                remaining -= len(chunk)
                got += len(chunk)
                parser.write(chunk)
            self.consumed = True
            parser.finalize()
        except FormParserError as exc:
            raise Refusal(400, f"malformed multipart body: {exc}") from None
        finally:
            if self.reader is not None:
                self.reader.deadline = None

    def _check_rate(self, user_id: str, record: bool) -> None:
        """429 when ``user_id`` has used up its uploads this hour; with ``record``,
        atomically count this upload when it may go ahead."""
        owner = self.host
        limit = owner.settings.limits.uploads_per_user_per_hour
        now = owner.clock.now()
        if record:
            if owner.store.record_upload(user_id, now, limit, RATE_WINDOW):
                return
        elif len(owner.store.uploads_since(user_id, now - RATE_WINDOW)) < limit:
            return
        times = owner.store.uploads_since(user_id, now - RATE_WINDOW)
        if times:
            wait = (parse_iso(times[0]) + RATE_WINDOW - now).total_seconds()
        else:
            wait = RATE_WINDOW.total_seconds()
        retry_after = max(1, math.ceil(wait))
        raise Refusal(
            429,
            f"user {user_id!r} has made {limit} uploads in the last hour"
            f" (limits.uploads_per_user_per_hour); try again in {retry_after} s",
            {"Retry-After": str(retry_after)},
        )
