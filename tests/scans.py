"""Scanned pages of known text, made here: the OCR tests' and the OCR bench's input.

Pillow draws the words with DejaVu Sans (Debian's fonts-dejavu-core) on a
white page, then the page is made to look scanned: a slight rotation and a
little noise. Saved as an image-only PDF (Pillow's PDF writer embeds only the
picture, no text layer), a PNG or a multi-page TIFF.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
#: the "scanner" resolution the pages are drawn at.
SCAN_DPI = 300
#: the words of the menu pages: real words, so accuracy means something.
_MENU = """
tomato soup with basil and fresh bread lentil curry rice grilled salmon
lemon potatoes green salad walnuts goat cheese chocolate cake vanilla
cream espresso orange juice sparkling water house wine pepper steak
mushroom risotto apple pie cinnamon roasted chicken garlic spinach
"""
MENU_WORDS = tuple(_MENU.split())


def menu_lines(seed: int, lines: int) -> list[str]:
    """``lines`` lines of menu items with prices, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(MENU_WORDS) for _ in range(rng.randint(3, 6)))
        out.append(f"{words.capitalize()} {rng.randint(3, 40)}.{rng.choice(('00', '50', '90'))}")
    return out


def scanned_page(
    lines: Sequence[str],
    *,
    width_in: float = 8.27,
    height_in: float = 11.69,
    font_pt: float = 12,
    dpi: int = SCAN_DPI,
    seed: int = 0,
    blur_px: float = 0.0,
) -> Image.Image:
    """A grey page (A4 by default) with ``lines`` drawn from the top, as a scanner gives it."""
    size = (round(width_in * dpi), round(height_in * dpi))
    page = Image.new("L", size, 255)
    draw = ImageDraw.Draw(page)
    font = ImageFont.truetype(str(FONT), round(font_pt * dpi / 72))
    y = dpi * 0.8
    for line in lines:
        draw.text((dpi * 0.8, y), line, fill=20, font=font)
        y += font_pt * 1.6 * dpi / 72
    rng = random.Random(seed)
    page = page.rotate(rng.uniform(-0.6, 0.6), fillcolor=255, resample=Image.Resampling.BILINEAR)
    noise = Image.effect_noise(size, 18).point(lambda v: 0 if v < 40 else 255)
    page = Image.composite(page, Image.new("L", size, 150), noise)
    if blur_px:  # an out-of-focus photo or a worn fax
        page = page.filter(ImageFilter.GaussianBlur(blur_px))
    page.info["dpi"] = (dpi, dpi)
    return page


def save_pdf(path: Path, pages: Sequence[Image.Image], dpi: int = SCAN_DPI) -> Path:
    """An image-only PDF, one picture per page."""
    first, *rest = pages
    first.save(path, "PDF", resolution=dpi, save_all=True, append_images=rest)
    return path


def save_tiff(path: Path, pages: Sequence[Image.Image], dpi: int = SCAN_DPI) -> Path:
    """A multi-page TIFF (one frame per page), compressed as fax scanners do."""
    first, *rest = [p.convert("1") for p in pages]
    first.save(
        path, "TIFF", save_all=True, append_images=rest, dpi=(dpi, dpi), compression="group4"
    )
    return path


def words(text: str) -> list[str]:
    """The words of ``text``, lower case, without punctuation around them."""
    return [w.strip(".,:;!?()").lower() for w in text.split() if w.strip(".,:;!?()")]


def word_accuracy(expected: str, found: str) -> float:
    """The share of expected words that OCR found, in order (longest common
    subsequence of the word lists over the expected count)."""
    a, b = words(expected), words(found)
    if not a:
        return 1.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1] / len(a)


def save_mixed_pdf(path: Path, pages: Sequence[str | Image.Image], dpi: int = SCAN_DPI) -> Path:
    """A PDF mixing pages with a text layer (a str: one Helvetica line, written
    by pypdf) and scanned pages (an image: a picture and no text)."""
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

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
    for page in pages:
        if isinstance(page, str):
            blank = writer.add_blank_page(612, 792)
            blank[NameObject("/Resources")] = DictionaryObject(
                {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
            )
            stream = DecodedStreamObject()
            stream.set_data(b"BT /F1 14 Tf 72 720 Td (" + page.encode("latin-1") + b") Tj ET")
            blank[NameObject("/Contents")] = writer._add_object(stream)
        else:
            scan = io.BytesIO()
            page.save(scan, "PDF", resolution=dpi)
            writer.append(PdfReader(scan))
    with path.open("wb") as fh:
        writer.write(fh)
    return path


def save_image_pdf(
    path: Path,
    picture: Image.Image,
    dpi: int = SCAN_DPI,
    *,
    filter: str = "/FlateDecode",
    image_keys: str = "",
    stream: bytes | None = None,
    content: bytes | None = None,
) -> Path:
    """A one-page PDF, written by hand, that is ``picture`` (grey or RGB) as an
    image XObject: deflated by default (as PDF libraries and some scanners
    store scans; Pillow's own PDF writer always stores JPEG). ``image_keys``
    go into the image's dictionary as written (``/Decode [1 0]``,
    ``/DecodeParms << … >>``); ``stream`` is the stored bytes when not the
    plain deflated pixels (a JPEG for ``/DCTDecode``); ``content`` is the
    page's content stream when not "draw the image over the page"."""
    import zlib

    data = zlib.compress(picture.tobytes()) if stream is None else stream
    width, height = picture.size
    points = f"{width * 72 / dpi:.4f} {height * 72 / dpi:.4f}"
    if content is None:
        content = f"q {points.replace(' ', ' 0 0 ')} 0 0 cm /Im0 Do Q".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {points}] "
        "/Resources << /XObject << /Im0 4 0 R >> >> /Contents 5 0 R >>".encode(),
        image_object(picture, data, filter, image_keys),
        stream_object(content),
    ]
    return write_pdf(path, objects)


def image_object(picture: Image.Image, data: bytes, filter: str, keys: str = "") -> bytes:
    """An image XObject of ``picture``'s size and colours, ``data`` stored."""
    colour_space = {"L": "/DeviceGray", "RGB": "/DeviceRGB"}[picture.mode]
    return stream_object(
        data,
        f"/Type /XObject /Subtype /Image /Width {picture.width} /Height {picture.height} "
        f"/ColorSpace {colour_space} /BitsPerComponent 8 /Filter {filter} {keys}",
    )


def stream_object(data: bytes, keys: str = "") -> bytes:
    return f"<< {keys} /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream"


def write_pdf(path: Path, objects: Sequence[bytes]) -> Path:
    """A PDF of ``objects`` (numbered from 1, the first the catalog) as written."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    trailer = f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n"
    path.write_bytes(bytes(out + trailer.encode() + b"%%EOF\n"))
    return path
