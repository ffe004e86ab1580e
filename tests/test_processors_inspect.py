"""The ``inspect`` processor on real PDF, XLSX, XLS and CSV files made here."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import openpyxl
import pytest
import xlwt  # type: ignore[import-untyped]
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from batchd.config import Settings, load_settings
from batchd.errors import PermanentError
from batchd.processors import ProcessorContext
from batchd.processors.inspect import inspect


def settings(**processing: int) -> Settings:
    env = {f"BATCHD_PROCESSING__{key.upper()}": str(value) for key, value in processing.items()}
    return load_settings(None, env=env)


def run(path: Path, config: Settings | None = None) -> tuple[dict[str, Any], list[int]]:
    """Inspect ``path``; the result (checked to be JSON) and the progress reported."""
    progress: list[int] = []
    out = path.parent / "out"
    out.mkdir(exist_ok=True)
    ctx = ProcessorContext(
        batch_id="b1",
        file_id="f1",
        relpath=path.name,
        output_path=out,
        settings=config or settings(),
        report=progress.append,
    )
    result = inspect(path, ctx)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    return result, progress


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
            "creator": "tests",
            "producer": "pypdf",
            "created": "2024-11-28T10:00:00+00:00",
            "modified": None,
        },
        "text": ["Soup 4.50", "Tea 2.00", "Cake 3.20"],
        "truncated": False,
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
                    ["tea", 2.5, "2024-03-01T00:00:00", 5],
                    ["cake", 3, "2024-03-02T09:30:00", None],
                ],
            },
            {"name": "Notes", "max_row": 1, "max_column": 2, "rows": [["open daily", True]]},
        ],
        "truncated": False,
    }
    assert progress == [50, 100]


def test_xlsx_formula_without_cached_value_is_null(tmp_path: Path) -> None:
    """A formula the file holds no cached value for (openpyxl-written) reads as null."""
    path = tmp_path / "fresh.xlsx"
    make_xlsx(path, cached=None)
    result, _ = run(path)
    assert result["sheets"][0]["rows"][1] == ["tea", 2.5, "2024-03-01T00:00:00", None]


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
    with pytest.raises(PermanentError, match=r"broken.xlsx: the XLSX workbook is damaged"):
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
                    ["tea", 2.5, "2024-03-01T00:00:00"],
                    ["cake", 3, True],
                ],
            },
            {"name": "Empty", "max_row": 0, "max_column": 0, "rows": []},
        ],
        "truncated": False,
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
    path.write_bytes(b"a,b\n" + b"1,2\n" * 5000 + b"\x00\x01\x02")
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
