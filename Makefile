# Set-up and the two everyday jobs. Every target builds the virtual environment first.
# torch is pinned to the release that installs from local files on the project's machines
# (pip never fetches a CUDA build from elsewhere); the rest comes from PyPI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
TEST_WORKERS ?= 2  # pytest-xdist workers (torch threads are shared among them: tests/conftest.py)

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/legofx demo

test: $(VENV)/.installed
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
