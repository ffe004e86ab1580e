"""A scanned PDF page's own picture, read from its stream without decoding it whole.

A page that is one scan is OCRed from that scan (``ocr._own_scan``). PDFium
hands out the scan only decoded, whole: a 300 dpi A4 colour scan is 26 MB in
the worker for a page whose result is a few KB of text. What its stream is
decides what the worker does instead:

* **DCTDecode** (a JPEG: what scanners write): a grey JPEG is a JPEG file as
  it is, and Tesseract reads it, so the worker holds the compressed bytes
  only; a colour one is decoded straight to grey (``ocr``).
* **FlateDecode** without a predictor: the stream inflates a band of rows
  at a time (``inflate_bands``), so only one band is decoded at once.

Anything else (other filters, predictors, /Decode arrays, masks, colour
spaces other than DeviceGray and DeviceRGB) is left to PDFium, as before.

PDFium does not expose an image's /DecodeParms, /Decode or masks, so the
image's dictionary is read with pypdf (``ImageDicts``) and trusted only when
its stored bytes are the ones PDFium draws; the stream's bytes are PDFium's
(decrypted, still encoded). Whatever pypdf cannot read makes the page go
PDFium's way: this is a saving, never a second parser that can fail a page.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

#: a JPEG's start-of-frame markers (all but DHT C4, JPG C8 and DAC CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: the frames handed to Tesseract as they are: baseline, extended and
#: progressive Huffman, what every JPEG decoder reads. Lossless and
#: arithmetic-coded ones go PDFium's way.
_COMMON_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
#: JPEG markers without a length: TEM, RSTn, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})


@dataclass(frozen=True)
class ScanImage:
    """What an own-scan page's picture is, as its PDF dictionary says."""

    #: "DCTDecode" or "FlateDecode": the one filter, the only ones taken.
    filter: str
    width: int
    height: int
    #: 1 (DeviceGray) or 3 (DeviceRGB) components of 8 bits.
    components: int


class ImageDicts:
    """The image dictionaries of one PDF's pages, read with pypdf on first use.

    ``scan(index, width, height, raw)`` is the page's one image when batchd may
    take its stream (``raw``, PDFium's bytes of the picture it draws) as it is,
    None when PDFium must decode it. ``close()`` when done.

    pypdf is a second parser of a file PDFium already reads, so it is held
    to what cannot cost more than it saves:

    * it is handed the open file, not its path: given a path, pypdf reads
      the whole file into memory first (a 100 MB scan: 100 MB in the worker);
    * strict: a damaged cross-reference table (which PDFium repairs quietly)
      would make pypdf rebuild it by reading the whole file; it raises instead;
    * its pages must be PDFium's: a page tree of plain /Pages nodes whose
      /Count is true, each page once, as many as PDFium counts (PDFium takes
      the root's /Count and walks into any node with /Kids; pypdf only into
      /Pages nodes: in a crafted tree the same index is another page);
    * every object it parsed is let go after each page, or a long scan would
      pile up its pages' streams in the worker.

    Any failure of pypdf's makes this document go PDFium's way from there on.
    """

    def __init__(self, path: Path, page_count: int) -> None:
        self.path = path
        self.page_count = page_count
        self._file: BinaryIO | None = None
        self._reader: Any = None
        self._broken = False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._reader = None

    def scan(self, index: int, width: int, height: int, raw: memoryview) -> ScanImage | None:
        if self._broken:
            return None
        try:
            if self._reader is None:
                self._reader = self._open()
                if self._reader is None:
                    self._broken = True
                    return None
            try:
                return _scan_image(self._reader.pages[index], width, height, raw)
            finally:
                self._reader.resolved_objects.clear()
        except Exception:
            # Any pypdf failure on a file PDFium reads: PDFium's way, for the
            # rest of the document too (one failure is enough to distrust it).
            self._broken = True
            return None

    def _open(self) -> Any:
        from pypdf import PdfReader

        # pypdf warns through logging (to stderr, unconfigured) about what it
        # repairs; its reading is a saving here, not a verdict on the file
        logging.getLogger("pypdf").setLevel(logging.ERROR)
        self._file = self.path.open("rb")
        reader = PdfReader(self._file, strict=True)
        # PDFium opened the file, so its user password is empty; the
        # dictionaries are what pypdf needs (the streams are PDFium's,
        # decrypted). A cipher pypdf cannot do raises: PDFium's way.
        if reader.is_encrypted and not reader.decrypt(""):
            return None
        root: Any = reader.trailer["/Root"]
        pages = root["/Pages"]
        try:
            plain = _leaves(pages, set(), 0) == self.page_count
        finally:
            reader.resolved_objects.clear()
        return reader if plain and len(reader.pages) == self.page_count else None


#: deeper page trees than this are not taken to be plain (real ones are 2-4).
_MAX_TREE_DEPTH = 32


def _leaves(node: Any, seen: set[tuple[int, int]], depth: int) -> int | None:
    """The number of pages under the /Pages ``node`` when the tree below it is
    plain (every kid an indirect /Pages node with a true /Count or a /Page
    without /Kids, none twice), None otherwise."""
    from pypdf.generic import ArrayObject, IndirectObject

    kids = node.get("/Kids")
    if node.get("/Type") != "/Pages" or depth > _MAX_TREE_DEPTH:
        return None
    kids = kids.get_object() if kids is not None else None
    if not isinstance(kids, ArrayObject):
        return None
    total = 0
    for kid in kids:
        if not isinstance(kid, IndirectObject) or (kid.idnum, kid.generation) in seen:
            return None
        seen.add((kid.idnum, kid.generation))
        child: Any = kid.get_object()
        if child.get("/Type") == "/Page" and "/Kids" not in child:
            total += 1
            continue
        under = _leaves(child, seen, depth + 1)
        if under is None:
            return None
        total += under
    return total if node.get("/Count") == total else None


#: a page that is one image drawn by name is a few operators (~50 bytes):
#: more is content PDFium did not count as an object (an inline image's data,
#: most likely). Checked on the stored bytes, and inflated to 4x this at most.
_MAX_CONTENT = 1024


def _scan_image(page: Any, width: int, height: int, raw: memoryview) -> ScanImage | None:
    from pypdf.generic import ArrayObject, NameObject, NullObject, StreamObject

    resources = page.get("/Resources")
    xobjects = resources.get_object().get("/XObject") if resources is not None else None
    if xobjects is None:
        return None
    # One XObject, or no telling which one is drawn; and resolving each would
    # read its stream into memory.
    xobjects = xobjects.get_object()
    if len(xobjects) != 1:
        return None
    drawn = _content(page)
    if drawn is None or re.search(rb"\bBI\b", drawn):  # an inline image
        return None
    ((name, image),) = ((name, ref.get_object()) for name, ref in xobjects.items())
    # the image the page draws, and the one PDFium gave the stream of
    if not isinstance(image, StreamObject) or image._data != raw:
        return None
    if not re.search(re.escape(name.encode("latin-1")) + rb"\s*Do\b", drawn):
        return None
    size = (image.get("/Width"), image.get("/Height"))
    if image.get("/Subtype") != "/Image" or size != (width, height):
        return None
    filters = image.get("/Filter")
    if isinstance(filters, ArrayObject) and len(filters) == 1:
        filters = filters[0]
    if not isinstance(filters, NameObject) or filters not in ("/DCTDecode", "/FlateDecode"):
        return None
    parms = image.get("/DecodeParms")
    if isinstance(parms, ArrayObject) and len(parms) == 1:
        parms = parms[0]
    parms = parms.get_object() if parms is not None else None
    if isinstance(parms, NullObject):
        parms = None
    if parms:  # a predictor, or DCT's /ColorTransform: PDFium's to undo
        if filters != "/FlateDecode" or set(parms) - {"/Predictor"}:
            return None
        if parms.get("/Predictor", 1) != 1:
            return None
    components = {"/DeviceGray": 1, "/DeviceRGB": 3}.get(str(image.get("/ColorSpace")))
    plain = not any(key in image for key in ("/Decode", "/SMask", "/Mask", "/ImageMask"))
    if components is None or image.get("/BitsPerComponent") != 8 or not plain:
        return None
    return ScanImage(str(filters)[1:], width, height, components)


def _content(page: Any) -> bytes | None:
    """The page's content stream(s) when small and stored plain or deflated
    once, None otherwise (inflated here, within the bound: pypdf would inflate
    a chain of filters whole)."""
    from pypdf.generic import ArrayObject, NameObject, StreamObject

    contents = page.get("/Contents")
    if contents is None:
        return None
    contents = contents.get_object()
    parts = list(contents) if isinstance(contents, ArrayObject) else [contents]
    streams = [part.get_object() for part in parts]
    if not all(isinstance(stream, StreamObject) for stream in streams):
        return None
    if sum(len(stream._data) for stream in streams) > _MAX_CONTENT:
        return None
    parts = []
    for stream in streams:
        filters = stream.get("/Filter")
        if isinstance(filters, ArrayObject) and len(filters) == 1:
            filters = filters[0]
        if filters is None:
            parts.append(bytes(stream._data))
        elif isinstance(filters, NameObject) and filters == "/FlateDecode":
            if stream.get("/DecodeParms") is not None:
                return None
            inflater = zlib.decompressobj()
            parts.append(inflater.decompress(stream._data, 4 * _MAX_CONTENT + 1))
        else:
            return None
    drawn = b"\n".join(parts)
    return drawn if len(drawn) <= 4 * _MAX_CONTENT else None


def jpeg_matches(data: bytes | memoryview, image: ScanImage) -> bool:
    """Whether ``data`` is a whole JPEG of 8-bit samples with the image's size
    and components, in a common frame: what Tesseract then decodes is what
    PDFium would have. Not proof that every byte decodes: a page Tesseract
    cannot read from it is read again from PDFium's copy (``ocr``)."""
    if data[:2] != b"\xff\xd8" or not bytes(data[-16:]).rstrip(b"\r\n\0 ").endswith(b"\xff\xd9"):
        return False  # not a JPEG, or one cut short
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker in _SOF_MARKERS:
            if marker not in _COMMON_FRAMES:
                return False
            frame = data[at + 4 : at + 10]
            if len(frame) < 6:
                return False
            precision, rows, columns, components = struct.unpack(">BHHB", frame)
            return (precision, columns, rows, components) == (
                8,
                image.width,
                image.height,
                image.components,
            )
        if marker == 0xDA:  # scan data before any frame header
            return False
        at += 2 + length
    return False


#: compressed bytes handed to zlib at a time: zlib copies what it has not yet
#: consumed on every call, so the input goes in in pieces, not whole.
INFLATE_INPUT = 1 << 16
#: the most inflated bytes taken from zlib at once, copied into the band: a
#: scan compresses 40:1, so a piece of input can inflate to a whole band.
INFLATE_OUTPUT = 1 << 18


def inflate_bands(
    data: bytes | memoryview, row_bytes: int, rows: int, band_rows: int
) -> Iterator[bytearray]:
    """The inflated rows of a Flate stream, ``band_rows`` rows at a time (the
    last band shorter): never more than one band decoded at once.

    ``zlib.error`` for a damaged stream, ``ValueError`` for one with fewer rows
    than the image has; bytes past the last row are ignored, as PDFium does.
    """
    stream = memoryview(data).cast("B")
    inflater = zlib.decompressobj()
    tail: bytes | memoryview = b""
    fed = 0
    for top in range(0, rows, band_rows):
        want = min(band_rows, rows - top) * row_bytes
        band = bytearray(want)  # filled in place: no second copy to join parts into
        got = 0
        while got < want:
            if not tail:
                if fed >= len(stream):
                    raise ValueError(f"the picture's stream ends at row {top + got // row_bytes}")
                tail, fed = stream[fed : fed + INFLATE_INPUT], fed + INFLATE_INPUT
            part = inflater.decompress(tail, min(want - got, INFLATE_OUTPUT))
            tail = inflater.unconsumed_tail
            if not part and inflater.eof:
                raise ValueError(f"the picture's stream ends at row {top + got // row_bytes}")
            band[got : got + len(part)] = part
            got += len(part)
        yield band
