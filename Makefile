# torchkiln: install, test, demo. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The trained preset: it learned arithmetic sequences, and its tokenizer spells each token as a number.
DEMO_PRESET ?= tiny-trained
DEMO_PROMPT ?= 5 8 11
DEMO_OUT ?= build/$(DEMO_PRESET)-cpu-fp32
# What `make cpu|aoti|cuda|rocm|tensorrt` converts: a preset, a model folder or package.module:factory.
MODEL ?= tiny-gpt2
PRECISION ?= fp32

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install test demo clean cpu aoti cuda rocm tensorrt bench interop

include plugins/plugins.mk

help:
	@echo "make install   create $(VENV), install $(TORCH_SPEC) then torchkiln[dev] pinned to it"
	@echo "make test      install, then run the test suite"
	@echo "make demo      install, convert $(DEMO_PRESET) for the CPU, verify, generate from \"$(DEMO_PROMPT)\", benchmark beside PyTorch"
	@echo "make plugins-cuda  build the attention kernel: cubin for $(CUDA_ARCHS) (nvcc)"
	@echo "make plugins-rocm  build the attention kernel for $(ROCM_ARCH) (hipcc, installed from Debian if missing)"
	@echo "make plugins-cpu   build the C++ reference: a plain library and the kiln::causal_attention torch op"
	@echo "make plugins-torch-cuda  compile the torch op's GPU half against torch's headers (a check; no GPU needed)"
	@echo "make cpu       convert MODEL=$(MODEL) for ONNX Runtime on the CPU (PRECISION=$(PRECISION)) into build/, verified"
	@echo "make aoti      the same as an AOTInductor package for the CPU"
	@echo "make cuda      the same for ONNX Runtime's CUDA provider: installs onnxruntime-gpu[cuda,cudnn] (needs an NVIDIA GPU)"
	@echo "make rocm      the same for ONNX Runtime's MIGraphX provider: installs onnxruntime-migraphx (needs an AMD GPU with ROCm and MIGraphX)"
	@echo "make tensorrt  the same as a TensorRT plan (needs an NVIDIA GPU and TensorRT)"
	@echo "make bench     convert gpt2 (ONNX fp32/int8/int4, AOTInductor) and measure beside eager and torch.compile (README table)"
	@echo "make interop   kiln engines in Optimum's ORTModelForCausalLM (own venv: it pins transformers < 4.58), Optimum and genai folders in kiln"
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

# Two workers for the two cores, each taking the next test as it finishes one; engines are built once per run.
PYTEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal

# optimum-onnx pins transformers < 4.58, kiln needs 5: Optimum gets a venv of its own, torch pinned the same.
OPTIMUM_VENV ?= build/venv-optimum
interop: install
	test -x $(OPTIMUM_VENV)/bin/python || $(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(OPTIMUM_VENV)/bin/python -m pip freeze | grep -i '^torch==' > $(OPTIMUM_VENV)/constraints.txt
	$(OPTIMUM_VENV)/bin/python -m pip install --quiet -c $(OPTIMUM_VENV)/constraints.txt optimum-onnx onnxruntime diffusers
	$(BIN)/python benchmarks/interop.py prepare build/interop
	$(OPTIMUM_VENV)/bin/python benchmarks/interop.py check build/interop
	$(BIN)/python benchmarks/interop.py foreign build/interop

demo: install
	$(BIN)/kiln convert $(DEMO_PRESET) --target cpu --precision fp32 -o $(DEMO_OUT) --force
	$(BIN)/kiln inspect $(DEMO_OUT)
	@echo "The model continues the sequence \"$(DEMO_PROMPT)\" (it learned a, a+d, a+2d, ... mod 64):"
	$(BIN)/kiln generate $(DEMO_OUT) --prompt "$(DEMO_PROMPT)" --max-new-tokens 16
	$(BIN)/kiln bench $(DEMO_OUT) --reference --prompt-lengths 32,128 --rounds 2

# Each hardware target converts into build/<model>-<target>-<precision>/ (kiln's default) and verifies.
cpu: install
	$(BIN)/kiln convert $(MODEL) --target cpu --precision $(PRECISION) --force

aoti: install
	$(BIN)/kiln convert $(MODEL) --target aoti-cpu --precision $(PRECISION) --force

# The GPU targets check for their hardware before installing anything, so they fail fast elsewhere.
NO_NVIDIA = { echo "make $@: no NVIDIA GPU on this machine (nvidia-smi lists none); the $@ target needs one" >&2; exit 2; }

# onnxruntime and its GPU builds install the same `onnxruntime` package: the CPU one goes first (and comes back
# when the GPU one cannot be installed), keeping the pinned torch.
RESTORE_CPU_ORT = $(BIN)/python -m pip install -q -c $(VENV)/constraints.txt onnxruntime
HAS_PROVIDER = $(BIN)/python -c "import onnxruntime, sys; sys.exit(sys.argv[1] not in onnxruntime.get_available_providers())"

# onnxruntime-gpu's cuda and cudnn extras bring CUDA's and cuDNN's libraries as nvidia-* wheels; the adapter
# loads them with onnxruntime.preload_dlls, and refuses a session that fell back to the CPU, naming the
# library that did not load.
cuda:
	@nvidia-smi -L >/dev/null 2>&1 || $(NO_NVIDIA)
	$(MAKE) install
	$(BIN)/python -m pip uninstall -y -q onnxruntime
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt 'onnxruntime-gpu[cuda,cudnn]' || \
	  { $(RESTORE_CPU_ORT); echo "make cuda: onnxruntime-gpu[cuda,cudnn] did not install (see pip above); onnxruntime (CPU) is back" >&2; exit 2; }
	@$(HAS_PROVIDER) CUDAExecutionProvider || \
	  { echo "make cuda: the onnxruntime installed lists no CUDAExecutionProvider" >&2; exit 2; }
	$(BIN)/kiln convert $(MODEL) --target cuda --precision $(PRECISION) --force

# ONNX Runtime's ROCm provider was removed in 1.23: the rocm target runs MIGraphX's, from onnxruntime-migraphx,
# which loads MIGraphX and ROCm from the system (AMD's packages: migraphx, rocm), not from pip.
rocm:
	@test -e /dev/kfd || { echo "make rocm: no AMD GPU on this machine (no /dev/kfd); the rocm target needs one with ROCm" >&2; exit 2; }
	$(MAKE) install
	$(BIN)/python -m pip uninstall -y -q onnxruntime
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt onnxruntime-migraphx || \
	  { $(RESTORE_CPU_ORT); echo "make rocm: no onnxruntime-migraphx wheel installs here (see pip above): build ONNX Runtime with --use_migraphx against this machine's ROCm; onnxruntime (CPU) is back" >&2; exit 2; }
	@$(HAS_PROVIDER) MIGraphXExecutionProvider || \
	  { echo "make rocm: the onnxruntime installed lists no MIGraphXExecutionProvider: it cannot run the rocm target" >&2; exit 2; }
	$(BIN)/kiln convert $(MODEL) --target rocm --precision $(PRECISION) --force

tensorrt:
	@nvidia-smi -L >/dev/null 2>&1 || $(NO_NVIDIA)
	$(MAKE) install
	$(BIN)/python -c "import tensorrt" 2>/dev/null || $(BIN)/python -m pip install -q -c $(VENV)/constraints.txt tensorrt
	$(BIN)/kiln convert $(MODEL) --target tensorrt --precision $(PRECISION) --force

BENCH_ENGINES := build/gpt2-cpu-fp32 build/gpt2-aoti-cpu-fp32 build/gpt2-cpu-int8 build/gpt2-cpu-int4

build/gpt2-cpu-%: | install
	$(BIN)/kiln convert gpt2 --target cpu --precision $* -o $@ --force

build/gpt2-aoti-cpu-fp32: | install
	$(BIN)/kiln convert gpt2 --target aoti-cpu -o $@ --force

bench: install $(BENCH_ENGINES)
	mkdir -p benchmarks/results
	# The AOTInductor engine carries native code; these were all built just above.
	$(BIN)/kiln bench $(BENCH_ENGINES) --reference --compiled-reference --rounds 3 --trust-native-code \
		--plot benchmarks/results/gpt2-cpu.png --json > benchmarks/results/gpt2-cpu.json
	$(BIN)/python benchmarks/table.py benchmarks/results/gpt2-cpu.json

clean:
	rm -rf build
