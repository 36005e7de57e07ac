# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Each creates .venv if missing and installs prefalign with its dev extras into it.
#
# TORCH is installed first, pinned, so that nothing later resolves torch to the newest
# registry build (several GB of CUDA packages on a CPU machine). Keep your own torch with:
#   make test TORCH= VENV_FLAGS=--system-site-packages
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prefalign-installed

.PHONY: test demo lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@if [ -n "$(TORCH)" ]; then echo "installing $(TORCH)"; $(PY) -m pip install -q "$(TORCH)"; fi
	@echo "installing prefalign[dev]"
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/prefalign demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-output
