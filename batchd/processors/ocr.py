"""OCR for ``inspect``: the text of scanned PDF pages and of images, by Tesseract.

Tesseract runs as its command line (Debian's ``tesseract-ocr``), one process
per page, handed the page as an uncompressed grey BMP file (the next page
renders meanwhile) and read back as TSV (words with their confidence). A PDF
page is rendered into the file a band of rows at a time; a page that is one
scan is its scan's Flate stream inflated a band at a time, or a grey JPEG
scan's own JPEG file: the worker holds no whole page's picture. (A colour
JPEG scan is decoded whole, but to grey only: a third of its RGB.) Chosen
over a binding (tesserocr) on purpose, see BENCHMARKS.md for the figures:

* a page that hangs or runs long is killed at ``inspect.ocr_page_seconds``
  and becomes a ``page_errors`` entry; the worker and the rest of the
  document live on. A crash inside Tesseract is the same: one page lost.
* the engine and its language data are Debian's, updated with the system;
  "is OCR available" is "is ``tesseract`` on PATH, with these languages".
* the process inherits the worker's limits (``RLIMIT_AS`` from
  ``processing.worker_memory_mb``) and its process group, so the daemon's
  kill of a timed-out worker kills it too.

PDF pages are rendered by PDFium (pypdfium2) at ``inspect.ocr_dpi``, in grey.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from batchd.config import InspectSettings, Settings
from batchd.errors import ConfigError, PermanentError
from batchd.processors.content import Budget
from batchd.processors.pdfscan import ImageDicts, ScanImage, inflate_bands, jpeg_matches

if TYPE_CHECKING:
    from PIL import Image

    from batchd.processors import Context

TESSERACT = "tesseract"
#: the Debian package that has the ``tesseract`` command.
TESSERACT_PACKAGE = "tesseract-ocr"
#: ``tesseract --version`` and ``--list-langs`` answer at once; more means it is broken.
PROBE_SECONDS = 10.0
#: PDF points per inch: a page's size in points times dpi/72 is its size in pixels.
POINTS_PER_INCH = 72
#: images saying less than this (or nothing) about their resolution let Tesseract guess it.
MIN_TRUSTED_DPI = 70
#: Tesseract's TSV row level for one word.
_TSV_WORD = 5
#: the content types that are pictures, OCRed as documents when allowed.
IMAGE_TYPES = frozenset({"png", "jpeg", "tiff"})

Result = dict[str, Any]
#: ``"done"``: the pages that needed OCR went through it (see ``ocr_pages`` and
#: ``page_errors``); ``"unavailable"``: they needed it but Tesseract (or a
#: language) is not installed; ``"off"``: ``inspect.ocr = "never"``.
Status = Literal["done", "unavailable", "off"]


class OcrError(Exception):
    """One page could not be OCRed; the message says why."""


class OcrTimeout(OcrError):
    """Tesseract ran past ``inspect.ocr_page_seconds`` on a page."""


# -- the engine ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Engine:
    """The Tesseract found on PATH."""

    path: str
    #: ``tesseract 5.3.0``
    version: str
    languages: tuple[str, ...]


def find_engine() -> Engine | None:
    """The ``tesseract`` on the current PATH, or None when there is none that runs."""
    return _find_engine(os.environ.get("PATH", os.defpath))


@functools.lru_cache(maxsize=4)
def _find_engine(search_path: str) -> Engine | None:
    # Cached per PATH: a worker asks once per document, the answer stays the same.
    path = shutil.which(TESSERACT, path=search_path)
    if path is None:
        return None
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, timeout=PROBE_SECONDS, check=True
        )
        langs = subprocess.run(
            [path, "--list-langs"], capture_output=True, timeout=PROBE_SECONDS, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    first = (version.stdout or version.stderr).decode(errors="replace").strip().splitlines()
    # The first line says where the data is ("List of available languages in ...").
    names = langs.stdout.decode(errors="replace").strip().splitlines()[1:]
    return Engine(
        path=path,
        version=first[0].strip() if first else "tesseract",
        languages=tuple(sorted(n.strip() for n in names if n.strip())),
    )


def language_package(language: str) -> str:
    """The Debian package with a Tesseract language's data: ``chi_sim`` is in
    ``tesseract-ocr-chi-sim``."""
    return f"{TESSERACT_PACKAGE}-{language.lower().replace('_', '-')}"


def unavailable_reason(settings: InspectSettings) -> str | None:
    """Why OCR cannot run with these settings (what to install), or None when it can."""
    engine = find_engine()
    if engine is None:
        return f"Tesseract is not installed (no {TESSERACT!r} on PATH; install {TESSERACT_PACKAGE})"
    missing = [name for name in settings.ocr_languages if name not in engine.languages]
    if missing:
        packages = " ".join(language_package(name) for name in missing)
        return f"Tesseract has no data for {', '.join(missing)} (install {packages})"
    return None


def check_settings(settings: Settings) -> None:
    """Raise :class:`ConfigError` when ``inspect.ocr = "always"`` but OCR cannot run.

    Called at start and on reload: a daemon told to always OCR must not start
    and then quietly return scans without text.
    """
    if settings.inspect.ocr != "always":
        return
    reason = unavailable_reason(settings.inspect)
    if reason is not None:
        raise ConfigError(f'inspect.ocr = "always" but {reason}; or set inspect.ocr = "auto"')


def describe(settings: Settings) -> Result:
    """OCR's state for ``batchd processors``: mode, engine, languages installed."""
    engine = find_engine()
    reason = unavailable_reason(settings.inspect)
    return {
        "mode": settings.inspect.ocr,
        "available": reason is None,
        "engine": engine.version if engine else None,
        "languages": list(engine.languages) if engine else [],
        "wanted_languages": list(settings.inspect.ocr_languages),
        "problem": reason,
    }


def status(settings: InspectSettings) -> Status | None:
    """What OCR will do for a document: None means it will run."""
    if settings.ocr == "never":
        return "off"
    if unavailable_reason(settings) is not None:
        return "unavailable"
    return None


# -- one page --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageText:
    text: str
    #: Tesseract's mean word confidence (0-100), None when it found no words.
    confidence: float | None


@dataclass
class Job:
    """One page in Tesseract: started, not yet collected."""

    index: int
    proc: subprocess.Popen[bytes]
    picture: Path
    started: float
    #: the resolution Tesseract was told, None when it guesses.
    dpi: int | None
    #: another way to make the page's picture, for when Tesseract cannot read
    #: this one (a scan's own JPEG that PDFium decodes and Tesseract does not).
    again: Again | None = None


def start(
    picture: Path,
    settings: InspectSettings,
    dpi: int | None,
    index: int,
    again: Again | None = None,
) -> Job:
    """Start Tesseract on ``picture`` (a BMP file, removed once read); collect it
    with :func:`finish`. ``dpi`` is the picture's resolution when known
    (Tesseract guesses otherwise); ``again`` makes the page's picture another
    way if Tesseract fails on this one. :class:`OcrError` when it cannot start."""
    engine = find_engine()
    if engine is None:
        picture.unlink(missing_ok=True)
        raise OcrError(f"Tesseract is gone from PATH (install {TESSERACT_PACKAGE})")
    command = [engine.path, str(picture), "stdout", "-l", "+".join(settings.ocr_languages)]
    if dpi is not None:
        command += ["--dpi", str(dpi)]
    command.append("tsv")
    # One thread: the pool already runs one worker per core, and OpenMP threads
    # fighting over them made a page 4x slower (BENCHMARKS.md).
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        picture.unlink(missing_ok=True)
        raise OcrError(f"cannot run {engine.path}: {exc}") from exc
    return Job(
        index=index, proc=proc, picture=picture, started=time.monotonic(), dpi=dpi, again=again
    )


def finish(job: Job, settings: InspectSettings) -> PageText:
    """Wait for a page started by :func:`start` (until ``ocr_page_seconds`` after
    its start, then kill it); its text, or :class:`OcrError` saying why not."""
    left = settings.ocr_page_seconds - (time.monotonic() - job.started)
    try:
        out, err = job.proc.communicate(timeout=max(left, 0.001))
    except subprocess.TimeoutExpired as exc:
        job.proc.kill()
        job.proc.communicate()
        raise OcrTimeout(
            f"OCR stopped after {settings.ocr_page_seconds:g} s (inspect.ocr_page_seconds)"
        ) from exc
    finally:
        job.picture.unlink(missing_ok=True)
    if job.proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {job.proc.returncode}"
        raise OcrError(f"Tesseract failed: {why}")
    return parse_tsv(out.decode("utf-8", errors="replace"))


def _grey(image: Image.Image) -> Image.Image:
    """The picture as 1-bit or 8-bit grey, transparency on white (Tesseract
    binarises anyway; grey is a third of the bytes to pass)."""
    from PIL import Image

    if image.mode in ("1", "L"):
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L")
    return image.convert("L")


def parse_tsv(tsv: str) -> PageText:
    """Text and mean confidence from Tesseract's TSV: words joined by spaces,
    lines by newlines, blocks by a blank line."""
    rows = csv.reader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(rows, None)
    if header is None or "conf" not in header or "text" not in header:
        raise OcrError("Tesseract gave no TSV output")
    col = {name: i for i, name in enumerate(header)}
    blocks: list[list[list[str]]] = []
    where: tuple[str, ...] | None = None
    block: str | None = None
    confidences: list[float] = []
    for row in rows:
        if len(row) < len(header) or row[col["level"]] != str(_TSV_WORD):
            continue
        word = row[col["text"]].strip()
        if not word:
            continue
        line = (row[col["block_num"]], row[col["par_num"]], row[col["line_num"]])
        if row[col["block_num"]] != block:
            block = row[col["block_num"]]
            blocks.append([])
        if line != where:
            where = line
            blocks[-1].append([])
        blocks[-1][-1].append(word)
        confidence = float(row[col["conf"]])
        if confidence >= 0:
            confidences.append(confidence)
    text = "\n\n".join("\n".join(" ".join(words) for words in lines) for lines in blocks)
    mean = round(sum(confidences) / len(confidences), 1) if confidences else None
    return PageText(text=text, confidence=mean)


# -- documents -------------------------------------------------------------------


@dataclass
class Pages:
    """What OCR adds to a result: which pages, their confidence, the failures."""

    ocr_pages: list[Result]
    page_errors: list[Result]

    def page_done(self, number: int, page: PageText, dpi: int | None, seconds: float) -> None:
        self.ocr_pages.append(
            {
                "page": number,
                "confidence": page.confidence,
                "dpi": dpi,
                "seconds": round(seconds, 3),
            }
        )

    def page_failed(self, number: int, message: str) -> None:
        self.page_errors.append({"page": number, "error": message})


class ScaledProgress:
    """A :class:`Context` whose progress 0-100 lands in [start, end] of the real one:
    the text layer's pass takes the first few percent, OCR the rest."""

    def __init__(self, ctx: Context, start: float, end: float) -> None:
        self._ctx = ctx
        self._start = start
        self._span = end - start
        self.batch_id = ctx.batch_id
        self.file_id = ctx.file_id
        self.relpath = ctx.relpath
        self.settings = ctx.settings

    @property
    def output_dir(self) -> Path:
        return self._ctx.output_dir

    def progress(self, percent: float) -> None:
        self._ctx.progress(self._start + self._span * percent / 100)


#: share of a PDF's progress bar given to its text-layer pass when OCR may follow.
TEXT_PASS_PERCENT = 10.0


def text_pass(ctx: Context) -> Context:
    """The context for reading a PDF's text layer: its progress takes the first
    TEXT_PASS_PERCENT when OCR may follow, all of it otherwise."""
    if status(ctx.settings.inspect) is None:
        return ScaledProgress(ctx, 0, TEXT_PASS_PERCENT)
    return ctx


def ocr_pdf(path: Path, ctx: Context, result: Result, budget: Budget) -> None:
    """OCR the pages of an inspected PDF that need it, in place in ``result``.

    ``auto``: the ``pages_without_text``; ``always``: every page read (the OCR
    text replaces the text layer's, for PDFs whose text layer is wrong, and
    has a budget of its own). ``budget`` is the document's text budget. A PDF
    with nothing to OCR is left as it was; otherwise ``ocr`` says what
    happened and ``ocr_pages`` lists the pages whose text came from OCR.
    """
    settings = ctx.settings.inspect
    texts: list[str] = result["text"]
    if settings.ocr == "always":
        wanted = list(range(min(result["pages"], settings.max_pages)))
        processing = ctx.settings.processing
        take = Budget(processing.max_rows, processing.max_text_chars)
        take.reasons = budget.reasons  # one list: the text pass's caps still count
    else:
        wanted = [number - 1 for number in result.get("pages_without_text", [])]
        take = budget
    if not wanted:
        return
    why_not = status(settings)
    if why_not is not None:
        result["ocr"] = why_not
        return
    pages = Pages(ocr_pages=[], page_errors=[])
    if len(wanted) > settings.ocr_max_pages:
        wanted = wanted[: settings.ocr_max_pages]
        take.hit("inspect.ocr_max_pages")
    done = 0

    def on_page() -> None:
        nonlocal done
        done += 1
        ctx.progress(TEXT_PASS_PERCENT + (100 - TEXT_PASS_PERCENT) * done / len(wanted))

    def items(scratch: Path) -> Iterator[Item]:
        return _render_pdf(path, ctx, wanted, pages, scratch)

    ocr_pages(items, texts, settings, pages, take, on_page)
    _merge(result, pages, take)


def _render_pdf(
    path: Path, ctx: Context, indexes: list[int], pages: Pages, scratch: Path
) -> Iterator[Item]:
    """Each wanted page as a grey BMP file in ``scratch``: the page's own scan,
    or the page rendered at ``inspect.ocr_dpi`` (smaller when that would pass
    ``ocr_max_page_megapixels``); None for a page PDFium fails on."""
    import pypdfium2 as pdfium

    settings = ctx.settings.inspect
    try:
        document = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as exc:
        for index in indexes:
            pages.page_failed(index + 1, f"cannot render the page for OCR: {exc}")
            yield index, None, None, None
        return
    dicts = ImageDicts(path, len(document))

    def pdfium_picture(index: int, picture: Path) -> tuple[Path, int]:
        """The page's picture from PDFium alone (its decoded scan, or the page
        rendered), for a page Tesseract could not read from its stream. The
        document is opened again: this runs after the pages were handed out,
        the last one's included, when ``document`` is closed."""
        try:
            again = pdfium.PdfDocument(path)
            try:
                page = again[index]
                try:
                    own = _own_scan(page, settings, picture, None, index)
                    return own or (picture, _render(page, settings, picture))
                finally:
                    page.close()
            finally:
                again.close()
        except (pdfium.PdfiumError, ValueError, MemoryError) as exc:
            _remove_pictures(picture)
            raise OcrError(f"cannot render the page for OCR: {exc}") from exc
        except OSError:
            _remove_pictures(picture)
            raise

    try:
        for index in indexes:
            picture = scratch / f"page-{index + 1}.bmp"
            try:
                page = document[index]
                try:
                    own = _own_scan(page, settings, picture, dicts, index)
                    if own is None:
                        own = picture, _render(page, settings, picture)
                finally:
                    page.close()
            except (pdfium.PdfiumError, ValueError, MemoryError) as exc:
                _remove_pictures(picture)
                pages.page_failed(index + 1, f"cannot render the page for OCR: {exc}")
                yield index, None, None, None
                continue
            except OSError:
                # Writing the picture failed (a full disk, a quota): not this
                # page's fault, so not a page error. The attempt fails and is
                # retried, as before the pictures were files of their own.
                _remove_pictures(picture)
                raise
            again = None
            if own[0].suffix == JPEG_SUFFIX:
                again = functools.partial(pdfium_picture, index, picture)
            yield index, *own, again
    finally:
        dicts.close()
        document.close()


def _remove_pictures(picture: Path) -> None:
    """A page's picture, whichever of its forms was being written."""
    for form in (picture, picture.with_suffix(JPEG_SUFFIX)):
        form.unlink(missing_ok=True)


#: a page is rendered (and a scan turned grey) this many bytes of rows at a
#: time, straight into its BMP file: an A4 page at 300 dpi in 9 bands.
BAND_BYTES = 1 << 20


def _render(page: Any, settings: InspectSettings, picture: Path) -> int:
    """Render the page in grey at ``ocr_dpi``, or less when that would pass
    ``ocr_max_page_megapixels``, into the BMP file ``picture``; the resolution used.

    A band of rows at a time into one small bitmap, each band PDFium's
    rendering of the whole page shifted up by the rows above it (as
    pypdfium2's ``render(crop=...)`` does): the picture of one rendering of
    the page but for PDFium's anti-aliasing, which moves a few pixels by a
    few grey levels (25 of 8.7 million on a LaTeX page of the corpus;
    ``test_a_page_is_rendered_band_by_band_with_the_same_pixels``), without
    holding the picture (a 300 dpi A4 page: 8.7 MB, and PDFium's buffers for
    it as much again).
    """
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    width, height = page.get_size()
    scale = settings.ocr_dpi / POINTS_PER_INCH
    limit = settings.ocr_max_page_megapixels * 1e6
    if width * height * scale * scale > limit:
        scale = (limit / (width * height)) ** 0.5
    # the page's size in pixels, as pypdfium2's render() makes it
    px_width, px_height = math.ceil(width * scale), math.ceil(height * scale)
    with _GreyBmp(picture, px_width, px_height) as bmp:
        rows = min(px_height, max(1, BAND_BYTES // bmp.stride))
        # A 1-byte grey bitmap: the same pixels as grayscale=True (checked on
        # the corpus), whose grey rendering passes through a larger buffer first.
        band = pdfium.PdfBitmap.new_native(px_width, rows, pdfium_c.FPDFBitmap_Gray)
        try:
            for top in range(0, px_height, rows):
                band.fill_rect((255, 255, 255, 255), 0, 0, px_width, rows)
                pdfium_c.FPDF_RenderPageBitmap(
                    band, page, 0, -top, px_width, px_height, 0, pdfium_c.FPDF_ANNOT
                )
                bmp.write_rows(top, band.buffer, band.stride, min(rows, px_height - top))
        finally:
            band.close()
    return round(scale * POINTS_PER_INCH)


class _GreyBmp:
    """An 8-bit grey BMP file (as Pillow writes one), written a band of rows at
    a time in any order. BMP because Tesseract (Leptonica) reads it fastest,
    measurably faster than PNM or PNG (BENCHMARKS.md); a file, not stdin, so
    that the next page renders while this one is read (ocr_pages)."""

    #: pixels per metre for 96 dpi, what Pillow writes when not told; Tesseract
    #: is given the resolution on its command line instead.
    PPM = round(96 * 39.3701)
    PALETTE = b"".join(bytes((i, i, i, 0)) for i in range(256))

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.stride = (width + 3) & ~3  # rows padded to 4 bytes
        size = self.stride * height
        self._data = 14 + 40 + len(self.PALETTE)
        if self._data + size > 2**32 - 1:
            raise ValueError(f"a {width}x{height} page is too large for a BMP file")
        head = b"BM" + struct.pack("<IHHI", self._data + size, 0, 0, self._data)
        info = struct.pack(
            "<IiiHHIIiiII", 40, width, height, 1, 8, 0, size, self.PPM, self.PPM, 256, 256
        )
        self.fd = _new_file(path)
        try:
            _write_all(self.fd, head + info + self.PALETTE, 0)
            os.ftruncate(self.fd, self._data + size)
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> _GreyBmp:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def write_rows(self, top: int, data: Any, stride: int, count: int) -> None:
        """Rows ``top`` to ``top + count - 1`` of the picture, top-down in
        ``data`` (a buffer), ``stride`` bytes apart. A BMP keeps its rows
        bottom-up: the band's rows are written in reverse, in one write."""
        view = memoryview(data).cast("B")
        width, pad = self.width, bytes(self.stride - self.width)
        rows: list[memoryview | bytes]
        if stride == self.stride:
            rows = [view[i * stride : (i + 1) * stride] for i in range(count - 1, -1, -1)]
        else:
            rows = []
            for i in range(count - 1, -1, -1):
                rows += (view[i * stride : i * stride + width], pad)
        _write_all(self.fd, b"".join(rows), self._data + (self.height - top - count) * self.stride)


def _new_file(path: Path) -> int:
    """A new file in the worker's private scratch folder, for this worker only."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


#: a page's own scan stands in for its rendering when its resolution is
#: within this factor below ocr_dpi.
OWN_SCAN_DPI_FACTOR = 2.0


#: the file suffix of a page handed to Tesseract as its scan's own JPEG.
JPEG_SUFFIX = ".jpg"


def _own_scan(
    page: Any, settings: InspectSettings, picture: Path, dicts: ImageDicts | None, index: int
) -> tuple[Path, int] | None:
    """Write the picture a scanned page is made of, as the scanner gave it, for
    Tesseract, when the page is that one upright picture filling the page: no
    rendering needed (0.02 s of CPU against 0.11-0.17 s to render a page at
    300 dpi, BENCHMARKS.md). The file written (``picture``, a grey BMP, or the
    scan's own JPEG beside it) and the scan's resolution; None otherwise (and
    nothing written). ``dicts`` are the document's image dictionaries, to read
    the scan from its stream; None takes PDFium's decoded copy.

    Only 8-bit grey and RGB pictures are taken as they are: 1-bit ones
    (fax scans) often carry a /Decode inversion or are masks, and other colour
    spaces need PDFium's conversion, so those pages are rendered. The picture
    comes from its stream where that can be read without decoding it whole
    (``pdfscan``), from PDFium's decoded copy otherwise.
    """
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    objects = list(page.get_objects(max_depth=1))
    if len(objects) != 1 or objects[0].type != pdfium_c.FPDF_PAGEOBJ_IMAGE:
        return None
    scan = objects[0]
    width, height = page.get_size()
    matrix = scan.get_matrix()
    upright = matrix.b == 0 and matrix.c == 0 and matrix.a > 0 and matrix.d > 0
    left, bottom, right, top = scan.get_bounds()
    fills = max(abs(left), abs(bottom), abs(right - width), abs(top - height)) < 1
    px_width, px_height = scan.get_px_size()
    dpi: int = round(float(px_width) * POINTS_PER_INCH / float(width))
    wanted = settings.ocr_dpi
    if not (upright and fills and wanted / OWN_SCAN_DPI_FACTOR <= dpi <= wanted):
        return None
    if px_width * px_height > settings.ocr_max_page_megapixels * 1e6:
        return None
    try:
        meta = scan.get_metadata()
        plain = (meta.colorspace, meta.bits_per_pixel) in (
            (pdfium_c.FPDF_COLORSPACE_DEVICEGRAY, 8),
            (pdfium_c.FPDF_COLORSPACE_DEVICERGB, 24),
        )
        if not plain:
            return None
        if dicts is not None:
            # the stream's bytes as PDFium holds them (a compressed scan: not copied)
            stream = memoryview(scan.get_data(decode_simple=False)).cast("B")
            image = dicts.scan(index, px_width, px_height, stream)
            written = _write_stream(stream, image, picture) if image is not None else None
            if written is not None:
                return written, dpi
        # PDFium's decoded picture, let go (by pypdfium2's finalizer) on return
        bitmap = scan.get_bitmap(render=False)
    except (pdfium.PdfiumError, ValueError):
        _remove_pictures(picture)
        return None
    try:
        _write_grey(bitmap, picture)
    except ValueError:  # not a picture Pillow takes: rendered instead
        picture.unlink(missing_ok=True)
        return None
    return picture, dpi


def _write_stream(data: memoryview, image: ScanImage, picture: Path) -> Path | None:
    """The scan from its stream ``data``: a JPEG as it is, beside ``picture``;
    a Flate stream inflated and made grey a band at a time into ``picture``
    (the same pixels as ``_write_grey`` of PDFium's decoded copy). The file
    written, or None (and nothing written) for a stream that is not what its
    dictionary says, which PDFium then decodes as it can."""
    from PIL import Image

    if image.filter == "DCTDecode":
        if not jpeg_matches(data, image):
            return None
        if image.components == 3:
            return _write_jpeg_grey(data, image, picture)
        jpeg = picture.with_suffix(JPEG_SUFFIX)
        fd = _new_file(jpeg)
        try:
            _write_all(fd, data, 0)
        finally:
            os.close(fd)
        return jpeg
    row_bytes = image.width * image.components
    try:
        with _GreyBmp(picture, image.width, image.height) as bmp:
            # Pillow holds RGB in 4 bytes a pixel: a band's RGB image is the
            # largest buffer, so it is what BAND_BYTES bounds
            rows = max(1, BAND_BYTES // (image.width * (4 if image.components == 3 else 1)))
            bands = inflate_bands(data, row_bytes, image.height, rows)
            for top, band in zip(range(0, image.height, rows), bands, strict=True):
                count = len(band) // row_bytes
                grey: bytes | bytearray = band
                if image.components == 3:
                    rgb = Image.frombuffer("RGB", (image.width, count), band, "raw", "RGB", 0, 1)
                    grey = rgb.convert("L").tobytes()
                bmp.write_rows(top, grey, image.width, count)
    except (zlib.error, ValueError):
        picture.unlink(missing_ok=True)
        return None
    return picture


def _write_jpeg_grey(data: memoryview, image: ScanImage, picture: Path) -> Path | None:
    """A colour JPEG scan decoded straight to grey (libjpeg keeps its luma
    channel and skips the colour conversion) into the BMP file ``picture``:
    the grey picture is the one copy in the worker (9 MB for an A4 page at
    300 dpi, against PDFium's 26 MB of BGR). Not handed to Tesseract as it
    is: on colour, Tesseract thresholds each channel and took 1.3x the time
    of the same page in grey, for the same words (BENCHMARKS.md).

    Luma is within a level or two of ``_grey`` of PDFium's RGB (rounding).
    None (nothing written) for a JPEG that does not decode to that grey.
    """
    from PIL import Image

    try:
        jpeg = Image.open(io.BytesIO(data), formats=["JPEG"])
        jpeg.draft("L", jpeg.size)
        jpeg.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # a JPEG libjpeg will not decode as a whole: PDFium's way
    with jpeg:
        if (jpeg.mode, jpeg.size) != ("L", (image.width, image.height)):
            return None
        # only the file's writes may fail from here: a full disk, raised
        with _GreyBmp(picture, image.width, image.height) as bmp:
            rows = max(1, BAND_BYTES // image.width)
            for top in range(0, image.height, rows):
                count = min(rows, image.height - top)
                band = jpeg.crop((0, top, image.width, top + count)).tobytes()
                bmp.write_rows(top, band, image.width, count)
    return picture


def _write_grey(bitmap: Any, picture: Path) -> None:
    """A PDFium bitmap as an 8-bit grey BMP file, a band of rows at a time.

    Grey rows are copied as they are; RGB (BGR bytes) rows become grey a band
    at a time: the same pixels as ``_grey(bitmap.to_pil())``, which first
    copies the whole picture to a 4-byte-per-pixel RGB image (an A4 scan at
    300 dpi: 35 MB more at the peak than the grey picture's 9 MB) and holds
    the grey one too.
    """
    from PIL import Image

    width, height, stride = bitmap.width, bitmap.height, bitmap.stride
    with _GreyBmp(picture, width, height) as bmp:
        if bitmap.mode in ("L", "BGR"):
            rows = max(1, BAND_BYTES // stride)
            data = memoryview(bitmap.buffer).cast("B")
            for top in range(0, height, rows):
                count = min(rows, height - top)
                band = data[top * stride : (top + count) * stride]
                if bitmap.mode == "L":
                    bmp.write_rows(top, band, stride, count)
                    continue
                rgb = Image.frombuffer(
                    "RGB", (width, count), band.tobytes(), "raw", "BGR", stride, 1
                )  # one band copied, then made grey
                bmp.write_rows(top, rgb.convert("L").tobytes(), width, count)
        else:  # a layout PDFium seldom hands out (BGRx, BGRA): through Pillow whole
            grey = _grey(bitmap.to_pil())
            if grey.mode != "L":
                grey = grey.convert("L")
            bmp.write_rows(0, grey.tobytes(), width, height)


def _save_grey(image: Image.Image, picture: Path) -> None:
    """A decoded picture (an image file's frame) as a grey BMP file."""
    _grey(image).save(picture, "BMP")


#: a second making of a page's picture (the file and its resolution);
#: OcrError when it cannot be made.
Again = Callable[[], tuple[Path, int]]
#: one page to OCR: its index, its picture file for Tesseract (None when it
#: could not be made; removed once read), its resolution, and another way to
#: make it if Tesseract cannot read this one.
Item = tuple[int, Path | None, int | None, Again | None]


def ocr_pages(
    items: Callable[[Path], Iterator[Item]],
    texts: list[str],
    settings: InspectSettings,
    pages: Pages,
    budget: Budget,
    on_page: Callable[[], None],
) -> None:
    """OCR each page of ``items`` into ``texts[index]``, in order, one
    Tesseract at a time; ``on_page`` after each page, done or not.

    The next page is rendered (``items`` advanced) while Tesseract reads the
    current one: rendering is a tenth of a page's time, and so hidden.
    """
    with tempfile.TemporaryDirectory(prefix="batchd-ocr-") as scratch:
        running: Job | None = None
        try:
            for index, picture, dpi, again in items(Path(scratch)):  # renders the next meanwhile
                if running is not None:
                    _collect(running, texts, settings, pages, budget)
                    running = None
                    on_page()
                if picture is None:
                    on_page()
                    continue
                try:
                    running = start(picture, settings, dpi, index, again)
                except OcrError as exc:
                    pages.page_failed(index + 1, str(exc))
                    on_page()
            if running is not None:
                _collect(running, texts, settings, pages, budget)
                running = None
                on_page()
        finally:
            if running is not None:  # an exception on the way: leave no Tesseract behind
                running.proc.kill()
                running.proc.communicate()


#: a page Tesseract failed on is made again and retried only when less than
#: this share of its time is spent (else the retry would be killed at once).
RETRY_BEFORE = 0.5


def _collect(
    job: Job, texts: list[str], settings: InspectSettings, pages: Pages, budget: Budget
) -> None:
    try:
        try:
            page = finish(job, settings)
        except OcrTimeout:
            raise
        except OcrError:
            spent = time.monotonic() - job.started
            if job.again is None or spent > RETRY_BEFORE * settings.ocr_page_seconds:
                raise
            # Tesseract could not read the scan's own JPEG (damaged past what
            # PDFium decodes, most likely): once more from PDFium's picture,
            # within what is left of the page's time
            picture, dpi = job.again()
            retry = start(picture, settings, dpi, job.index)
            retry.started = job.started
            job = retry
            try:
                page = finish(job, settings)
            except BaseException:
                if job.proc.poll() is None:  # not OcrError: finish left it running
                    job.proc.kill()
                    job.proc.communicate()
                raise
    except OcrError as exc:
        pages.page_failed(job.index + 1, str(exc))
        return
    kept = budget.take_text(page.text)
    if kept is None:  # the text budget is spent: this page's text is not kept
        return
    while len(texts) <= job.index:
        texts.append("")
    texts[job.index] = kept
    pages.page_done(job.index + 1, page, job.dpi, time.monotonic() - job.started)


def _merge(result: Result, pages: Pages, budget: Budget) -> None:
    result["ocr"] = "done"
    result["ocr_pages"] = pages.ocr_pages
    errors: list[Result] = [*result.get("page_errors", []), *pages.page_errors]
    result["page_errors"] = sorted(errors, key=lambda e: int(e["page"]))
    result.update(budget.fields())


def read_image(path: Path, ctx: Context, budget: Budget) -> Result:
    """An image as a document: its frames (pages; several in a TIFF), size and
    resolution, and the text OCR reads on each frame."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    settings = ctx.settings.inspect
    limit = int(settings.ocr_max_page_megapixels * 1e6)
    try:
        picture = Image.open(path)
    except (UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        raise PermanentError(
            f"{ctx.relpath}: the image is damaged and cannot be read ({exc}); scan it again"
        ) from exc
    with picture:
        width, height = picture.size
        if width * height > limit:
            raise PermanentError(
                f"{ctx.relpath}: the image is {width}x{height} pixels, more than "
                f"inspect.ocr_max_page_megapixels ({settings.ocr_max_page_megapixels:g} "
                "million); scan it at a lower resolution or raise the limit"
            )
        frames = int(getattr(picture, "n_frames", 1))
        dpi = _image_dpi(picture.info.get("dpi"))
        result: Result = {
            "pages": frames,
            "width": width,
            "height": height,
            "dpi": dpi,
            "text": [""] * frames,
            "page_errors": [],
            **budget.fields(),
        }
        why_not = status(settings)
        if why_not is not None:
            result["ocr"] = why_not
            return result
        pages = Pages(ocr_pages=[], page_errors=[])
        wanted = min(frames, settings.ocr_max_pages)
        if frames > wanted:
            budget.hit("inspect.ocr_max_pages")

        def frames_of(scratch: Path) -> Iterator[Item]:
            for index in range(wanted):
                saved = scratch / f"page-{index + 1}.bmp"
                try:
                    picture.seek(index)
                    frame_w, frame_h = picture.size
                    if frame_w * frame_h > limit:
                        raise ValueError(f"the frame is {frame_w}x{frame_h} pixels, over the limit")
                    frame = ImageOps.exif_transpose(picture)
                    frame.load()
                except (OSError, EOFError, ValueError, SyntaxError) as exc:
                    pages.page_failed(index + 1, f"cannot decode the frame: {exc}")
                    yield index, None, None, None
                    continue
                try:
                    _save_grey(frame, saved)
                except ValueError as exc:
                    saved.unlink(missing_ok=True)
                    pages.page_failed(index + 1, f"cannot hand the frame to OCR: {exc}")
                    yield index, None, None, None
                    continue
                except OSError:  # a full disk, a quota: the attempt is retried
                    saved.unlink(missing_ok=True)
                    raise
                frame_dpi = _image_dpi(frame.info.get("dpi")) or dpi
                del frame  # the frame is in its file now: one picture held at a time
                yield index, saved, frame_dpi, None

        done = 0

        def on_page() -> None:
            nonlocal done
            done += 1
            ctx.progress(done * 100 / wanted)

        ocr_pages(frames_of, result["text"], settings, pages, budget, on_page)
        _merge(result, pages, budget)
        return result


def _image_dpi(value: Any) -> int | None:
    try:
        dpi = round(float(value[0]))
    except (TypeError, ValueError, IndexError):
        return None
    return dpi if dpi >= MIN_TRUSTED_DPI else None
