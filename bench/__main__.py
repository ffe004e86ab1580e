"""``python -m bench``: run every benchmark, print a table, write bench/results.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import daemon


def main() -> None:
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        }
    }
    results["daemon"] = daemon.main()
    lat = results["daemon"]["latency"]
    print(f"{'scenario':40} {'figure':>14}")
    print(f"{'drop-to-result latency, median':40} {lat['median_ms']:>11} ms")
    print(f"{'drop-to-result latency, p99':40} {lat['p99_ms']:>11} ms")
    for key in ("throughput_folders", "throughput_loose"):
        t = results["daemon"][key]
        print(f"{key + ' (no-op, 2 workers)':40} {t['files_per_second']:>9} f/s")
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {out}")
    print("\nHTTP API (list and 50-file detail, keep-alive clients):")
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_http.py"))], check=False)
    print("\nprocessors (inspect on a 100-page PDF and a 100,000-row CSV):")
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("bench_processors.py"))], check=False
    )


if __name__ == "__main__":
    main()
