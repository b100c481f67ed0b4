# hapsms-relay: the quick start is `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/dev.toml

# `make install` (as root): a venv in PREFIX, the units, and a config if there is none yet.
# DESTDIR stages everything under another root (packaging, tests); paths inside the
# installed files are those without DESTDIR.
PREFIX  ?= /opt/hapsms-relay
DESTDIR ?=
UNITDIR ?= /etc/systemd/system
BINDIR  ?= /usr/local/bin
CONFDIR ?= /etc/hapsms-relay
STAGED  := $(DESTDIR)$(PREFIX)
# /run/systemd/system exists only when systemd is PID 1 (what sd_booted(3) checks).
SYSTEMD_RUNNING = $(if $(DESTDIR),,$(wildcard /run/systemd/system))

.PHONY: run test lint typecheck pytest fuzz mutation mutation-quick bench bench-smoke wrk bench-smtp \
	bench-cluster postgresql strace clean install uninstall test-systemd guest-tools

# The venv is rebuilt when the packaging metadata changes.
$(BIN)/hapsms-relay: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.test-extras: $(BIN)/hapsms-relay
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

run: $(BIN)/hapsms-relay
	$(BIN)/hapsms-relay serve --config $(CONFIG)

lint: $(VENV)/.test-extras
	$(BIN)/ruff check hapsms_relay tests $(wildcard bench)

typecheck: $(VENV)/.test-extras
	$(BIN)/mypy

# The tests start throwaway PostgreSQL servers (tests/pg_server.py) from Debian's package.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| (apt-get update -q && apt-get install -y -q postgresql) \
		|| { echo "make test needs PostgreSQL: apt-get install postgresql (Debian's package)" >&2; exit 1; }

# tests/test_outbox_fsync.py counts the outbox's fsyncs with strace (Debian's package).
strace:
	@command -v strace >/dev/null || (apt-get update -q && apt-get install -y -q strace) \
		|| { echo "make test needs strace: apt-get install strace (Debian's package)" >&2; exit 1; }

pytest: $(VENV)/.test-extras postgresql strace
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# The units under a real systemd: a cached Debian guest booted with systemd-nspawn, the
# checkout installed in it, and tests/guest/checks.py run there (as root; a few minutes the
# first time, while debootstrap builds the guest, then about a minute).
guest-tools:
	@command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null || \
	  (apt-get update -q && apt-get install -y -q debootstrap systemd-container) || \
	  { echo "make test-systemd needs debootstrap and systemd-container (Debian's packages)" >&2; exit 1; }

test-systemd: guest-tools
	tests/guest/run.sh

# Benchmarks (bench/README.md): server pinned to CPU 0, wrk and the sink on CPU 1.
wrk:
	@command -v wrk >/dev/null || (apt-get update -q && apt-get install -y -q wrk) \
		|| { echo "make bench needs wrk: apt-get install wrk (Debian's package)" >&2; exit 1; }

bench: $(BIN)/hapsms-relay wrk
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# A few seconds per stage, no thresholds: CI runs it so the tooling cannot rot.
bench-smoke: $(BIN)/hapsms-relay wrk
	$(BIN)/python bench/run.py --smoke

# PostgreSQL and two relays beside a single SQLite relay (bench/cluster.py);
# BENCH_ARGS=--smoke runs each stage for a second or two.
bench-cluster: $(VENV)/.test-extras wrk postgresql
	$(BIN)/python bench/cluster.py $(BENCH_ARGS)

# Messages/s through the smtp provider's connection pool to a local aiosmtpd: the client on
# CPU 0, the server in a child process on CPU $(SERVER_CPU) ("same": CPU 0 as well).
SERVER_CPU ?= 1
bench-smtp: $(VENV)/.test-extras
	taskset -c 0 $(BIN)/python bench/smtp_bench.py --server-cpu $(SERVER_CPU) $(BENCH_ARGS)

# The webhook fuzz test with 10,000 generated requests (make test runs 300), and the number
# fast path against phonenumbers on as many generated numbers (make test: 2,000).
fuzz: $(VENV)/.test-extras
	FUZZ_EXAMPLES=10000 $(BIN)/pytest tests/test_fuzz.py tests/test_numbers_fuzz.py $(PYTEST_ARGS)

# Mutation testing (mutation/run.py): mutmut over the modules of mutation/scope.toml, each
# with the tests that pin it; ~20 minutes on two cores (quick: ~9). Scores per module go to
# var/mutation/report.txt, survivors to var/mutation/survivors.txt; the run fails under 85 %
# killed in a module or on a survivor mutation/accepted.toml does not explain.
# MUTATION_ARGS: module names to run only those. mutation-quick: the pure-logic modules (CI).
$(VENV)/.mutation: $(VENV)/.test-extras
	$(BIN)/pip install --quiet -e '.[test,mutation]'
	@# pip rewrote the console script: keep it older than the stamps, or every make reinstalls
	@touch $(BIN)/hapsms-relay && touch $(VENV)/.test-extras && touch $@

mutation: $(VENV)/.mutation
	nice -n 19 $(BIN)/python mutation/run.py $(MUTATION_ARGS)

mutation-quick: $(VENV)/.mutation
	nice -n 19 $(BIN)/python mutation/run.py --quick

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache

install:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
	  echo "make install: run as root (or stage with DESTDIR=...)" >&2; exit 1; fi
	$(PYTHON) -m venv $(STAGED)
	$(STAGED)/bin/python -m pip install --quiet --upgrade pip
	$(STAGED)/bin/python -m pip install --quiet --upgrade .
	@# pip wrote the staging path into the scripts' #! lines; point them at PREFIX.
	@if [ -n "$(DESTDIR)" ]; then \
	  find $(STAGED)/bin -maxdepth 1 -type f -exec grep -lI -F '$(STAGED)' {} + \
	    | xargs -r sed -i 's|$(STAGED)|$(PREFIX)|g'; fi
	install -m 0644 README.md $(STAGED)/README.md
	install -d -m 0755 $(STAGED)/docs/providers
	install -m 0644 docs/*.md $(STAGED)/docs/
	install -m 0644 docs/providers/*.md $(STAGED)/docs/providers/
	@# On root's PATH, so that the README's commands (hapsms-relay queue stats) run as written.
	install -d -m 0755 $(DESTDIR)$(BINDIR)
	ln -sfn $(PREFIX)/bin/hapsms-relay $(DESTDIR)$(BINDIR)/hapsms-relay
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	for unit in hapsms-relay.service hapsms-relay.socket; do \
	  sed 's|/opt/hapsms-relay|$(PREFIX)|g' systemd/$$unit > $(DESTDIR)$(UNITDIR)/$$unit && \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit || exit 1; done
	install -d -m 0755 $(DESTDIR)$(CONFDIR)
	@# The config holds no secret (those are credentials), so the service user may read it.
	@if [ -e $(DESTDIR)$(CONFDIR)/config.toml ]; then \
	  echo "keeping $(CONFDIR)/config.toml"; \
	else install -m 0644 systemd/config.example.toml $(DESTDIR)$(CONFDIR)/config.toml; fi
	install -d -m 0700 $(DESTDIR)$(CONFDIR)/credentials
	@if [ ! -e $(DESTDIR)$(CONFDIR)/credentials/webhook-token ]; then \
	  (umask 077; $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' \
	    > $(DESTDIR)$(CONFDIR)/credentials/webhook-token) && \
	  echo "generated the webhook token: $(CONFDIR)/credentials/webhook-token"; fi
	$(if $(SYSTEMD_RUNNING),systemctl daemon-reload)
	@echo "installed hapsms-relay in $(PREFIX); next: see $(PREFIX)/docs/operations.md, \"Deploy on a VM\""

# Leaves $(CONFDIR) (config and credentials) and /var/lib/hapsms-relay (the outbox).
uninstall:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
	  echo "make uninstall: run as root (or with DESTDIR=...)" >&2; exit 1; fi
	$(if $(SYSTEMD_RUNNING),-systemctl disable --now hapsms-relay.socket hapsms-relay.service)
	rm -f $(DESTDIR)$(UNITDIR)/hapsms-relay.service $(DESTDIR)$(UNITDIR)/hapsms-relay.socket
	@if [ "$$(readlink $(DESTDIR)$(BINDIR)/hapsms-relay)" = "$(PREFIX)/bin/hapsms-relay" ]; then \
	  rm -f $(DESTDIR)$(BINDIR)/hapsms-relay; fi
	$(if $(SYSTEMD_RUNNING),systemctl daemon-reload)
	rm -rf $(STAGED)
	@echo "kept $(CONFDIR) and /var/lib/hapsms-relay (the outbox)"
