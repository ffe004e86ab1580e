"""The ``inspect`` processor on real PDF, XLSX, XLS and CSV files made here."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import random
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import openpyxl
import pytest
import xlwt  # type: ignore[import-untyped]
from inspecting import inspect_file
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from batchd.config import Settings, load_settings
from batchd.errors import PermanentError


def settings(**processing: int) -> Settings:
    env = {f"BATCHD_PROCESSING__{key.upper()}": str(value) for key, value in processing.items()}
    return load_settings(None, env=env)


def run(path: Path, config: Settings | None = None) -> tuple[dict[str, Any], list[int]]:
    """Inspect ``path``; the result (checked to be JSON) and the progress reported."""
    return inspect_file(path, config or settings())


def identity(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- PDF -----------------------------------------------------------------------


def make_pdf(
    texts: list[str],
    info: dict[str, str] | None = None,
    password: str | None = None,
    algorithm: str = "RC4-128",
) -> bytes:
    """A PDF with one Helvetica text line per page, written by pypdf."""
    writer = PdfWriter()
    font = writer._add_object(
        DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
    )
    for text in texts:
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        stream = DecodedStreamObject()
        stream.set_data(b"BT /F1 12 Tf 72 720 Td (" + text.encode("latin-1") + b") Tj ET")
        page[NameObject("/Contents")] = writer._add_object(stream)
    if info:
        writer.add_metadata(info)
    if password is not None:
        writer.encrypt(user_password=password, owner_password="owner", algorithm=algorithm)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


MENU_INFO = {
    "/Title": "Winter menu",
    "/Author": "Chef Ana",
    "/Subject": "Prices",
    "/Creator": "tests",
    "/CreationDate": "D:20241128100000Z",
}


def test_pdf_pages_metadata_and_text(tmp_path: Path) -> None:
    """A PDF gives its page count, document information and each page's text."""
    path = tmp_path / "menu.pdf"
    path.write_bytes(make_pdf(["Soup 4.50", "Tea 2.00", "Cake 3.20"], MENU_INFO))
    # Without OCR the text pass has the whole progress bar (test_processors_ocr.py has the rest).
    result, progress = run(path, load_settings(None, env={"BATCHD_INSPECT__OCR": "never"}))
    assert result == {
        "type": "pdf",
        "mime": "application/pdf",
        **identity(path),
        "pages": 3,
        "encrypted": False,
        "metadata": {
            "title": "Winter menu",
            "author": "Chef Ana",
            "subject": "Prices",
            "keywords": None,
            "creator": "tests",
            "producer": "pypdf",
            "created": "2024-11-28T10:00:00Z",
            "modified": None,
        },
        "text": ["Soup 4.50", "Tea 2.00", "Cake 3.20"],
        "page_errors": [],
        "pages_without_text": [],
        "truncated": False,
        "truncated_reasons": [],
    }
    assert progress == [33, 66, 100]


def test_pdf_text_capped_at_max_text_chars(tmp_path: Path) -> None:
    """PDF text stops at processing.max_text_chars and says it was truncated."""
    path = tmp_path / "long.pdf"
    path.write_bytes(make_pdf(["abcdefgh", "ijklmnop", "qrstuvwx"]))
    result, _ = run(path, settings(max_text_chars=12))
    assert (result["pages"], result["text"], result["truncated"]) == (
        3,
        ["abcdefgh", "ijkl"],
        True,
    )


def test_pdf_encrypted_with_password_fails_permanently(tmp_path: Path) -> None:
    """A PDF that needs a password fails permanently, saying it is encrypted."""
    path = tmp_path / "secret.pdf"
    path.write_bytes(make_pdf(["hidden"], password="s3cret"))
    with pytest.raises(PermanentError, match=r"secret.pdf: the PDF is encrypted"):
        run(path)


def test_pdf_encrypted_with_empty_password_is_read(tmp_path: Path) -> None:
    """An AES-encrypted PDF with an empty user password (permissions only) is read."""
    path = tmp_path / "locked.pdf"
    path.write_bytes(make_pdf(["visible"], password="", algorithm="AES-256"))
    result, _ = run(path)
    assert (result["encrypted"], result["pages"], result["text"]) == (True, 1, ["visible"])


def test_pdf_truncated_fails_permanently(tmp_path: Path) -> None:
    """A PDF cut short fails permanently, saying it is truncated."""
    path = tmp_path / "cut.pdf"
    data = make_pdf(["one", "two"])
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PermanentError, match=r"cut.pdf: the PDF is truncated"):
        run(path)


def test_pdf_damaged_fails_permanently(tmp_path: Path) -> None:
    """A file with a PDF header but garbage inside fails permanently as damaged."""
    path = tmp_path / "junk.pdf"
    path.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8 + b"\n%%EOF\n")
    with pytest.raises(PermanentError, match=r"junk.pdf: the PDF is damaged"):
        run(path)


# -- XLSX and XLS --------------------------------------------------------------


def rewrite_zip(path: Path, member: str, edit: Any) -> None:
    """Replace one member of a ZIP file by ``edit(old_text)``."""
    with zipfile.ZipFile(path) as zf:
        parts = {name: zf.read(name) for name in zf.namelist()}
    parts[member] = edit(parts[member].decode()).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in parts.items():
            zf.writestr(name, data)


def make_xlsx(path: Path, *, cached: str | None = "5") -> None:
    """Two sheets: prices with a date and a formula (cached value ``cached``), notes."""
    book = openpyxl.Workbook()
    prices = book.active
    assert prices is not None
    prices.title = "Prices"
    prices.append(["item", "price", "since", "double"])
    prices.append(["tea", 2.5, dt.date(2024, 3, 1), "=B2*2"])
    prices.append(["cake", 3, dt.datetime(2024, 3, 2, 9, 30), None])
    notes = book.create_sheet("Notes")
    notes.append(["open daily", True])
    book.save(path)
    if cached is not None:
        # openpyxl writes formulas without the value Excel caches on save; add one.
        rewrite_zip(
            path,
            "xl/worksheets/sheet1.xml",
            lambda xml: xml.replace("<f>B2*2</f><v />", f"<f>B2*2</f><v>{cached}</v>"),
        )


def test_xlsx_sheets_values_dates_and_cached_formulas(tmp_path: Path) -> None:
    """An XLSX gives each sheet's size and rows, dates as ISO text, formulas cached."""
    path = tmp_path / "prices.xlsx"
    make_xlsx(path)
    result, progress = run(path)
    assert result == {
        "type": "xlsx",
        "mime": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        **identity(path),
        "sheets": [
            {
                "name": "Prices",
                "max_row": 3,
                "max_column": 4,
                "rows": [
                    ["item", "price", "since", "double"],
                    ["tea", 2.5, "2024-03-01", 5],
                    ["cake", 3, "2024-03-02T09:30:00"],
                ],
                "merged": [],
                "errors": [],
            },
            {
                "name": "Notes",
                "max_row": 1,
                "max_column": 2,
                "rows": [["open daily", True]],
                "merged": [],
                "errors": [],
            },
        ],
        "truncated": False,
        "truncated_reasons": [],
    }
    assert progress == [50, 100]


def test_xlsx_formula_without_cached_value_is_null(tmp_path: Path) -> None:
    """A formula the file holds no cached value for (openpyxl-written) reads as null."""
    path = tmp_path / "fresh.xlsx"
    make_xlsx(path, cached=None)
    result, _ = run(path)
    assert result["sheets"][0]["rows"][1] == ["tea", 2.5, "2024-03-01"]


def test_xlsx_rows_capped_across_sheets(tmp_path: Path) -> None:
    """At most processing.max_rows rows are kept over all sheets, then truncated."""
    path = tmp_path / "prices.xlsx"
    make_xlsx(path)
    result, _ = run(path, settings(max_rows=2))
    assert [(s["name"], s["max_row"], len(s["rows"])) for s in result["sheets"]] == [
        ("Prices", 3, 2),
        ("Notes", 1, 0),
    ]
    assert result["truncated"] is True


def test_xlsx_external_entity_is_refused_without_leaking(tmp_path: Path) -> None:
    """An XLSX whose XML declares an external entity (XXE) fails and leaks nothing."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    path = tmp_path / "evil.xlsx"
    make_xlsx(path)
    doctype = f'<!DOCTYPE worksheet [<!ENTITY xxe SYSTEM "file://{secret}">]>'
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: doctype + xml.replace("<t>tea</t>", "<t>&xxe;</t>"),
    )
    with pytest.raises(
        PermanentError, match=r"evil.xlsx: the workbook declares XML entities"
    ) as err:
        run(path)
    assert "TOP-SECRET" not in str(err.value)


def test_xlsx_damaged_fails_permanently(tmp_path: Path) -> None:
    """An XLSX whose sheet XML is broken fails permanently as damaged."""
    path = tmp_path / "broken.xlsx"
    make_xlsx(path)
    rewrite_zip(path, "xl/worksheets/sheet1.xml", lambda xml: xml[: len(xml) // 2])
    with pytest.raises(PermanentError, match=r"broken.xlsx: damaged workbook: "):
        run(path)


def test_xls_sheets_values_dates_and_formulas(tmp_path: Path) -> None:
    """An Excel 97 XLS gives sheets and rows like an XLSX, integers as integers."""
    path = tmp_path / "old.xls"
    book = xlwt.Workbook()
    sheet = book.add_sheet("Prices")
    for col, value in enumerate(["item", "price", "since"]):
        sheet.write(0, col, value)
    sheet.write(1, 0, "tea")
    sheet.write(1, 1, 2.5)
    sheet.write(1, 2, dt.date(2024, 3, 1), xlwt.easyxf(num_format_str="YYYY-MM-DD"))
    sheet.write(2, 0, "cake")
    sheet.write(2, 1, 3)
    sheet.write(2, 2, True)
    book.add_sheet("Empty")
    book.save(str(path))
    result, _ = run(path)
    assert result == {
        "type": "xls",
        "mime": "application/vnd.ms-excel",
        **identity(path),
        "sheets": [
            {
                "name": "Prices",
                "max_row": 3,
                "max_column": 3,
                "rows": [
                    ["item", "price", "since"],
                    ["tea", 2.5, "2024-03-01"],
                    ["cake", 3, True],
                ],
                "merged": [],
                "errors": [],
            },
            {
                "name": "Empty",
                "max_row": 0,
                "max_column": 0,
                "rows": [],
                "merged": [],
                "errors": [],
            },
        ],
        "truncated": False,
        "truncated_reasons": [],
    }


# -- CSV -----------------------------------------------------------------------

PRICES = [{"item": "tea", "price": "2,50"}, {"item": "cake; large", "price": "3"}]


@pytest.mark.parametrize(
    ("delimiter", "content"),
    [
        (",", 'item,price\ntea,"2,50"\n"cake; large",3\n'),
        (";", 'item;price\ntea;2,50\n"cake; large";3\n'),
        ("\t", "item\tprice\ntea\t2,50\ncake; large\t3\n"),
    ],
    ids=["comma", "semicolon", "tab"],
)
def test_csv_delimiters_and_quoted_fields(tmp_path: Path, delimiter: str, content: str) -> None:
    """Comma, semicolon and tab files give the same header and records."""
    path = tmp_path / "prices.csv"
    path.write_text(content, encoding="utf-8")
    result, _ = run(path)
    assert result == {
        "type": "csv",
        "mime": "text/csv",
        **identity(path),
        "encoding": "utf-8",
        "delimiter": delimiter,
        "header": ["item", "price"],
        "rows": 2,
        "records": PRICES,
        "truncated": False,
        "truncated_reasons": [],
    }


def test_csv_utf8_bom_is_not_part_of_the_header(tmp_path: Path) -> None:
    """A UTF-8 BOM (Excel's "CSV UTF-8") is reported and kept out of the first column."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffname;city\nJosé;Zürich\n".encode())
    result, _ = run(path)
    assert (result["encoding"], result["header"], result["records"]) == (
        "utf-8-sig",
        ["name", "city"],
        [{"name": "José", "city": "Zürich"}],
    )


def test_csv_latin1_file(tmp_path: Path) -> None:
    """A Latin-1 file is decoded as Latin-1 and says so."""
    path = tmp_path / "latin.csv"
    path.write_bytes("name,city\nJosé,Zürich\nRenée,Genève\n".encode("latin-1"))
    result, _ = run(path)
    assert (result["encoding"], result["records"]) == (
        "latin-1",
        [{"name": "José", "city": "Zürich"}, {"name": "Renée", "city": "Genève"}],
    )


def test_csv_windows_1252_euro_sign(tmp_path: Path) -> None:
    """A Windows-1252 file with a euro sign is decoded as cp1252, not Latin-1."""
    path = tmp_path / "euro.csv"
    path.write_bytes("item;price\ntea;2 €\n".encode("cp1252"))
    result, _ = run(path)
    assert (result["encoding"], result["records"]) == ("cp1252", [{"item": "tea", "price": "2 €"}])


def test_csv_utf16_with_bom(tmp_path: Path) -> None:
    """Excel's "Unicode text" export (UTF-16 with BOM, tabs) is read."""
    path = tmp_path / "unicode.csv"
    path.write_bytes("item\tprice\ntea\t2\n".encode("utf-16"))
    result, _ = run(path)
    assert (result["encoding"], result["delimiter"], result["records"]) == (
        "utf-16",
        "\t",
        [{"item": "tea", "price": "2"}],
    )


def test_csv_ragged_rows_and_blank_header_names(tmp_path: Path) -> None:
    """Short rows get nulls, extra fields column_N keys, blank and repeated names unique keys."""
    path = tmp_path / "ragged.csv"
    path.write_text("a,,a\n1\n\n1,2,3,4\n")
    result, _ = run(path)
    assert (result["header"], result["rows"], result["records"]) == (
        ["a", "", "a"],
        2,
        [
            {"a": "1", "column_2": None, "a_2": None},
            {"a": "1", "column_2": "2", "a_2": "3", "column_4": "4"},
        ],
    )


def test_csv_counts_every_row_but_keeps_max_rows(tmp_path: Path) -> None:
    """A CSV longer than processing.max_rows counts all rows, keeps max_rows, truncated."""
    path = tmp_path / "big.csv"
    path.write_text("n,square\n" + "".join(f"{i},{i * i}\n" for i in range(2500)))
    result, progress = run(path, settings(max_rows=3))
    assert (result["rows"], result["records"], result["truncated"]) == (
        2500,
        [{"n": "0", "square": "0"}, {"n": "1", "square": "1"}, {"n": "2", "square": "4"}],
        True,
    )
    assert progress[-1] == 100


def test_csv_named_file_that_is_binary_fails_permanently(tmp_path: Path) -> None:
    """A .csv whose bytes are not text fails permanently."""
    path = tmp_path / "data.csv"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(PermanentError, match=r"data.csv: named like a CSV file but its content"):
        run(path)


def test_csv_with_nul_bytes_after_the_head_fails_permanently(tmp_path: Path) -> None:
    """A CSV that turns binary past the sniffed head fails permanently as not text."""
    path = tmp_path / "late.csv"
    path.write_bytes(b"a,b\n" + b"1,2\n" * 5000 + b"\x00\x01\x02" * 1000)
    with pytest.raises(PermanentError, match=r"late.csv: not a text file"):
        run(path)


# -- anything else -------------------------------------------------------------


def test_other_types_give_type_mime_size_and_hash(tmp_path: Path) -> None:
    """A GIF (allowed by config) gives only type, MIME type, size and sha256."""
    path = tmp_path / "logo.gif"
    path.write_bytes(b"GIF89a" + b"\x00" * 64)
    result, progress = run(path)
    assert result == {"type": "gif", "mime": "image/gif", **identity(path)}
    assert progress == [100]


def test_plain_text_gives_encoding_and_lines(tmp_path: Path) -> None:
    """A text file that is not tabular gives its encoding and line count."""
    path = tmp_path / "notes.txt"
    path.write_text("just some words\nand more\n")
    result, _ = run(path)
    assert result == {
        "type": "txt",
        "mime": "text/plain",
        **identity(path),
        "encoding": "utf-8",
        "lines": 2,
    }


# -- PDF: real-world cases (issue 13, issue 12.12) ------------------------------


def raw_pdf(contents: list[bytes], *, compress: bool = False, info: bytes = b"") -> bytes:
    """A hand-written PDF with one page per content stream (Helvetica), as
    producers write them: a classic xref table, optional Flate streams and an
    /Info dictionary ``info``."""
    font = len(contents) * 2 + 3
    kids = b" ".join(b"%d 0 R" % (3 + 2 * i) for i in range(len(contents)))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(contents)),
    ]
    for i, content in enumerate(contents):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
            b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (4 + 2 * i, font)
        )
        data = zlib.compress(content, 9) if compress else content
        flate = b" /Filter /FlateDecode" if compress else b""
        objects.append(b"<< /Length %d%s >>\nstream\n%s\nendstream" % (len(data), flate, data))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    if info:
        objects.append(info)
    body = b"%PDF-1.4\n"
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n%s\nendobj\n" % (number, obj)
    xref = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    body += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    info_ref = b" /Info %d 0 R" % len(objects) if info else b""
    body += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        info_ref,
        xref,
    )
    return body


def text_op(text: str) -> bytes:
    return b"BT /F1 12 Tf 72 712 Td (" + text.encode("latin-1") + b") Tj ET"


def test_pdf_flate_bomb_fails_permanently_with_the_limit(tmp_path: Path) -> None:
    """A Flate stream expanding past inspect.max_pdf_stream_mb fails, naming the limit."""
    path = tmp_path / "bomb.pdf"
    path.write_bytes(raw_pdf([text_op("hi") + b" " * (3 << 20)], compress=True))
    config = load_settings(None, env={"BATCHD_INSPECT__MAX_PDF_STREAM_MB": "2"})
    with pytest.raises(PermanentError, match=r"bomb.pdf: .* more than 2 MiB .*max_pdf_stream_mb"):
        run(path, config)
    result, _ = run(path)  # under the default limit the same file is read
    assert result["text"] == ["hi"]


def test_pdf_with_no_pages_fails_permanently(tmp_path: Path) -> None:
    """A PDF with 0 pages is a permanent failure, not an empty success."""
    path = tmp_path / "empty.pdf"
    path.write_bytes(raw_pdf([]))
    with pytest.raises(PermanentError, match=r"empty.pdf: the PDF has no pages"):
        run(path)


def test_pdf_pages_without_text_are_listed(tmp_path: Path) -> None:
    """Pages with no text layer (blank or scanned) are listed in pages_without_text."""
    path = tmp_path / "scan.pdf"
    image_only = b"q 100 0 0 100 0 0 cm 0.5 g 0 0 1 1 re f Q"
    path.write_bytes(raw_pdf([text_op("cover"), image_only, b""]))
    result, _ = run(path)
    assert (result["text"], result["pages_without_text"]) == (["cover", "", ""], [2, 3])
    assert result["page_errors"] == []


def test_pdf_one_broken_content_stream_does_not_fail_the_document(tmp_path: Path) -> None:
    """A page whose compressed content stream is corrupt still lets the other pages through."""
    good = [zlib.compress(text_op(f"page {n}")) for n in (1, 2, 3)]
    broken = bytearray(zlib.compress(text_op("page 4 broken") * 50))
    broken[len(broken) // 2 :] = b"\x00" * (len(broken) - len(broken) // 2)
    streams = [*good[:2], bytes(broken), good[2]]
    data = raw_pdf([b"@%d@" % i for i in range(4)])
    for i, stream in enumerate(streams):
        old = b"<< /Length 3 >>\nstream\n@%d@\nendstream" % i
        new = b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (
            len(stream),
            stream,
        )
        data = data.replace(old, new)
    path = tmp_path / "broken.pdf"
    path.write_bytes(data)  # the xref offsets are now wrong: readers rebuild them
    result, _ = run(path)
    assert result["pages"] == 4
    assert (result["text"][0], result["text"][1], result["text"][3]) == (
        "page 1",
        "page 2",
        "page 3",
    )


@pytest.mark.parametrize(
    ("raw", "iso"),
    [
        ("D:20150722100404Z00'00'", "2015-07-22T10:04:04Z"),  # macOS Quartz
        ("D:20150722100404+02'00'", "2015-07-22T08:04:04Z"),
        ("D:20150722100404-05'30", "2015-07-22T15:34:04Z"),
        ("D:20150722100404", "2015-07-22T10:04:04Z"),
        ("D:2015", "2015-01-01T00:00:00Z"),
        ("20150722", "2015-07-22T00:00:00Z"),
        ("D:20151340", "D:20151340"),  # month 13: kept as written
        ("yesterday", "yesterday"),
    ],
)
def test_pdf_dates_are_iso_8601_utc_or_kept_raw(tmp_path: Path, raw: str, iso: str) -> None:
    """PDF dates in every form the spec allows become ISO 8601 UTC; others stay raw."""
    path = tmp_path / "dated.pdf"
    info = b"<< /CreationDate (" + raw.encode() + b") /ModDate (D:20240101000000Z) >>"
    path.write_bytes(raw_pdf([text_op("x")], info=info))
    result, _ = run(path)
    assert (result["metadata"]["created"], result["metadata"]["modified"]) == (
        iso,
        "2024-01-01T00:00:00Z",
    )


def test_pdf_max_pages_stops_reading_and_says_so(tmp_path: Path) -> None:
    """Text stops after inspect.max_pages pages; the result names the cap."""
    path = tmp_path / "long.pdf"
    path.write_bytes(raw_pdf([text_op(f"p{n}") for n in range(5)]))
    config = load_settings(None, env={"BATCHD_INSPECT__MAX_PAGES": "2"})
    result, _ = run(path, config)
    assert (result["pages"], result["text"]) == (5, ["p0", "p1"])
    assert (result["truncated"], result["truncated_reasons"]) == (True, ["inspect.max_pages"])


# -- spreadsheets: real-world cases (issue 13, issue 12.4) ---------------------


def set_dimension(path: Path, ref: str) -> None:
    """Make sheet1 declare ``<dimension ref=ref>``, as R's writexl and POI do."""
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: re.sub(r'<dimension ref="[^"]*"\s*/>', f'<dimension ref="{ref}"/>', xml),
    )


def test_xlsx_declared_dimension_a1_does_not_hide_rows(tmp_path: Path) -> None:
    """A sheet declaring <dimension ref="A1"> still gives all 151 x 5 cells it holds."""
    path = tmp_path / "iris.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Sepal.Length", "Sepal.Width", "Petal.Length", "Petal.Width", "Species"])
    for n in range(150):
        sheet.append([5.1 + n / 100, 3.5, 1.4, 0.2, "setosa"])
    book.save(path)
    set_dimension(path, "A1")
    result, _ = run(path)
    (iris,) = result["sheets"]
    assert (iris["max_row"], iris["max_column"], len(iris["rows"])) == (151, 5, 151)
    assert iris["rows"][150] == [6.59, 3.5, 1.4, 0.2, "setosa"]
    assert result["truncated"] is False


def test_xlsx_huge_declared_dimension_is_trimmed(tmp_path: Path) -> None:
    """A LibreOffice-style A1:AMJ1048576 dimension with 4 real rows gives 4 rows, no padding."""
    path = tmp_path / "lo.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for n in range(4):
        sheet.append([f"r{n}", n])
    sheet["AMJ1048576"].style = "Note"  # a styled, empty far corner, as LibreOffice keeps
    book.save(path)
    set_dimension(path, "A1:AMJ1048576")
    result, _ = run(path)
    (only,) = result["sheets"]
    assert (only["max_row"], only["max_column"]) == (4, 2)
    assert only["rows"] == [["r0", 0], ["r1", 1], ["r2", 2], ["r3", 3]]
    assert result["truncated"] is False
    assert len(json.dumps(result)) < 2000


def test_xlsx_one_row_of_millions_of_cells_stays_bounded(tmp_path: Path) -> None:
    """A zip-bombed row of 5 M numeric cells stops at inspect.max_cells, small and truncated."""
    path = tmp_path / "wide.xlsx"
    book = openpyxl.Workbook()
    book.active.append([1, 2])  # type: ignore[union-attr]
    book.save(path)
    cells = "".join(f'<c r="{col}1"><v>1</v></c>' for col in ("A", "B"))
    row = cells + "<c><v>7</v></c>" * 5_000_000  # no r: as some writers do
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: re.sub(
            r"<sheetData>.*</sheetData>", f'<sheetData><row r="1">{row}</row></sheetData>', xml
        ),
    )
    assert path.stat().st_size < 1_000_000
    config = load_settings(None, env={"BATCHD_INSPECT__MAX_CELLS": "100000"})
    result, _ = run(path, config)
    (sheet,) = result["sheets"]
    assert result["truncated"] is True
    assert result["truncated_reasons"] == ["inspect.max_columns"]
    assert sheet["max_column"] == 16_384
    assert len(json.dumps(result)) < 200_000


def test_xlsx_cells_beyond_max_cells_stop_reading(tmp_path: Path) -> None:
    """Reading stops at inspect.max_cells: the rows before it are kept, the result says why."""
    path = tmp_path / "tall.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for n in range(1000):
        sheet.append([n, n * 2])
    book.save(path)
    config = load_settings(None, env={"BATCHD_INSPECT__MAX_CELLS": "500"})
    result, _ = run(path, config)
    (only,) = result["sheets"]
    assert len(only["rows"]) == 250
    assert only["rows"][249] == [249, 498]
    assert result["truncated_reasons"] == ["inspect.max_cells"]


def test_xlsx_merged_ranges_and_error_cells(tmp_path: Path) -> None:
    """Merged ranges are listed per sheet; error cells are named apart from look-alike text."""
    path = tmp_path / "report.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Total", None, "#N/A"])
    sheet["C1"].data_type = "s"  # text that reads like an error, not an error
    sheet.append([1, 0, None])
    sheet.merge_cells("A1:B1")
    book.save(path)
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: xml.replace(
            "</row></sheetData>", '<c r="C2" t="e"><f>A2/B2</f><v>#DIV/0!</v></c></row></sheetData>'
        ),
    )
    result, _ = run(path)
    (only,) = result["sheets"]
    assert only["merged"] == ["A1:B1"]
    assert only["rows"] == [["Total", None, "#N/A"], [1, 0, "#DIV/0!"]]
    assert only["errors"] == [{"cell": "C2", "error": "#DIV/0!"}]


def test_xlsx_error_cell_without_a_value_takes_nothing_from_the_next_cell(tmp_path: Path) -> None:
    """An error cell written without a value (<c t="e"/>) is empty, not the next cell's value."""
    path = tmp_path / "export.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["tea", None, 7])
    sheet.append(["cake", None, 12])
    book.save(path)
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: xml.replace('<c r="C1"', '<c r="B1" t="e"/><c r="C1"').replace(
            '<c r="C2"', '<c r="B2" t="e"></c><c r="C2"'
        ),
    )
    result, _ = run(path)
    (only,) = result["sheets"]
    assert only["rows"] == [["tea", None, 7], ["cake", None, 12]]
    assert only["errors"] == [{"cell": "B1", "error": ""}, {"cell": "B2", "error": ""}]


def test_xlsx_time_of_day_is_a_time(tmp_path: Path) -> None:
    """A time-of-day cell reads "06:34:00", a date "2024-03-01", a datetime with its T."""
    path = tmp_path / "times.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append([dt.time(6, 34), dt.date(2024, 3, 1), dt.datetime(2024, 3, 1, 9, 30)])
    book.save(path)
    result, _ = run(path)
    assert result["sheets"][0]["rows"] == [["06:34:00", "2024-03-01", "2024-03-01T09:30:00"]]


@pytest.mark.parametrize("date1904", [False, True], ids=["1900", "1904"])
def test_xls_time_of_day_is_a_time_not_a_fake_date(tmp_path: Path, date1904: bool) -> None:
    """An XLS time cell reads "06:34:00" in both date systems, as in XLSX and CSV."""
    path = tmp_path / "times.xls"
    book = xlwt.Workbook()
    book.dates_1904 = date1904
    sheet = book.add_sheet("T")
    sheet.write(0, 0, dt.time(6, 34), xlwt.easyxf(num_format_str="hh:mm:ss"))
    sheet.write(
        0, 1, dt.datetime(2024, 3, 1, 9, 30), xlwt.easyxf(num_format_str="yyyy-mm-dd hh:mm")
    )
    sheet.write(0, 2, dt.date(2024, 3, 1), xlwt.easyxf(num_format_str="yyyy-mm-dd"))
    book.save(str(path))
    result, _ = run(path)
    assert result["sheets"][0]["rows"] == [["06:34:00", "2024-03-01T09:30:00", "2024-03-01"]]


def test_xls_merged_ranges_and_error_cells(tmp_path: Path) -> None:
    """An XLS reports merged ranges and marks error cells, like an XLSX."""
    path = tmp_path / "report.xls"
    book = xlwt.Workbook()
    sheet = book.add_sheet("R")
    sheet.write_merge(0, 0, 0, 1, "Total")
    sheet.write(0, 2, "#N/A")
    sheet.write(1, 0, xlwt.Formula("1/0"))
    book.save(str(path))
    result, _ = run(path)
    (only,) = result["sheets"]
    assert only["merged"] == ["A1:B1"]
    assert only["rows"][0] == ["Total", None, "#N/A"]
    # xlwt stores no cached formula results, so the formula cell reads as empty
    assert only["errors"] == []


def test_xls_error_cell_is_reported_and_sends_the_file_to_xlrd(tmp_path: Path) -> None:
    """An XLS error cell is listed in errors (calamine shows it as empty: xlrd reads it)."""
    from batchd.processors.xls import _may_hold_error_cells

    plain, broken = tmp_path / "plain.xls", tmp_path / "broken.xls"
    for path, error in ((plain, False), (broken, True)):
        book = xlwt.Workbook()
        sheet = book.add_sheet("R")
        sheet.write_merge(0, 0, 0, 1, "Total")
        sheet.write(1, 1, 7)
        if error:
            sheet.row(1).set_cell_error(0, "#DIV/0!")
        book.save(str(path))
    assert not _may_hold_error_cells(plain)
    assert _may_hold_error_cells(broken)
    for path, errors in ((plain, []), (broken, [{"cell": "A2", "error": "#DIV/0!"}])):
        result, _ = run(path)
        (only,) = result["sheets"]
        assert only["merged"] == ["A1:B1"]
        assert only["errors"] == errors
        assert only["rows"][1] == (["#DIV/0!", 7] if errors else [None, 7])


def biff2(cells: list[tuple[int, int, float | str]]) -> bytes:
    """An Excel 2.x worksheet (BIFF2, no OLE2 wrapper) with these cells."""
    out = struct.pack("<HHHH", 0x0009, 4, 0x0002, 0x0010)  # BOF: BIFF2 worksheet
    for row, col, value in cells:
        if isinstance(value, str):
            data = value.encode("latin-1")
            body = struct.pack("<HH3sB", row, col, b"\0\0\0", len(data)) + data
            out += struct.pack("<HH", 0x0004, len(body)) + body  # LABEL
        else:
            body = struct.pack("<HH3sd", row, col, b"\0\0\0", value)
            out += struct.pack("<HH", 0x0003, len(body)) + body  # NUMBER
    return out + struct.pack("<HH", 0x000A, 0)  # EOF


def test_xls_excel_2_worksheet_is_read(tmp_path: Path) -> None:
    """An Excel 2.x (BIFF2) file is sniffed as xls and read, not refused as binary."""
    path = tmp_path / "old.xls"
    path.write_bytes(biff2([(0, 0, "item"), (0, 1, "price"), (1, 0, "tea"), (1, 1, 2.5)]))
    result, _ = run(path)
    assert result["type"] == "xls"
    assert result["sheets"][0]["rows"] == [["item", "price"], ["tea", 2.5]]


def test_xlsx_missing_part_is_a_damaged_workbook(tmp_path: Path) -> None:
    """A workbook missing a sheet part says "damaged workbook: <part> is missing"."""
    path = tmp_path / "cut.xlsx"
    make_xlsx(path)
    with zipfile.ZipFile(path) as zf:
        parts = {n: zf.read(n) for n in zf.namelist() if n != "xl/worksheets/sheet2.xml"}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in parts.items():
            zf.writestr(name, data)
    with pytest.raises(
        PermanentError, match=r"cut.xlsx: damaged workbook: xl/worksheets/sheet2.xml .* is missing"
    ):
        run(path)


def test_xlsx_cut_short_is_a_damaged_workbook(tmp_path: Path) -> None:
    """An XLSX whose end was cut off is a damaged workbook, not "a zip"."""
    path = tmp_path / "short.xlsx"
    make_xlsx(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(PermanentError, match=r"short.xlsx: damaged workbook"):
        run(path)


# -- CSV: real-world cases (issue 13.5, issue 12.6) ----------------------------


def test_csv_with_control_characters_in_a_quoted_header_is_text(tmp_path: Path) -> None:
    """A UTF-8 CSV whose quoted header holds tab, newline and vertical tab is read."""
    path = tmp_path / "odd.csv"
    path.write_bytes(b'"a\tb","c\nd","e\x0bf"\n1,2,3\n')
    result, _ = run(path)
    assert result["header"] == ["a\tb", "c\nd", "e\x0bf"]
    assert result["records"] == [{"a\tb": "1", "c\nd": "2", "e\x0bf": "3"}]


def test_csv_with_one_nul_byte_is_read(tmp_path: Path) -> None:
    """A CSV with one stray NUL byte is text: read, the NUL kept in its field."""
    path = tmp_path / "nul.csv"
    path.write_bytes(b"name,qty\ntea,2\x00\ncake,3\n")
    result, _ = run(path)
    assert result["records"] == [{"name": "tea", "qty": "2\x00"}, {"name": "cake", "qty": "3"}]


def test_csv_header_of_identical_names_is_linear_and_capped(tmp_path: Path) -> None:
    """100,000 identical header names finish quickly; fields past max_header_columns are dropped."""
    path = tmp_path / "same.csv"
    path.write_text(",".join(["x"] * 100_000) + "\n" + ",".join(["1"] * 100_000) + "\n")
    result, _ = run(path)
    assert len(result["header"]) == 4096
    assert result["header"][:2] == ["x", "x"]
    assert list(result["records"][0])[:3] == ["x", "x_2", "x_3"]
    assert result["truncated_reasons"] == ["inspect.max_header_columns"]


def test_csv_unique_keys_is_linear() -> None:
    """Keys for 100,000 repeats of a name are made in linear steps (x, x_2 ... x_100000)."""
    from batchd.processors.inspect import _unique_keys

    keys = _unique_keys(["x"] * 100_000 + ["x_5"])
    assert keys[:3] == ["x", "x_2", "x_3"]
    assert keys[-2:] == ["x_100000", "x_5_2"]
    assert len(set(keys)) == len(keys)


def _inspect_in_child(path: Path, queue: Any) -> None:
    import resource

    import pypdfium2  # noqa: F401  (loaded like in a worker, before the file)
    import python_calamine  # noqa: F401

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, _ = run(path)
    queue.put((len(json.dumps(result)), result["truncated_reasons"]))
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)


def test_xlsx_row_of_5m_cells_stays_small_in_worker_memory(tmp_path: Path) -> None:
    """Under the default caps, a 5 M-cell row bomb keeps a worker's peak RSS and result small."""
    import multiprocessing as mp

    path = tmp_path / "bomb.xlsx"
    book = openpyxl.Workbook()
    book.active.append([1])  # type: ignore[union-attr]
    book.save(path)
    row = '<c r="A1"><v>1</v></c>' + "<c><v>7</v></c>" * 5_000_000
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: re.sub(
            r"<sheetData>.*</sheetData>", f'<sheetData><row r="1">{row}</row></sheetData>', xml
        ),
    )
    assert path.stat().st_size < 400_000
    context = mp.get_context("spawn")  # a fresh worker, as batchd's pool starts them
    queue = context.Queue()
    child = context.Process(target=_inspect_in_child, args=(path, queue))
    child.start()
    size, reasons = queue.get(timeout=120)
    peak_kib = queue.get(timeout=30)
    child.join(30)
    assert reasons == ["inspect.max_columns"]
    assert size < 200_000
    assert peak_kib < 64 * 1024, f"worker peak RSS grew by {peak_kib // 1024} MiB"


def test_xlsx_calamine_failure_falls_back_to_the_streaming_reader(tmp_path: Path) -> None:
    """A number cell calamine cannot parse ("2,5") does not fail the workbook: it reads as text."""
    path = tmp_path / "comma.xlsx"
    make_xlsx(path)
    rewrite_zip(
        path, "xl/worksheets/sheet1.xml", lambda xml: xml.replace("<v>2.5</v>", "<v>2,5</v>")
    )
    result, _ = run(path)
    assert result["sheets"][0]["rows"] == [
        ["item", "price", "since", "double"],
        ["tea", "2,5", "2024-03-01", 5],
        ["cake", 3, "2024-03-02T09:30:00"],
    ]
    assert result["truncated"] is False


def test_xlsx_streaming_reader_does_not_load_openpyxl(tmp_path: Path) -> None:
    """Dates in a streamed sheet are found without importing openpyxl (~10 MiB per worker)."""
    path = tmp_path / "comma.xlsx"
    make_xlsx(path)
    rewrite_zip(
        path, "xl/worksheets/sheet1.xml", lambda xml: xml.replace("<v>2.5</v>", "<v>2,5</v>")
    )
    code = (
        "import json, sys; from pathlib import Path\n"
        "from batchd.config import load_settings\n"
        "from batchd.processors import ProcessorContext\n"
        "from batchd.processors.inspect import inspect\n"
        "ctx = ProcessorContext(batch_id='b', file_id='f', relpath='comma.xlsx',\n"
        "    output_path=Path('/nonexistent'), settings=load_settings(None, env={}))\n"
        "rows = inspect(Path(sys.argv[1]), ctx)['sheets'][0]['rows']\n"
        "print(json.dumps([rows[1], 'openpyxl' in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == [["tea", "2,5", "2024-03-01", 5], False]


def test_xlsx_sheet_calamine_fails_on_is_streamed_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the sheet calamine cannot parse goes to the streaming reader; the others stay."""
    from batchd.processors import sheets

    streamed: list[str] = []
    real = sheets._streamed_sheet

    def spy(*args: Any, **kwargs: Any) -> Any:
        streamed.append(args[3].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(sheets, "_streamed_sheet", spy)
    path = tmp_path / "comma.xlsx"
    make_xlsx(path)
    rewrite_zip(
        path, "xl/worksheets/sheet1.xml", lambda xml: xml.replace("<v>2.5</v>", "<v>2,5</v>")
    )
    result, _ = run(path)
    assert streamed == ["Prices"]
    assert result["sheets"][0]["rows"][1] == ["tea", "2,5", "2024-03-01", 5]
    assert result["sheets"][1]["rows"] == [["open daily", True]]


def form_pdf(value: bytes) -> bytes:
    """A one-page PDF with a text field holding ``value`` (AcroForm, appearance stream)."""
    data = raw_pdf([text_op("Name:")])
    widget = (
        b"<< /Type /Annot /Subtype /Widget /FT /Tx /T (name) /V (" + value + b") "
        b"/Rect [100 600 300 620] /P 3 0 R >>"
    )
    data = data.replace(b"/Resources << /Font", b"/Annots [99 0 R] /Resources << /Font", 1)
    data = data.replace(
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Catalog /Pages 2 0 R /AcroForm << /Fields [99 0 R] >> >>",
    )
    return data.replace(b"xref\n", b"99 0 obj\n" + widget + b"\nendobj\nxref\n", 1)


def test_pdf_form_field_values_follow_the_page_text(tmp_path: Path) -> None:
    """A filled-in form field's value, shown on the page, is in that page's text."""
    path = tmp_path / "form.pdf"
    path.write_bytes(form_pdf(b"Ana Lima"))
    result, _ = run(path)
    assert result["text"] == ["Name:\nAna Lima"]


def _scan_first_sheet(path: Path, *, quick: bool) -> Any:
    from batchd.processors.sheets import _scan_sheet

    with zipfile.ZipFile(path) as zf:
        return _scan_sheet(zf, "Sheet", "xl/worksheets/sheet1.xml", 2_000_000, quick=quick)


def _wide_book(path: Path, last: str) -> None:
    """Three rows, values in A and in column ``last``."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for n in range(1, 4):
        sheet["A" + str(n)] = n
        sheet[last + str(n)] = n * 10
    book.save(path)


def test_xlsx_quick_first_pass_counts_exactly_and_bounds_short_columns(tmp_path: Path) -> None:
    """The quick first pass counts cells and rows exactly and bounds a two-letter column by 702."""
    path = tmp_path / "wide.xlsx"
    _wide_book(path, "AB")
    quick, exact = _scan_first_sheet(path, quick=True), _scan_first_sheet(path, quick=False)
    assert (
        (quick.cells, quick.max_row, quick.unplaced) == (exact.cells, exact.max_row, 0) == (6, 3, 0)
    )
    assert (quick.max_column, quick.bounded) == (702, True)
    assert (exact.max_column, exact.bounded) == (28, False)


def test_xlsx_quick_first_pass_is_exact_for_three_letters_and_odd_cells(tmp_path: Path) -> None:
    """Three-letter columns are exact, r later in a tag is found, a cell without r is counted."""
    path = tmp_path / "far.xlsx"
    _wide_book(path, "XFD")
    assert _scan_first_sheet(path, quick=True).max_column == 16_384
    _wide_book(path, "AB")
    rewrite_zip(
        path, "xl/worksheets/sheet1.xml", lambda xml: xml.replace('<c r="AB2"', '<c s="0" r="AB2"')
    )
    scan = _scan_first_sheet(path, quick=True)
    assert (scan.max_column, scan.bounded, scan.cells, scan.unplaced) == (702, True, 6, 0)
    rewrite_zip(
        path, "xl/worksheets/sheet1.xml", lambda xml: xml.replace('<c s="0" r="AB2"', '<c s="0"')
    )
    scan = _scan_first_sheet(path, quick=True)
    assert (scan.max_column, scan.bounded, scan.cells, scan.unplaced) == (28, False, 6, 1)


def test_xlsx_bound_over_max_cells_rechecked_exactly(tmp_path: Path) -> None:
    """A sheet whose column bound breaks inspect.max_cells but whose area fits is read whole."""
    path = tmp_path / "tall.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for n in range(1, 101):
        sheet.append([n] + [None] * 26 + [n * 2])  # A and AB: 28 columns, bound 702
    book.save(path)
    config = load_settings(None, env={"BATCHD_INSPECT__MAX_CELLS": "10000"})
    result, _ = run(path, config)
    (only,) = result["sheets"]
    assert (only["max_row"], only["max_column"], result["truncated"]) == (100, 28, False)
    assert only["rows"][99] == [100] + [None] * 26 + [200]


def _tricky_book(path: Path) -> None:
    """Rows all numbers (whole, huge, fractional, negative zero), all text with
    empty cells, and mixed; an error cell in a number row, a merged range, a
    declared dimension of A1 (a lie), a styled empty far cell."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append([1, 2.0, -0.0, 2**53, float(2**53) - 1, 1e300, 0.1, -7])
    sheet.append(["a", None, "", "b", None])
    sheet.append([])
    sheet.append(["x", 1.5, True, None, 3])
    sheet.append([10, 20, 30])
    sheet.merge_cells("A4:B4")
    sheet["Z40"].style = "Note"  # no value: not a row or column that counts
    other = book.create_sheet("Two")
    for n in range(30):
        other.append([n, n * 0.5, f"t{n}"])
    book.save(path)
    set_dimension(path, "A1")
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: xml.replace(
            '<c r="C5" t="n"><v>30</v></c>', '<c r="C5" t="e"><f>1/0</f><v>#DIV/0!</v></c>'
        ),
    )


@pytest.mark.parametrize("max_rows", [1000, 20])
def test_xlsx_calamine_path_and_streaming_reader_agree_on_a_tricky_workbook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_rows: int
) -> None:
    """Calamine with the whole-row conversion gives what the exact streaming reader gives."""
    from batchd.processors import sheets

    path = tmp_path / "tricky.xlsx"
    _tricky_book(path)
    fast, _ = run(path, settings(max_rows=max_rows))
    assert "#DIV/0!" in json.dumps(fast)  # the edit above took
    monkeypatch.setattr(sheets, "_calamine_sheets", lambda *args: None)
    exact, _ = run(path, settings(max_rows=max_rows))
    assert fast == exact
    first = fast["sheets"][0]
    assert first["rows"][0] == [1, 2, 0, 2**53, 2**53 - 1, 1e300, 0.1, -7]
    assert first["rows"][1] == ["a", None, None, "b"]
    assert first["rows"][4] == [10, 20, "#DIV/0!"]
    assert (first["max_row"], first["max_column"], first["merged"]) == (5, 8, ["A4:B4"])
    assert fast["truncated"] is (max_rows == 20)


def test_whole_row_conversion_matches_json_value_per_cell() -> None:
    """Rows of only numbers or only text convert as json_value does each cell ("" empty)."""
    from batchd.processors.content import json_value
    from batchd.processors.sheets import _json_row

    rows: list[list[Any]] = [
        [1.0, 2.5, -0.0, 255.0],
        [float(2**53), -float(2**53), float(2**53) - 1, 1e300, -1e-300],
        [float("nan"), 1.0],
        [float("inf"), 3.0],
        [-float("inf")],
        ["a", "", "b", ""],
        ["only", "text"],
        ["", ""],
        [True, 1.0],
        [1.0, "x", None, dt.date(2024, 1, 2)],
        [],
    ]
    for row in rows:
        values, chars = _json_row(list(row))
        assert values == [None if v == "" else json_value(v) for v in row], row
        assert [type(v) for v in values] == [
            type(None if v == "" else json_value(v)) for v in row
        ], row
        text = sum(len(v) for v in row if isinstance(v, str))
        assert chars in (None, text), row


def test_xlsx_first_pass_cut_between_blocks_misses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks cut near their end (or back past a long text cell) count what one block does."""
    from batchd.processors import sheets

    path = tmp_path / "long.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for n in range(1, 400):
        sheet.append([n, "x" * 10, n * 0.5])
    sheet.merge_cells("A1:B1")
    book.save(path)

    def edit(xml: str) -> str:
        # rows 5, 10, 15 ...: text longer than the short look back
        long = r'<c r="B\1" t="inlineStr"><is><t>' + "y" * 6000 + "</t></is></c>"
        xml = re.sub(r'<c r="B([0-9]*[05])" t="inlineStr"><is><t>x+</t></is></c>', long, xml)
        return xml.replace('<c r="C200" t="n"><v>100</v></c>', '<c r="C200" t="e"><v>#N/A</v></c>')

    rewrite_zip(path, "xl/worksheets/sheet1.xml", edit)
    whole = _scan_first_sheet(path, quick=True)
    monkeypatch.setattr(sheets, "XML_CHUNK_BYTES", 8192)
    cut = _scan_first_sheet(path, quick=True)
    assert (cut.cells, cut.max_row, cut.max_column, cut.merged, cut.errors, cut.unplaced) == (
        whole.cells,
        whole.max_row,
        whole.max_column,
        whole.merged,
        whole.errors,
        whole.unplaced,
    )
    assert (whole.cells, whole.max_row, whole.merged, whole.errors) == (
        1196,  # B1 is merged away
        399,
        ["A1:B1"],
        {"C200": "#N/A"},
    )
    result, _ = run(path)
    assert result["sheets"][0]["rows"][199] == [200, "y" * 6000, "#N/A"]
    assert result["sheets"][0]["rows"][198] == [199, "x" * 10, 99.5]


def _styled_far_book(path: Path, far_value: int | None = None) -> None:
    """Four rows and merged cells, LibreOffice-style empty styled cells out to
    AMJ1048576 and XFD5, a declared dimension that says so, an error cell."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for n in range(4):
        sheet.append([f"r{n}", n, n * 1.5])
    sheet.merge_cells("A4:B4")
    sheet["AMJ1048576"].style = "Note"
    sheet["XFD5"].style = "Note"
    if far_value is not None:
        sheet["AMJ1048575"] = far_value
    book.save(path)
    set_dimension(path, "A1:XFD1048576")
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: xml.replace(
            '<c r="C2" t="n"><v>1.5</v></c>', '<c r="C2" t="e"><v>#REF!</v></c>'
        ),
    )


def test_xlsx_cells_written_empty_do_not_send_a_sheet_to_the_streaming_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty styled cells far out leave a sheet on calamine, with the streaming reader's answer."""
    from batchd.processors import sheets

    path = tmp_path / "styled.xlsx"
    _styled_far_book(path)
    with monkeypatch.context() as patch:
        patch.setattr(sheets, "_streamed_sheets", lambda *args: pytest.fail("streamed"))
        fast, _ = run(path)
    monkeypatch.setattr(sheets, "_calamine_sheets", lambda *args: None)
    exact, _ = run(path)
    assert fast == exact
    (only,) = fast["sheets"]
    assert (only["max_row"], only["max_column"], only["merged"]) == (4, 3, ["A4:B4"])
    assert only["rows"][1] == ["r1", 1, "#REF!"]
    assert only["errors"] == [{"cell": "C2", "error": "#REF!"}]
    assert fast["truncated"] is False


@pytest.mark.parametrize("edit", ["far value", "odd attribute"])
def test_xlsx_far_value_or_unreadable_tag_still_goes_to_the_streaming_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str
) -> None:
    """A far cell holding a value, or a cell tag the pass cannot read, keeps calamine away."""
    from batchd.processors import sheets

    path = tmp_path / "far.xlsx"
    _styled_far_book(path, far_value=7 if edit == "far value" else None)
    if edit == "odd attribute":  # a ">" inside an attribute value hides the reference
        rewrite_zip(
            path,
            "xl/worksheets/sheet1.xml",
            lambda xml: xml.replace('<c r="XFD5" s="1" t="n" />', '<c s="1" a="b>c" r="XFD5"/>'),
        )
        with zipfile.ZipFile(path) as zf:
            assert b'a="b>c"' in zf.read("xl/worksheets/sheet1.xml")
    monkeypatch.setattr(sheets, "_calamine_sheets", lambda *args: pytest.fail("calamine"))
    result, _ = run(path)
    assert result["sheets"][0]["rows"][1] == ["r1", 1, "#REF!"]


@pytest.mark.parametrize("kind", ["n", "s", "str", "e", "b", "inlineStr", "d"])
def test_calamine_gives_cells_written_empty_no_area(tmp_path: Path, kind: str) -> None:
    """calamine leaves <c .../> out of a sheet's range: _valued_area relies on it."""
    import python_calamine

    path = tmp_path / "near.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["a", 1])
    sheet["Z30"].style = "Note"
    book.save(path)
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: xml.replace('<c r="Z30" s="1" t="n" />', f'<c r="Z30" s="1" t="{kind}"/>'),
    )
    with zipfile.ZipFile(path) as zf:
        assert f't="{kind}"/>'.encode() in zf.read("xl/worksheets/sheet1.xml")
    workbook = python_calamine.CalamineWorkbook.from_path(str(path))
    assert workbook.get_sheet_by_name("Sheet").end == (0, 1)


def test_xlsx_streaming_reader_places_odd_references_as_before(tmp_path: Path) -> None:
    """References the streaming reader cannot read (b1, AAAA1, C, B1x) take the next column."""
    path = tmp_path / "odd.xlsx"
    book = openpyxl.Workbook()
    book.active.append([0])  # type: ignore[union-attr]
    book.save(path)
    first = "".join(
        f'<c r="{ref}"><v>{n}</v></c>' for n, ref in enumerate(["B1", "b1", "AAAA1", "C", "B1x"], 1)
    )
    second = '<c r="C2"><v>6</v></c><c r="B2"><v>7</v></c><c r="E2"><v>8</v></c>'
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: re.sub(
            r"<sheetData>.*</sheetData>",
            f'<sheetData><row r="1">{first}</row><row r="2">{second}</row></sheetData>',
            xml,
        ),
    )
    result, _ = run(path)
    assert result["sheets"][0]["rows"] == [[None, 1, 2, 3, 4, 5], [None, 7, 6, None, 8]]


def test_xlsx_quick_first_pass_with_reference_later_in_the_tag(tmp_path: Path) -> None:
    """r after other attributes: three letters are exact; another attribute ending in r only
    raises the bound, and the result stays the exact one."""
    path = tmp_path / "later.xlsx"
    _wide_book(path, "XFD")
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: xml.replace('<c r="XFD2"', '<c s="0" r="XFD2"').replace(
            '<c r="A3"', '<c s="0" xr="ZZZ9" r="A3"'
        ),
    )
    quick, exact = _scan_first_sheet(path, quick=True), _scan_first_sheet(path, quick=False)
    assert (exact.max_column, exact.cells, exact.unplaced) == (16_384, 6, 0)
    assert quick.max_column >= exact.max_column
    assert (quick.cells, quick.max_row, quick.unplaced) == (6, 3, 0)
    result, _ = run(path)
    (only,) = result["sheets"]
    assert (only["max_row"], only["max_column"]) == (3, 16_384)
    assert only["rows"][2][0] == 3 and only["rows"][2][-1] == 30


def test_pdf_stream_keywords_found_across_block_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of any size find each stream keyword the whole-file search finds, and no endstream."""
    from batchd.processors import pdf

    data = (
        b"stream\nab endstream\r\nxstream\r\n1 0 obj stream\nendstream"
        + b"q" * 37
        + b"stream\r\nendstreamstream\n"
        + raw_pdf([text_op("hi")] * 3, compress=True)
    )
    path = tmp_path / "keywords.pdf"
    path.write_bytes(data)
    whole = [m.end() for m in re.finditer(rb"(?<!end)stream\r?\n", data)]
    assert len(whole) == 8
    with path.open("rb") as fh:
        for block in (1, 2, 3, 5, 7, 8, 13, 1 << 20):
            monkeypatch.setattr(pdf, "STREAM_SCAN_BYTES", block)
            assert list(pdf._stream_starts(fh.fileno(), len(data))) == whole, block


def test_pdf_flate_bomb_found_when_read_in_growing_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bomb whose compressed stream spans many pieces and scan blocks still fails."""
    from batchd.processors import pdf

    monkeypatch.setattr(pdf, "FIRST_INFLATE_BYTES", 64)
    monkeypatch.setattr(pdf, "INFLATE_CHUNK_BYTES", 4096)
    monkeypatch.setattr(pdf, "STREAM_SCAN_BYTES", 1000)
    path = tmp_path / "bomb.pdf"
    noise = bytes(random.Random(1).getrandbits(8) for _ in range(200_000))  # does not compress
    content = text_op("hi") + b" %" + noise.hex().encode() + b"\n" + b" " * (3 << 20)
    path.write_bytes(raw_pdf([content], compress=True))
    config = load_settings(None, env={"BATCHD_INSPECT__MAX_PDF_STREAM_MB": "3"})
    with pytest.raises(PermanentError, match=r"bomb.pdf: .* more than 3 MiB .*max_pdf_stream_mb"):
        run(path, config)
    result, _ = run(path)
    assert result["text"] == ["hi"]


def _lying_rows_book(path: Path, far: str) -> None:
    """One row element holding A1 and a cell whose own reference is ``far``."""
    book = openpyxl.Workbook()
    book.active.append([1])  # type: ignore[union-attr]
    book.save(path)
    cells = f'<c r="A1"><v>1</v></c><c r="{far}"><v>2</v></c>'
    rewrite_zip(
        path,
        "xl/worksheets/sheet1.xml",
        lambda xml: re.sub(
            r"<sheetData>.*</sheetData>", f'<sheetData><row r="1">{cells}</row></sheetData>', xml
        ),
    )


@pytest.mark.parametrize("quick", [True, False])
def test_xlsx_first_pass_takes_the_row_from_the_cell_reference(tmp_path: Path, quick: bool) -> None:
    """<row r="1"><c r="C900"> is row 900 to calamine, and so to the first pass."""
    path = tmp_path / "lie.xlsx"
    _lying_rows_book(path, "C900")
    scan = _scan_first_sheet(path, quick=quick)
    assert (scan.max_row, scan.area >= 900 * 3) == (900, True)


def test_xlsx_cell_referenced_far_from_its_row_keeps_calamine_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A far reference written in row 1 counts at its own row against inspect.max_cells."""
    from batchd.processors import sheets

    path = tmp_path / "lie.xlsx"
    _lying_rows_book(path, "XFD1048576")  # calamine would allocate 17 billion cells
    monkeypatch.setattr(sheets, "_calamine_sheets", lambda *args: pytest.fail("calamine"))
    result, _ = run(path)
    assert result["sheets"][0]["rows"][0][0] == 1


def test_reference_past_finds_exactly_the_rows_past_the_bound() -> None:
    """_reference_past(_row_bound(m)) finds r="A<n>" exactly when n is past m rounded up."""
    from batchd.processors.sheets import _reference_past, _row_bound

    rng = random.Random(13)
    tops = [0, 1, 9, 10, 99, 100, 272, 999, 1000, 2089, 99_999, 1_048_576]
    tops += [rng.randrange(1, 2_000_000) for _ in range(30)]
    assert [_row_bound(t) for t in (0, 1, 9, 10, 272, 999, 2089)] == [0, 1, 9, 19, 299, 999, 2999]
    for top in tops:
        bound = _row_bound(top)
        assert top <= bound < max(2 * top, 10)
        pattern = _reference_past(bound)
        rows = {0, 1, top, bound, bound + 1, top * 10, rng.randrange(1, 3_000_000)}
        rows |= {rng.randrange(max(0, bound - 50), bound + 50) for _ in range(200)}
        for row in rows:
            ref = b'<c r="XB%d" t="s">' % row
            assert (pattern.search(ref) is not None) == (row > bound), (top, row)


def test_not_placed_within_finds_wider_columns_later_rows_and_odd_cells() -> None:
    """_not_placed_within(prefix, letters, bound) passes only <c r="..."> within both bounds."""
    from batchd.processors.sheets import _not_placed_within, _row_bound

    rng = random.Random(7)
    for top in [
        0,
        1,
        9,
        10,
        272,
        2089,
        99_999,
        1_048_576,
        *(rng.randrange(1, 2_000_000) for _ in range(20)),
    ]:
        bound = _row_bound(top)
        one, two = _not_placed_within(b"", 1, bound), _not_placed_within(b"", 2, bound)
        rows = {1, top, bound, bound + 1, top * 10} | {
            rng.randrange(1, bound + 60) for _ in range(100)
        }
        for row in rows - {0}:
            past = row > bound
            assert (one.search(b'<c r="B%d" s="1">' % row) is not None) == past, (top, row)
            assert (two.search(b'<c r="AB%d"/>' % row) is not None) == past, (top, row)
            assert one.search(b'<c r="AB%d">' % row) is not None
            assert two.search(b'<c r="ABC%d">' % row) is not None
        assert two.search(b'<c t="s" r="A1">') is not None
        x = _not_placed_within(b"x:", 2, bound)
        assert x.search(b'<x:c r="B%d"><x:v>1</x:v></x:c>' % max(bound, 1)) is None or not bound
        assert x.search(b'<x:c r="B%d">' % (bound + 1)) is not None


def test_xlsx_streaming_reader_numbers_blanks_and_date_styles(tmp_path: Path) -> None:
    """The streaming reader reads padded numbers, blank and non-numeric number cells, and
    cells sharing or not sharing a date style, each as its own value; a style index that
    is not a number is a damaged sheet."""
    path = tmp_path / "padded.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    when = dt.datetime(2024, 3, 2, 9, 30)
    sheet.append(["tea", 2.5, 41, 7, dt.date(2024, 3, 1), dt.date(2024, 3, 2), when, 8])
    sheet.append([dt.time(6, 34), 1.5, dt.date(2024, 3, 3), 9])
    book.save(path)

    def edit(xml: str) -> str:
        # "2,5" makes calamine fail on the sheet: it is streamed
        xml = xml.replace("<v>2.5</v>", "<v>2,5</v>").replace("<v>41</v>", "<v> 41 </v>")
        return xml.replace("<v>7</v>", "<v>  </v>")

    rewrite_zip(path, "xl/worksheets/sheet1.xml", edit)
    result, _ = run(path)
    assert result["sheets"][0]["rows"] == [
        ["tea", "2,5", 41, None, "2024-03-01", "2024-03-02", "2024-03-02T09:30:00", 8],
        ["06:34:00", 1.5, "2024-03-03", 9],
    ]
    rewrite_zip(
        path, "xl/worksheets/sheet1.xml", lambda xml: xml.replace('r="H1"', 'r="H1" s="x"', 1)
    )
    with pytest.raises(PermanentError, match="damaged workbook"):
        run(path)


@pytest.mark.parametrize(
    ("where", "tag"),
    [
        ("before", '<c r="XFD1048576"><v>1</v></c>'),
        ("after", '<c\tr="XFD1048576"><v>1</v></c>'),
        ("after", '<row r="1048576"/>'),
        ("none", ""),
    ],
)
def test_xlsx_first_pass_counts_tags_outside_sheet_data(
    tmp_path: Path, where: str, tag: str
) -> None:
    """A cell or row written before or after <sheetData> counts in the first pass, as one
    inside does; a sheet without any keeps its own bounds."""
    from batchd.processors import sheets

    path = tmp_path / "outside.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for n in range(1, 30):
        sheet.append([n, "x", n * 0.5])
    book.save(path)

    def edit(xml: str) -> str:
        if where == "before":
            return xml.replace("<sheetData>", tag + "<sheetData>", 1)
        return xml.replace("</sheetData>", "</sheetData>" + tag, 1)

    rewrite_zip(path, "xl/worksheets/sheet1.xml", edit)
    with zipfile.ZipFile(path) as zf:
        scan = sheets._scan_sheet(zf, "Sheet", "xl/worksheets/sheet1.xml", 10**6)
        exact = sheets._scan_sheet(zf, "Sheet", "xl/worksheets/sheet1.xml", 10**6, quick=False)
    assert scan.cells == exact.cells
    # the quick pass may bound the last column (Z = 26) where the exact one counts 3
    assert scan.max_column >= exact.max_column
    if "<c" in tag:
        assert scan.max_column == exact.max_column == 16384
    if tag:
        assert scan.max_row == exact.max_row == 1048576
    else:
        assert exact.max_row == 29 and scan.max_row >= 29
