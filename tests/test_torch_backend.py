"""PyTorch-backend specifics: chunking, the strided and gathered paths, memory, dtypes, the benchmark smoke run.

Correctness of every case against the reference lives in `test_attention_matrix.py`; this file checks what
only the PyTorch backend's ATen-composition engine has (the C++ kernel engine: `test_cpu_kernel.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_attn as sa
from sparse_attn import backends
from sparse_attn.backends import cpu_kernel
from sparse_attn.backends import torch_backend as tb
from sparse_attn.backends.torch_backend import planning
from sparse_attn.layout import BlockLayout
from sparse_attn.reference import attention_reference

ROOT = Path(__file__).resolve().parents[1]


def fwd_bwd(q, k, v, pattern, **kw):
    """(out, lse, dq, dk, dv) through the public function and the torch backend."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = sa.sparse_attention(*leaves, pattern, backend="torch", return_lse=True, **kw)
    g = torch.Generator().manual_seed(5)
    (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum().backward()
    return [out.detach(), lse, *(t.grad for t in leaves)]


def inputs(b=1, hq=2, hkv=2, sq=300, skv=None, d=32, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    skv = sq if skv is None else skv
    return [torch.randn(b, h, s, d, generator=g, dtype=dtype) for h, s in ((hq, sq), (hkv, skv), (hkv, skv))]


PATTERNS = {
    "window": sa.sliding_window(70),
    "bigbird": sa.bigbird(window=40, global_tokens=10, num_random_blocks=2, block_size=32),
    "per-head-gqa": sa.per_head(
        [sa.sliding_window(30), sa.causal(), sa.global_tokens(3), sa.sliding_window(5)]
    ),
}


@pytest.fixture(autouse=True)
def aten_engine(monkeypatch):
    """Every test here runs the ATen-composition engine (subprocesses inherit the variable)."""
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "aten")


@pytest.fixture
def restore_chunk_size():
    before = tb.get_chunk_size()
    yield
    tb.set_chunk_size(before)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_chunk_size_changes_nothing(name, restore_chunk_size):
    hq = 4 if name == "per-head-gqa" else 2
    q, k, v = inputs(hq=hq, hkv=2)
    key_mask = torch.ones(1, 300, dtype=torch.bool)
    key_mask[0, 250:] = False
    default = fwd_bwd(q, k, v, PATTERNS[name], key_mask=key_mask)
    tb.set_chunk_size(1)  # one row of the layout per kernel call
    tiny = fwd_bwd(q, k, v, PATTERNS[name], key_mask=key_mask)
    for a, b in zip(default, tiny, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), (a - b).abs().max()


def gather_everything(monkeypatch):
    """Turn off every copy-free path: no band pass, no strided runs; each row's blocks are gathered."""
    monkeypatch.setattr(BlockLayout, "cached", lambda self, key, compute: compute())  # plans made anew
    monkeypatch.setattr(planning, "_MIN_RUN", 10**9)
    monkeypatch.setattr(
        planning,
        "_split_runs",
        lambda rows, full, part, tiles, n, merge: [tb.Call(rows, full, part, tiles, n, 0, merge)],
    )


def test_gathered_path_matches_strided_path(monkeypatch):
    """The copy-free strided K/V views give the same result as gathering every block."""
    q, k, v = inputs()
    pattern = sa.sliding_window(100)
    calls = [
        c
        for calls in tb.plan(pattern.layout(300, block_size=backends.get("torch").default_block_size))
        for c in calls
    ]
    assert any(c.step for c in calls), "the window should use strided views"
    strided = fwd_bwd(q, k, v, pattern)
    gather_everything(monkeypatch)
    gathered = fwd_bwd(q, k, v, pattern)
    for a, b in zip(strided, gathered, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


BANDED = {
    "longformer": sa.longformer(70, global_tokens=32),
    "bigbird": sa.bigbird(window=64, global_tokens=32, num_random_blocks=2, block_size=32, seed=3),
    "per-head": sa.per_head([sa.sliding_window(40) | sa.global_tokens(64), sa.longformer(90, 33)]),
}


@pytest.mark.parametrize("name", list(BANDED))
@pytest.mark.parametrize("masked", [False, True], ids=["no-key-mask", "key-mask"])
def test_band_pass_matches_gathering(name, masked, monkeypatch, restore_chunk_size):
    """Bands taken out of scattered full blocks (pass 1) and merged with the rest (pass 2) give the
    same forward and gradients as gathering every block, with the band path really taken."""
    seq, block = 1030, 32
    layout = BANDED[name].layout(seq, block_size=block)
    band_calls, _ = tb.plan(layout)
    assert band_calls and all(c.step > 0 and c.part.shape[1] == 0 for c in band_calls)
    assert sum(len(c.rows) for c in band_calls) > layout.num_q_blocks // 2
    q, k, v = inputs(b=2, hq=2, hkv=1 if name != "per-head" else 2, sq=seq, d=16)
    key_mask = torch.ones(2, seq, dtype=torch.bool)
    key_mask[1, :37] = False  # left padding in one sequence
    key_mask = key_mask if masked else None
    tb.set_chunk_size(1 << 15)  # several chunks per call
    banded = fwd_bwd(q, k, v, layout, key_mask=key_mask)
    gather_everything(monkeypatch)
    passes = tb.passes(layout, tb.Problem(q, k, v, layout, 1.0, None), False)
    assert len(passes) == 1 and not any(c.step for c in passes[0])
    gathered = fwd_bwd(q, k, v, layout, key_mask=key_mask)
    for a, b in zip(banded, gathered, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    out, lse = attention_reference(q, k, v, BANDED[name], key_mask=key_mask)
    assert torch.allclose(banded[0], out, atol=1e-12, rtol=0)
    assert torch.equal(torch.isinf(banded[1]), torch.isinf(lse))


def test_set_chunk_size_rejects_bad_values(restore_chunk_size):
    for bad in (0, -5, 2.5, True, "64"):
        with pytest.raises(ValueError, match="chunk size"):
            tb.set_chunk_size(bad)
    tb.set_chunk_size(12345)
    assert tb.get_chunk_size() == 12345


def test_chunk_size_from_environment():
    code = "from sparse_attn.backends import torch_backend as tb; print(tb.get_chunk_size())"
    env = {**os.environ, tb.CHUNK_ENV: "4321"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "4321"


def test_all_true_key_mask_equals_no_key_mask():
    q, k, v = inputs(dtype=torch.float32)
    pattern = sa.sliding_window(50)
    with_mask = fwd_bwd(q, k, v, pattern, key_mask=torch.ones(1, 300, dtype=torch.bool))
    without = fwd_bwd(q, k, v, pattern)
    for a, b in zip(with_mask, without, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_of_outputs_and_grads(dtype):
    q, k, v = inputs(dtype=dtype, sq=97)
    out, lse, dq, dk, dv = fwd_bwd(q, k, v, sa.sliding_window(20))
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    truth, _ = attention_reference(q.double(), k.double(), v.double(), sa.sliding_window(20))
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert (out.double() - truth).abs().max().item() < tolerance


def test_inference_mode_and_no_grad():
    q, k, v = inputs(dtype=torch.float32, sq=97)
    with torch.inference_mode():
        out = sa.sparse_attention(q, k, v, sa.sliding_window(20), backend="torch")
    truth, _ = attention_reference(q, k, v, sa.sliding_window(20))
    assert (out - truth).abs().max().item() < 1e-5


# Runs in a fresh process: a 16k-token window, forward + backward; prints the peak resident-set rise (MiB).
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


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_16k_window_forward_backward_never_builds_s_by_s():
    """One fp32 S x S score matrix per head would be 1 GiB here; the whole fwd + bwd stays far below."""
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, check=True)
    rise_mib = float(done.stdout.strip().splitlines()[-1])
    assert rise_mib < 400, f"peak memory rose by {rise_mib:.0f} MiB"


def test_concurrent_calls_do_not_share_scratch():
    """Scratch is cached per thread between calls; two threads at once must not see each other's."""
    from concurrent.futures import ThreadPoolExecutor

    q, k, v = inputs(dtype=torch.float32)
    patterns = [
        sa.sliding_window(70),
        sa.bigbird(window=40, global_tokens=10, num_random_blocks=2, block_size=32),
    ]
    expected = [sa.sparse_attention(q, k, v, p, backend="torch") for p in patterns]
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda i: sa.sparse_attention(q, k, v, patterns[i % 2], backend="torch"), range(8))
        )
    for i, out in enumerate(results):
        assert torch.equal(out, expected[i % 2])
    tb.release_scratch()
    assert torch.equal(sa.sparse_attention(q, k, v, patterns[0], backend="torch"), expected[0])


def test_worker_threads_match_single_thread_and_are_deterministic(monkeypatch, restore_chunk_size):
    """Chunks on the worker pool give the same forward as the caller's thread, and a repeatable backward."""
    tb.set_chunk_size(1 << 16)  # many chunks, so the workers really share them
    q, k, v = inputs(b=2, hq=4, hkv=2, sq=1100, d=32, dtype=torch.float32)
    pattern = sa.bigbird(window=100, global_tokens=16, num_random_blocks=2, block_size=64)
    monkeypatch.setenv(tb.WORKERS_ENV, "2")
    layout = pattern.layout(1100, block_size=64)
    passes = tb.passes(layout, tb.Problem(q, k, v, layout, 0.1, None), True)
    assert sum(map(len, passes)) > 4
    pooled = fwd_bwd(q, k, v, pattern)
    again = fwd_bwd(q, k, v, pattern)
    monkeypatch.setenv(tb.WORKERS_ENV, "0")
    inline = fwd_bwd(q, k, v, pattern)
    for a, b, c in zip(pooled, again, inline, strict=True):
        assert torch.equal(a, b)
        # Multi-threaded kernels reduce in another order: fp32 rounding, relative to the values' size.
        assert torch.allclose(a, c, atol=1e-6 * float(c.abs().max()), rtol=1e-5)


def _attention_in_child(queue):
    # As DataLoader workers do: OpenMP itself is not fork-safe once the parent has used its threads.
    torch.set_num_threads(1)
    q, k, v = inputs(sq=1100, d=32, dtype=torch.float32)
    out = sa.sparse_attention(q, k, v, sa.sliding_window(100), backend="torch")
    queue.put(out.sum().item())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_worker_pool_after_fork(monkeypatch, restore_chunk_size):
    """A forked child inherits the pool object but not its threads; it must start its own, not hang.

    The child uses 1 torch thread (OpenMP is not fork-safe), but SPARSE_ATTN_TORCH_WORKERS=2 still asks
    for the pool."""
    import multiprocessing

    monkeypatch.setenv(tb.WORKERS_ENV, "2")
    tb.set_chunk_size(1 << 16)
    q, k, v = inputs(sq=1100, d=32, dtype=torch.float32)
    expected = sa.sparse_attention(q, k, v, sa.sliding_window(100), backend="torch").sum().item()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_attention_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("attention in a forked child hung")
    assert child.exitcode == 0
    assert abs(queue.get(timeout=5) - expected) < 1e-3


def test_plan_is_made_once_per_layout(monkeypatch):
    """The grouping of rows into kernel calls is cached on the (immutable) layout, not redone per call."""
    layout = sa.longformer(70, global_tokens=32).layout(1030, block_size=32)
    q, k, v = inputs(sq=1030, d=16)
    calls = []
    plan = planning.plan
    monkeypatch.setattr(planning, "plan", lambda lay: calls.append(lay) or plan(lay))
    first = fwd_bwd(q, k, v, layout)
    second = fwd_bwd(q, k, v, layout)
    assert len(calls) == 1  # the ops rebuild the layout from its tensors; the plan is shared
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
