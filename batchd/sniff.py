"""What a file really is, judged by its content rather than its name.

``limits.allowed_types`` and the ``inspect`` processor both ask this module.
Types are named like file extensions (``pdf``, ``xlsx``, ``xls``, ``csv``,
``png`` ...), so an operator lists them the way users name their files.

Only the first :data:`HEAD_BYTES` of a file are read, plus, for ZIP and OLE2
containers, their directory: sniffing runs in the daemon for every file
registered, so it must stay cheap whatever the file's size.
"""

from __future__ import annotations

import codecs
import csv
import re
import struct
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import filetype

HEAD_BYTES = 8192
#: text may hold this many control characters, or one per _CONTROLS_PER characters.
_MIN_CONTROLS = 4
_CONTROLS_PER = 50
#: a BIFF2-BIFF5 worksheet stream outside an OLE2 file (Excel 2.x-5.0) starts
#: with a BOF record: its id (0x0009, 0x0209, 0x0409, 0x0809) and length.
_BIFF_BOF = (b"\x09\x00\x04\x00", b"\x09\x02\x06\x00", b"\x09\x04\x06\x00")
_BIFF58_BOF = b"\x09\x08"
_TEXT_EXTENSIONS = {".csv", ".tsv", ".tab", ".txt"}
_CSV_DELIMITERS = ",;\t|"
#: the control characters text holds few of: all below 32 but \t \n \v \f \r.
_CONTROL_CHARS = tuple(chr(code) for code in range(32) if chr(code) not in "\t\n\v\f\r")
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
#: OLE2 stream names (UTF-16LE in the directory) and the document type they mean.
_OLE2_STREAMS = (
    ("Workbook".encode("utf-16-le"), "xls", "application/vnd.ms-excel"),
    ("Book\x00".encode("utf-16-le"), "xls", "application/vnd.ms-excel"),  # Excel 5/95
    ("WordDocument".encode("utf-16-le"), "doc", "application/msword"),
    ("PowerPoint Document".encode("utf-16-le"), "ppt", "application/vnd.ms-powerpoint"),
)

#: filetype's extension names where batchd's type names differ (the image
#: types inspect OCRs are named by format: ``jpeg``, ``tiff``).
_KIND_NAMES = {"jpg": "jpeg", "tif": "tiff"}


@dataclass(frozen=True, slots=True)
class Sniffed:
    """The detected type (``kind``) and its MIME type."""

    kind: str
    mime: str
    #: with ``sniff(..., keep_zip=True)``, the open archive an Office ZIP type
    #: was told from, for the caller to read and close (reading its directory
    #: again was ~10 % of inspect's time on a small workbook).
    archive: zipfile.ZipFile | None = field(default=None, compare=False, repr=False)


def decode_head(head: bytes) -> str | None:
    """``head`` as text when it looks like text (UTF-8, UTF-16 with a BOM,
    Windows-1252 or Latin-1, few control characters), else None."""
    if head.startswith(_UTF16_BOMS):
        # An odd length cuts the last code unit, and a pair may be cut too.
        text = head[: len(head) & ~1].decode("utf-16", errors="ignore")
    else:
        text = _decode_8bit(head)
    # Real CSV exports hold the odd control character (a vertical tab from a
    # spreadsheet cell, a stray NUL): a few per hundred characters is still
    # text. Binary formats and UTF-16 without a BOM have far more.
    controls = sum(map(text.count, _CONTROL_CHARS))  # one C-speed count per character
    return text if controls <= max(_MIN_CONTROLS, len(text) // _CONTROLS_PER) else None


def _decode_8bit(head: bytes) -> str:
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sample is still UTF-8.
        if exc.start >= len(head) - 3:
            return head[: exc.start].decode("utf-8")
    try:
        return head.decode("cp1252")
    except UnicodeDecodeError:
        return head.decode("latin-1")  # decodes any byte string


def _looks_like_csv(text: str, suffix: str) -> bool:
    if suffix in _TEXT_EXTENSIONS - {".txt"}:
        return True
    if "\n" not in text:
        return False
    sample = text[: text.rfind("\n")]  # whole lines only: a cut line fools the sniffer
    return guess_delimiter(sample, _CSV_DELIMITERS) is not None


# -- the delimiter -------------------------------------------------------------

#: csv.Sniffer's four expressions for a quoted field and the character around it.
_QUOTED_FIELDS = tuple(
    re.compile(expression, re.DOTALL | re.MULTILINE)
    for expression in (
        r"(?P<delim>[^\w\n\"\'])(?P<space> ?)(?P<quote>[\"\']).*?(?P=quote)(?P=delim)",
        r"(?:^|\n)(?P<quote>[\"\']).*?(?P=quote)(?P<delim>[^\w\n\"\'])(?P<space> ?)",
        r"(?P<delim>[^\w\n\"\'])(?P<space> ?)(?P<quote>[\"\']).*?(?P=quote)(?:$|\n)",
        r"(?:^|\n)(?P<quote>[\"\']).*?(?P=quote)(?:$|\n)",
    )
)
#: lines of the sample parsed with each candidate delimiter.
_PARSED_LINES = 50
#: csv.Sniffer's lines per round of its frequency tables.
_SNIFF_CHUNK_LINES = 10


def guess_delimiter(sample: str, candidates: str) -> str | None:
    """The delimiter of the delimited text ``sample`` (whole lines), or None
    when it cannot be told: where ``csv.Sniffer().sniff(sample,
    delimiters=candidates)`` raises "Could not determine delimiter" and no
    candidate parses the first lines alike.

    First the candidate that parses the first lines into rows of one width
    (:func:`_parsed_delimiter`), which decides most real files; else the
    standard library sniffer's two steps, with its answer: the character
    around quoted fields, else the candidate found the same number of times
    on (nearly) every line. The sniffer counts all 127 ASCII characters on
    every line and guesses the quote character and double quoting too (40-50 %
    of inspect's CSV time); batchd needs only the delimiter, so only the
    candidates are counted.
    """
    lines = [line for line in sample.split("\n") if line]
    parsed = _parsed_delimiter(lines[:_PARSED_LINES], candidates)
    if parsed is not None:
        return parsed
    if '"' in sample or "'" in sample:  # every quoted-field expression needs a quote
        found = _quoted_delimiter(sample, candidates)
        if found:
            return found
    return _frequent_delimiter(lines, candidates)


def _parsed_delimiter(lines: list[str], candidates: str) -> str | None:
    """The one candidate that splits every one of ``lines`` (two or more)
    into the same number of fields, more than one, read as CSV with double
    quotes; None when no candidate or more than one does.

    Quoted fields holding other candidates ("2,50" in a semicolon file) do
    not fool it, as they fool counting characters; a record that continues
    past the last line (a quoted newline) makes the candidates disagree and
    the sniffer's way decides.
    """
    if len(lines) < 2:
        return None
    found = None
    for candidate in candidates:
        try:
            widths = {len(row) for row in csv.reader(lines, delimiter=candidate) if row}
        except csv.Error:
            continue
        if len(widths) == 1 and widths.pop() > 1:
            if found is not None:
                return None  # two candidates fit: the sniffer's preferences decide
            found = candidate
    return found


def _quoted_delimiter(sample: str, candidates: str) -> str | None:
    """csv.Sniffer._guess_quote_and_delimiter's delimiter."""
    for expression in _QUOTED_FIELDS:
        matches = expression.findall(sample)
        if matches:
            break
    else:
        return None
    where = expression.groupindex.get("delim")
    if where is None:  # a single column of quoted fields
        return None
    delims: dict[str, int] = {}
    for match in matches:
        key = match[where - 1]
        if key and key in candidates:
            delims[key] = delims.get(key, 0) + 1
    return max(delims, key=delims.__getitem__) if delims else None


def _frequent_delimiter(data: list[str], candidates: str) -> str | None:
    """csv.Sniffer._guess_delimiter on the non-blank lines ``data``, counting
    only ``candidates``: the candidate whose most common count per line
    (lines in rounds of ten) holds on every line, or on 99 %, 98 % ... 90 %
    of them."""
    chars = sorted(set(candidates))  # the sniffer's order: by code point
    chunk = min(_SNIFF_CHUNK_LINES, len(data))
    frequencies: dict[str, dict[int, int]] = {}
    modes: dict[str, tuple[int, int]] = {}
    delims: dict[str, tuple[int, int]] = {}
    start, end, rounds = 0, chunk, 0
    while start < len(data):
        rounds += 1
        for line in data[start:end]:
            for char in chars:
                meta = frequencies.setdefault(char, {})
                count = line.count(char)
                meta[count] = meta.get(count, 0) + 1
        for char, meta in frequencies.items():
            items = list(meta.items())
            if len(items) == 1 and items[0][0] == 0:
                continue
            if len(items) > 1:
                mode = max(items, key=lambda item: item[1])
                items.remove(mode)
                modes[char] = (mode[0], mode[1] - sum(item[1] for item in items))
            else:
                modes[char] = items[0]
        total = float(min(chunk * rounds, len(data)))
        consistency = 1.0
        while not delims and consistency >= 0.9:
            for char, (count, lines) in modes.items():
                if count > 0 and lines > 0 and lines / total >= consistency:
                    delims[char] = (count, lines)
            consistency -= 0.01
        if len(delims) == 1:
            return next(iter(delims))
        start = end
        end += chunk
    if not delims:
        return None
    for preferred in (",", "\t", ";", " ", ":"):  # csv.Sniffer.preferred
        if preferred in delims:
            return preferred
    return max((value, char) for char, value in delims.items())[1]


_XLSX = Sniffed("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")


def _zip_office_kind(path: Path, head: bytes, *, keep_zip: bool = False) -> Sniffed | None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        # A damaged archive (its directory cut off or broken) still names
        # its first parts in the local headers at its start: a workbook that
        # lost its end is a damaged workbook, not "a zip".
        if b"[Content_Types].xml" in head and (b"xl/" in head or b"_rels/" in head):
            return _XLSX
        return None
    kind = _office_kind(zf)
    if keep_zip and kind is not None:
        return replace(kind, archive=zf)
    zf.close()
    return kind


def _office_kind(zf: zipfile.ZipFile) -> Sniffed | None:
    names = set(zf.namelist())
    if "[Content_Types].xml" not in names:
        return None
    prefixes = {n.split("/", 1)[0] for n in names}
    if "xl" in prefixes:
        return _XLSX
    if "word" in prefixes:
        return Sniffed(
            "docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        )
    if "ppt" in prefixes:
        return Sniffed(
            "pptx", "application/vnd.openxmlformats-officedocument.presentationml.presentation"
        )
    return None


def _ole2_kind(path: Path, head: bytes) -> Sniffed:
    """Which Office 97-2003 document an OLE2 compound file holds.

    The stream names live in the directory, whose first sector the header
    points to (offset 0x30; sector size 2**uint16 at 0x1E). The main stream is
    in that first sector for every file Office writes, so one extra read is
    enough; the head is searched too, for small-sector files.
    """
    where = head
    try:
        (sector_shift,) = struct.unpack_from("<H", head, 0x1E)
        (first_dir_sector,) = struct.unpack_from("<I", head, 0x30)
        if 7 <= sector_shift <= 16:
            sector = 1 << sector_shift
            with path.open("rb") as fh:
                fh.seek((first_dir_sector + 1) * sector)
                where = fh.read(sector) + head
    except (struct.error, OSError, OverflowError, ValueError):
        pass
    for name, kind, mime in _OLE2_STREAMS:
        if name in where:
            return Sniffed(kind, mime)
    return Sniffed("ole2", "application/x-ole-storage")


def sniff(path: Path, name: str | None = None, *, keep_zip: bool = False) -> Sniffed:
    """Detect the type of the regular file at ``path`` from its bytes.

    Raises ``OSError`` when the file cannot be read. An empty file is
    ``empty``; text that parses as delimited rows is ``csv`` (any text whose
    name ends in ``.csv``, ``.tsv`` or ``.tab`` counts), other text ``txt``;
    anything unrecognised is ``bin``. ``name`` is the file's name as the
    user gave it, when ``path`` is not (a ``/proc/self/fd/N`` path, a copy).
    With ``keep_zip``, an Office ZIP type comes with its open ``archive``,
    which the caller closes.
    """
    with path.open("rb") as fh:
        head = fh.read(HEAD_BYTES)
    if not head:
        return Sniffed("empty", "application/x-empty")
    if head.startswith(b"%PDF-"):
        return Sniffed("pdf", "application/pdf")
    if head.startswith(b"PK\x03\x04"):
        office = _zip_office_kind(path, head, keep_zip=keep_zip)
        if office is not None:
            return office
    if head.startswith(_OLE2_MAGIC):
        return _ole2_kind(path, head)
    if head.startswith(_BIFF_BOF) or (
        head.startswith(_BIFF58_BOF) and head[2:4] in (b"\x08\x00", b"\x10\x00")
    ):
        return Sniffed("xls", "application/vnd.ms-excel")  # Excel 2.x to 5.0, no OLE2 wrapper
    guess = filetype.guess(head)
    if guess is not None:
        kind = str(guess.extension)
        return Sniffed(_KIND_NAMES.get(kind, kind), str(guess.mime))
    text = decode_head(head)
    if text is not None:
        suffix = PurePosixPath(name if name is not None else path.name).suffix.lower()
        if _looks_like_csv(text, suffix):
            return Sniffed("csv", "text/csv")
        return Sniffed("txt", "text/plain")
    return Sniffed("bin", "application/octet-stream")
