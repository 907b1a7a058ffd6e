# omop_emb: the two commands a user needs are `make demo` and `make test`.
# Both set up everything from nothing: Debian packages, pgvector, the Python
# environment, a throwaway PostgreSQL cluster and the embedded embedding server.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup server-deps venv build demo test regress bench eval clean

setup: server-deps venv build

# PostgreSQL, plpython3u, server headers, python3-requests, pgvector >= 0.8.
server-deps:
	$(SUDO) bash scripts/install-server-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[serve,sample,test,bench]'
	touch $@

venv: $(VENV)/.installed

# Assemble the versioned extension script from sql/ and the in-database Python modules.
build: venv
	$(PY) extension/build.py
	$(SUDO) $(MAKE) -C extension install PYTHON3=$(abspath $(PY)) >/dev/null

demo: setup
	$(VENV)/bin/omop-emb-pg demo

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The SQL regression suite alone (test/sql/*.sql against test/expected/*.out with
# pg_regress, tests/test_regress.py); `make test` runs it with everything else.
regress: setup
	$(VENV)/bin/pytest tests/test_regress.py

bench: setup
	$(PY) bench/run_all.py

eval: setup
	$(PY) bench/eval_quality.py

clean:
	rm -rf $(VENV) .omop_emb build dist
