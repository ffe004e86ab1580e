"""The live status page in real headless Chromium (Debian's ``chromium`` package).

Chromium loads the page from a real :class:`HttpServer`, runs its script
against the JSON API for a few seconds of virtual time and dumps the DOM.
"""

from __future__ import annotations

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

    def finished_batch(self, name: str) -> BatchRow:
        folder = self.spool.inbox_for(Priority.HIGH) / name
        folder.mkdir()
        for i in range(3):
            (folder / f"menu{i}.csv").write_bytes(CSV)
        batch = self.intake.take_drop(folder, Priority.HIGH)
        assert batch is not None
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
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
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


class _AttackPage(BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_page_on_another_origin_cannot_upload(
    make_site: Callable[[str], Site], tmp_path: Path
) -> None:
    """A hostile page (no-cors fetch and a plain form POST, no token set) creates no batch."""
    site = make_site("")
    target = f"http://127.0.0.1:{site.server.port}/api/batch/upload"

    class Handler(_AttackPage):
        page = ATTACK.format(target=target).encode()

    attacker = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=attacker.serve_forever, daemon=True)
    thread.start()
    try:
        # localhost:<other port> is another site than 127.0.0.1:<batchd's port>.
        dump_dom(f"http://localhost:{attacker.server_address[1]}/", tmp_path / "profile")
    finally:
        attacker.shutdown()
        attacker.server_close()
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
