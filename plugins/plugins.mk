# Builds of the kiln attention plugin; included by the top-level Makefile, which defines BIN and `install`.
# Outputs are cached by source hash in the user's cache folder (KILN_CACHE_DIR overrides), so a second
# run compiles nothing.
ROCM_ARCH ?= gfx90a
CUDA_ARCHS ?= sm_80 sm_90 compute_80
# apt-get needs root; CI containers run as root, developer machines go through sudo.
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)
# plugins/__init__.py imports plugins.build (it exports the build function), so `-m` would warn that the
# module was imported before it ran; harmless, and silenced here.
PLUGIN_BUILD = $(BIN)/python -W ignore::RuntimeWarning:runpy -m plugins.build

.PHONY: plugins plugins-cuda plugins-rocm plugins-cpu plugins-torch-cuda

plugins: plugins-cuda plugins-rocm plugins-cpu plugins-torch-cuda

# cubin for each sm_XX and PTX for each compute_XX (the PTX is what the TensorRT plugin embeds).
plugins-cuda: install
	$(PLUGIN_BUILD) cuda $(addprefix --arch ,$(CUDA_ARCHS))

# A HIP code object; Debian's hipcc (ROCm 5.2) is installed when missing. gfx942 needs ROCm >= 6.
plugins-rocm: install
	command -v hipcc >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq hipcc libamdhip64-dev; }
	$(PLUGIN_BUILD) rocm --arch $(ROCM_ARCH)

# The C++ reference twice: a plain shared library (no torch) and the kiln::causal_attention PyTorch op.
plugins-cpu: install
	$(PLUGIN_BUILD) cpu
	$(BIN)/python -c "import plugins; print('torch op ready:', plugins.load_torch_op())"

# The PyTorch op's GPU half (torch_op_cuda.cu) compiled, not linked, against this torch's headers, so that
# a break on the host side fails CI too; where a GPU is, torch.utils.cpp_extension builds it for real.
# The CPU wheel of torch lacks one generated header (cuda_cmake_macros.h): an empty stand-in takes its place.
TORCH_STUB = build/plugins/torch-stub
plugins-torch-cuda: install
	mkdir -p $(TORCH_STUB)/c10/cuda/impl && touch $(TORCH_STUB)/c10/cuda/impl/cuda_cmake_macros.h
	nvcc -c -std=c++20 -O3 -arch=sm_90 -I$(TORCH_STUB) \
	  $$($(BIN)/python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))") \
	  -o build/plugins/torch_op_cuda.o plugins/attention/torch_op_cuda.cu
