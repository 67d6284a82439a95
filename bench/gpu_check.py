"""`make gpu-check`: the first thing to run on a machine with an NVIDIA GPU (about 5 minutes on one GPU).

1. The shared test matrix (`tests/test_attention_matrix.py`) on CUDA tensors, with the real compiled
   Triton kernels (TRITON_INTERPRET=0), against the float64 reference computed on the GPU.
2. A short `bench/gpu_kernels.py` configuration: 4k and 16k tokens, window and random blocks at 10%,
   bf16, head dim 128, forward / backward / both, against dense FlashAttention, FlexAttention, xformers.

Everything lands in one folder, ``$SPARSE_ATTN_GPU_CHECK_DIR`` (default ``bench/results/gpu-check``):
``gpu-check.log`` (both steps' whole output), ``gpu-check.json`` (the summary: device, versions, each
step's exit code and duration, the test counts), ``pytest-junit.xml``, and the benchmark's JSON and PNG.
Each step has a time limit, so the whole check ends within 8 minutes. Without CUDA it says so, writes
nothing and exits 0.

    make gpu-check
    SPARSE_ATTN_GPU_CHECK_DIR=/tmp/gpu python bench/gpu_check.py
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIR_ENV = "SPARSE_ATTN_GPU_CHECK_DIR"
TEST_TIMEOUT_S = 300
BENCH_TIMEOUT_S = 150
BENCH_ARGS = [
    "--lengths", "4096,16384",
    "--families", "window,blocks",
    "--densities", "0.1",
    "--dtypes", "bf16",
    "--head-dims", "128",
    "--rep", "50",
]  # fmt: skip


def _step(name: str, cmd: list[str], env: dict, timeout: int, log) -> dict:
    """Run one step, its output appended to the log; returns its exit code, duration and output."""
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code = "timeout"
        output = "".join((s.decode() if isinstance(s, bytes) else s) or "" for s in (exc.stdout, exc.stderr))
        output += f"\n{name} stopped after its {timeout} s limit\n"
    log.write(output)
    log.flush()
    print(output[-3000:])
    return {"exit_code": code, "seconds": round(time.perf_counter() - start, 1), "output": output}


def _test_counts(output: str) -> dict:
    """pytest's final tally: {"passed": n, "failed": n, ...}."""
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", tail)}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check. "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of torch."
        )
        return 0
    out = Path(os.environ.get(DIR_ENV) or ROOT / "bench" / "results" / "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRITON_INTERPRET": "0", "SPARSE_ATTN_TEST_DEVICE": "cuda"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    summary = {
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    tests_cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_attention_matrix.py"]
    tests_cmd += ["-p", "no:cacheprovider", f"--junitxml={out / 'pytest-junit.xml'}"]
    bench_cmd = [sys.executable, "bench/gpu_kernels.py", *BENCH_ARGS, "--out", str(out)]
    with open(out / "gpu-check.log", "w") as log:
        log.write(json.dumps(summary, indent=2) + "\n")
        tests = _step("tests on CUDA", tests_cmd, env, TEST_TIMEOUT_S, log)
        bench = _step("gpu_kernels benchmark", bench_cmd, env, BENCH_TIMEOUT_S, log)
    summary["tests"] = {
        "exit_code": tests["exit_code"],
        "seconds": tests["seconds"],
        "counts": _test_counts(tests["output"]),
    }
    summary["benchmark"] = {"exit_code": bench["exit_code"], "seconds": bench["seconds"]}
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2))
    ok = tests["exit_code"] == 0 and bench["exit_code"] == 0
    print(f"gpu-check {'passed' if ok else 'FAILED'}; results in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
