# fastseq: the README's two commands are `make test` and `make bench`; both create .venv when it is missing.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
RESULTS_DIR ?= bench/results/latest
PY_GPU      ?= python3
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.fastseq-installed
SOURCES     := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*) setup.py pyproject.toml

.PHONY: test fuzz bench ci build cuda-check compat triton-check gpu-check clean

# A virtual environment with torch (a CPU wheel on these machines), the build tools and fastseq installed
# editable with its test extra; the extension is rebuilt when its sources change.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" setuptools wheel pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

build: $(STAMP)

test: build
	$(PY) -m pytest tests -q

# The differential fuzz suite against torch with many random examples (make test runs a fixed few per test).
FUZZ_EXAMPLES ?= 1000
fuzz: build
	FASTSEQ_FUZZ_PROFILE=fuzz FASTSEQ_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q \
	  --hypothesis-show-statistics

bench: build
	mkdir -p $(RESULTS_DIR)
	$(PY) -m fastseq check | tee $(RESULTS_DIR)/check.txt
	$(PY) -m pytest bench -q -p no:randomly --benchmark-json=$(RESULTS_DIR)/bench.json
	$(PY) bench/report.py $(RESULTS_DIR)/bench.json | tee $(RESULTS_DIR)/table.txt

# The GPU machine's torch and Triton (GPU_*_SPEC): `make compat` with them builds the real CUDA extension (PyPI's
# torch wheels are CUDA builds) for sm_80 and sm_90 with this machine's nvcc, links and imports it, checks the
# machine code of every kernel per architecture (tools/cuda_kernels.py), compiles every Triton kernel ahead of time
# with that Triton, and runs the whole test suite under that build. Triton < 3.7's interpreter needs numpy < 2.4.
GPU_TORCH_SPEC  ?= torch==2.11.0
GPU_TRITON_SPEC ?= triton==3.6.0
GPU_EXTRA_SPECS ?= numpy<2.4
cuda-check:
	TORCH_SPEC="$(GPU_TORCH_SPEC)" TRITON_SPEC="$(GPU_TRITON_SPEC)" EXTRA_SPECS="$(GPU_EXTRA_SPECS)" COMPAT_AOT=1 \
	  bash tools/compat.sh

# Any pair: make compat TORCH_SPEC=torch==2.15.0 TRITON_SPEC=triton==3.7.0 [EXTRA_SPECS=...] [COMPAT_TESTS=...]
compat:
	TORCH_SPEC="$(TORCH_SPEC)" TRITON_SPEC="$(TRITON_SPEC)" EXTRA_SPECS="$(EXTRA_SPECS)" bash tools/compat.sh

# Every Triton kernel compiled ahead of time for sm_80 and sm_90 at each configuration (no GPU needed).
triton-check: build
	env -u TRITON_INTERPRET $(PY) -m fastseq.kernels.aot

# The dry run of gpu-check rebuilds the extension from scratch on this machine's 2 cores (~100 s of C++), where the
# GPU machine builds with 16: its build budget is its own.
DRY_RUN_BUDGET_BUILD ?= 300
ci: build
	$(MAKE) test
	$(MAKE) triton-check
	$(MAKE) cuda-check
	$(MAKE) gpu-check PY_GPU=$(abspath $(PY)) RESULTS_DIR=build/gpu-check-dry-run BUDGET_BUILD=$(DRY_RUN_BUDGET_BUILD)
	BENCH_QUICK=1 $(MAKE) bench RESULTS_DIR=$(RESULTS_DIR)

# On a GPU machine whose python3 has torch, triton, pybind11, ninja, pytest and pytest-benchmark (no network):
# build for this GPU, then check, GPU tests, compute-sanitizer, GPU benchmarks, each within its time budget, all
# results in RESULTS_DIR (8 files at most). Without a GPU it is a dry run: the GPU stages say why they are skipped.
gpu-check:
	RESULTS_DIR=$(RESULTS_DIR) PY=$(PY_GPU) bash tools/gpu_check.sh

clean:
	rm -rf build fastseq/_C*.so *.egg-info .venv-compat
