# The README's commands. Each works on its own on a fresh clone: it installs what it needs first.
PYTHON ?= python3

.PHONY: setup demo test lint gpu-check

# PyTorch 2.13.0 unless a torch is installed already: a bare `torch` requirement would pull a multi-GB
# CUDA build on a machine without one. The package's own range (torch>=2.5) is then already satisfied.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -e ".[dev]"

demo: setup
	$(PYTHON) -m sparse_attn demo

# The tests run the real Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1 must be
# set before triton is imported). pytest exits 5 when it collected no test; that is a failure here.
test: setup
	$(PYTHON) -m ruff check sparse_attn triton_kernels tests bench
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q; status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

lint:
	$(PYTHON) -m ruff check sparse_attn triton_kernels tests bench
	$(PYTHON) -m ruff format --check sparse_attn triton_kernels tests bench

# On a machine with an NVIDIA GPU: the test matrix on CUDA tensors with the real kernels and a short GPU
# benchmark, < 8 min; results (JSON, PNG, log) in $$SPARSE_ATTN_GPU_CHECK_DIR (default bench/results/gpu-check).
# Without CUDA it says so and exits 0.
gpu-check: setup
	$(PYTHON) bench/gpu_check.py
