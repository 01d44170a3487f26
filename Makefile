# Two entry points: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKSPACE ?= workspace

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project description changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/bench data --workspace $(WORKSPACE)
	$(BIN)/bench train --model mlp --workspace $(WORKSPACE)
	$(BIN)/bench errors --run mlp-s0 --workspace $(WORKSPACE)
	$(BIN)/bench bound --subset all --workspace $(WORKSPACE)
	$(BIN)/bench report --workspace $(WORKSPACE)
	@echo "Results are in $(WORKSPACE)/: runs/mlp-s0 (model, meta.json, probabilities), hardsets/mlp-s0 (the hard set),"
	@echo "bound/all (two-pixel bound) and report/report.html (the comparison report)"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(WORKSPACE)
