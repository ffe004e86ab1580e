"""The ``exec`` processor, driving small Python scripts as the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from batchd.config import ExecSettings, ProcessingSettings, Settings
from batchd.errors import PermanentError, ProcessorError
from batchd.processors import ProcessorContext
from batchd.processors.exec import run_command
from batchd.testing import wait_until


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tool.py"
    path.write_text("import json, os, sys, time, subprocess\n" + textwrap.dedent(body))
    return path


def setup(
    tmp_path: Path,
    body: str,
    *args: str,
    timeout: float = 60.0,
    **exec_settings: Any,
) -> tuple[Path, ProcessorContext, list[int]]:
    """An input file and a context whose [exec] command runs ``body`` with ``args``."""
    tool = script(tmp_path, body)
    source = tmp_path / "in" / "menu.csv"
    source.parent.mkdir()
    source.write_text("item,price\ntea,2\n")
    settings = Settings(
        processing=ProcessingSettings(timeout_seconds=timeout),
        exec=ExecSettings(command=(sys.executable, str(tool), *args), **exec_settings),
    )
    progress: list[int] = []
    ctx = ProcessorContext(
        batch_id="batch-1",
        file_id="file-1",
        relpath="docs/menu.csv",
        output_path=tmp_path / "out",
        settings=settings,
        report=progress.append,
    )
    return source, ctx, progress


def dead(pid: int) -> bool:
    """True when ``pid`` is gone or a zombie (an init that never reaps leaves those)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


def test_json_stdout_is_the_result(tmp_path: Path) -> None:
    """A JSON object on stdout becomes the result as it is."""
    source, ctx, _ = setup(tmp_path, 'print(json.dumps({"rows": 1, "ok": True}))')
    assert run_command(source, ctx) == {"rows": 1, "ok": True}


def test_placeholders_env_and_cwd(tmp_path: Path) -> None:
    """Placeholders expand inside argv elements, other braces stay, env and cwd apply."""
    body = """
        keys = ("BATCHD_FILE_ID", "BATCHD_RELPATH", "GREETING")
        env = {k: os.environ.get(k) for k in keys}
        print(json.dumps({"argv": sys.argv[1:], "env": env, "cwd": os.getcwd()}))
    """
    workdir = tmp_path / "work"
    workdir.mkdir()
    source, ctx, _ = setup(
        tmp_path,
        body,
        "--in={input}",
        "{output_dir}",
        "{batch_id}/{file_id}/{relpath}",
        '{"literal": {braces}}',
        env={"GREETING": "hi"},
        cwd=workdir,
    )
    assert run_command(source, ctx) == {
        "argv": [
            f"--in={source}",
            str(tmp_path / "out"),
            "batch-1/file-1/docs/menu.csv",
            '{"literal": {braces}}',
        ],
        "env": {"BATCHD_FILE_ID": "file-1", "BATCHD_RELPATH": "docs/menu.csv", "GREETING": "hi"},
        "cwd": str(workdir),
    }


def test_files_written_to_output_dir_are_listed(tmp_path: Path) -> None:
    """Regular files the command writes into {output_dir} are listed in "outputs"."""
    body = """
        out = sys.argv[1]
        open(os.path.join(out, "summary.txt"), "w").write("2 rows")
        os.mkdir(os.path.join(out, "pages"))
        open(os.path.join(out, "pages", "1.png"), "wb").write(b"png")
        print("converted")
    """
    source, ctx, _ = setup(tmp_path, body, "{output_dir}")
    assert run_command(source, ctx) == {
        "stdout": "converted\n",
        "outputs": ["pages/1.png", "summary.txt"],
    }
    assert (ctx.output_dir / "summary.txt").read_text() == "2 rows"


def test_symlinks_in_output_dir_are_removed(tmp_path: Path) -> None:
    """A symbolic link the command leaves in {output_dir} is removed, never listed."""
    body = """
        os.symlink("/etc/passwd", os.path.join(sys.argv[1], "passwd"))
        open(os.path.join(sys.argv[1], "real.txt"), "w").write("x")
    """
    source, ctx, _ = setup(tmp_path, body, "{output_dir}")
    assert run_command(source, ctx) == {"outputs": ["real.txt"]}
    assert sorted(p.name for p in ctx.output_dir.iterdir()) == ["real.txt"]


def test_text_stdout_is_kept_and_capped(tmp_path: Path) -> None:
    """Stdout that is not a JSON object is kept as text, cut at exec.max_stdout_bytes."""
    source, ctx, _ = setup(tmp_path, 'sys.stdout.write("x" * 100000)', max_stdout_bytes=10)
    assert run_command(source, ctx) == {"stdout": "x" * 10, "truncated": True}


def test_json_that_is_not_an_object_is_text(tmp_path: Path) -> None:
    """A JSON list on stdout is kept as text, since a result is an object."""
    source, ctx, _ = setup(tmp_path, "print('[1, 2]')")
    assert run_command(source, ctx) == {"stdout": "[1, 2]\n"}


def test_permanent_exit_code_fails_without_retry(tmp_path: Path) -> None:
    """Exit 65 (EX_DATAERR) raises PermanentError quoting the last stderr lines."""
    body = """
        for n in range(30):
            print(f"line {n}", file=sys.stderr)
        print("bad price in row 2", file=sys.stderr)
        sys.exit(65)
    """
    source, ctx, _ = setup(tmp_path, body)
    with pytest.raises(PermanentError) as err:
        run_command(source, ctx)
    lines = str(err.value).splitlines()
    program = Path(sys.executable).name
    assert lines[0] == f"docs/menu.csv: {program} exited with code 65; last lines of stderr:"
    assert lines[1:] == [f"line {n}" for n in range(11, 30)] + ["bad price in row 2"]


def test_other_exit_code_is_retryable(tmp_path: Path) -> None:
    """Exit 1 raises a retryable ProcessorError (not PermanentError) with stderr."""
    source, ctx, _ = setup(tmp_path, 'print("database busy", file=sys.stderr); sys.exit(1)')
    with pytest.raises(ProcessorError, match=r"exited with code 1.*\ndatabase busy$") as err:
        run_command(source, ctx)
    assert not isinstance(err.value, PermanentError)


def test_death_by_signal_is_retryable(tmp_path: Path) -> None:
    """A command killed by a signal raises a retryable error naming the signal."""
    source, ctx, _ = setup(tmp_path, "os.abort()")
    with pytest.raises(ProcessorError, match=r"was killed by SIGABRT") as err:
        run_command(source, ctx)
    assert not isinstance(err.value, PermanentError)


def test_configured_permanent_exit_codes(tmp_path: Path) -> None:
    """exec.permanent_exit_codes decides which exit codes are permanent."""
    source, ctx, _ = setup(tmp_path, "sys.exit(3)", permanent_exit_codes=(3,))
    with pytest.raises(PermanentError, match=r"exited with code 3"):
        run_command(source, ctx)


def test_progress_lines_on_stderr(tmp_path: Path) -> None:
    """`PROGRESS n` lines on stderr report progress and stay out of error text."""
    body = """
        for line in ("PROGRESS 10", "PROGRESS: 55.5", "working", "PROGRESS 90%"):
            print(line, file=sys.stderr, flush=True)
        print("{}")
    """
    source, ctx, progress = setup(tmp_path, body)
    assert run_command(source, ctx) == {}
    assert progress == [10, 55, 90, 100]


def test_timeout_kills_command_and_its_children(tmp_path: Path) -> None:
    """A command that hangs past processing.timeout_seconds is killed with its child."""
    body = """
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
        time.sleep(600)
    """
    pids = tmp_path / "pids"
    source, ctx, _ = setup(tmp_path, body, str(pids), timeout=3.0)
    with pytest.raises(PermanentError, match=r"^Processing timeout exceeded: docs/menu.csv"):
        run_command(source, ctx)
    command, child = map(int, pids.read_text().split())
    assert wait_until(lambda: dead(command) and dead(child))


def test_leftover_background_process_is_killed_when_command_exits(tmp_path: Path) -> None:
    """In a worker that leads its process group, what the command left running dies."""
    body = """
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        open(sys.argv[1], "w").write(str(child.pid))
        print("{}")
    """
    pids = tmp_path / "pids"
    source, ctx, _ = setup(tmp_path, body, str(pids))
    worker = f"""
import os, sys, json
from pathlib import Path
from batchd.config import Settings
from batchd.processors import ProcessorContext
from batchd.processors.exec import run_command
os.setpgrp()  # as the daemon's workers do
ctx = ProcessorContext("b", "f", "menu.csv", Path({str(ctx.output_dir)!r}),
                       Settings.model_validate_json({ctx.settings.model_dump_json()!r}))
print(json.dumps(run_command(Path({str(source)!r}), ctx)))
"""
    done = subprocess.run(
        [sys.executable, "-c", worker], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == {}
    assert wait_until(lambda: dead(int(pids.read_text())))


def test_empty_command_is_a_clear_permanent_error(tmp_path: Path) -> None:
    """Selecting exec without exec.command fails permanently, naming the key."""
    source, ctx, _ = setup(tmp_path, "")
    ctx.settings = Settings()
    with pytest.raises(PermanentError, match=r"exec.command is not set"):
        run_command(source, ctx)


def test_missing_program_is_a_permanent_error(tmp_path: Path) -> None:
    """A command that does not exist fails permanently, naming it."""
    source, ctx, _ = setup(tmp_path, "")
    ctx.settings = Settings(exec=ExecSettings(command=(str(tmp_path / "nope"), "{input}")))
    with pytest.raises(PermanentError, match=r"exec.command cannot be started .*nope"):
        run_command(source, ctx)


def _live_children() -> set[str]:
    me = str(os.getpid()).encode()
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes()
        except OSError:
            continue
        after = fields[fields.rfind(b")") + 2 :].split()
        if after[1] == me and after[0] != b"Z":
            found.add(stat.parent.name)
    return found


@pytest.fixture(autouse=True)
def _no_leftovers() -> Any:
    """Fail a test that leaves a child process of ours running (children that
    other tests in the same session started before it are not its business)."""
    before = _live_children()
    yield
    left = _live_children() - before
    assert not left, f"children still running: {sorted(left)}"


def test_command_gets_a_clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command sees PATH, LANG and exec.env, never the daemon's secrets or other variables."""
    monkeypatch.setenv("BATCHD_HTTP__TOKEN", "secret-http-token-123456")
    monkeypatch.setenv("BATCHD_DATABASE__URL", "postgresql://batchd:pw@db/batchd")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "inherited-secret")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    body = 'print(json.dumps({"env": dict(os.environ)}))'
    source, ctx, _ = setup(tmp_path, body, env={"GREETING": "hi"})
    env = run_command(source, ctx)["env"]
    assert "BATCHD_HTTP__TOKEN" not in env and "BATCHD_DATABASE__URL" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert (env["LANG"], env["LC_ALL"], env["GREETING"]) == ("C.UTF-8", "C.UTF-8", "hi")
    assert env["PATH"] == os.environ["PATH"]
    assert env["BATCHD_INPUT"] == str(source)
    assert {k for k in env if k.startswith("BATCHD_")} == {
        "BATCHD_INPUT",
        "BATCHD_OUTPUT_DIR",
        "BATCHD_BATCH_ID",
        "BATCHD_FILE_ID",
        "BATCHD_RELPATH",
        "BATCHD_SAFE_RELPATH",
    }


def test_safe_relpath_is_never_option_like(tmp_path: Path) -> None:
    """{safe_relpath} of a file named like an option reaches the command as ./-name."""
    source, ctx, _ = setup(
        tmp_path, 'print(json.dumps({"argv": sys.argv[1:]}))', "{safe_relpath}", "{input}"
    )
    ctx = ProcessorContext(
        batch_id=ctx.batch_id,
        file_id=ctx.file_id,
        relpath="-rf.csv",
        output_path=tmp_path / "out",
        settings=ctx.settings,
        report=lambda _: None,
    )
    argv = run_command(source, ctx)["argv"]
    assert argv == ["./-rf.csv", str(source)]
    assert not any(arg.startswith("-") for arg in argv)
