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

.PHONY: test demo lint install clean gpu-wheels gpu-check

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

# -- the GPU check (benchmarks/gpu_check.py; see benchmarks/RESULTS.md, "GPU check") --------
# The GPU machine has no network and no trl/datasets: `make gpu-wheels` fetches them here,
# for Linux x86_64 CPython $(GPU_PYTHON), into .gpu-wheels (about 60 MB; pyarrow is 49 MB
# of it, which is why only one Python version fits a 64 MiB transfer). Never torch.
# `make gpu-check` installs them there offline and runs every step into $$OUT (or
# ./gpu-check-out); `make gpu-check DRY=1` runs the same steps on a CPU with a tiny model.
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= 3.12
# The versions this repository's tests run against; pyarrow 24 is the smallest datasets
# 5.2 accepts. Binary: pyarrow, pandas, xxhash; the rest are pure Python (multiprocess
# is tagged per Python version).
GPU_PACKAGES ?= trl==1.16.0 datasets==5.2.0 pyarrow==24.0.0 pandas==3.1.1 xxhash==4.1.0 \
	dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 python-dateutil==4.0.0 tzdata==2026.6
DRY ?=

gpu-wheels:
	@mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		--python-version $(GPU_PYTHON) -d $(GPU_WHEELS) $(GPU_PACKAGES)
	@ls -l $(GPU_WHEELS) | tail -n +2 | awk '{print $$5, $$9}'
	@du -sh $(GPU_WHEELS)

gpu-check:
	$(if $(DRY),$(PY),python3) benchmarks/gpu_check.py --wheels $(GPU_WHEELS) $(if $(DRY),--dry)
