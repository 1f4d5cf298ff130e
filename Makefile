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

# What a lent GPU host lacks (it has torch and triton), for cp312 x86-64: `make gpu-wheels`
GPU_WHEELS := zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1 hjson==3.1.0 \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
        manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))
DEVICE ?= cuda

.PHONY: setup demo lint test test-fast demo-test gpu-check gpu-wheels clean

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
	$(MAKE) --no-print-directory gpu-check DEVICE=cpu
	$(PY) -m pytest -q tests

# The inner loop: everything but the multi-process, Ray and minutes-long tests (under 2 minutes).
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not demo" tests

# The demo's promise alone: the demo config recalls >= 90% of its facts (about 6 minutes).
demo-test: setup
	$(PY) -m pytest -q -m demo tests

# One command for a lent GPU (benchmarks/gpu.sh; DEVICE=cpu: its smoke run, QUICK=1, OUT=DIR).
# A GPU host has no make of its own for sure: `bash benchmarks/gpu.sh` is the same.
gpu-check: $(if $(filter cpu,$(DEVICE)),setup)
	DEVICE=$(DEVICE) bash benchmarks/gpu.sh

# What the GPU host lacks, as wheels in .whl/ (ignored by git; carried to the host).
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d .whl $(GPU_WHEELS) 2>&1 | { grep -v "^WARNING: Location" || true; }
	@# DeepSpeed publishes no wheel: build its pure-Python one (its ops compile on first use)
	$(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 \
		2>&1 | { grep -v "^WARNING: Location" || true; }
	@ls .whl && du -sh .whl

clean:
	rm -rf $(VENV) runs .pytest_cache
