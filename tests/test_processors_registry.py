"""Naming processors: built-ins, ``module:function`` specs, plugins, routing."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from test_processors_inspect import make_pdf  # tests/ is on sys.path (rootdir-less layout)

import batchd.processors as processors
from batchd.config import ExecSettings, ProcessingSettings, RouteSettings, Settings
from batchd.errors import ConfigError
from batchd.processors import ProcessorContext, available, choose, describe, resolve
from batchd.processors.builtin import noop
from batchd.processors.exec import run_command
from batchd.processors.inspect import inspect


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test resolves names afresh."""
    monkeypatch.setattr(processors, "_cache", {})


def test_builtins_are_available() -> None:
    """inspect, exec and noop are registered names, even from a source tree."""
    names = available()
    assert {k: names[k] for k in ("inspect", "exec", "noop")} == {
        "inspect": "batchd.processors.inspect:inspect",
        "exec": "batchd.processors.exec:run_command",
        "noop": "batchd.processors.builtin:noop",
    }


def test_resolve_builtin_names() -> None:
    """Registered names resolve to their callables."""
    assert (resolve("inspect"), resolve("exec"), resolve("noop")) == (inspect, run_command, noop)


def test_resolve_module_function_spec() -> None:
    """A "package.module:function" spec resolves without registration."""
    assert resolve("batchd.processors.builtin:noop") is noop


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "neither a registered name"),
        ("batchd.nosuchmodule:fn", "cannot import batchd.nosuchmodule"),
        ("batchd.processors.builtin:nosuch", "has no attribute 'nosuch'"),
        ("batchd.processors:ENTRY_POINT_GROUP", "is not callable"),
    ],
)
def test_resolve_errors_name_the_problem(spec: str, message: str) -> None:
    """A name that cannot be resolved raises ConfigError saying why."""
    with pytest.raises(ConfigError, match=message):
        resolve(spec)


def test_describe_builtins_in_one_line() -> None:
    """describe() gives the first docstring line of each built-in."""
    assert {name: describe(name) for name in ("inspect", "exec", "noop")} == {
        "inspect": "Read PDF, XLSX, XLS and CSV content; type, size and sha256 of anything else.",
        "exec": "Run the [exec] command on the file: its JSON stdout is the result, "
        "its files the outputs.",
        "noop": "Do nothing and succeed: for measuring batchd's own overhead.",
    }


def test_describe_unloadable_processor() -> None:
    """describe() of a broken name says it cannot be loaded instead of raising."""
    assert describe("batchd.nosuchmodule:fn").startswith(
        "cannot be loaded: processor 'batchd.nosuchmodule:fn': cannot import"
    )


def install_plugin(site: Path) -> None:
    """A distribution batchd_testplugin 0.1 declaring an entry point, as pip leaves it."""
    dist = site / "batchd_testplugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: batchd-testplugin\nVersion: 0.1\n"
        "Summary: a test plugin for batchd\n"
    )
    (dist / "entry_points.txt").write_text("[batchd.processors]\nshout = batchd_testplugin:shout\n")
    (site / "batchd_testplugin.py").write_text(
        textwrap.dedent(
            '''
            def shout(path, ctx):
                """Upper-case a text file's content."""
                ctx.progress(50)
                return {"text": path.read_text().upper(), "relpath": ctx.relpath}
            '''
        )
    )


def test_plugin_entry_point_is_listed_resolved_and_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A processor registered under the batchd.processors entry-point group is usable."""
    install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "batchd_testplugin", raising=False)
    assert available()["shout"] == "batchd_testplugin:shout"
    assert describe("shout") == "Upper-case a text file's content."
    source = tmp_path / "hello.txt"
    source.write_text("hello")
    progress: list[int] = []
    ctx = ProcessorContext("b", "f", "hello.txt", tmp_path / "out", Settings(), progress.append)
    assert resolve("shout")(source, ctx) == {"text": "HELLO", "relpath": "hello.txt"}
    assert progress == [50]


def routed_settings() -> Settings:
    return Settings(
        processing=ProcessingSettings(processor="noop"),
        exec=ExecSettings(command=(sys.executable, "-c", "print(open(r'{input}').read())")),
        route=(
            RouteSettings(match="*.pdf", processor="inspect"),
            RouteSettings(match="prices/*.csv", processor="exec"),
            RouteSettings(match="*.csv", processor="inspect"),
        ),
    )


def test_choose_first_matching_route_else_default() -> None:
    """The first [[route]] matching the path or bare name wins; else processing.processor."""
    settings = routed_settings()
    assert {
        relpath: choose(settings, relpath)
        for relpath in ("menu.pdf", "a/b/menu.pdf", "prices/tea.csv", "other/tea.csv", "x.xlsx")
    } == {
        "menu.pdf": "inspect",
        "a/b/menu.pdf": "inspect",
        "prices/tea.csv": "exec",
        "other/tea.csv": "inspect",
        "x.xlsx": "noop",
    }


def test_folder_with_pdf_and_csv_goes_to_two_processors(tmp_path: Path) -> None:
    """A PDF and a CSV from one folder are processed by the two routed processors."""
    folder = tmp_path / "drop"
    (folder / "prices").mkdir(parents=True)
    (folder / "menu.pdf").write_bytes(make_pdf(["Soup"]))
    (folder / "prices" / "tea.csv").write_text("item,price\ntea,2\n")
    settings = routed_settings()
    results = {}
    for relpath in ("menu.pdf", "prices/tea.csv"):
        out = tmp_path / "out" / relpath
        ctx = ProcessorContext("b", relpath, relpath, out, settings)
        name = choose(settings, relpath)
        results[relpath] = (name, resolve(name)(folder / relpath, ctx))
    assert results["menu.pdf"][0] == "inspect"
    assert (results["menu.pdf"][1]["type"], results["menu.pdf"][1]["text"]) == ("pdf", ["Soup"])
    assert results["prices/tea.csv"] == ("exec", {"stdout": "item,price\ntea,2\n\n"})
