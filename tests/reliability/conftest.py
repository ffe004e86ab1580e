"""Shared fixtures for the reliability tests: ``seed``, ``long_run`` and the integration helpers.

``pytest tests/reliability --long`` (or ``BATCHD_TORTURE_LONG=1``) selects the long form;
``--seed N`` (or ``BATCHD_TORTURE_SEED=N``) replays a randomized run. The seed in use is
printed in the report header and belongs in every assertion message of a randomized test.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_SEED: int | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("batchd reliability")
    group.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the long (torture) form of the reliability tests (env BATCHD_TORTURE_LONG=1)",
    )
    group.addoption(
        "--seed",
        action="store",
        type=int,
        default=None,
        help="seed for the randomized reliability tests (env BATCHD_TORTURE_SEED)",
    )


def _resolve_seed(config: pytest.Config) -> int:
    global _SEED
    if _SEED is None:
        opt: int | None = config.getoption("--seed", default=None)
        env = os.environ.get("BATCHD_TORTURE_SEED", "").strip()
        if opt is not None:
            _SEED = opt
        elif env:
            _SEED = int(env)
        else:
            _SEED = int(time.time() * 1000) % 1_000_000_007
    return _SEED


def _is_long(config: pytest.Config) -> bool:
    if config.getoption("--long", default=False):
        return True
    return os.environ.get("BATCHD_TORTURE_LONG", "").strip() not in ("", "0", "false", "no")


def pytest_report_header(config: pytest.Config) -> str:
    seed = _resolve_seed(config)
    form = "long" if _is_long(config) else "short"
    return (
        f"batchd reliability: seed={seed} form={form} "
        f"(replay: --seed {seed} or BATCHD_TORTURE_SEED={seed})"
    )


#: pytest-timeout limit for each reliability test in the long form (pyproject's 120 s
#: is for the short form).
LONG_TIMEOUT_SECONDS = 3600


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _is_long(config):
        return
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_SECONDS))


@pytest.fixture(scope="session")
def seed(pytestconfig: pytest.Config) -> int:
    """The session's random seed; use ``random.Random(seed)`` and quote it in assertions."""
    return _resolve_seed(pytestconfig)


@pytest.fixture(scope="session")
def long_run(pytestconfig: pytest.Config) -> bool:
    """True for the long form (``--long`` or ``BATCHD_TORTURE_LONG=1``)."""
    return _is_long(pytestconfig)


@pytest.fixture
def rng(seed: int, request: pytest.FixtureRequest) -> random.Random:
    """A random generator per test, derived from the session seed and the test's id."""
    return random.Random(f"{seed}:{request.node.nodeid}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Repeat the seed at the end: with a plain ``pytest`` from the root this conftest loads
    after the header is printed, so the header line may be missing."""
    if _SEED is not None:
        terminalreporter.write_line(
            f"batchd reliability: seed={_SEED} (replay: BATCHD_TORTURE_SEED={_SEED})"
        )
