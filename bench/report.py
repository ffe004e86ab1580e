"""``python -m bench.report``: put bench/results.json's figures into BENCHMARKS.md.

Rewrites only what lies between the ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->`` markers (machine, table, drain, profile); the prose
around them is written by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from bench.__main__ import render, table

ROOT = Path(__file__).resolve().parents[1]


def machine(r: dict[str, Any]) -> str:
    m = r["machine"]
    return "\n".join(
        [
            f"- CPU: {m['cpus']} x {m['cpu_model']} (`nproc` = {m['cpus']})",
            f"- kernel {m['kernel']}, Python {m['python']}, SQLite {m['sqlite']}",
            f"- load average at start {m['loadavg_at_start']}, at end {m['loadavg_at_end']}",
            f"- {'quick' if r['quick'] else 'full'} run, {r['rounds']} round(s),"
            f" {r['total_seconds']} s in all; seconds per scenario: {r['seconds']}",
        ]
    )


def drain(r: dict[str, Any]) -> str:
    s = r.get("scale")
    if not s:
        return "(scale not run)"
    lines = [
        "| slice of the drain | queue depth | files/s | service ms (median) |",
        "|--|--|--|--|",
    ]
    for k, x in enumerate(s.get("slices_first_run") or []):
        lines.append(
            f"| {k + 1}/10 | {x['queue_depth_at_start']:,} | {x['files_per_second']} |"
            f" {x['service_ms_median']} |"
        )
    lines += ["", "| pending rows | claim_next median ms | max ms |", "|--|--|--|"]
    for x in s.get("claim_next_by_depth") or []:
        lines.append(f"| {x['pending']:,} | {x['claim_ms_median']} | {x['claim_ms_max']} |")
    extra = {k: s[k] for k in ("registration", "drain", "recovery", "after_restart") if k in s}
    lines += ["", "```", json.dumps(extra, indent=1), "```"]
    return "\n".join(lines)


def profile(r: dict[str, Any]) -> str:
    p = r.get("profile")
    if not p or not p.get("profiled"):
        return f"(no profile: {r.get('profile_error') or (p or {}).get('reason')})"
    run = p["run"]
    out = [
        f"py-spy, 250 Hz, {run['files']} no-op files in folders, 2 workers"
        f" ({run['files_per_second']} files/s under the profiler); samples: {p['samples']}."
        " Percent of each process kind's samples (all threads).",
        "",
    ]
    for kind in ("daemon", "workers"):
        out.append(f"{kind}, own time (leaf frames, waits left out):")
        out.append("```")
        out += [f"{pct:5.1f} %  {f}" for f, pct in p[kind]["own_busy"][:12]]
        out.append("```")
        out.append(f"{kind}, total time (frame anywhere on the stack), batchd frames:")
        out.append("```")
        out += [f"{pct:5.1f} %  {f}" for f, pct in p[kind]["total"] if "batchd/" in f][:14]
        out.append("```")
    return "\n".join(out)


def main() -> int:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    doc_path = ROOT / "BENCHMARKS.md"
    doc = doc_path.read_text()
    parts = {
        "machine": machine(results),
        "table": render(table(results)),
        "drain": drain(results),
        "profile": profile(results),
    }
    for name, body in parts.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
        doc, n = pattern.subn(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), doc)
        if n != 1:
            print(f"marker bench:{name} not found in BENCHMARKS.md", file=sys.stderr)
            return 1
    doc_path.write_text(doc)
    print(f"updated {doc_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
