# make quickstart   - the CPU quickstart (installs what it needs into .venv first)
# make test         - the test suite (CI runs exactly this)
# make gpu-check    - on a CUDA machine: gpu tests, benchmarks, a short quickstart (scripts/gpu_check.sh)
# make gpu-wheels   - here, with network: the wheels gpu-check installs on a GPU image without network
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: venv quickstart test test-slow bench clean gpu-check gpu-wheels

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

# the image's own Python and torch, never .venv: it stops at once, with one line, where CUDA is absent
gpu-check:
	bash scripts/gpu_check.sh

# thinkrl's dependencies that the GPU image (Python 3.12, torch, transformers, peft, safetensors, tokenizers, pyyaml,
# tqdm, jinja2, numpy, pytest) lacks, with theirs, and setuptools for the editable install: 15 MB, carried with
# the tree. TRL does not fit the 64 MiB carry limit (datasets needs pyarrow, 55 MB): bench rl-step runs --skip-trl.
GPU_WHEELS   := build/gpu-wheels
GPU_PACKAGES := 'fastapi>=0.110' 'uvicorn>=0.29' 'httpx>=0.27' 'plotly>=5.20'
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d $(GPU_WHEELS) $(GPU_PACKAGES) 'setuptools>=68'
	echo $(GPU_PACKAGES) > $(GPU_WHEELS)/packages.txt
	du -sh $(GPU_WHEELS)

clean:
	rm -rf runs .pytest_cache
