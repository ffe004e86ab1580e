"""OCR in ``inspect``: scanned PDF pages and images read by the real Tesseract.

The scans are made here (tests/scans.py): Pillow draws known words with a
DejaVu font, the picture becomes an image-only PDF, a PNG or a TIFF. A
stand-in ``tesseract`` on PATH (a shell script) plays an engine that fails,
hangs or is missing a language; everything else runs the real one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inspecting import inspect_file
from PIL import Image, ImageChops
from scans import (
    image_object,
    menu_lines,
    save_image_pdf,
    save_mixed_pdf,
    save_pdf,
    save_tiff,
    scanned_page,
    stream_object,
    word_accuracy,
    words,
    write_pdf,
)

from batchd.config import LimitsSettings, Settings, load_settings
from batchd.errors import ConfigError
from batchd.processors import ocr
from batchd.processors.pdfscan import ImageDicts
from batchd.sniff import sniff

REPO = Path(__file__).resolve().parents[1]
TESSERACT = shutil.which("tesseract")

needs_tesseract = pytest.mark.skipif(
    TESSERACT is None, reason="needs Tesseract: apt-get install tesseract-ocr tesseract-ocr-eng"
)
#: how many of the drawn words OCR must find on these clean small scans.
MIN_ACCURACY = 0.9


def settings(**inspect_keys: Any) -> Settings:
    env = {f"BATCHD_INSPECT__{k.upper()}": json.dumps(v) for k, v in inspect_keys.items()}
    return load_settings(None, env={k: v.strip('"') for k, v in env.items()})


def run(path: Path, config: Settings | None = None) -> tuple[dict[str, Any], list[int]]:
    """Inspect ``path``; the result (checked to be JSON) and the progress reported."""
    return inspect_file(path, config or settings())


def page(seed: int, lines: int = 5) -> tuple[str, Image.Image]:
    """A small scanned page of menu text and the text drawn on it."""
    text = menu_lines(seed, lines)
    return "\n".join(text), scanned_page(text, width_in=5.5, height_in=2.5, seed=seed)


@pytest.fixture
def fake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder put first on PATH, for a stand-in ``tesseract``."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    yield folder


def fake_tesseract(folder: Path, body: str, languages: str = "eng") -> Path:
    """A ``tesseract`` that answers --version/--list-langs and runs ``body`` otherwise."""
    script = folder / "tesseract"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  --version) echo 'tesseract 0.0-test'; exit 0 ;;\n"
        f"  --list-langs) printf 'List of available languages (1):\\n{languages}\\n'; exit 0 ;;\n"
        "esac\n"
        f"{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def no_tesseract_path(tmp_path: Path) -> str:
    """A PATH with every folder of the current one except those holding ``tesseract``."""
    kept = [
        folder
        for folder in os.environ["PATH"].split(os.pathsep)
        if folder and not (Path(folder) / "tesseract").exists()
    ]
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return os.pathsep.join([str(empty), *kept])


# -- scanned PDFs ----------------------------------------------------------------


@needs_tesseract
def test_image_only_pdf_gives_the_words_drawn_on_it(tmp_path: Path) -> None:
    """An image-only PDF of known text gives those words, marked as OCR, with a confidence."""
    text, image = page(1)
    path = save_pdf(tmp_path / "menu.pdf", [image])
    result, progress = run(path)
    assert result["pages"] == 1
    assert word_accuracy(text, result["text"][0]) >= MIN_ACCURACY, result["text"][0]
    assert result["ocr"] == "done"
    [entry] = result["ocr_pages"]
    assert entry["page"] == 1
    assert 50 < entry["confidence"] <= 100
    assert (result["truncated"], result["page_errors"]) == (False, [])
    assert result["pages_without_text"] == [1]  # the text layer's story, OCR or not
    assert progress[-1] == 100


@needs_tesseract
def test_mixed_pdf_keeps_the_text_layer_and_ocrs_only_the_scans(tmp_path: Path) -> None:
    """In a mixed PDF, text pages keep their text layer and only scanned pages are OCRed."""
    text2, scan2 = page(2)
    text4, scan4 = page(4)
    path = save_mixed_pdf(tmp_path / "mixed.pdf", ["Soup 4.50", scan2, "Tea 2.00", scan4])
    result, progress = run(path)
    assert result["pages"] == 4
    assert result["text"][0] == "Soup 4.50"
    assert result["text"][2] == "Tea 2.00"
    assert word_accuracy(text2, result["text"][1]) >= MIN_ACCURACY
    assert word_accuracy(text4, result["text"][3]) >= MIN_ACCURACY
    assert [p["page"] for p in result["ocr_pages"]] == [2, 4]
    # The text layer's pass takes the first 10 %, then progress moves per OCRed page.
    assert [p for p in progress if p > 10] == [55, 100]


@needs_tesseract
def test_a_page_that_is_one_scan_is_read_at_the_scans_resolution(tmp_path: Path) -> None:
    """A page made of one picture is OCRed from that picture at its own dpi (no rendering)
    when that is up to ocr_dpi; a coarser scan is rendered at ocr_dpi."""
    text, _ = page(19)
    lines = text.splitlines()
    scans = [scanned_page(lines, width_in=5.5, height_in=2.5, dpi=d, seed=d) for d in (200, 100)]
    first, second = scans
    result, _ = run(save_pdf_per_dpi(tmp_path / "mixed-dpi.pdf", [(first, 200), (second, 100)]))
    assert [(p["page"], p["dpi"]) for p in result["ocr_pages"]] == [(1, 200), (2, 300)]
    assert word_accuracy(text, result["text"][0]) >= MIN_ACCURACY


def save_pdf_per_dpi(path: Path, pages: list[tuple[Image.Image, int]]) -> Path:
    """An image-only PDF whose pages are pictures of different resolutions."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for image, dpi in pages:
        one = io.BytesIO()
        image.save(one, "PDF", resolution=dpi)
        writer.append(PdfReader(one))
    with path.open("wb") as fh:
        writer.write(fh)
    return path


def test_pdf_with_a_text_layer_everywhere_is_left_as_it_was(tmp_path: Path) -> None:
    """With ocr = "auto", a PDF whose every page has text gains no OCR fields."""
    path = save_mixed_pdf(tmp_path / "text.pdf", ["Soup 4.50", "Tea 2.00"])
    result, _ = run(path)
    assert result["text"] == ["Soup 4.50", "Tea 2.00"]
    assert not {"ocr", "ocr_pages"} & set(result)


@needs_tesseract
def test_ocr_always_reads_every_page_even_with_a_text_layer(tmp_path: Path) -> None:
    """ocr = "always" OCRs pages that have a text layer too, and its text replaces the layer's."""
    text, scan = page(5, lines=3)
    path = save_mixed_pdf(tmp_path / "mixed.pdf", ["Grilled salmon with lemon 19.50", scan])
    result, _ = run(path, settings(ocr="always"))
    assert [p["page"] for p in result["ocr_pages"]] == [1, 2]
    assert words(result["text"][0]) == ["grilled", "salmon", "with", "lemon", "19.50"]
    assert word_accuracy(text, result["text"][1]) >= MIN_ACCURACY


def test_ocr_never_leaves_scans_without_text_and_says_so(tmp_path: Path) -> None:
    """ocr = "never": scanned pages stay empty and the result says "off"."""
    _, scan = page(6)
    result, _ = run(save_pdf(tmp_path / "scan.pdf", [scan]), settings(ocr="never"))
    assert (result["text"], result["ocr"]) == ([""], "off")
    assert "ocr_pages" not in result


@needs_tesseract
def test_cap_on_ocred_pages_sets_truncated(tmp_path: Path) -> None:
    """At most inspect.ocr_max_pages pages are OCRed; the result says truncated."""
    scans = [page(seed)[1] for seed in (7, 8, 9)]
    result, _ = run(save_pdf(tmp_path / "long.pdf", scans), settings(ocr_max_pages=1))
    assert [p["page"] for p in result["ocr_pages"]] == [1]
    assert result["text"][0] and result["text"][1:] == ["", ""]
    assert result["truncated"] is True
    assert result["truncated_reasons"] == ["inspect.ocr_max_pages"]


@needs_tesseract
def test_text_cap_applies_to_ocr_text(tmp_path: Path) -> None:
    """OCR text counts against processing.max_text_chars like a text layer's."""
    _, scan = page(10)
    config = load_settings(None, env={"BATCHD_PROCESSING__MAX_TEXT_CHARS": "12"})
    result, _ = run(save_pdf(tmp_path / "scan.pdf", [scan]), config)
    assert len(result["text"][0]) == 12
    assert result["truncated_reasons"] == ["processing.max_text_chars"]


# -- images ----------------------------------------------------------------------


def test_images_are_sniffed_by_content_and_not_allowed_by_default(tmp_path: Path) -> None:
    """PNG, JPEG, TIFF are told by content, refused by default, allowed by name (jpg/tif too)."""
    _, scan = page(11, lines=1)
    kinds = {}
    for name, fmt in (("a.bin", "PNG"), ("b.dat", "JPEG"), ("c", "TIFF")):
        scan.save(tmp_path / name, fmt)
        kinds[name] = sniff(tmp_path / name).kind
    assert kinds == {"a.bin": "png", "b.dat": "jpeg", "c": "tiff"}
    assert not any(LimitsSettings().allows(kind) for kind in kinds.values())
    allowed = LimitsSettings(allowed_types=("png", "JPG", ".tif"))
    assert all(allowed.allows(kind) for kind in kinds.values())


@needs_tesseract
def test_png_is_read_like_a_scanned_page(tmp_path: Path) -> None:
    """A PNG comes back with the same shape as a scanned PDF page: text, ocr_pages, confidence."""
    text, scan = page(12)
    scan.save(tmp_path / "photo.png", dpi=(300, 300))
    result, progress = run(tmp_path / "photo.png")
    assert (result["type"], result["pages"], result["dpi"]) == ("png", 1, 300)
    assert (result["width"], result["height"]) == scan.size
    assert word_accuracy(text, result["text"][0]) >= MIN_ACCURACY
    assert [p["page"] for p in result["ocr_pages"]] == [1]
    assert (result["ocr"], result["truncated"]) == ("done", False)
    assert progress == [100]


@needs_tesseract
def test_two_page_tiff_gives_one_text_per_page(tmp_path: Path) -> None:
    """A 2-page (fax-compressed) TIFF gives the text of each page, progress per page."""
    text1, scan1 = page(13)
    text2, scan2 = page(14)
    result, progress = run(save_tiff(tmp_path / "fax.tiff", [scan1, scan2]))
    assert (result["type"], result["pages"]) == ("tiff", 2)
    assert word_accuracy(text1, result["text"][0]) >= MIN_ACCURACY
    assert word_accuracy(text2, result["text"][1]) >= MIN_ACCURACY
    assert [p["page"] for p in result["ocr_pages"]] == [1, 2]
    assert progress == [50, 100]


@needs_tesseract
def test_rgba_jpeg_and_palette_images_are_read(tmp_path: Path) -> None:
    """Colour, palette and transparent pictures are turned grey (on white) before OCR."""
    text, scan = page(15, lines=3)
    rgba = scan.convert("RGBA")
    rgba.putalpha(Image.new("L", scan.size, 255))
    cases = {"t.png": rgba, "p.png": scan.convert("P"), "c.jpeg": scan.convert("RGB")}
    for name, image in cases.items():
        image.save(tmp_path / name)
        result, _ = run(tmp_path / name)
        assert word_accuracy(text, result["text"][0]) >= MIN_ACCURACY, name


def test_damaged_or_huge_image_fails_permanently_saying_why(tmp_path: Path) -> None:
    """A cut PNG is "damaged"; one over ocr_max_page_megapixels is refused naming the setting."""
    from batchd.errors import PermanentError

    cut = tmp_path / "cut.png"
    cut.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(PermanentError, match=r"cut.png: the image is damaged"):
        run(cut)
    big = tmp_path / "big.png"
    Image.new("1", (4000, 3000), 1).save(big)
    with pytest.raises(PermanentError, match=r"big.png: .*4000x3000.*ocr_max_page_megapixels"):
        run(big, settings(ocr_max_page_megapixels=10))


# -- failures and missing pieces -------------------------------------------------


def test_a_page_that_fails_ocr_is_a_page_error(tmp_path: Path, fake_path: Path) -> None:
    """Tesseract failing on a page is a page_errors entry saying why; the document completes."""
    fake_tesseract(fake_path, "echo 'Error: cannot allocate pix' >&2; exit 3")
    _, scan = page(16, lines=1)
    path = save_mixed_pdf(tmp_path / "m.pdf", ["Soup 4.50", scan])
    result, _ = run(path)
    assert result["text"] == ["Soup 4.50", ""]
    assert result["ocr"] == "done"
    assert result["ocr_pages"] == []
    assert result["page_errors"] == [
        {"page": 2, "error": "Tesseract failed: Error: cannot allocate pix"}
    ]


def test_a_page_over_its_time_budget_is_stopped(
    tmp_path: Path, fake_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page OCRed past inspect.ocr_page_seconds is killed, a page error; nothing is left."""
    pids = tmp_path / "pids"
    fake_tesseract(fake_path, f"echo $$ >> {pids}; exec sleep 60")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    _, scan = page(17, lines=1)
    config = settings(ocr_page_seconds=0.5)
    result, _ = run(save_pdf(tmp_path / "s.pdf", [scan, scan]), config)
    assert result["page_errors"] == [
        {"page": n, "error": "OCR stopped after 0.5 s (inspect.ocr_page_seconds)"} for n in (1, 2)
    ]
    for pid in pids.read_text().split():  # killed and reaped, not left running
        assert not Path(f"/proc/{pid}").exists()
    assert list(scratch.iterdir()) == []  # the page pictures are gone


def test_without_tesseract_auto_says_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no tesseract on PATH, ocr = "auto" leaves scans empty and says "unavailable"."""
    monkeypatch.setenv("PATH", no_tesseract_path(tmp_path))
    _, scan = page(18, lines=1)
    result, _ = run(save_pdf(tmp_path / "s.pdf", [scan]))
    assert (result["text"], result["ocr"]) == ([""], "unavailable")
    scan.save(tmp_path / "s.png")
    result, _ = run(tmp_path / "s.png")
    assert (result["text"], result["ocr"]) == ([""], "unavailable")


def test_missing_language_is_unavailable_naming_the_package(fake_path: Path) -> None:
    """A language Tesseract has no data for makes OCR unavailable, naming the Debian package."""
    fake_tesseract(fake_path, "exit 1", languages="eng")
    config = settings(ocr="always", ocr_languages=["eng", "chi_sim"])
    assert ocr.status(config.inspect) == "unavailable"
    with pytest.raises(ConfigError, match=r"no data for chi_sim \(install tesseract-ocr-chi-sim\)"):
        ocr.check_settings(config)


def test_ocr_always_without_tesseract_exits_78_naming_the_package(tmp_path: Path) -> None:
    """`batchd run` with ocr = "always" and no tesseract exits 78, one line naming the package."""
    config = tmp_path / "batchd.toml"
    config.write_text(f'[spool]\nroot = "{tmp_path / "spool"}"\n[inspect]\nocr = "always"\n')
    env = {**os.environ, "PATH": no_tesseract_path(tmp_path), "PYTHONPATH": str(REPO)}
    env["BATCHD_CONFIG"] = str(config)
    done = subprocess.run(
        [sys.executable, "-m", "batchd", "run"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 78, done.stderr
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "install tesseract-ocr" in lines[0] and 'inspect.ocr = "always"' in lines[0]
    assert not (tmp_path / "spool").exists()  # refused before touching anything


def test_processors_command_shows_ocr_state(tmp_path: Path) -> None:
    """`batchd processors --json` says whether OCR is available, its engine and languages."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "BATCHD_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")

    def ocr_row(path: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "batchd", "processors", "--json"],
            env={**env, "PATH": path},
            capture_output=True,
            timeout=60,
            check=True,
        )
        [row] = [r for r in json.loads(done.stdout) if r["name"] == "inspect"]
        return row["ocr"]  # type: ignore[no-any-return]

    missing = ocr_row(no_tesseract_path(tmp_path))
    assert missing["available"] is False
    assert "install tesseract-ocr" in missing["problem"]
    if TESSERACT is not None:
        found = ocr_row(os.environ["PATH"])
        assert found["available"] is True
        assert found["engine"].startswith("tesseract ")
        assert "eng" in found["languages"]


def test_language_names_are_checked(tmp_path: Path) -> None:
    """inspect.ocr_languages refuses names that are not Tesseract language names."""
    with pytest.raises(ConfigError, match=r"inspect.ocr_languages"):
        settings(ocr_languages=["eng", "../../etc/passwd"])


def test_parse_tsv_joins_words_lines_and_blocks() -> None:
    """Tesseract's TSV becomes words joined by spaces, lines by newlines, blocks by a blank line."""
    head = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\t"
    head += "left\ttop\twidth\theight\tconf\ttext"
    rows = [
        "1\t1\t0\t0\t0\t0\t0\t0\t10\t10\t-1\t",
        "5\t1\t1\t1\t1\t1\t0\t0\t1\t1\t90\tSoup",
        "5\t1\t1\t1\t1\t2\t0\t0\t1\t1\t80\t4.50",
        "5\t1\t1\t1\t2\t1\t0\t0\t1\t1\t70\tTea",
        "5\t1\t2\t1\t1\t1\t0\t0\t1\t1\t60\tCake",
        "5\t1\t2\t1\t1\t2\t0\t0\t1\t1\t-1\t ",
    ]
    parsed = ocr.parse_tsv("\n".join([head, *rows]))
    assert parsed == ocr.PageText(text="Soup 4.50\nTea\n\nCake", confidence=75.0)


def _render_into(tmp_path: Path, path: Path) -> tuple[Image.Image, Image.Image]:
    """The first page of ``path`` as ``_render`` writes it (read back) and as
    one rendering by pypdfium2 makes it."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    document = pdfium.PdfDocument(path)
    try:
        first = document[0]
        bmp = tmp_path / "page.bmp"
        dpi = ocr._render(first, settings().inspect, bmp)
        whole = first.render(scale=dpi / 72, force_bitmap_format=pdfium_c.FPDFBitmap_Gray)
        first.close()
        with Image.open(bmp) as written:
            assert (written.format, written.mode) == ("BMP", "L")
            return written.copy(), whole.to_pil().copy()
    finally:
        document.close()


def test_a_page_is_rendered_band_by_band_with_the_same_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page rendered for OCR a band of rows at a time into its BMP file is the
    page as one rendering draws it, but for PDFium's anti-aliasing (a few grey
    levels on a few pixels)."""

    monkeypatch.setattr(ocr, "BAND_BYTES", 40_000)  # bands of 15 rows: many cut the text
    text = " ".join(menu_lines(3, 3))
    path = save_mixed_pdf(tmp_path / "text.pdf", [text])
    written, whole = _render_into(tmp_path, path)
    assert written.size == whole.size and written.width == 2550  # US Letter at 300 dpi
    difference = ImageChops.difference(written, whole)
    differing = sum(difference.histogram()[1:])
    assert differing <= written.width * written.height // 10_000, differing
    assert ImageChops.difference(written, Image.new("L", written.size, 255)).getbbox()  # text drawn


def _render_twice_in_child(path: Path, queue: Any, own_scan: bool = False) -> None:
    """Make the first page of ``path`` Tesseract's picture twice (the first warms
    PDFium's fonts and the allocator): rendered, or from its own scan; the
    second's growth of the peak RSS, in KiB."""
    import pypdfium2 as pdfium

    from batchd.processors import ocr as child_ocr

    def picture(bmp: Path) -> None:
        if own_scan:
            dicts = ImageDicts(path, len(document))
            own = child_ocr._own_scan(first, settings().inspect, bmp, dicts, 0)
            dicts.close()
            assert own == (bmp, 300)
        else:
            child_ocr._render(first, settings().inspect, bmp)

    document = pdfium.PdfDocument(path)
    first = document[0]
    picture(path.with_suffix(".1.bmp"))
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS back to the RSS now
    before = _status_kib("VmRSS")
    picture(path.with_suffix(".2.bmp"))
    queue.put(_status_kib("VmHWM") - before)
    first.close()
    document.close()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_rendering_a_page_for_ocr_holds_no_whole_page_picture(tmp_path: Path) -> None:
    """A 300 dpi Letter page is an 8.4 MB grey picture: rendered into its file a
    band at a time, a warm worker grows by a fraction of that."""
    import multiprocessing as mp

    path = save_mixed_pdf(tmp_path / "text.pdf", [" ".join(menu_lines(5, 3))])
    context = mp.get_context("spawn")  # a fresh worker, as batchd's pool starts them
    queue = context.Queue()
    child = context.Process(target=_render_twice_in_child, args=(path, queue))
    child.start()
    growth_kib = queue.get(timeout=120)
    child.join(30)
    assert growth_kib < 4 * 1024, f"rendering grew the worker by {growth_kib // 1024} MiB"


def _pdfium_picture(path: Path, picture: Path, from_stream: bool) -> tuple[Path, int] | None:
    """``ocr._own_scan`` of the first page of ``path``: its picture read from
    the scan's stream, or PDFium's decoded copy of it."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(path)
    try:
        scan = document[0]
        try:
            dicts = ImageDicts(path, len(document)) if from_stream else None
            try:
                return ocr._own_scan(scan, settings().inspect, picture, dicts, 0)
            finally:
                if dicts is not None:
                    dicts.close()
        finally:
            scan.close()
    finally:
        document.close()


def _colour_page() -> Image.Image:
    """A scan in colour: blue ink on cream paper, and a red band."""
    from PIL import ImageOps

    _, drawn = page(7)
    colour = ImageOps.colorize(drawn.convert("L"), black=(20, 30, 120), white=(250, 240, 200))
    colour.paste((200, 30, 30), (0, 0, colour.width // 3, 150))
    return colour


def _no_pdfium_copy(*_: object) -> None:
    raise AssertionError("PDFium's decoded copy was used, not the scan's stream")


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_flate_scan_is_inflated_band_by_band_into_pdfiums_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A scan stored deflated becomes Tesseract's grey picture from its stream,
    a band of rows at a time (no whole decoded copy): the same pixels as from
    PDFium's decoded copy."""
    picture = _colour_page().convert(mode)
    path = save_image_pdf(tmp_path / "scan.pdf", picture)
    expected = _pdfium_picture(path, tmp_path / "pdfium.bmp", from_stream=False)
    assert expected == (tmp_path / "pdfium.bmp", 300)
    row_bytes = picture.width * len(mode)
    monkeypatch.setattr(ocr, "BAND_BYTES", 7 * row_bytes)  # bands of 7 rows, the last short
    assert picture.height % 7
    monkeypatch.setattr(ocr, "_write_grey", _no_pdfium_copy)
    own = _pdfium_picture(path, tmp_path / "own.bmp", from_stream=True)
    assert own == (tmp_path / "own.bmp", 300)
    with Image.open(own[0]) as written, Image.open(expected[0]) as reference:
        assert (written.mode, written.size) == ("L", picture.size)
        assert ImageChops.difference(written, reference).getextrema() == (0, 0)


def test_grey_jpeg_scan_is_handed_to_tesseract_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grey JPEG scan (what scanners and Pillow write) goes to Tesseract as
    its own JPEG file: nothing decoded in the worker, and what Tesseract
    decodes is the picture PDFium would have given."""
    from pypdf import PdfReader

    path = save_pdf(tmp_path / "scan.pdf", [page(3)[1].convert("L")])
    expected = _pdfium_picture(path, tmp_path / "pdfium.bmp", from_stream=False)
    assert expected is not None
    monkeypatch.setattr(ocr, "_write_grey", _no_pdfium_copy)
    own = _pdfium_picture(path, tmp_path / "page.bmp", from_stream=True)
    assert own == (tmp_path / "page.jpg", 300)
    (image,) = PdfReader(path).pages[0]["/Resources"]["/XObject"].values()
    assert own[0].read_bytes() == image.get_object()._data  # the stream, byte for byte
    with Image.open(own[0]) as written, Image.open(expected[0]) as reference:
        assert written.size == reference.size
        assert max(ImageChops.difference(written, reference).getextrema()) <= 2


def test_colour_jpeg_scan_is_decoded_straight_to_grey(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A colour JPEG scan is decoded to its grey (luma) alone, into the BMP a
    band at a time: PDFium's RGB made grey but for the rounding at colour edges
    (the JPEG keeps its chroma at half resolution, its luma as it is)."""
    path = save_pdf(tmp_path / "scan.pdf", [_colour_page()])
    expected = _pdfium_picture(path, tmp_path / "pdfium.bmp", from_stream=False)
    assert expected is not None
    monkeypatch.setattr(ocr, "_write_grey", _no_pdfium_copy)
    monkeypatch.setattr(ocr, "BAND_BYTES", 7 * _colour_page().width)
    own = _pdfium_picture(path, tmp_path / "own.bmp", from_stream=True)
    assert own == (tmp_path / "own.bmp", 300)
    with Image.open(own[0]) as written, Image.open(expected[0]) as reference:
        assert (written.mode, written.size) == ("L", reference.size)
        levels = ImageChops.difference(written, reference).histogram()
        assert sum(levels[5:]) <= sum(levels) // 1000, levels  # 0.1 % off by 5 or more
        assert sum(levels[1:]) <= sum(levels) // 100, levels  # 99 % the same


def _png_predicted(picture: Image.Image) -> bytes:
    """The picture's rows each behind PNG filter type 0, deflated (Predictor 15)."""
    import zlib

    row = picture.width * len(picture.mode)
    raw = picture.tobytes()
    return zlib.compress(b"".join(b"\0" + raw[top : top + row] for top in range(0, len(raw), row)))


def _stream_taken(path: Path, page_count: int = 1) -> bool:
    """Whether the stream reader takes the first page's scan as plain pixels."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(path)
    dicts = ImageDicts(path, page_count)
    try:
        (scan,) = document[0].get_objects(max_depth=1)
        width, height = scan.get_px_size()
        raw = memoryview(scan.get_data(decode_simple=False)).cast("B")
        return dicts.scan(0, width, height, raw) is not None
    finally:
        dicts.close()
        document.close()


def _inline_image(picture: Image.Image, data: bytes) -> bytes:
    """A content stream drawing ``data`` as an inverted inline image over the page."""
    points = f"{picture.width * 72 / 300:.4f} 0 0 {picture.height * 72 / 300:.4f}"
    head = f"q {points} 0 0 cm BI /W {picture.width} /H {picture.height} /CS /G /BPC 8 "
    return (head + "/D [1 0] /F /Fl ID\n").encode() + data + b"\nEI Q"


@pytest.mark.parametrize(
    "case",
    ["decode-array", "png-predictor", "truncated", "corrupt", "inline-image", "broken-xref"],
)
def test_scan_streams_batchd_does_not_read_are_pdfiums_to_decode(tmp_path: Path, case: str) -> None:
    """A scan that is not plain pixels (inverted by /Decode, behind a PNG
    predictor, damaged), or whose dictionary batchd cannot be sure of (an
    inline image drawn beside an unused XObject of its size, a file pypdf
    would have to rebuild), is not read from its stream: the page's picture
    is what PDFium makes of it, as without the stream reader."""
    import zlib

    picture = page(4)[1].convert("L")
    plain = zlib.compress(picture.tobytes())
    keys, data, content = "", None, None
    if case == "decode-array":
        keys = "/Decode [1 0]"
    elif case == "png-predictor":
        keys = f"/DecodeParms << /Predictor 15 /Colors 1 /Columns {picture.width} >>"
        data = _png_predicted(picture)
    elif case == "truncated":
        data = plain[:2000]
    elif case == "corrupt":  # a zlib error in the middle
        data = plain[:1000] + bytes(255 - b for b in plain[1000:1100]) + plain[1100:]
    elif case == "inline-image":
        content = _inline_image(picture, plain)
    path = save_image_pdf(
        tmp_path / "scan.pdf", picture, image_keys=keys, stream=data, content=content
    )
    if case == "broken-xref":  # PDFium repairs it quietly; pypdf would read the whole file
        text = path.read_bytes()
        at = text.rindex(b"startxref\n") + len(b"startxref\n")
        path.write_bytes(text[:at] + b"17" + text[at:])
    if case not in ("truncated", "corrupt"):  # those are refused when inflated
        assert not _stream_taken(path)
    expected = _pdfium_picture(path, tmp_path / "pdfium.bmp", from_stream=False)
    own = _pdfium_picture(path, tmp_path / "own.bmp", from_stream=True)
    if expected is None:  # PDFium could not decode it either: the page is rendered
        assert own is None
        return
    assert own == (tmp_path / "own.bmp", 300)
    with Image.open(own[0]) as written, Image.open(expected[0]) as reference:
        assert ImageChops.difference(written, reference).getextrema() == (0, 0)
    if case not in ("truncated", "corrupt"):
        with Image.open(own[0]) as written:  # PDFium undid the inversion or the predictor
            inverted = case in ("decode-array", "inline-image")
            plain_picture = Image.eval(picture, lambda v: 255 - v) if inverted else picture
            assert ImageChops.difference(written, plain_picture).getextrema() == (0, 0)


@needs_tesseract
def test_a_jpeg_scan_tesseract_cannot_read_is_read_from_pdfiums_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grey JPEG scan cut short (its end marker put back, as some writers
    do) is whole enough for PDFium, which draws what it has, and not for
    Tesseract's JPEG reader: the page is OCRed again from PDFium's picture,
    not lost to a page error."""
    text, drawn = page(2, lines=6)
    jpeg = io.BytesIO()
    drawn.convert("L").save(jpeg, "JPEG", quality=85)
    cut = jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 5] + b"\xff\xd9"
    alone = tmp_path / "alone.jpg"
    alone.write_bytes(cut)
    assert subprocess.run([str(TESSERACT), str(alone), "stdout"], capture_output=True).returncode
    path = save_image_pdf(
        tmp_path / "scan.pdf", drawn.convert("L"), filter="/DCTDecode", stream=cut
    )
    assert _stream_taken(path)
    given: list[str] = []
    real_start = ocr.start

    def start(picture: Path, *args: Any, **kwargs: Any) -> ocr.Job:
        given.append(picture.suffix)
        return real_start(picture, *args, **kwargs)

    monkeypatch.setattr(ocr, "start", start)
    result, _ = run(path)
    assert given == [".jpg", ".bmp"]  # the JPEG as it is, then PDFium's picture
    assert result["page_errors"] == [] and result["ocr"] == "done"
    found = set(words(result["text"][0]))
    assert len(found & set(words(text))) >= 5, result["text"][0]  # the rows PDFium drew
    [entry] = result["ocr_pages"]
    assert entry["dpi"] == 300


def _crafted(case: str, path: Path) -> tuple[Path, Image.Image]:
    """A one-page PDF crafted so that pypdf's dictionary of the drawn image
    could be taken for another (plain) one; the picture stored in it."""
    import zlib

    from PIL import ImageDraw

    picture = Image.new("L", (600, 300), 255)
    ImageDraw.Draw(picture).rectangle((40, 40, 200, 120), fill=0)
    data = zlib.compress(picture.tobytes())
    draw = b"q 144 0 0 72 0 0 cm /Im%d Do Q"
    page = "<< /Type /Page /Parent {parent} 0 R /MediaBox [0 0 144 72] {extra} "
    page += "/Resources << /XObject << {xobjects} >> >> /Contents 5 0 R >>"
    decoy = image_object(picture, data, "/FlateDecode")  # plain, not drawn
    inverted = image_object(picture, data, "/FlateDecode", "/Decode [1 0]")
    if case == "inline-image":  # drawn inline; the XObject it names in a comment is not
        inline = f"BI /W 600 /H 300 /CS /G /BPC 8 /D [1 0] /F /Fl /L {len(data)} ID\n"
        content = b"% /Im0 Do\nq 144 0 0 72 0 0 cm " + inline.encode() + data + b"\nEI Q"
        assert len(content) <= 1024  # small enough for the content-size check
        objects = [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            page.format(parent=2, extra="", xobjects="/Im0 4 0 R").encode(),
            decoy,
            stream_object(content),
        ]
    elif case == "page-with-kids":  # PDFium and pypdf take different objects for page 1
        objects = [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            page.format(parent=2, extra="/Kids [6 0 R]", xobjects="/Im0 4 0 R").encode(),
            decoy,
            stream_object(draw % 0),
            page.format(parent=3, extra="", xobjects="/Im0 7 0 R").encode(),
            inverted,
        ]
    else:  # "two-images": the drawn one hides its width behind a reference
        hidden = inverted.replace(b"/Width 600", b"/Width 7 0 R")
        objects = [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            page.format(parent=2, extra="", xobjects="/Im0 4 0 R /Im1 6 0 R").encode(),
            decoy,
            stream_object(b"% /Im0 Do\n" + draw % 1),
            hidden,
            b"600",
        ]
    return write_pdf(path, objects), picture


@pytest.mark.parametrize("case", ["inline-image", "page-with-kids", "two-images"])
def test_a_dictionary_batchd_cannot_be_sure_of_is_not_read(tmp_path: Path, case: str) -> None:
    """Where the image PDFium draws may not be the one pypdf's dictionary
    describes (an inline image beside a plain XObject of the same bytes, a
    page tree the two walk differently, a second image), the stream is not
    taken: the picture is PDFium's, inverted where PDFium inverts it."""
    path, picture = _crafted(case, tmp_path / "crafted.pdf")
    assert not _stream_taken(path)
    expected = _pdfium_picture(path, tmp_path / "pdfium.bmp", from_stream=False)
    own = _pdfium_picture(path, tmp_path / "own.bmp", from_stream=True)
    assert expected is not None and own is not None
    with Image.open(own[0]) as written, Image.open(expected[0]) as reference:
        assert ImageChops.difference(written, reference).getextrema() == (0, 0)
    if case != "page-with-kids":  # which page PDFium draws there is its own choice
        with Image.open(own[0]) as written:
            inverted = Image.eval(picture, lambda v: 255 - v)
            assert ImageChops.difference(written, inverted).getextrema() == (0, 0)


def test_the_stream_reader_trusts_pypdf_only_where_it_agrees_with_pdfium(tmp_path: Path) -> None:
    """pypdf's page index is PDFium's only when both count the same pages; a
    plain deflated scan is taken when they do."""
    path = save_image_pdf(tmp_path / "scan.pdf", page(5)[1].convert("L"))
    assert _stream_taken(path, page_count=1)
    assert not _stream_taken(path, page_count=2)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_an_own_scan_page_holds_no_whole_decoded_picture(tmp_path: Path, mode: str) -> None:
    """An A4 page that is a 300 dpi scan stored deflated (26 MB decoded in RGB)
    becomes Tesseract's picture with the worker growing by a fraction of that."""
    import multiprocessing as mp

    text = menu_lines(6, 40)
    path = save_image_pdf(tmp_path / "scan.pdf", scanned_page(text).convert(mode))
    context = mp.get_context("spawn")  # a fresh worker, as batchd's pool starts them
    queue = context.Queue()
    child = context.Process(target=_render_twice_in_child, args=(path, queue, True))
    child.start()
    growth_kib = queue.get(timeout=120)
    child.join(30)
    # the grey picture alone is 8.7 MB: what grows is a band (1 MiB) and the
    # compressed stream (1 MB here), held by PDFium and read by pypdf
    assert growth_kib < 6 * 1024, f"the scan grew the worker by {growth_kib // 1024} MiB"


@needs_tesseract
def test_a_deflated_colour_scan_gives_the_words_drawn_on_it(tmp_path: Path) -> None:
    """End to end: a colour scan stored deflated is OCRed from its stream."""
    text, drawn = page(8)
    from PIL import ImageOps

    colour = ImageOps.colorize(drawn.convert("L"), black=(20, 30, 120), white=(250, 240, 200))
    result, _ = run(save_image_pdf(tmp_path / "scan.pdf", colour))
    assert result["ocr"] == "done" and result["page_errors"] == []
    assert word_accuracy(text, result["text"][0]) >= MIN_ACCURACY, result["text"][0]


def test_rgb_scan_turns_grey_band_by_band_with_the_same_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page that is one RGB scan becomes the same grey picture, written into
    its file a band at a time, without a full RGB or grey copy; a grey scan is
    copied as it is."""
    import pypdfium2 as pdfium

    _, drawn = page(7)
    colour = Image.merge("RGB", [drawn.convert("L")] * 3)
    colour.paste((200, 30, 30), (0, 0, colour.width // 3, 150))  # a red band: not grey
    for name, scan_picture, mode in (("colour", colour, "BGR"), ("grey", drawn.convert("L"), "L")):
        path = save_pdf(tmp_path / f"{name}.pdf", [scan_picture])
        document = pdfium.PdfDocument(path)
        try:
            scan = document[0]
            (picture,) = scan.get_objects(max_depth=1)
            bitmap = picture.get_bitmap(render=False)
            assert bitmap.mode == mode
            # bands of 7 rows, the last one short
            monkeypatch.setattr(ocr, "BAND_BYTES", 7 * bitmap.stride)
            assert bitmap.height % 7
            bmp = tmp_path / f"{name}.bmp"
            assert ocr._own_scan(scan, settings().inspect, bmp, None, 0) == (bmp, 300)
            whole = ocr._grey(bitmap.to_pil())
            with Image.open(bmp) as written:
                assert (written.mode, written.size) == ("L", whole.size)
                assert ImageChops.difference(written, whole).getextrema() == (0, 0)
            scan.close()
        finally:
            document.close()


#: inspect a file in a child whose files may not grow past RLIMIT_FSIZE; prints
#: what became of it as JSON.
_SMALL_FILES_CHILD = """
import json, sys
sys.path[:0] = [sys.argv[2]]
from pathlib import Path
from inspecting import inspect_file
from batchd.config import load_settings
try:
    result, _ = inspect_file(Path(sys.argv[1]), load_settings(None, env={}))
except BaseException as exc:
    print(json.dumps({"raised": type(exc).__name__ + ": " + str(exc)}))
else:
    print(json.dumps({"page_errors": result["page_errors"], "ocr": result.get("ocr")}))
"""


def _files_up_to_200_kb() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, as ENOSPC on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@needs_tesseract
@pytest.mark.parametrize("how", ["own-jpeg", "own-flate", "rendered"])
def test_a_page_picture_that_cannot_be_written_fails_the_attempt(tmp_path: Path, how: str) -> None:
    """A full disk (or quota) while a page's picture is written for Tesseract is
    not the page's fault: the attempt fails (and is retried), the document is not
    completed without that page's text. Whichever way the picture is made: the
    scan's own JPEG copied, its Flate stream inflated, the page rendered."""
    _, drawn = page(1)
    path = tmp_path / "scan.pdf"
    if how == "own-jpeg":  # a page large enough for its JPEG to pass the limit
        save_pdf(path, [scanned_page(menu_lines(1, 40), blur_px=1)])
    elif how == "own-flate":
        save_image_pdf(path, drawn)
    else:  # at 72 dpi the picture is not the page's scan: PDFium renders it at 300
        save_pdf(path, [drawn], dpi=72)
    tests = Path(__file__).resolve().parent
    done = subprocess.run(
        [sys.executable, "-c", _SMALL_FILES_CHILD, str(path), str(tests)],
        capture_output=True,
        text=True,
        preexec_fn=_files_up_to_200_kb,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert "File too large" in answer.get("raised", ""), answer
