"""The README's Python examples run as written, in order, in one namespace (as a reader would paste them)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(python_blocks()) >= 5


@pytest.mark.timeout(600)
def test_readme_examples_run():
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(python_blocks(), 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:  # re-raised with the block that failed
            raise AssertionError(f"README python block {number} failed:\n{block}") from error
    # The examples' results are real: the quickstart's output has the query's shape and is finite.
    assert namespace["out"].shape == namespace["q"].shape and torch.isfinite(namespace["out"]).all()
    assert namespace["n"] == 2  # replace_attention swapped both encoder layers
    assert namespace["tokens"].shape == (2, 32)
