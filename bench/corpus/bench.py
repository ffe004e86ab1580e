"""Benchmark ``inspect`` on the real-document corpus against the tools people
would use instead: poppler's ``pdftotext`` for PDF text, pandas (``read_excel``
with calamine, its fastest engine, and with its default openpyxl/xlrd;
``read_csv`` with the C parser) for spreadsheets and CSV.

    python -m bench.corpus.bench        # fetches the corpus first if needed

    python -m bench.corpus.bench --kinds xlsx,csv --rounds 5

Per type: files/s (and pages/s for PDF) of each reader over the same files,
read one after another in one warm process (pdftotext: one process per file,
as it is used); the worker's peak RSS per file (inspect in a forked child,
minus the parent's RSS at the fork) and the largest result. Printed as lines
and written to bench/corpus_results.json.

Each reader makes ``--rounds`` passes over the files (``--pdf-rounds`` for
PDF, whose passes are long), the readers taking turns, and its fastest pass
counts: on a machine shared with other work the slowest passes measure the
neighbours. Besides wall seconds, CPU seconds (the process's own, plus its
children's for pdftotext) are reported: they vary less with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.corpus.check import run_inspect_memory
from bench.corpus.fetch import SUFFIXES, documents
from bench.corpus.fetch import main as fetch_main

RESULTS = Path(__file__).resolve().parent.parent / "corpus_results.json"


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def memory(docs: list[Path], settings: Any) -> dict[str, Any]:
    """Memory of a forked inspect worker per file.

    ``growth_kib``: the worker's own peak RSS above its RSS when it started
    on the file (measured inside it; the first file after the fork);
    ``warm_growth_kib``: the same on a second reading of the file, a warm
    worker's (see run_inspect_memory);
    ``tesseract_kib``: the largest RSS of the Tesseract processes it ran
    (separate processes, not the worker's memory); ``peak_above_base_kib``:
    the measure of earlier runs, the largest RSS of the worker or any of its
    children minus the parent's RSS (which counts Tesseract as the worker's
    and the parent's file-backed pages the child had not touched).
    """
    rows = []
    for path in docs:
        base = _rss_kib()
        status, payload, _, peak, own = run_inspect_memory(path, settings, warm=True)
        size = len(json.dumps(payload)) if status == "ok" else 0
        rows.append(
            {
                "file": f"{path.parent.name}/{path.name}",
                "bytes": path.stat().st_size,
                "status": status,
                "growth_kib": max(0, own.get("own_peak_kib", 0) - own.get("start_kib", 0)),
                "warm_growth_kib": max(
                    0, own.get("warm_peak_kib", 0) - own.get("warm_start_kib", 0)
                ),
                "tesseract_kib": own.get("children_peak_kib", 0),
                "peak_above_base_kib": max(0, peak - base),
                "result_bytes": size,
            }
        )
    worst = sorted(rows, key=lambda r: r["growth_kib"], reverse=True)[:10]
    largest = max(rows, key=lambda r: r["result_bytes"])
    by_kind: dict[str, Any] = {}
    for row in rows:
        kind = SUFFIXES[Path(row["file"]).suffix.lower()]
        if row["growth_kib"] >= by_kind.get(kind, {}).get("growth_kib", -1):
            by_kind[kind] = row
    return {
        "base_rss_kib": _rss_kib(),
        "max_growth_kib": worst[0]["growth_kib"] if worst else 0,
        "max_warm_growth_kib": max((r["warm_growth_kib"] for r in rows), default=0),
        "max_tesseract_kib": max((r["tesseract_kib"] for r in rows), default=0),
        "max_peak_above_base_kib": max((r["peak_above_base_kib"] for r in rows), default=0),
        "worst": worst,
        "worst_by_kind": by_kind,
        "largest_result": largest,
        "largest_results": sorted(rows, key=lambda r: r["result_bytes"], reverse=True)[:5],
        "files": rows,
    }


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _timed(
    fn: Any, paths: list[Path], per_file: dict[Path, tuple[float, float]] | None = None
) -> tuple[float, float, int, set[Path]]:
    """(wall seconds, CPU seconds, files read, files failed) of ``fn`` over ``paths``.

    CPU seconds are this process's and its waited-for children's. With
    ``per_file``, each file's (wall, CPU) is kept there too, the fastest seen.
    """
    ok, failed = 0, set()
    start, start_cpu = time.perf_counter(), _cpu()
    for path in paths:
        t0, c0 = time.perf_counter(), _cpu()
        try:
            fn(path)
            ok += 1
        except Exception:
            failed.add(path)
        if per_file is not None:
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
            best = per_file.get(path, (wall, cpu))
            per_file[path] = (min(best[0], wall), min(best[1], cpu))
    return time.perf_counter() - start, _cpu() - start_cpu, ok, failed


def speed(
    by_type: dict[str, list[Path]], settings: Any, rounds: int = 3, pdf_rounds: int = 1
) -> dict[str, Any]:
    from batchd.errors import PermanentError
    from batchd.processors import ProcessorContext
    from batchd.processors.inspect import inspect

    pages: dict[Path, int] = {}
    seps: dict[Path, tuple[str, str]] = {}

    def run(path: Path) -> None:
        ctx = ProcessorContext(
            batch_id="bench",
            file_id="f",
            relpath=path.name,
            output_path=Path("/nonexistent"),
            settings=settings,
        )
        try:
            result = inspect(path, ctx)
        except PermanentError:
            return
        pages[path] = int(result.get("pages", 0))
        if "delimiter" in result:
            seps[path] = (result["delimiter"], result["encoding"])

    import pandas as pd

    def pdftotext(path: Path) -> None:
        subprocess.run(["pdftotext", "-q", str(path), "-"], stdout=subprocess.DEVNULL, check=True)

    def excel(engine: str | None) -> Any:
        return lambda path: pd.read_excel(path, sheet_name=None, header=None, engine=engine)

    def read_csv(path: Path) -> None:
        sep, encoding = seps.get(path, (",", "utf-8"))
        pd.read_csv(path, sep=sep, encoding=encoding, header=None, dtype=str)

    out: dict[str, Any] = {}
    peers: dict[str, dict[str, Any]] = {
        "pdf": {"pdftotext": pdftotext},
        "xlsx": {"pandas calamine": excel("calamine"), "pandas openpyxl": excel("openpyxl")},
        "xls": {"pandas calamine": excel("calamine"), "pandas xlrd": excel("xlrd")},
        "csv": {"pandas read_csv (C)": read_csv},
    }
    for kind, paths in by_type.items():
        if not paths:
            continue
        _timed(run, paths)  # warm-up: first imports, page cache
        readers: dict[str, Any] = {"inspect": run, **peers[kind]}
        best: dict[str, tuple[float, float, int]] = {}
        files: dict[str, dict[Path, tuple[float, float]]] = {name: {} for name in readers}
        refused: dict[str, set[Path]] = {}
        for _ in range(pdf_rounds if kind == "pdf" else rounds):
            for name, fn in readers.items():  # taking turns: the same minutes for each
                seconds, cpu, _, failed = _timed(fn, paths, files[name])
                wall, cpu_best, _ = best.get(name, (seconds, cpu, len(failed)))
                best[name] = (min(wall, seconds), min(cpu_best, cpu), len(failed))
                refused[name] = failed
        seconds, cpu, _ = best["inspect"]
        total_pages = sum(pages.get(p, 0) for p in paths)
        entry: dict[str, Any] = {
            "files": len(paths),
            "mib": round(sum(p.stat().st_size for p in paths) / 2**20, 1),
            "inspect": {
                "seconds": round(seconds, 3),
                "cpu_seconds": round(cpu, 3),
                "files_per_s": round(len(paths) / seconds, 1),
            },
        }
        if kind == "pdf":
            entry["pages"] = total_pages
            entry["inspect"]["pages_per_s"] = round(total_pages / seconds, 1)
        for name in peers[kind]:
            peer_seconds, peer_cpu, peer_failed = best[name]
            peer: dict[str, Any] = {
                "seconds": round(peer_seconds, 3),
                "cpu_seconds": round(peer_cpu, 3),
                "files_per_s": round(len(paths) / peer_seconds, 1),
                "failed": peer_failed,
                "inspect_speedup": round(peer_seconds / seconds, 2),
                "inspect_speedup_cpu": round(peer_cpu / cpu, 2) if cpu else None,
            }
            if kind == "pdf":
                peer["pages_per_s"] = round(total_pages / peer_seconds, 1)
            # The same reads: only the files this peer read too (a peer that
            # gives up on a file after a few ms has not read it), each file's
            # fastest pass of each reader.
            both = [p for p in paths if p not in refused[name]]
            if refused[name]:
                ours = [sum(files["inspect"][p][i] for p in both) for i in (0, 1)]
                theirs = [sum(files[name][p][i] for p in both) for i in (0, 1)]
                peer["both_read"] = {
                    "files": len(both),
                    "inspect_speedup": round(theirs[0] / ours[0], 2) if ours[0] else None,
                    "inspect_speedup_cpu": round(theirs[1] / ours[1], 2) if ours[1] else None,
                    "peer_failed_on": sorted(p.name for p in refused[name]),
                }
            entry[name] = peer
        out[kind] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="pdf,xlsx,xls,csv", help="types to run, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="passes per reader (XLSX, XLS, CSV)")
    parser.add_argument("--pdf-rounds", type=int, default=1, help="passes per reader for PDF")
    args = parser.parse_args(argv)
    kinds = [k for k in ("pdf", "xlsx", "xls", "csv") if k in args.kinds.split(",")]
    warnings.simplefilter("ignore")
    if not documents():
        fetch_main([])
    docs = [d for d in documents() if SUFFIXES[d.suffix.lower()] in kinds]
    from batchd.config import load_settings

    settings = load_settings(None, env={})
    import pypdfium2  # noqa: F401  (loaded before forking, as in a warm worker)
    import python_calamine  # noqa: F401
    import xlrd  # noqa: F401

    mem = memory(docs, settings)  # before pandas is loaded: a lean parent
    by_type: dict[str, list[Path]] = {k: [] for k in kinds}
    for doc in docs:
        by_type[SUFFIXES[doc.suffix.lower()]].append(doc)
    results = {
        "documents": len(docs),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "rounds": {"pdf": args.pdf_rounds, "others": args.rounds},
        "speed": speed(by_type, settings, args.rounds, args.pdf_rounds),
        "memory": mem,
        "bench_peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    for kind, entry in results["speed"].items():
        line = f"{kind:5} {entry['files']:4} files {entry['mib']:7} MiB"
        if kind == "pdf":
            line += f" {entry['pages']} pages"
        line += f" | inspect {entry['inspect']['files_per_s']} files/s"
        if kind == "pdf":
            line += f", {entry['inspect']['pages_per_s']} pages/s"
        for name, peer in entry.items():
            if isinstance(peer, dict) and name != "inspect":
                line += f" | {name} {peer['files_per_s']} files/s"
                if kind == "pdf":
                    line += f", {peer['pages_per_s']} pages/s"
                line += (
                    f" (inspect x{peer['inspect_speedup']}, CPU x{peer['inspect_speedup_cpu']},"
                    f" peer failed {peer['failed']})"
                )
                if "both_read" in peer:
                    both = peer["both_read"]
                    line += (
                        f" [on the {both['files']} both read: x{both['inspect_speedup']},"
                        f" CPU x{both['inspect_speedup_cpu']}]"
                    )
        print(line)
    print(
        f"worker growth: max {mem['max_growth_kib'] / 1024:.1f} MiB (warm "
        f"{mem['max_warm_growth_kib'] / 1024:.1f} MiB) "
        f"({mem['worst'][0]['file'] if mem['worst'] else '-'}); Tesseract max "
        f"{mem['max_tesseract_kib'] / 1024:.1f} MiB; earlier measure (worker or child "
        f"above parent) max {mem['max_peak_above_base_kib'] / 1024:.1f} MiB; largest result "
        f"{mem['largest_result']['result_bytes'] / 1024:.0f} KiB ({mem['largest_result']['file']})"
    )
    for kind, row in mem["worst_by_kind"].items():
        print(
            f"  {kind:5} largest growth {row['growth_kib'] / 1024:.1f} MiB "
            f"(warm {row['warm_growth_kib'] / 1024:.1f}; {row['file']}, "
            f"{row['bytes'] // 1024} KiB, result {row['result_bytes'] // 1024} KiB)"
        )
    for row in mem["largest_results"]:
        print(
            f"  result {row['result_bytes'] // 1024} KiB: growth {row['growth_kib'] / 1024:.1f} MiB"
            f" (warm {row['warm_growth_kib'] / 1024:.1f})"
            f" ({row['file']})"
        )
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
