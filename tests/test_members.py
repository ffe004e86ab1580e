"""Tests for batchd.members: the scan's caps and the re-check of a member."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchd import members, safefs
from batchd.testing.settings import make_settings

CSV = b"id,value\n1,2\n"


def deep(top: Path, levels: int) -> None:
    """``top/d/d/…/x.csv``, made through descriptors (the path passes PATH_MAX)."""
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    out = os.open("x.csv", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, CSV)
    os.close(out)
    os.close(fd)


def test_scan_refuses_a_drop_deeper_than_max_depth(tmp_path: Path) -> None:
    """A 1,500-level drop raises DropRefused naming limits.max_depth, without recursion."""
    folder = tmp_path / "work" / "deep"
    deep(folder, 1500)
    with pytest.raises(members.DropRefused, match=r"limits.max_depth \(32\)"):
        members.scan(folder, make_settings(tmp_path))
    assert members.repair_names(folder, make_settings(tmp_path)) == []
    safefs.remove_tree(folder)  # pytest's own clean-up of tmp_path recurses per level


def test_scan_takes_a_drop_at_max_depth(tmp_path: Path) -> None:
    """A file exactly max_depth folders down is a member."""
    folder = tmp_path / "work" / "ok"
    deep(folder, 3)
    found = members.scan(folder, make_settings(tmp_path, limits__max_depth="3"))
    assert [m.relpath for m in found] == ["d/d/d/x.csv"]
    with pytest.raises(members.DropRefused):
        members.scan(folder, make_settings(tmp_path, limits__max_depth="2"))


def test_scan_refuses_a_drop_over_max_entries(tmp_path: Path) -> None:
    """More entries than limits.max_entries_per_drop refuses the drop, naming the cap."""
    folder = tmp_path / "work" / "wide"
    folder.mkdir(parents=True)
    for i in range(12):
        (folder / f"f{i}.csv").write_bytes(CSV)
    with pytest.raises(members.DropRefused, match=r"limits.max_entries_per_drop \(10\)"):
        members.scan(folder, make_settings(tmp_path, limits__max_entries_per_drop="10"))


def test_check_reads_content_through_the_descriptor(tmp_path: Path) -> None:
    """check() judges the open file's content against its name, as the scan does."""
    path = tmp_path / "fake.pdf"
    path.write_bytes(b"just words\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        problem = members.check(fd, os.fstat(fd), "fake.pdf", make_settings(tmp_path).limits)
    finally:
        os.close(fd)
    assert problem is not None and "not an allowed type for a .pdf file" in problem


def test_batch_limit_error_names_the_limit(tmp_path: Path) -> None:
    """A batch over max_files_per_batch gets the refusal the scan gives it."""
    limits = make_settings(tmp_path).limits
    assert members.batch_limit_error(50, limits) is None
    error = members.batch_limit_error(51, limits)
    assert error is not None and "limits.max_files_per_batch (50)" in error


@pytest.mark.parametrize(
    "patterns",
    [
        (),
        (".*", "~$*", "*.tmp", "*.part", "*.partial", "*.crdownload", "*.swp"),
        ("[!a-c]*.csv", "x?y", "*[*]*", "a|b", "(x)", "\\", "[", "*.PDF"),
    ],
)
def test_ignored_agrees_with_fnmatchcase(tmp_path: Path, patterns: tuple[str, ...]) -> None:
    """The one compiled pattern for every glob answers as fnmatchcase per glob
    does, for names with regex syntax, newlines and case differences in them."""
    import fnmatch
    import random

    settings = make_settings(tmp_path, watch__ignore=repr(list(patterns)).replace("'", '"'))
    assert settings.watch.ignore == patterns
    rng = random.Random(15)
    alphabet = "abcxyz.~$*?[]!|()\\\n PDFpdf-"
    names = ["a|b", "(x)", "\\", "[", "x.PDF", "x.pdf", ".tmp", "a.tmp\n", "dx.csv", "bx.csv"]
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(3000)]
    for name in names:
        want = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        assert members.ignored(name, settings) is want, (name, patterns)
