"""Test setup: Triton's interpreter runs the real kernels on the CPU.

TRITON_INTERPRET must be in the environment before triton is first imported, so it is set here, at
collection, before any test module imports sparse_attn's Triton backend.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
