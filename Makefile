# slimops — build, test and demo entry points.
#   make demo        set up .venv, build, run the proximal-training demo on the embedded digits data
#   make test        set up .venv, build, run the Python tests and the C++ (ctest) tests
#   make cuda-check  compile + link the CUDA kernels with nvcc against torch 2.14.1 (CUDA 13), no GPU needed
#   make bench       run the benchmarks on this machine and append to bench/results/
PYTHON     ?= python3
VENV       ?= .venv
VPY        := $(VENV)/bin/python
TORCH_PIN  ?= torch==2.13.0
CUDA_VENV  ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_HOME  ?= /usr/local/cuda
CUDA_ARCH  ?= 9.0
MAX_JOBS   ?= 2
# pytest-xdist workers of `make test` (each gets its share of the cores: tests/conftest.py)
TEST_JOBS  ?= 2
# Triton kernels run through the interpreter on CPU tensors when no GPU is visible.
TRITON_INTERPRET ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 0 || echo 1)
SOURCES    := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.inc')
EXT        := slimops/_C.abi3.so

.PHONY: all venv build demo test test-py test-cpp cuda-check bench info clean

all: build

# The venv sees a system-wide torch (--system-site-packages): an installed torch (e.g. a CUDA build on a
# GPU machine) is used as it is; otherwise the CPU build of $(TORCH_PIN) is installed.
$(VENV)/.ready:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_PIN)"
	$(VPY) -m pip install -q triton numpy ninja pytest pytest-timeout pytest-xdist expecttest scikit-learn tqdm matplotlib setuptools wheel
	touch $@

venv: $(VENV)/.ready

$(EXT): $(VENV)/.ready $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(VPY) -m pip install -q -e . --no-build-isolation
	@touch $@

build: $(EXT)

demo: build
	$(VPY) -m slimops demo

test: test-py test-cpp

# worksteal: the long pipeline tests (subprocess trainings of 10-80 s) are spread over the workers as they free up.
# -p no:benchmark: a pytest-benchmark the venv may see (system site-packages) warns in every xdist worker; no test
# uses it.
test-py: build
	$(VPY) -c "import xdist" 2>/dev/null || $(VPY) -m pip install -q pytest-xdist
	TRITON_INTERPRET=$(TRITON_INTERPRET) $(VPY) -m pytest tests -q -n $(TEST_JOBS) --dist worksteal -p no:benchmark

# The C++ test executable of the prox maths and the registered CPU kernels, built by CMake against the
# same libtorch and run by ctest.
test-cpp: $(VENV)/.ready
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DSLIMOPS_PYTHON=$(abspath $(VPY)) >/dev/null
	cmake --build build/cmake -j $(MAX_JOBS)
	ctest --test-dir build/cmake --output-on-failure

$(CUDA_VENV)/.ready:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH)" numpy ninja setuptools wheel
	touch $@

# Builds into build/cuda-check (never over the in-place CPU build), then checks that every op that
# should have a CUDA kernel registered one.
cuda-check: $(CUDA_VENV)/.ready
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=$(CUDA_ARCH) SLIMOPS_FORCE_CUDA=1 MAX_JOBS=$(MAX_JOBS) \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib build/cuda-check --build-temp build/cuda-tmp
	$(CUDA_VENV)/bin/python tools/cuda_check.py build/cuda-check/slimops/_C.abi3.so

bench: build
	$(VPY) bench/bench_prox.py
	$(VPY) bench/bench_channel_conv.py
	$(VPY) bench/bench_spectral.py
	$(VPY) bench/bench_sema.py
	$(VPY) bench/bench_quant.py
	$(VPY) bench/bench_token_attention.py
	$(VPY) bench/bench_distill.py

info: build
	$(VPY) -m slimops info

clean:
	rm -rf build $(EXT) *.egg-info
