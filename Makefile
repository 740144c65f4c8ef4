# A new user on a bare machine runs `make test` or `make demo` and nothing else.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

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

# The offline demo (synthetic multilingual captions, tiny model, three training stages) is the next
# piece of work; until it lands this target says so instead of pretending.
demo: $(STAMP)
	@echo "make demo: the offline demo is not built yet (it arrives with the data and training work)." >&2
	@exit 1

clean:
	rm -rf $(VENV) runs .pytest_cache
