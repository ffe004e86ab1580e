# batchd developer tasks. Every target creates .venv itself when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SPOOL ?= $(CURDIR)/spool
# The developer's config: `make run` writes it once (edit it freely, it is
# gitignored) and README's tour exports BATCHD_CONFIG=$PWD/batchd.dev.toml,
# so `.venv/bin/batchd jobs` reads ./spool, not /var/lib/batchd.
DEV_CONFIG := batchd.dev.toml
STAMP := $(VENV)/.installed

.PHONY: run test test-slow test-system lint typecheck pytest bench torture clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The systemd extra needs libsystemd-dev to build; batchd runs without it.
	-$(BIN)/python -m pip install -q -e '.[systemd]' 2>/dev/null
	touch $(STAMP)

$(DEV_CONFIG):
	printf '%s\n' '# batchd.dev.toml: written by `make run`; export BATCHD_CONFIG=$$PWD/$(DEV_CONFIG)' \
		'[spool]' 'root = "$(SPOOL)"' '' '[http]' 'host = "127.0.0.1"' 'port = 8080' >$@

run: $(STAMP) $(DEV_CONFIG)
	$(BIN)/batchd run --config $(DEV_CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check batchd tests bench
	$(BIN)/ruff format --check batchd tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Everything but the multi-node suite (test-slow), within ~8 minutes on 2 cores.
pytest: $(STAMP)
	$(BIN)/pytest -q --ignore=tests/cluster

test: lint typecheck pytest

# The slower suites CI runs after make test (~3 min): several daemons on one
# PostgreSQL (tests/cluster) and a restart after every crash point, first pass
# and mid-batch (make test runs four of them).
test-slow: $(STAMP)
	BATCHD_TEST_SLOW=1 $(BIN)/pytest -q tests/cluster tests/reliability/test_crash_points.py

# batchd as a service under a real systemd, in a booted systemd-nspawn container
# (root, debootstrap and systemd-container; see README "Testing on a real systemd").
test-system: $(STAMP)
	BATCHD_TEST_SYSTEM=1 $(BIN)/pytest -v --timeout=1800 tests/system

# The long form of tests/reliability (kill -9 torture: >= 100 kills). SEED=N replays a run.
torture: $(STAMP)
	$(BIN)/pytest -v -s tests/reliability --long $(if $(SEED),--seed $(SEED))

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) spool $(DEV_CONFIG) .mypy_cache .pytest_cache .ruff_cache
