# make quickstart   - the CPU quickstart (installs what it needs into .venv first)
# make test         - the test suite (CI runs exactly this)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: venv quickstart test test-slow bench clean

venv: $(VENV)/.installed

# torch first (a CPU wheel on this machine), then the package; the package's torch range is
# satisfied by the installed torch, so pip never pulls another one.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "thinkrl needs Python >= 3.10"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

.venv: venv

quickstart: venv
	$(BIN)/thinkrl quickstart --control

test: venv
	$(BIN)/python -m pytest -q

# the slow suite also runs the Ray and TRL end-to-end tests: install their extras (skipped without them)
test-slow: venv
	$(BIN)/python -m pip install --quiet -e '.[test,ray,bench]'
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/thinkrl bench generate --json
	$(BIN)/thinkrl bench train --json

clean:
	rm -rf runs .pytest_cache
