# The README's commands. Each works on its own on a fresh clone: it installs what it needs first.
PYTHON ?= python3

.PHONY: setup demo test lint gpu-check test-transformers-lowest

# PyTorch 2.13.0 unless a torch is installed already: a bare `torch` requirement would pull a multi-GB
# CUDA build on a machine without one. The package's own range (torch>=2.5) is then already satisfied.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -e ".[dev]"

demo: setup
	$(PYTHON) -m sparse_attn demo

# The tests run the real Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1 must be
# set before triton is imported). pytest exits 5 when it collected no test; that is a failure here.
# PYTEST_WORKERS processes (pytest-xdist) share the cores: the interpreter runs one Python thread per test, so
# two workers nearly halve the wall time on a 2-core machine. Each worker starts with one intra-op thread
# (OMP_NUM_THREADS=1: idle OpenMP threads spinning beside the other worker cost far more than they give);
# tests about threads set their own counts.
PYTEST_WORKERS ?= 2
test: setup
	$(PYTHON) -m ruff check sparse_attn triton_kernels tests bench
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(PYTEST_WORKERS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status
	$(MAKE) --no-print-directory test-transformers-lowest

# The transformers integration on the lowest transformers release pyproject.toml accepts (the main run tests
# the installed one, the newest): a throwaway virtual environment in build/ that sees this one's packages and
# installs over them only that release and what it needs (its huggingface-hub, tokenizers and `kernels`, which
# a newer `kernels` would break). Kept between runs, so a warm run only runs the tests: the version-sensitive
# ones (mask recognition and evaluation, packed batches, caches, a model of each mask kind, continuous batching).
TRANSFORMERS_LOWEST = 5.23.0
TRANSFORMERS_LOWEST_ENV = build/transformers-$(TRANSFORMERS_LOWEST)
TRANSFORMERS_LOWEST_TESTS = (mask_info or decode_key_mask or alignment or unrecognised or look_alike or unseen \
  or packed_batch or left_padding or t5 or generate_batch or packed_step or continuous_batching) and not compiled
test-transformers-lowest:
	@$(TRANSFORMERS_LOWEST_ENV)/bin/python -c "import transformers as t; assert t.__version__ == '$(TRANSFORMERS_LOWEST)'" \
	  2>/dev/null || { rm -rf $(TRANSFORMERS_LOWEST_ENV) \
	  && $(PYTHON) -m venv --system-site-packages $(TRANSFORMERS_LOWEST_ENV) \
	  && $(TRANSFORMERS_LOWEST_ENV)/bin/python -m pip install --quiet "transformers[kernels]==$(TRANSFORMERS_LOWEST)"; }
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR) $(TRANSFORMERS_LOWEST_ENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) \
	  -p no:cacheprovider \
	  tests/test_transformers.py tests/test_transformers_paged.py -k "$(TRANSFORMERS_LOWEST_TESTS)"

lint:
	$(PYTHON) -m ruff check sparse_attn triton_kernels tests bench
	$(PYTHON) -m ruff format --check sparse_attn triton_kernels tests bench

# On a machine with an NVIDIA GPU: the test matrix on CUDA tensors with the real kernels and a short GPU
# benchmark, < 8 min; results (JSON, PNG, log) in $$SPARSE_ATTN_GPU_CHECK_DIR (default bench/results/gpu-check).
# Without CUDA it says so and exits 0.
gpu-check: setup
	$(PYTHON) bench/gpu_check.py
