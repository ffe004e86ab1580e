"""Content sniffing: a file's type from its bytes, not its name."""

from __future__ import annotations

import csv
import random
import zipfile
from pathlib import Path

import openpyxl
import pytest
import xlwt  # type: ignore[import-untyped]

from batchd.sniff import Sniffed, guess_delimiter, sniff

XLSX_MIME = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_pdf_by_magic_whatever_its_name(tmp_path: Path) -> None:
    """A file starting with %PDF- is a PDF even when named .csv."""
    path = write(tmp_path, "report.csv", b"%PDF-1.7\n%%EOF\n")
    assert sniff(path) == Sniffed("pdf", "application/pdf")


def test_pdf_name_with_text_content_is_not_pdf(tmp_path: Path) -> None:
    """A .pdf whose bytes are plain text is text, so allowed_types can refuse it."""
    path = write(tmp_path, "invoice.pdf", b"hello, this is not a pdf\n")
    assert sniff(path).kind != "pdf"


def test_xlsx_from_its_zip_parts(tmp_path: Path) -> None:
    """A ZIP holding [Content_Types].xml and xl/ parts is an XLSX."""
    path = tmp_path / "book.bin"
    openpyxl.Workbook().save(path)
    assert sniff(path) == Sniffed("xlsx", XLSX_MIME)


def test_plain_zip_is_zip(tmp_path: Path) -> None:
    """A ZIP that is no Office document is a zip."""
    path = tmp_path / "data.xlsx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    assert sniff(path) == Sniffed("zip", "application/zip")


def test_xls_from_its_ole2_directory(tmp_path: Path) -> None:
    """An OLE2 compound file with a Workbook stream is an XLS, whatever its name."""
    path = tmp_path / "old.dat"
    book = xlwt.Workbook()
    book.add_sheet("One").write(0, 0, "x")
    book.save(str(path))
    assert sniff(path) == Sniffed("xls", "application/vnd.ms-excel")


def test_ole2_without_known_stream_is_ole2(tmp_path: Path) -> None:
    """An OLE2 header with no Workbook stream is not taken for an XLS, even named .xls."""
    header = bytearray(512)
    header[:8] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
    header[0x1E:0x20] = (9).to_bytes(2, "little")  # 512-byte sectors
    path = write(tmp_path, "fake.xls", bytes(header) + bytes(1024))
    assert sniff(path) == Sniffed("ole2", "application/x-ole-storage")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("a.txt", b"item;price\ntea;2\ncake;3\n"),
        ("a", b"item\tprice\ntea\t2\ncake\t3\n"),
        ("a.dat", "name,city\nJos\u00e9,Z\u00fcrich\n".encode("latin-1")),
        ("a.dat", "\ufeffname,city\nx,y\n".encode()),
        ("a.dat", "name\tcity\nx\ty\n".encode("utf-16")),
        ("single.csv", b"just one column\nvalues\n"),
    ],
    ids=["semicolon", "tab", "latin1", "utf8-bom", "utf16", "csv-suffix"],
)
def test_delimited_text_is_csv(tmp_path: Path, name: str, data: bytes) -> None:
    """Text that parses as delimited rows, or any text named .csv, is a CSV."""
    assert sniff(write(tmp_path, name, data)) == Sniffed("csv", "text/csv")


def test_prose_is_txt(tmp_path: Path) -> None:
    """Text that is not delimited rows is txt."""
    path = write(tmp_path, "notes.txt", b"Dear team\nthe menu changes tomorrow\n")
    assert sniff(path) == Sniffed("txt", "text/plain")


def test_binary_is_bin(tmp_path: Path) -> None:
    """Unrecognised binary content is bin, even named .csv."""
    path = write(tmp_path, "data.csv", bytes(range(256)) * 4)
    assert sniff(path) == Sniffed("bin", "application/octet-stream")


def test_png_through_filetype(tmp_path: Path) -> None:
    """Common binary formats are named by the filetype library."""
    path = write(tmp_path, "logo", b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert sniff(path) == Sniffed("png", "image/png")


def test_empty_file(tmp_path: Path) -> None:
    """An empty file is empty."""
    assert sniff(write(tmp_path, "nothing.csv", b"")) == Sniffed("empty", "application/x-empty")


def test_unreadable_file_raises_oserror(tmp_path: Path) -> None:
    """A file that cannot be opened raises OSError for the caller to report."""
    with pytest.raises(OSError):
        sniff(tmp_path / "missing.pdf")


def test_damaged_xlsx_is_still_xlsx(tmp_path: Path) -> None:
    """An XLSX whose end (the ZIP directory) was cut off is an xlsx, not a zip or bin."""
    path = tmp_path / "cut.xlsx"
    openpyxl.Workbook().save(path)
    path.write_bytes(path.read_bytes()[:-100])
    assert sniff(path) == Sniffed("xlsx", XLSX_MIME)


@pytest.mark.parametrize(
    "bof",
    [
        b"\x09\x00\x04\x00\x02\x00\x10\x00",
        b"\x09\x02\x06\x00\x00\x00\x10\x00\x00\x00",
        b"\x09\x04\x06\x00\x00\x00\x10\x00\x00\x00",
    ],
    ids=["biff2", "biff3", "biff4"],
)
def test_excel_2_to_4_worksheets_are_xls(tmp_path: Path, bof: bytes) -> None:
    """A BIFF2-4 worksheet (Excel 2.x-4.0, no OLE2 wrapper) is sniffed as xls."""
    path = write(tmp_path, "old.xls", bof + b"\x0a\x00\x00\x00")
    assert sniff(path) == Sniffed("xls", "application/vnd.ms-excel")


def test_csv_with_control_characters_is_csv(tmp_path: Path) -> None:
    """A short CSV with a vertical tab, a NUL and an escape character is still CSV."""
    path = write(tmp_path, "odd.csv", b'"a\x0bb","c"\n1,2\x00\n3,\x1b4\n')
    assert sniff(path) == Sniffed("csv", "text/csv")


def test_sniff_takes_the_name_from_its_argument(tmp_path: Path) -> None:
    """With ``name``, the suffix comes from the user's name, not the path (/proc/self/fd/N)."""
    path = write(tmp_path, "opaque-copy", b"just one line, no newline")
    assert sniff(path).kind == "txt"
    assert sniff(path, name="upload/prices.csv").kind == "csv"


CANDIDATES = ",;\t|"
FIELDS = ["name", "12", '"2,50"', '"Smith, John"', '"a; b"', "O'Neil", "'x'", '"x|y"', ""]


def _sniffer(sample: str) -> str | None:
    try:
        return csv.Sniffer().sniff(sample, delimiters=CANDIDATES).delimiter
    except csv.Error:
        return None


def _samples(seed: int, count: int) -> list[tuple[str, str]]:
    """(delimiter, text): well-formed delimited texts of 1-30 rows of equal
    width, with quoted fields, apostrophes, blank lines and CRLF (decimal
    commas unquoted where the delimiter is not a comma)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        delimiter = rng.choice(CANDIDATES)
        fields = FIELDS if delimiter == "," else [*FIELDS, "2,50"]
        width = rng.randint(1, 6)
        rows = [
            delimiter.join(rng.choice(fields) for _ in range(width))
            for _ in range(rng.randint(1, 30))
        ]
        end = rng.choice(["\n", "\r\n", "\n\n"])
        out.append((delimiter, end.join(rows)))
    return out


def test_guess_delimiter_agrees_with_csv_sniffer() -> None:
    """guess_delimiter finds csv.Sniffer's delimiter; where it fails, the right one or None."""
    differ = []
    for delimiter, text in _samples(13, 3000):
        found, theirs = guess_delimiter(text, CANDIDATES), _sniffer(text)
        if found != theirs and not (theirs is None and found in (delimiter, None)):
            differ.append((text, found, theirs))
    assert differ == []


def test_guess_delimiter_reads_quoted_newlines_and_delimiters() -> None:
    """Quoted fields holding newlines and other candidates do not change the delimiter."""
    sample = "code;label\n" + "\n".join(
        f'{n};"Total {n}, {"a," * n}\nblank=not known; see note"' for n in range(1, 12)
    )
    assert guess_delimiter(sample, CANDIDATES) == ";"
    assert guess_delimiter(sample.replace(";", "\t"), CANDIDATES) == "\t"


def test_xlsx_archive_kept_open_only_when_asked(tmp_path: Path) -> None:
    """keep_zip hands an XLSX's open archive to the caller; by default none is kept."""
    path = tmp_path / "book.xlsx"
    openpyxl.Workbook().save(path)
    assert sniff(path).archive is None
    kept = sniff(path, keep_zip=True)
    assert kept == Sniffed("xlsx", XLSX_MIME)
    assert kept.archive is not None
    with kept.archive as zf:
        assert "xl/workbook.xml" in zf.namelist()
    plain = tmp_path / "data.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("readme.txt", "hello")
    assert sniff(plain, keep_zip=True).archive is None
