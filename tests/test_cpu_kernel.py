"""The C++ CPU kernel (`sparse_attn/backends/cpu_kernel.py`), the engine of the "torch" backend.

The shared matrix in `test_attention_matrix.py` runs the "torch" backend, hence this kernel, against the
float64 reference (gradcheck included). Here: the kernel builds where a compiler is, the previous
ATen-composition engine still passes the same matrix, the fallback when the build fails (one warning),
NaN in masked keys, determinism across thread counts, memory, engine selection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_attention_matrix import CASES, GRADCHECK, TORCH_ONLY, check_case, make_inputs, run
from test_attention_matrix import test_gradcheck_torch_float64 as gradcheck_case

import sparse_attn as sa
from sparse_attn.backends import cpu_kernel
from sparse_attn.reference import attention_reference

ROOT = Path(__file__).resolve().parents[1]
HAS_TOOLCHAIN = shutil.which("c++") is not None and shutil.which("ninja") is not None


def attend(q, k, v, pattern, **kw):
    return sa.sparse_attention(q, k, v, pattern, backend="torch", return_lse=True, **kw)


@pytest.fixture
def engine(monkeypatch):
    """Select an engine for one test: ``engine("aten")``."""
    return lambda name: monkeypatch.setenv(cpu_kernel.ENGINE_ENV, name)


@pytest.fixture
def fresh_build_state(monkeypatch):
    """Forget whether the kernel was built, so a test can simulate a failed build; restored afterwards."""
    monkeypatch.setattr(cpu_kernel, "_modules", {})
    monkeypatch.setattr(cpu_kernel, "_build_errors", {})


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="no C++ compiler or ninja: the fallback test covers this")
def test_kernel_builds_where_a_compiler_is():
    """With a compiler (CI has one) the kernel must build: "auto" must not fall back silently."""
    assert cpu_kernel.load(strict=True) is not None
    assert cpu_kernel.active()


@pytest.mark.parametrize("name", list(CASES) + list(TORCH_ONLY))
def test_previous_engine_matches_reference(name, engine):
    """The ATen-composition engine (the fallback, and the benchmark's "previous backend") stays exact."""
    engine("aten")
    check_case({**CASES, **TORCH_ONLY}[name], "torch")


@pytest.mark.parametrize("name", list(GRADCHECK)[:2])
def test_previous_engine_gradcheck(name, engine):
    engine("aten")
    gradcheck_case(name)


def test_failed_build_falls_back_with_one_warning(monkeypatch, fresh_build_state):
    """No compiler: the ATen engine runs, with one clear warning for the whole process."""

    def no_compiler(isa):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpu_kernel, "_build", no_compiler)
    monkeypatch.delenv(cpu_kernel.ENGINE_ENV, raising=False)
    case = CASES["bigbird"]
    qkv, _ = make_inputs(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(lambda q, k, v: attend(q, k, v, case.pattern), qkv, torch.float32)
        run(lambda q, k, v: attend(q, k, v, case.pattern), qkv, torch.float32)
    ours = [w for w in caught if "could not build the C++ CPU attention kernel" in str(w.message)]
    assert len(ours) == 1 and "c++: command not found" in str(ours[0].message)
    assert not cpu_kernel.active()
    truth = run(lambda q, k, v: attention_reference(q, k, v, case.pattern), qkv, torch.float64)
    for g, t in zip(got, truth, strict=True):
        assert (g.double() - t).nan_to_num(0.0, 0.0, 0.0).abs().max() < 1e-5
    # Asking for the kernel explicitly is an error, not a silent fallback.
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "kernel")
    with pytest.raises(cpu_kernel.KernelUnavailable, match="command not found"):
        attend(*(t.float() for t in qkv), case.pattern)


def test_engine_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="engine must be one of"):
        cpu_kernel.set_engine("fast")
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "fast")
    with pytest.raises(ValueError, match="SPARSE_ATTN_CPU_ENGINE must be one of"):
        cpu_kernel.get_engine()


def test_set_engine_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "kernel")
    try:
        cpu_kernel.set_engine("aten")
        assert cpu_kernel.get_engine() == "aten" and not cpu_kernel.active()
    finally:
        cpu_kernel.set_engine(None)
    assert cpu_kernel.get_engine() == "kernel"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_masked_keys_changes_nothing(dtype):
    """Keys hidden by key_mask may hold NaN: outputs and every gradient equal the clean run's, exactly."""
    case = CASES["key-mask-left-gqa"]
    qkv, key_mask = make_inputs(case)
    hidden = ~key_mask[:, None, :, None]
    dirty = [qkv[0], *(t.masked_fill(hidden, float("nan")) for t in qkv[1:])]
    fn = lambda q, k, v: attend(q, k, v, case.pattern, key_mask=key_mask)
    clean_run, dirty_run = run(fn, qkv, dtype), run(fn, dirty, dtype)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), clean_run, dirty_run, strict=True):
        assert not b.isnan().any(), name
        assert torch.equal(a, b), name


def test_same_result_for_any_thread_count():
    """Every task writes its own rows (no atomics): 1 and 2 threads give bitwise equal results."""
    case = CASES["per-head"]
    qkv, _ = make_inputs(case)
    fn = lambda q, k, v: attend(q, k, v, case.pattern)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(fn, qkv, torch.float32)
        torch.set_num_threads(2)
        two = run(fn, qkv, torch.float32)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_layouts_with_unequal_block_sizes():
    """Blocks of 32 queries x 48 keys: tiles and transposed tiles of different shapes."""
    for case in (CASES["bigbird"], CASES["sq>skv-empty-rows"]):
        qkv, _ = make_inputs(case)
        skv = case.sq if case.skv is None else case.skv
        layout = case.pattern.layout(case.sq, skv, block_size=(32, 48))
        got = run(lambda q, k, v, lay=layout: attend(q, k, v, lay), qkv, torch.float32)
        truth = run(lambda q, k, v, p=case.pattern: attention_reference(q, k, v, p), qkv, torch.float64)
        for g, t in zip(got, truth, strict=True):
            assert torch.equal(g.isinf(), t.isinf())
            assert (g.double() - t).nan_to_num(0.0, 0.0, 0.0).abs().max() < 1e-5


def test_inference_mode():
    qkv, _ = make_inputs(CASES["window"])
    q, k, v = (t.float() for t in qkv)
    with torch.inference_mode():
        out = sa.sparse_attention(q, k, v, CASES["window"].pattern, backend="torch")
    truth, _ = attention_reference(*qkv, CASES["window"].pattern)
    assert (out.double() - truth).abs().max() < 1e-5


# A fresh process: a 16k-token window, forward + backward; prints the peak resident-set rise (MiB).
MEMORY_CHILD = r"""
import torch, sparse_attn as sa
torch.set_num_threads(2)
seq, heads, dim = 16384, 2, 32
q, k, v = (torch.randn(1, heads, seq, dim, requires_grad=True) for _ in range(3))
sa.sparse_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], sa.sliding_window(128), backend="torch")
def rss(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
before = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
out = sa.sparse_attention(q, k, v, sa.sliding_window(256), backend="torch")
out.backward(torch.ones_like(out))
print((rss("VmHWM:") - before) / 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux /proc peak-RSS reset")
def test_16k_window_memory_is_linear(monkeypatch):
    """q, k, v, out, their gradients and the kernel's transposed copies: ~50 MiB of 4 MiB tensors here;
    one fp32 S x S score matrix per head would be 1 GiB."""
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "kernel")
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, check=True, timeout=300
    )
    rise_mib = float(done.stdout.strip().splitlines()[-1])
    assert rise_mib < 120, f"peak memory rose by {rise_mib:.0f} MiB"


def test_benchmark_quick_run(tmp_path):
    """The benchmark runs both engines, SDPA, the fraction of ideal and the score-modifier overhead, and
    saves its JSON and PNG."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import cpu_attention
    finally:
        sys.path.pop(0)
    argv = ["--quick", "--no-memory", "--repeats", "1", "--dtypes", "float32", "--out", str(tmp_path)]
    assert cpu_attention.main(argv) == 0
    results = json.loads((tmp_path / "cpu_attention-quick-cpu.json").read_text())
    for case in cpu_attention.CASES:
        lower = {f"sparse_attn_{isa}" for isa in results["isa"]["kernel_isas"][1:]}
        assert set(results["float32"][case]) == {"sparse_attn", "previous", "sdpa"} | lower
        fractions = results["float32"]["fraction_of_ideal"][case]
        assert all(f["wall_s"] > 0 and f["cpu_s"] > 0 for f in fractions.values())
    mods = results["modifiers"]
    assert set(mods["forward"]) == set(cpu_attention.MODIFIERS)
    assert set(mods["forward_backward"]) == {"none", "all"}
    assert mods["ratio_to_none"]["forward"]["none"] == {"wall_s": 1.0, "cpu_s": 1.0}
    assert all(r["cpu_s"] > 0 for r in mods["ratio_to_none"]["forward"].values())
    assert (tmp_path / "cpu_attention-quick-cpu.png").stat().st_size > 0


def test_benchmark_modifiers_only_quick_run(tmp_path):
    """`--modifiers-only` runs the score-modifier case alone and saves it under its own name."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import cpu_attention
    finally:
        sys.path.pop(0)
    assert cpu_attention.main(["--quick", "--modifiers-only", "--repeats", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "cpu_attention_modifiers-quick-cpu.json").read_text())
    assert "float32" not in results and "memory_fwd_bwd" not in results
    assert set(results["modifiers"]["ratio_to_none"]["forward"]) == set(cpu_attention.MODIFIERS)
    assert (tmp_path / "cpu_attention_modifiers-quick-cpu.png").stat().st_size > 0


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    """`make gpu-check` on a machine without CUDA: a clear message, exit 0, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `make gpu-check` runs the real check")
    env = {**os.environ, "SPARSE_ATTN_GPU_CHECK_DIR": str(tmp_path / "out")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert not (tmp_path / "out").exists()
