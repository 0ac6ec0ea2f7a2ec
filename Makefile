# Two entry points a new user needs: `make demo` and `make test`.
# Each creates .venv and installs tiertune (editable) with what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/tiertune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/tiertune

venv: $(BIN)/tiertune

demo: venv
	$(BIN)/tiertune demo

test: venv
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) tiertune-demo
