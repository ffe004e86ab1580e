"""``python -m bench``: batchd against its peers, side by side; a table and bench/results.json.

    python -m bench                 # what ``make bench`` runs (full sizes, 3 rounds)
    python -m bench --quick         # small sizes, 1 round: for development
    python -m bench --only latency,cpu

Scenarios (issue 7): overhead (no-op, vs huey), cpu (~50 ms CPU per file, vs
``xargs -P`` and the ideal), latency (idle pick-up, vs huey, inotifywait and
the original 5 s poll), http (list/detail under load, vs a static
``http.server``), scale (100,000 files), plus a py-spy profile of the daemon
and the processors' own benchmark. Issue 15: peer15 (vs a watchdog + huey
stack doing the file work), daemon_cpu (daemon CPU ms per file from /proc),
floor (the physical work alone, bench/floor.py), scaleout (1, 2, 4 PostgreSQL
nodes, I/O-bound, and a node SIGKILLed), and http's ``flow`` part (list and
detail while no-op files flow at full speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import cluster, issue15, profile, scale, scenarios
from bench import ocr as ocr_bench
from bench.common import CORES

SCENARIOS = (
    "overhead",
    "cpu",
    "latency",
    "http",
    "scale",
    "cluster",
    "profile",
    "processors",
    "ocr",
    "documents",
    "peer15",
    "daemon_cpu",
    "floor",
    "scaleout",
)

FULL = {
    "rounds": 3,
    "overhead": (40, 50),
    "cpu_files": 200,
    "latency_samples": 50,
    "http": (6000, 40),
    "scale": (2000, 60.0, 10.0),
    "profile": (40, 50),
    "peer15": (40, 50),
    "daemon_cpu": (40, 50),
    "floor": 2000,
    "http_flow_folders": 40,
}
QUICK = {
    "rounds": 1,
    "overhead": (4, 25),
    "cpu_files": 20,
    "latency_samples": 10,
    "http": (1000, 6),
    "scale": (40, 3.0, 3.0),
    "profile": (10, 50),
    "peer15": (4, 50),
    "daemon_cpu": (4, 50),
    "floor": 200,
    "http_flow_folders": 8,
}


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "cpus": CORES,
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        value = f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    return f"{value}{unit}"


def _peer_ms(lat: dict[str, Any], who: str) -> str:
    if who not in lat:
        return f"{who} n/a"
    return f"{who} {_fmt(lat[who]['median_ms'])} / {_fmt(lat[who]['p99_ms'])} ms"


def table(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows: scenario, batchd, peer, ratio, target (met?)."""
    rows: list[tuple[str, str, str, str, str]] = []

    def met(ok: Any) -> str:
        return "" if ok is None else (" yes" if ok else " NO")

    o = results.get("overhead")
    if o:
        hu = _fmt(o["huey_tps"], " tasks/s huey")
        rows.append(
            (
                f"overhead, {o['files']} in folders",
                _fmt(o["batchd_folders_fps"], " files/s"),
                hu,
                _fmt(o.get("ratio_folders"), "x"),
                ">= 1.5x" + met(o.get("ratio_folders", 0) >= 1.5 if o["huey_tps"] else None),
            )
        )
        rows.append(
            (
                f"overhead, {o['files']} loose",
                _fmt(o["batchd_loose_fps"], " files/s"),
                hu,
                _fmt(o.get("ratio_loose"), "x"),
                ">= 1.5x" + met(o.get("ratio_loose", 0) >= 1.5 if o["huey_tps"] else None),
            )
        )
        if o.get("huey_normal_tps"):
            rows.append(
                (
                    "  vs huey with synchronous=NORMAL",
                    f"{_fmt(o['batchd_folders_fps'])} / {_fmt(o['batchd_loose_fps'])} files/s",
                    _fmt(o["huey_normal_tps"], " tasks/s"),
                    f"{_fmt(o['ratio_folders_vs_normal'])}x / {_fmt(o['ratio_loose_vs_normal'])}x",
                    "(no target)",
                )
            )
    c = results.get("cpu")
    if c:
        rows.append(
            (
                f"cpu-bound, {c['files']} x ~50 ms, {c['workers']} workers",
                _fmt(c["batchd_s"], " s"),
                f"{_fmt(c['ideal_s'], ' s')} ideal, {_fmt(c['xargs_s'], ' s')} xargs",
                f"{c['efficiency']:.0%} of ideal, {c['ratio_vs_xargs']}x xargs",
                ">= 95 %" + met(c["met"]),
            )
        )
    lat = results.get("latency")
    if lat:
        b = lat["batchd"]
        rows.append(
            (
                "pick-up latency, median / p99",
                f"{_fmt(b['median_ms'])} / {_fmt(b['p99_ms'])} ms",
                _peer_ms(lat, "inotifywait"),
                _fmt(lat.get("ratio_vs_inotifywait"), "x floor"),
                "<= 10 / 50 ms" + met(lat["met"]),
            )
        )
        if "huey_warm" in lat:
            h = lat["huey_warm"]
            rows.append(
                (
                    "  vs huey consumer (warm polling)",
                    "",
                    f"{_fmt(h['median_ms'])} / {_fmt(h['p99_ms'])} ms",
                    _fmt(lat.get("ratio_vs_huey_warm"), "x faster"),
                    "",
                )
            )
        rows.append(
            (
                "  vs huey idle / original 5 s poll (computed)",
                "",
                f"{lat['huey_idle_computed']['median_ms']:,.0f} / "
                f"{lat['original_5s_poll']['median_ms']:,.0f} ms median",
                _fmt(round(lat["original_5s_poll"]["median_ms"] / b["median_ms"]), "x faster"),
                "",
            )
        )
    cl_ = results.get("cluster")
    if cl_ and "skipped" not in cl_:
        tp = cl_["throughput_files_per_s"]
        for kind, label in (("noop", "no-op"), ("cpu", "cpu ~50 ms")):
            t = tp[kind]
            rows.append(
                (
                    f"cluster {label}: SQLite 1 / PG 1, 2, 3 nodes",
                    f"{_fmt(t['sqlite-1'])} / "
                    + ", ".join(_fmt(t[f"pg-{n}"]) for n in (1, 2, 3))
                    + " files/s",
                    "",
                    f"{_fmt(t['pg-3'] / t['pg-1'])}x (3 vs 1 node)",
                    "",
                )
            )
        cr = cl_["claim_rate_per_s"]
        rows.append(
            (
                "cluster: SKIP LOCKED claims alone",
                f"{_fmt(cr['1 connection'])} / {_fmt(cr['3 connections'])} claims/s",
                "1 / 3 connections",
                "",
                "",
            )
        )
        la = cl_["latency"]
        rows.append(
            (
                "cluster: drop-to-result, SQLite vs PG",
                f"{_fmt(la['sqlite']['median_ms'])} vs {_fmt(la['postgresql']['median_ms'])} ms",
                "median",
                f"+{_fmt(la['postgresql']['median_ms'] - la['sqlite']['median_ms'])} ms",
                "",
            )
        )
    s = results.get("scale")
    if s:
        rows.append(
            (
                f"scale: registration of {s['files']:,}",
                _fmt(s["registration"]["files_per_second"], " files/s"),
                "",
                "",
                "~1,000+ files/s",
            )
        )
        rows.append(
            (
                "scale: daemon RSS peak (workers)",
                f"{s['rss_mib']['daemon_peak']} MiB ({s['rss_mib']['worker_peak']} MiB)",
                "",
                "",
                "<= 150 MiB" + met(s["rss_mib"]["daemon_peak"] <= 150),
            )
        )
        if "recovery" in s:
            r = s["recovery"]
            rows.append(
                (
                    f"scale: recovery, {r['pending_rows']:,} pending",
                    _fmt(r["start_to_daemon_started_s"], " s"),
                    "",
                    "",
                    "<= 5 s" + met(r["start_to_daemon_started_s"] <= 5),
                )
            )
        q = s["http_with_all_rows"]
        rows.append(
            (
                f"scale: GET list / detail, {s['files']:,} rows",
                f"{_fmt(q['list']['p50_ms'])} / {_fmt(q['detail']['p50_ms'])} ms p50",
                "",
                "",
                "",
            )
        )
        sl = s.get("slices_first_run") or []
        if sl:
            fps = [x["files_per_second"] for x in sl if x["files_per_second"]]
            rows.append(
                (
                    "scale: dispatch files/s by tenth of drain",
                    f"{min(fps):,.0f}..{max(fps):,.0f}",
                    "",
                    "",
                    "flat",
                )
            )
        cl = s.get("claim_next_by_depth") or []
        if cl:
            rows.append(
                (
                    f"scale: claim_next at {cl[0]['pending']:,} .. {cl[-1]['pending']:,} pending",
                    f"{cl[0]['claim_ms_median']} .. {cl[-1]['claim_ms_median']} ms",
                    "",
                    "",
                    "flat (O(log n))",
                )
            )
        st = s["status_json"]
        if st.get("measured"):
            rows.append(
                (
                    "scale: status.json writes",
                    f"{st['writes']:,} for {s['files_done_total']:,} files",
                    f"{st['approx_mib']} MiB",
                    f"{st['writes_per_file']} per file",
                    "throttled",
                )
            )
    h = results.get("http")
    if h:
        b, f = h["batchd"], h["static"]
        rows.append(
            (
                "http under load: req/s",
                _fmt(b["requests_per_second"]),
                _fmt(f["requests_per_second"], " static http.server"),
                _fmt(h["ratio_vs_static"], "x"),
                "",
            )
        )
        for label in ("list", "detail"):
            rows.append(
                (
                    f"  {label} p50 / p99",
                    f"{_fmt(b[label]['p50_ms'])} / {_fmt(b[label]['p99_ms'])} ms",
                    f"{_fmt(f[label]['p50_ms'])} / {_fmt(f[label]['p99_ms'])} ms",
                    "",
                    "",
                )
            )
        fl = h.get("flow")
        if fl:
            rows.append(
                (
                    f"http while {fl['files']:,} no-op files flow: req/s",
                    _fmt(fl["requests_per_second"]),
                    _fmt(fl["generator_ceiling_rps"], " generator ceiling"),
                    _fmt(fl["files_per_second_meanwhile"], " files/s meanwhile"),
                    ">= 2,000" + met(fl["requests_per_second"] >= scenarios.FLOW_TARGET_RPS),
                )
            )
            rows.append(
                (
                    "  HTTP process CPU per request (flowing)",
                    f"{fl['http_cpu_ms_per_request']:.3f} ms",
                    "",
                    "",
                    "",
                )
            )
            for label in ("list", "detail"):
                rows.append(
                    (
                        f"  {label} p50 / p99 (flowing)",
                        f"{_fmt(fl[label]['p50_ms'])} / {_fmt(fl[label]['p99_ms'])} ms",
                        "",
                        "",
                        "p99 <= 20 ms" + met(fl[label]["p99_ms"] <= scenarios.FLOW_TARGET_P99_MS),
                    )
                )
    if results.get("ocr"):
        rows += ocr_bench.rows(results["ocr"])
    rows += issue15.rows(results)
    so = results.get("scaleout")
    if so and "skipped" not in so:
        fps, ratio = so["files_per_second"], so["ratio_to_n_x_one"]
        rows.append(
            (
                f"issue 15: PG nodes {' / '.join(fps)}, 100 ms I/O, conc. 3",
                " / ".join(_fmt(fps[n]) for n in fps) + " files/s",
                f"ideal {so['ideal_files_per_s_per_node']} files/s per node",
                " / ".join(_fmt(ratio[n]) for n in ratio if n != "1") + " of N x 1 node",
                f">= {cluster.SCALE_TARGET}"
                + met(all(r >= cluster.SCALE_TARGET for r in ratio.values())),
            )
        )
        k = so["kill"]
        rows.append(
            (
                f"  one of {k['nodes']} nodes SIGKILLed, {k['files']} files",
                f"lost {k['lost']}, {k['in_flight_finished_elsewhere']}/"
                f"{k['in_flight_on_victim']} in flight done elsewhere",
                f"{k['result_files']} results, {k['duplicate_rows']} doubled rows",
                f"{_fmt(k['kill_to_all_done_s'], ' s')} kill to done",
                "lose nothing" + met(k["ok"]),
            )
        )
    return rows


def render(rows: list[tuple[str, str, str, str, str]]) -> str:
    head = ("scenario", "batchd", "peer", "ratio", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round")
    parser.add_argument("--rounds", type=int, help="rounds per side-by-side scenario")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name("results.json"), help="JSON out"
    )
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    rounds = args.rounds or int(size["rounds"])  # type: ignore[call-overload]
    wanted = SCENARIOS if not args.only else tuple(args.only.split(","))
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")

    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "rounds": rounds}
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def step(name: str, fn: Any, *a: Any) -> None:
        if name not in wanted:
            return
        print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = fn(*a)
        except Exception as exc:  # one broken scenario must not lose the others
            results[name + "_error"] = f"{type(exc).__name__}: {exc}"
            print(f"  {name} failed: {exc}", file=sys.stderr, flush=True)
        timings[name] = round(time.perf_counter() - t0, 1)

    step("overhead", scenarios.overhead, rounds, *size["overhead"])  # type: ignore[misc]
    step("cpu", scenarios.cpu_bound, rounds, size["cpu_files"])
    step("latency", scenarios.latency, rounds, size["latency_samples"])
    step("http", scenarios.http, rounds, *size["http"], size["http_flow_folders"])  # type: ignore[misc]
    step("scale", scale.run, *size["scale"])  # type: ignore[misc]
    step("cluster", cluster.run, args.quick)
    step("profile", profile.run, *size["profile"])  # type: ignore[misc]
    if "processors" in wanted and not args.quick:
        print(f"[{time.perf_counter() - started:6.0f} s] processors ...", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("bench_processors.py"))],
            capture_output=True,
            text=True,
            check=False,
        )
        results["processors"] = done.stdout.splitlines()
        timings["processors"] = round(time.perf_counter() - t0, 1)
    step("ocr", ocr_bench.run, rounds, args.quick)  # issue 18: s/page vs tesseract by hand
    # Issue 15: is the daemon the bottleneck?
    step("peer15", issue15.peer15, rounds, *size["peer15"])  # type: ignore[misc]
    step("daemon_cpu", issue15.daemon_cpu, rounds, *size["daemon_cpu"])  # type: ignore[misc]
    step("floor", issue15.floor, rounds, size["floor"])
    step("scaleout", cluster.scaleout, rounds, args.quick)
    if "documents" in wanted and not args.quick:
        # inspect on the real-document corpus vs pdftotext and pandas (bench/corpus).
        print(f"[{time.perf_counter() - started:6.0f} s] documents ...", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "bench.corpus.bench"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )
        results["documents"] = done.stdout.splitlines()
        timings["documents"] = round(time.perf_counter() - t0, 1)
    results["seconds"] = timings
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(render(table(results)))
    for key in results:
        if key.endswith("_error"):
            print(f"{key}: {results[key]}")
    if "processors" in results:
        print("\nprocessors (inspect, one fresh worker each):")
        print("\n".join(results["processors"]))
    if "documents" in results:
        print("\ndocuments (inspect on the real-document corpus, BENCHMARKS.md):")
        print("\n".join(results["documents"]))
    print(f"\n{results['total_seconds']} s in all; written {args.output}")
    return 1 if any(k.endswith("_error") for k in results) else 0


if __name__ == "__main__":
    sys.exit(main())
