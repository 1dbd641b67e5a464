# torchkiln: install, test, demo. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_PRESET ?= tiny-gpt2
DEMO_OUT ?= build/$(DEMO_PRESET)-cpu-fp32

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install test demo clean

include plugins/plugins.mk

help:
	@echo "make install   create $(VENV), install $(TORCH_SPEC) then torchkiln[dev] pinned to it"
	@echo "make test      install, then run the test suite"
	@echo "make demo      install, convert $(DEMO_PRESET) for the CPU, verify, generate"
	@echo "make plugins-cuda  build the attention kernel: cubin for $(CUDA_ARCHS) (nvcc)"
	@echo "make plugins-rocm  build the attention kernel for $(ROCM_ARCH) (hipcc, installed from Debian if missing)"
	@echo "make plugins-cpu   build the C++ reference: a plain library and the kiln::causal_attention torch op"
	@echo "make clean     remove build outputs"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	# Keep the torch just installed through every later install.
	$(BIN)/python -m pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/kiln convert $(DEMO_PRESET) --target cpu --precision fp32 -o $(DEMO_OUT) --force
	$(BIN)/kiln inspect $(DEMO_OUT)
	$(BIN)/kiln generate $(DEMO_OUT) --prompt-ids 1,2,3,4 --max-new-tokens 32

clean:
	rm -rf build
