"""The live status page in real headless Chromium (Debian's ``chromium`` package).

Chromium loads the page from a real :class:`HttpServer`, runs its script
against the JSON API for a few seconds of virtual time and dumps the DOM.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from batchd.clock import SystemClock
from batchd.config import Priority, Settings
from batchd.http import HttpServer
from batchd.intake import Intake
from batchd.metrics import Metrics
from batchd.outbox import Outbox
from batchd.records import BatchRow, Outcome, Status
from batchd.spool import Spool
from batchd.store import SQLiteStore

CHROMIUM = Path("/usr/bin/chromium")
#: How every test runs Chromium: headless, quiet, nothing fetched of its own accord.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
CSV = b"name,qty\nmenu,1\n"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium package (/usr/bin/chromium)"
)


class Site:
    """A server over a spool with one batch whose files all completed."""

    def __init__(self, root: Path, token: str) -> None:
        self.settings = Settings(
            spool={"root": root / "spool"}, http={"host": "127.0.0.1", "port": 0, "token": token}
        )
        self.spool = Spool(self.settings)
        self.spool.init()
        self.store = SQLiteStore(self.settings.db_path)
        clock = SystemClock()
        self.intake = Intake(
            self.settings, self.spool, self.store, Outbox(self.spool, self.store), clock
        )
        self.server = HttpServer(
            self.settings, self.store, self.spool, self.intake, Metrics(), dict, clock
        )
        self.server.start()

    def drop(self, name: str, priority: Priority) -> BatchRow:
        """A folder of three CSV files, claimed and registered at once."""
        folder = self.spool.inbox_for(priority) / name
        folder.mkdir()
        for i in range(3):
            (folder / f"menu{i}.csv").write_bytes(CSV)
        batch = self.intake.take_drop(folder, priority)
        assert batch is not None
        return batch

    def finished_batch(self, name: str) -> BatchRow:
        batch = self.drop(name, Priority.HIGH)
        now = SystemClock().now()
        while (task := self.store.claim_next(now)) is not None:
            self.store.finish(task.file.id, Outcome(Status.COMPLETED, result={"rows": 1}), now)
        return batch

    def close(self) -> None:
        self.server.stop()
        self.store.close()


@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[Callable[[str], Site]]:
    sites: list[Site] = []

    def make(token: str = "") -> Site:
        site = Site(tmp_path, token)
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.close()


def dump_dom(url: str, profile: Path, *flags: str) -> str:
    """The page's DOM after Chromium ran it for 5 s of virtual time."""
    done = subprocess.run(
        [
            str(CHROMIUM),
            *flags,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def batch_row(dom: str, batch_id: str) -> str:
    match = re.search(rf'<tr class="batch[^"]*" data-batch-id="{batch_id}".*?</tr>', dom, re.S)
    assert match is not None, dom[-3000:]
    return match.group(0)


def test_page_shows_a_finished_batch_at_100_percent(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """The page lists the batch with a full bar and shows its files as completed."""
    site = make_site("")
    batch = site.finished_batch("menus")
    dom = dump_dom(f"http://127.0.0.1:{site.server.port}/?batch={batch.id}", tmp_path / "profile")
    row = batch_row(dom, batch.id)
    assert ">menus<" in row
    assert 'data-percent="100"' in row
    detail = re.search(r'<div id="batch-progress">.*?</div></div>', dom, re.S)
    assert detail is not None and 'data-percent="100"' in detail.group(0)
    assert "Batch menus" in dom
    assert dom.count('<span class="status completed">completed</span></td>') >= 4
    for i in range(3):
        assert f">menu{i}.csv<" in dom


def test_page_uses_a_token_given_once_in_the_url(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """With http.token the page takes ?token=, drops it from the URL and reads the API with it."""
    site = make_site("page-secret")
    batch = site.finished_batch("secured")
    url = f"http://127.0.0.1:{site.server.port}/?token=page-secret&batch={batch.id}"
    dom = dump_dom(url, tmp_path / "profile")
    assert 'data-percent="100"' in batch_row(dom, batch.id)


def test_page_asks_for_the_token_when_missing(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """Without the token the page shows the API's refusal and its token form."""
    site = make_site("page-secret")
    site.finished_batch("classified")
    dom = dump_dom(f"http://127.0.0.1:{site.server.port}/", tmp_path / "profile")
    assert '<form id="token-form" autocomplete="off" class="shown">' in dom
    assert "authorization required" in dom
    assert "classified" not in dom


# -- hostile pages (issue 12.5) ----------------------------------------------------

ATTACK = """<!doctype html><html><body>
<form id="f" method="POST" action="{target}" enctype="multipart/form-data" target="sink">
<input name="user_id" value="victim"><input name="priority" value="high">
<input type="file" name="file" id="file"></form>
<iframe name="sink"></iframe>
<script>
const csv = "name,qty\\nmenu,1\\n";
const dt = new DataTransfer();
dt.items.add(new File([csv], "form.csv", {{type: "text/csv"}}));
document.getElementById("file").files = dt.files;
const fd = new FormData();
fd.append("user_id", "victim");
fd.append("file", new File([csv], "fetch.csv", {{type: "text/csv"}}));
fetch("{target}", {{method: "POST", mode: "no-cors", body: fd}})
  .then(() => {{ document.body.dataset.fetch = "sent"; }})
  .catch(() => {{ document.body.dataset.fetch = "failed"; }});
document.getElementById("f").submit();
</script></body></html>"""


class _Quiet(BaseHTTPRequestHandler):
    """A stand-in web server's handler: answers with :meth:`reply`, logs nothing."""

    def reply(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _AttackPage(_Quiet):
    page = b""

    def do_GET(self) -> None:
        self.reply(self.page, "text/html; charset=utf-8")


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """Another web server on 127.0.0.1, on a thread, for as long as the block runs; its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_on_another_origin_cannot_upload(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """A hostile page (no-cors fetch and a plain form POST, no token set) creates no batch."""
    site = make_site("")
    target = f"http://127.0.0.1:{site.server.port}/api/batch/upload"

    class Handler(_AttackPage):
        page = ATTACK.format(target=target).encode()

    with serving(Handler) as port:
        # localhost:<other port> is another site than 127.0.0.1:<batchd's port>.
        dump_dom(f"http://localhost:{port}/", tmp_path / "profile")
    assert site.store.list_batches() == []
    assert list(site.spool.uploads.iterdir()) == []


def test_a_rebound_dns_name_cannot_read_the_api(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """After DNS rebinding (rebind.example resolves to 127.0.0.1), the page under that
    name gets 421 and shows no batch."""
    site = make_site("")
    batch = site.finished_batch("rebound")
    dom = dump_dom(
        f"http://rebind.example:{site.server.port}/",
        tmp_path / "profile",
        "--host-resolver-rules=MAP rebind.example 127.0.0.1",
    )
    assert batch.id not in dom
    assert "rebind.example" in dom and "http.allowed_hosts" in dom


def _detail_progress(dom: str) -> str:
    detail = re.search(r'<div id="batch-progress">.*?</div></div>', dom, re.S)
    assert detail is not None, dom[-3000:]
    return detail.group(0)


def test_list_and_detail_show_the_same_percentage(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """The list's bar uses SPEC section 6's progressPercent, as the detail does."""
    site = make_site("")
    batch = site.drop("partial", Priority.NORMAL)
    now = SystemClock().now()
    first = site.store.claim_next(now)
    second = site.store.claim_next(now)
    assert first is not None and second is not None
    site.store.finish(first.file.id, Outcome(Status.COMPLETED, result={"rows": 1}), now)
    site.store.set_progress({second.file.id: 50})  # (100 + 50 + 0) / 3 = 50
    dom = dump_dom(f"http://127.0.0.1:{site.server.port}/?batch={batch.id}", tmp_path / "profile")
    assert 'data-percent="50"' in batch_row(dom, batch.id)
    assert 'data-percent="50"' in _detail_progress(dom)


def test_failed_batch_shows_counts_and_times(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """A batch with a failed file shows completed and failed apart, not a red 100 %,
    with its created time and how long it took."""
    site = make_site("")
    batch = site.drop("mixed", Priority.NORMAL)
    now = SystemClock().now()
    for n in range(3):
        task = site.store.claim_next(now)
        assert task is not None
        outcome = (
            Outcome(Status.FAILED, error="bad content")
            if n == 0
            else Outcome(Status.COMPLETED, result={"rows": 1})
        )
        site.store.finish(task.file.id, outcome, now)
    dom = dump_dom(f"http://127.0.0.1:{site.server.port}/?batch={batch.id}", tmp_path / "profile")
    row = batch_row(dom, batch.id)
    assert "<em>2 ok, 1 failed</em>" in row and "<em>100%</em>" not in row
    assert "<em>2 ok, 1 failed</em>" in _detail_progress(dom)
    cells = re.findall(r'<td class="when">([^<]*)</td>', row)
    assert len(cells) == 2 and all(cells), row  # created, took
    times = re.search(r'<p class="times" id="batch-times">([^<]*)</p>', dom)
    assert times is not None and "finished" in times.group(1) and "took" in times.group(1)


def test_page_says_it_needs_the_token_instead_of_loading(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """After a 401 the page says a token is needed; nothing is left saying "loading…"."""
    site = make_site("page-secret")
    dom = dump_dom(f"http://127.0.0.1:{site.server.port}/", tmp_path / "profile")
    assert "needs its access token" in dom
    assert "loading…" not in dom


def test_inbox_panel_is_hidden_without_the_endpoint(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """A server without GET /api/inbox (404) leaves the inbox panel hidden."""
    site = make_site("")
    site.finished_batch("menus")
    dom = dump_dom(f"http://127.0.0.1:{site.server.port}/", tmp_path / "profile")
    assert re.search(r'<section id="inbox" hidden(="")?>', dom), dom[:3000]


def test_inbox_panel_shows_waiting_and_refused_drops(tmp_path: Path) -> None:
    """The page renders GET /api/inbox's drops with their state and reason."""
    import json
    from importlib import resources

    page = resources.files("batchd").joinpath("static/status.html").read_bytes()
    drops = [
        {"priority": "normal", "name": "week1", "state": "settling", "reason": "still changing"},
        {
            "priority": "high",
            "name": "reports-2026-11",
            "state": "refused",
            "reason": "no group write: run chmod -R g+w inbox/high/reports-2026-11",
        },
    ]
    answers = {"/api/batch/jobs": [], "/api/inbox": drops}

    class Handler(_Quiet):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/":
                self.reply(page, "text/html")
            elif path in answers:
                body = json.dumps({"success": True, "data": answers[path]}).encode()
                self.reply(body, "application/json")
            else:
                self.send_error(404)

    with serving(Handler) as port:
        dom = dump_dom(f"http://127.0.0.1:{port}/", tmp_path / "profile")
    assert re.search(r'<section id="inbox">', dom), dom[:3000]
    assert '<tr class="drop" data-state="refused">' in dom
    assert "chmod -R g+w inbox/high/reports-2026-11" in dom
    assert ">reports-2026-11<" in dom and ">settling<" in dom


class Cdp:
    """Chromium driven over ``--remote-debugging-pipe`` (the DevTools protocol on
    fds 3 and 4, NUL-terminated JSON): enough to load a page and evaluate layout."""

    def __init__(self, profile: Path, width: int, height: int) -> None:
        import os

        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [
                str(CHROMIUM),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=fds,
            pass_fds=(3, 4),  # kept open across exec: the pipe ends fds() put there
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next = 0

    def call(self, method: str, session: str | None = None, **params: object) -> dict[str, object]:
        import json
        import os

        self._next += 1
        message: dict[str, object] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 65536)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next:
                assert "error" not in answer, answer
                return answer["result"]  # type: ignore[no-any-return]

    def close(self) -> None:
        import os

        self.proc.kill()
        self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def test_long_names_wrap_instead_of_pushing_the_table_under_the_detail(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """A very long batch name wraps in its cell: the list stays beside the detail panel."""
    import time

    site = make_site("")
    batch = site.finished_batch("quarterly-report-" + "x" * 180)
    cdp = Cdp(tmp_path / "profile", 1400, 900)
    try:
        target = cdp.call(
            "Target.createTarget", url=f"http://127.0.0.1:{site.server.port}/?batch={batch.id}"
        )
        session = str(
            cdp.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)[
                "sessionId"
            ]
        )
        check = (
            "(() => { const row = document.querySelector('tr.batch');"
            " const detail = document.querySelector('#files');"
            " if (!row || !detail) return null;"
            " const list = document.querySelector('main > section');"
            " const table = list.querySelector('table');"
            " return {tableRight: table.getBoundingClientRect().right,"
            " listRight: list.getBoundingClientRect().right,"
            " detailLeft: document.querySelector('#detail').getBoundingClientRect().left,"
            " detailTop: document.querySelector('#detail').getBoundingClientRect().top,"
            " listTop: list.getBoundingClientRect().top}; })()"
        )
        deadline = time.monotonic() + 30
        layout = None
        while layout is None and time.monotonic() < deadline:
            result = cdp.call("Runtime.evaluate", session, expression=check, returnByValue=True)
            layout = result["result"].get("value")  # type: ignore[attr-defined]
            if layout is None:
                time.sleep(0.2)
        assert layout is not None, "the page never rendered the batch and its files"
    finally:
        cdp.close()
    assert layout["tableRight"] <= layout["listRight"] + 1, layout
    assert layout["detailTop"] == layout["listTop"], layout  # side by side, not below
    assert layout["listRight"] <= layout["detailLeft"], layout
