# Two commands on a fresh machine: `make demo` and `make test`. Both run the idempotent `make setup`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

# The whole pinned stack in ONE pip command, torch pinned in it: an unpinned torch pulls ~5 GB of CUDA.
PINS := torch==2.13.0 triton==3.7.1 "ray[default,train,data]==2.60.0" deepspeed==0.19.8 \
        pyarrow==26.0.1 zarr==3.1.6 tokenizers==0.23.3 click pyyaml safetensors tqdm matplotlib tensorboard==2.20.0 \
        transformers==5.24.0 pytest \
        ruff==0.17.6

# What a lent GPU host lacks (it has torch and triton): benchmarks/gpu-wheels.txt, as wheels for
# its CPython (WHEEL_PYTHON) on x86-64 in WHEELS: `make gpu-wheels`
GPU_WHEELS := $(shell grep -v '^\#' benchmarks/gpu-wheels.txt)
WHEELS ?= .whl
WHEEL_PYTHON ?= 3.12
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
        manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))
DEVICE ?= cuda

# The GPU host, simulated on this CPU machine (`make gpu-host-sim`): a fresh environment of the
# host's packages that memray, its tests and DeepSpeed import (the device library's KINDS.md; its
# versions where it gives them), with the CPU machines' torch 2.13 (the host's 2.11 has no CPU
# wheel within reach of these machines) and the host's triton 3.6; numpy below 2.4 (the host has
# 2.5.2, which has no CPython 3.11 wheel; and triton 3.6's interpreter, which this CPU run uses in
# place of compiled kernels, converts one-element arrays to ints, which numpy 2.4 refuses: the
# host compiles its kernels). Nothing else: what memray needs beyond it must come from the
# wheels, installed as benchmarks/gpu.sh installs them on the host.
HOST_SIM := .venv-host
HOST_PINS := torch==2.13.0 triton==3.6.0 safetensors==0.8.0 tokenizers==0.23.2 transformers==5.17.0 \
        "numpy<2.4" pyarrow click pyyaml tqdm psutil ninja msgpack py-cpuinfo packaging einops \
        typing-extensions tensorboard matplotlib pytest setuptools

.PHONY: setup demo lint test test-soak test-fast demo-test gpu-check gpu-wheels gpu-host-sim clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(PINS) -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import torch, triton, click, yaml, safetensors, memray.kernels, memray.model"
	@# build the C++ CPU kernels once now rather than inside the first training step
	$(PY) -c "from memray.kernels import cpu_ext; print('C++ CPU kernels:', 'built' if cpu_ext.load() else 'unavailable (' + str(cpu_ext.load_error) + '), using the torch backend')"
	@# DeepSpeed compiles a shared-memory comm op on its first init (~30 s): once, here
	$(PY) -c "from memray.train.deepspeed import prebuild; prebuild(); print('DeepSpeed CPU comm op: built')"
	touch $(STAMP)

# The main job through Ray: synthetic facts -> Arrow shards -> 2 Ray Train workers (embedded local
# Ray, DeepSpeed + sharded memory) -> checkpoint -> exact-match recall (fails below 90%) -> inspect.
demo: setup
	mkdir -p $(DEMO_DIR)
	$(VENV)/bin/memray facts demo --out $(DEMO_DIR)/facts.jsonl
	$(VENV)/bin/memray ingest $(DEMO_DIR)/facts.jsonl --out $(DEMO_DIR)/shards
	$(VENV)/bin/memray train demo --workers 2 --run-dir $(DEMO_DIR)/run \
		--set data.source=arrow --set data.path=$(DEMO_DIR)/shards
	$(VENV)/bin/memray eval $(DEMO_DIR)/run --facts $(DEMO_DIR)/facts.jsonl --min-recall 0.9
	$(VENV)/bin/memray inspect $(DEMO_DIR)/run

# Lint and format check (settings in pyproject.toml); `ruff format .` fixes the layout.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole suite, the demo's recall promise included, and the GPU check's CPU smoke run
# (about 15 minutes from a fresh clone on 2 cores, installs included).
test: lint
	$(MAKE) --no-print-directory gpu-check DEVICE=cpu SECTIONS=$(SMOKE_SECTIONS)
	$(PY) -m pytest -q -m "not soak" tests

# The end-to-end Ray runs and the fault matrix (about 4 minutes: each starts Ray or several
# processes): CI runs them after make test.
test-soak: setup
	$(PY) -m pytest -q -m soak tests

# The inner loop: everything but the multi-process, Ray and minutes-long tests (under 2 minutes).
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not demo and not soak" tests

# The demo's promise alone: the demo config recalls >= 90% of its facts (about 6 minutes).
demo-test: setup
	$(PY) -m pytest -q -m demo tests

# make test's smoke run of the GPU check: every section but the kernels' compilation for the GPU
# targets, which tests/test_aot.py does (make gpu-host-sim runs it too, under the host's triton)
SMOKE_SECTIONS := env,tests,train,lookup,value_step,layer,search,e2e,scale

# One command for a lent GPU (benchmarks/gpu.sh; DEVICE=cpu: its smoke run, QUICK=1, OUT=DIR).
# A GPU host has no make of its own for sure: `bash benchmarks/gpu.sh` is the same.
gpu-check: $(if $(filter cpu,$(DEVICE)),setup)
	DEVICE=$(DEVICE) $(if $(SECTIONS),SECTIONS=$(SECTIONS)) bash benchmarks/gpu.sh

# What the GPU host lacks, as wheels in .whl/ (ignored by git; carried to the host).
gpu-wheels: setup
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version $(WHEEL_PYTHON) --implementation cp $(GPU_PLATFORMS) -d $(WHEELS) \
		$(filter-out deepspeed==%,$(GPU_WHEELS)) 2>&1 | { grep -v "^WARNING: Location" || true; }
	@# DeepSpeed publishes no wheel: build its pure-Python one (its ops compile on first use)
	$(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w $(WHEELS) \
		$(filter deepspeed==%,$(GPU_WHEELS)) 2>&1 | { grep -v "^WARNING: Location" || true; }
	@ls $(WHEELS) && du -sh $(WHEELS)

# What benchmarks/gpu.sh does on a GPU host, on this CPU machine, from scratch: the host's
# packages (HOST_PINS) in a fresh environment, the wheels for its Python, gpu.sh's own install
# (the wheels with --no-index, memray without network), its CPU smoke run and the ahead-of-time
# compilation of every kernel under the host's triton. CI runs it after make test.
gpu-host-sim: setup
	rm -rf $(HOST_SIM) .whl-host
	$(PYTHON) -m venv $(HOST_SIM)
	$(HOST_SIM)/bin/python -m pip install --disable-pip-version-check -q $(HOST_PINS) 2>&1 | \
		{ grep -v "^WARNING: Location" || true; }
	$(PY) benchmarks/host_packages.py $(HOST_SIM)/bin/python
	$(MAKE) --no-print-directory gpu-wheels WHEELS=.whl-host WHEEL_PYTHON=$$($(HOST_SIM)/bin/python -c \
		'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
	DEVICE=cpu QUICK=1 INSTALL=1 WHEELS=.whl-host SITE=$(CURDIR)/$(HOST_SIM)/memray-site \
		PYTHON=$(HOST_SIM)/bin/python bash benchmarks/gpu.sh

clean:
	rm -rf $(VENV) $(HOST_SIM) .whl-host runs .pytest_cache
