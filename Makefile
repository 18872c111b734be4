# fastseq: the README's two commands are `make test` and `make bench`; both create .venv when it is missing.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
RESULTS_DIR ?= bench/results/latest
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.fastseq-installed
SOURCES     := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*) setup.py pyproject.toml

.PHONY: test bench ci build cuda-check triton-check gpu-check clean

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

bench: build
	mkdir -p $(RESULTS_DIR)
	$(PY) -m fastseq check | tee $(RESULTS_DIR)/check.txt
	$(PY) -m pytest bench -q -p no:randomly --benchmark-json=$(RESULTS_DIR)/bench.json
	$(PY) bench/report.py $(RESULTS_DIR)/bench.json | tee $(RESULTS_DIR)/table.txt

# nvcc compiles every csrc/cuda/*.cu for sm_80 and sm_90 (registers and spills printed); the glue compiles
# syntax-only against torch's headers.
cuda-check: build
	PY=$(PY) bash tools/cuda_check.sh

# Every Triton kernel compiled ahead of time for sm_80 and sm_90 at each configuration (no GPU needed).
triton-check: build
	env -u TRITON_INTERPRET $(PY) -m fastseq.kernels.aot

ci: build
	$(MAKE) test
	$(MAKE) cuda-check
	$(MAKE) triton-check
	BENCH_QUICK=1 $(MAKE) bench RESULTS_DIR=$(RESULTS_DIR)

# On a machine with a GPU and no network whose python3 has torch, triton, pybind11 and ninja: build the CUDA
# extension in place, run the GPU tests, compute-sanitizer on a subset, the GPU benchmarks; results in RESULTS_DIR.
gpu-check:
	RESULTS_DIR=$(RESULTS_DIR) bash tools/gpu_check.sh

clean:
	rm -rf build fastseq/_C*.so *.egg-info
