"""An upload's multipart form: file parts streamed to files, limits checked as bytes arrive.

:class:`UploadReceiver` is python-multipart's callbacks for one upload
(:class:`batchd.upload.Upload` drives the parser): each file part goes
straight to its own file in the upload's private folder under a safe,
unique name (:func:`safe_filename`), the ``priority`` and ``user_id``
fields are read, and a :class:`~batchd.errors.Refusal` is raised the moment
a limit is passed.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import parse_options_header

from batchd.config import LimitsSettings, Priority
from batchd.errors import Refusal
from batchd.httpguard import parse_user_id

#: A plain form field (priority, user_id) longer than this is refused.
MAX_FIELD_BYTES = 1024
#: The header naming the uploading user when no per-user token does.
USER_HEADER = "X-Batchd-User"
#: File names are cut to this many UTF-8 bytes (filesystems allow 255).
MAX_FILENAME_BYTES = 200


# -- file names --------------------------------------------------------------


def safe_filename(raw: str) -> str:
    """A plain base name for an uploaded file, or ``""`` when nothing usable is left.

    Directory parts (``/`` and ``\\``) are dropped, control, format and other
    non-printing characters removed, leading dots stripped (hidden names are
    ignored by the spool and ``..`` must never survive), and the name cut to
    :data:`MAX_FILENAME_BYTES` keeping its extension.
    """
    name = unicodedata.normalize("NFC", raw).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = name.strip().lstrip(".").strip()
    if len(name.encode("utf-8")) > MAX_FILENAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        if not dot or len(ext) > 16:
            stem, ext = name, ""
        else:
            ext = "." + ext
        budget = MAX_FILENAME_BYTES - len(ext.encode("utf-8"))
        name = stem.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip() + ext
    return name


def _unique(name: str, taken: set[str]) -> str:
    """``name``, else ``stem-2.ext``, ``stem-3.ext`` ... whichever is not in ``taken``."""
    if name not in taken:
        return name
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    n = 2
    while f"{stem}-{n}{dot}{ext}" in taken:
        n += 1
    return f"{stem}-{n}{dot}{ext}"


# -- multipart uploads -------------------------------------------------------


@dataclass
class _Part:
    form_name: str
    filename: str | None = None  # None for a plain form field
    path: Path | None = None
    fh: BinaryIO | None = None
    size: int = 0
    value: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True, slots=True)
class Received:
    """One uploaded file on disk: its safe name, where it is, how big."""

    name: str
    path: Path
    size: int


class UploadReceiver:
    """python-multipart callbacks that stream file parts into ``folder``.

    Each file part goes straight to its own file; limits are checked as
    bytes arrive and a :class:`Refusal` is raised from inside the parser
    the moment one is passed, which stops the reading.
    """

    def __init__(
        self,
        folder: Path,
        limits: LimitsSettings,
        skipped: Callable[[str], bool],
        on_user: Callable[[str], None],
    ) -> None:
        self.folder = folder
        self.limits = limits
        self.skipped = skipped
        self.on_user = on_user
        #: The user once known: from the token or header, a user_id field, or
        #: "anonymous" when the first file part comes with none before it.
        self.user: str | None = None
        self.files: list[Received] = []
        self.fields: dict[str, str] = {}
        self.finished = False
        self._taken: set[str] = set()
        self._part: _Part | None = None
        self._headers: dict[str, str] = {}
        self._hfield = bytearray()
        self._hvalue = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._hfield.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._hvalue.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def close(self) -> None:
        """Close a file left open by an upload cut short."""
        if self._part is not None and self._part.fh is not None:
            self._part.fh.close()
            self._part.fh = None

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._hfield.decode("latin-1").strip().lower()] = self._hvalue.decode(
            "latin-1"
        ).strip()
        self._hfield.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        _disposition, opts = parse_options_header(self._headers.get("content-disposition", ""))
        part = _Part(form_name=opts.get(b"name", b"").decode("utf-8", "replace"))
        raw_name = opts.get(b"filename")
        self._part = part
        if raw_name is None:
            return
        part.filename = raw_name.decode("utf-8", "replace")
        if self.user is None:
            # No file byte is written before the rate limit is checked.
            self.user = "anonymous"
            self.on_user(self.user)
        name = safe_filename(part.filename)
        if not name:
            return  # refused below if it carries any data (a browser's empty file input has none)
        if len(self.files) >= self.limits.max_files_per_batch:
            raise Refusal(
                413,
                f"too many files: more than limits.max_files_per_batch"
                f" ({self.limits.max_files_per_batch}) in one upload",
            )
        if self.skipped(name):
            raise Refusal(
                400,
                f"file name {name!r} is one batchd ignores as work in progress (watch.ignore);"
                " rename the file",
            )
        name = _unique(name, self._taken)
        self._taken.add(name)
        part.filename = name
        part.path = self.folder / name
        # O_EXCL | O_NOFOLLOW: the name is a fresh plain name in a private folder;
        # refuse anything else rather than write through a surprise.
        fd = os.open(part.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        part.fh = os.fdopen(fd, "wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None:
            return
        n = end - start
        if part.filename is None:
            if part.form_name in ("priority", "user_id"):
                part.value.extend(data[start:end])
                if len(part.value) > MAX_FIELD_BYTES:
                    raise Refusal(
                        400, f"form field {part.form_name} is over {MAX_FIELD_BYTES} bytes"
                    )
            return  # other fields are ignored
        if part.fh is None:
            if n:
                raise Refusal(400, f"a file part has no usable file name ({part.filename!r})")
            return
        part.size += n
        if part.size > self.limits.max_file_bytes:
            raise Refusal(
                413,
                f"file {part.filename!r} is over limits.max_file_bytes"
                f" ({self.limits.max_file_bytes} bytes)",
            )
        part.fh.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        if part.fh is not None and part.path is not None and part.filename is not None:
            part.fh.flush()
            # fsync before the folder is adopted: a registered batch must never
            # point at a file whose blocks are not on disk yet.
            os.fsync(part.fh.fileno())
            part.fh.close()
            self.files.append(Received(part.filename, part.path, part.size))
        elif part.filename is None and part.form_name in ("priority", "user_id"):
            try:
                value = part.value.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise Refusal(400, f"form field {part.form_name} is not UTF-8 text") from None
            self.fields[part.form_name] = value
            if part.form_name == "priority":
                parse_priority(value)
            elif not value:
                return  # an empty field names nobody (a browser form left blank)
            elif self.files or self.user == "anonymous":
                raise Refusal(
                    400,
                    "send user_id before the first file part (or as the X-Batchd-User"
                    " header): the rate limit is checked before any file is written",
                )
            else:
                user = parse_user_id(value)
                if self.user is not None and user != self.user:
                    raise Refusal(
                        403,
                        f"user_id {user!r} is not the user your token or {USER_HEADER}"
                        f" names ({self.user!r})",
                    )
                self.user = user
                self.on_user(user)

    def _end(self) -> None:
        self.finished = True


def parse_priority(value: str) -> Priority:
    """The ``priority`` form field (empty means normal)."""
    try:
        return Priority(value.lower() or Priority.NORMAL)
    except ValueError:
        raise Refusal(400, f"priority must be high, normal or low, not {value!r}") from None
