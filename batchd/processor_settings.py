"""The settings of the processors: ``[inspect]`` (caps and OCR), ``[exec]`` and
``[[route]]``; and :class:`Section`, the base of every settings section.

Their own module so that the processors' many knobs do not crowd
:mod:`batchd.config`, which re-exports them: ``from batchd.config import
InspectSettings`` keeps working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    """One ``[section]`` of the configuration."""

    # Unknown keys are typos; refusing them beats silently ignoring a setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class InspectSettings(Section):
    """Caps of the ``inspect`` processor; a cap that stops reading sets
    ``"truncated": true`` and names itself in ``truncated_reasons``. Then its
    OCR of scanned pages and images (Tesseract, issue 18)."""

    #: spreadsheet cells read per file (every cell, empty or not, counts).
    max_cells: int = Field(2_000_000, ge=1)
    #: cells kept per spreadsheet row; a wider row stops being read there.
    max_columns: int = Field(16_384, ge=1)
    #: CSV header fields kept (the rest of the header and of each record is dropped).
    max_header_columns: int = Field(4_096, ge=1)
    #: PDF pages whose text is read; later pages count but give no text.
    max_pages: int = Field(10_000, ge=1)
    #: one compressed PDF stream may expand to at most this many MiB (flate bombs).
    max_pdf_stream_mb: int = Field(256, ge=1)
    #: the XML parts of an XLSX workbook may expand to at most this many MiB in total.
    max_xlsx_unpacked_mb: int = Field(1_024, ge=1)

    #: auto: OCR pages without a text layer when Tesseract is installed;
    #: always: OCR every page, Tesseract required at start; never: no OCR.
    ocr: Literal["auto", "always", "never"] = "auto"
    #: Tesseract language packs (Debian: tesseract-ocr-<lang>), tried together.
    ocr_languages: tuple[str, ...] = ("eng",)
    #: one page's OCR is stopped after this long and becomes a page_errors entry.
    ocr_page_seconds: float = Field(60.0, gt=0)
    #: pages OCRed per document at most; beyond, "truncated": true.
    ocr_max_pages: int = Field(100, ge=1)
    #: resolution PDF pages are rendered at for OCR (chosen by measurement: BENCHMARKS.md).
    ocr_dpi: int = Field(300, ge=50, le=1200)
    #: a page or image larger than this (after rendering) is refused, or rendered smaller.
    ocr_max_page_megapixels: float = Field(50.0, gt=0)

    @field_validator("ocr_languages")
    @classmethod
    def _language_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError('must list at least one language, e.g. ["eng"]')
        for name in value:
            # The names become a tesseract argument and a tessdata file name.
            if not name.replace("_", "").isalnum() or not name.isascii():
                raise ValueError(f"{name!r} is not a Tesseract language name like eng or chi_sim")
        return value


class ExecSettings(Section):
    command: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    permanent_exit_codes: tuple[int, ...] = (65,)
    max_stdout_bytes: int = Field(1024 * 1024, ge=1)


class RouteSettings(Section):
    match: str
    processor: str
