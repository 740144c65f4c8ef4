# A new user on a bare machine runs `make test` or `make demo` and nothing else.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test test-gpu demo install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

# On a CUDA machine with the gpu extra: xformers against SDPA (not collected on CPU machines).
test-gpu: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[gpu]"
	$(VENV)/bin/python -m pytest -q tests/gpu

demo: $(STAMP)
	$(VENV)/bin/salamandra-vl demo

clean:
	rm -rf $(VENV) runs .pytest_cache
