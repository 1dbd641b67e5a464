# Builds of the kiln attention plugin; included by the top-level Makefile, which defines BIN and `install`.
# Outputs are cached by source hash under build/plugins/, so a second run compiles nothing.
ROCM_ARCH ?= gfx90a
CUDA_ARCHS ?= sm_80 sm_90 compute_80
# apt-get needs root; CI containers run as root, developer machines go through sudo.
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)
# plugins/__init__.py imports plugins.build (it exports the build function), so `-m` would warn that the
# module was imported before it ran; harmless, and silenced here.
PLUGIN_BUILD = $(BIN)/python -W ignore::RuntimeWarning:runpy -m plugins.build

.PHONY: plugins plugins-cuda plugins-rocm plugins-cpu

plugins: plugins-cuda plugins-rocm plugins-cpu

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
