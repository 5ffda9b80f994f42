# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean check

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (Python 3.11) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	@$(BIN)/cardswitch demo

test: $(STAMP)
	@$(BIN)/python -m pytest -q

check: $(STAMP)
	@$(BIN)/cardswitch check

bench: $(STAMP)
	@$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var build src/*.egg-info .pytest_cache .hypothesis
