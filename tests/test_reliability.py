"""Real use (issue 12): inference mode, odd strides, threads, garbage in padding, huge scales, double
backward, determinism. Each test here failed before its fix."""

import threading
import time

import pytest
import torch

import sparse_attn as sa
from sparse_attn.backends import torch_backend
from sparse_attn.reference import attention_reference


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- 1. inference mode -----------------------------------------------------------------------------------
def test_inference_mode_with_several_worker_tasks(monkeypatch):
    """Worker threads must run in the caller's inference mode (an inference tensor cannot be updated in
    place outside it). 8 heads x 1024 tokens split into many tasks; 2 workers even on a 1-core runner."""
    monkeypatch.setenv(torch_backend.WORKERS_ENV, "2")
    q, k, v = (randn(1, 8, 1024, 32, seed=s) for s in range(3))
    pattern = sa.longformer(128, 4)
    want = sa.sparse_attention(q, k, v, pattern, backend="torch")
    with torch.inference_mode():
        got = sa.sparse_attention(q, k, v, pattern, backend="torch")
        assert got.is_inference()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Scratch kept from the inference-mode call is reused by a normal (differentiable) call.
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    sa.sparse_attention(*leaves, pattern, backend="torch").sum().backward()


# -- 2. memory formats at ragged lengths -------------------------------------------------------------------
@pytest.mark.parametrize(
    "layout_of",
    [
        lambda t: t.contiguous(memory_format=torch.channels_last),
        lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),  # [B, S, H, D] storage (SDPA's usual)
        lambda t: torch.stack([t, t], -1)[..., 0],  # last-dim stride 2
    ],
    ids=["channels_last", "bshd", "strided_last_dim"],
)
def test_any_memory_format_at_ragged_lengths(layout_of):
    q, k, v = (randn(1, 2, 90, 16, seed=s, dtype=torch.float64).requires_grad_() for s in range(3))
    args = [layout_of(t.detach()).requires_grad_() for t in (q, k, v)]
    pattern = sa.causal() | sa.global_tokens(3)
    got = sa.sparse_attention(*args, pattern, backend="torch")
    want = attention_reference(q, k, v, pattern.mask(90))[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad_out = layout_of(randn(1, 2, 90, 16, seed=9, dtype=torch.float64))
    got_grads = torch.autograd.grad(got, args, grad_out)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# -- 3. layout caches under threads ------------------------------------------------------------------------
def _hammer(fn, threads=8, seconds=2.0):
    """Run `fn(thread, i)` from several threads for about `seconds`; return the exceptions raised."""
    errors, stop = [], time.monotonic() + seconds
    lock = threading.Lock()

    def work(t):
        i = 0
        while time.monotonic() < stop:
            try:
                fn(t, i)
            except Exception as e:  # noqa: BLE001 - collected and reported by the test
                with lock:
                    errors.append(e)
                return
            i += 1

    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + 30)
    assert not any(w.is_alive() for w in workers), "a thread hung"
    return errors


def test_module_layout_cache_is_thread_safe():
    module = sa.SparseAttention(sa.sliding_window(3), cache_size=2)
    lengths = list(range(1, 13))

    def call(t, i):
        n = lengths[(t * 5 + i) % len(lengths)]
        layout = module.prepare(n, n)
        assert (layout.q_len, layout.kv_len) == (n, n)

    assert _hammer(call) == []


def test_pattern_layout_cache_is_thread_safe():
    pattern = sa.sliding_window(3) | sa.global_tokens(1)
    lengths = list(range(1, 3 * sa.patterns.base.LAYOUT_CACHE_SIZE))

    def call(t, i):
        n = lengths[(t * 7 + i) % len(lengths)]
        layout = pattern.layout(n, n, block_size=4)
        assert (layout.q_len, layout.kv_len) == (n, n)

    assert _hammer(call) == []


# -- 4. garbage in masked keys -------------------------------------------------------------------------------
BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
def test_garbage_in_masked_keys_and_values_changes_nothing(backend, garbage):
    q, k, v = (randn(2, 2, 128, 16, seed=s) for s in range(3))
    key_mask = torch.ones(2, 128, dtype=torch.bool)
    key_mask[0, 5] = key_mask[0, 70:] = key_mask[1, :3] = False
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[~key_mask.view(2, 1, 128).expand(2, 2, 128)] = garbage
    dirty_v[~key_mask.view(2, 1, 128).expand(2, 2, 128)] = garbage
    pattern = sa.causal()
    results = []
    for kk, vv in ((k, v), (dirty_k, dirty_v)):
        leaves = [t.clone().requires_grad_() for t in (q, kk, vv)]
        out, lse = sa.sparse_attention(*leaves, pattern, key_mask=key_mask, return_lse=True, backend=backend)
        (out * randn(*out.shape, seed=5)).sum().backward()
        results.append((out, lse, *(t.grad for t in leaves)))
    for clean, dirty in zip(*results, strict=True):
        assert not dirty.isnan().any()
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
