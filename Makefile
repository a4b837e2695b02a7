# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_PROGRESS_BAR := off
TEST_MODELS := gemma3-270m qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct

.PHONY: install install-test demo test lint models clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

install: $(BIN)/python
	$(PIP) install -e .

install-test: $(BIN)/python
	$(PIP) install -e '.[test]'

models: install
	$(BIN)/velollm pull $(TEST_MODELS)

demo: install
	$(BIN)/velollm pull qwen2.5-coder-0.5b-instruct
	$(BIN)/python examples/quickstart.py

lint: install-test
	$(BIN)/ruff check .

test: install-test
	$(BIN)/ruff check .
	$(BIN)/velollm pull $(TEST_MODELS)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
