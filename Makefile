# The two commands a newcomer needs: `make test`, and (later) `make demo`.
# Each creates .venv from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test lint clean

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 8) <= v < (3, 12) else \
		"error: OpenFL 1.6 needs Python 3.8 to 3.11; run make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

venv: $(VENV)/.installed

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf workspace/plan workspace/save workspace/logs workspace/*.pkl workspace/requirements.txt
