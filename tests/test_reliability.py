"""Real use (issue 12): inference mode, odd strides, threads, garbage in padding, huge scales, double
backward, determinism. Each test here failed before its fix."""

import threading
import time

import pytest
import torch

import sparse_attn as sa
from sparse_attn.backends import torch_backend
from sparse_attn.cli import BENCH_SCRIPTS
from sparse_attn.reference import attention_reference


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- 1. inference mode -----------------------------------------------------------------------------------
def test_inference_mode_with_several_worker_tasks(monkeypatch):
    """Worker threads must run in the caller's inference mode (an inference tensor cannot be updated in
    place outside it). 4 heads x 1024 tokens split into many tasks; 2 workers even on a 1-core runner."""
    monkeypatch.setenv(torch_backend.WORKERS_ENV, "2")
    q, k, v = (randn(1, 4, 1024, 16, seed=s) for s in range(3))
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


@pytest.mark.parametrize(
    "backend, garbage",
    [("torch", float("nan")), ("torch", float("inf")), ("torch", -float("inf")), ("triton", float("nan"))],
)
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


# -- 5. huge scales ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_huge_scale_is_exact_up_to_the_bound_and_rejected_beyond(backend, dtype):
    q, k, v = (randn(1, 1, 64, 16, seed=s, dtype=dtype) for s in range(3))
    mask = sa.causal().mask(64)
    for scale in (1e6, 2.0**64):  # near-argmax attention: every row picks its best key
        got = sa.sparse_attention(q, k, v, sa.causal(), scale=scale, backend=backend)
        want = attention_reference(q.double(), k.double(), v.double(), mask, scale=scale)[0]
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3)
    for scale in (1e38, -1e300):
        with pytest.raises(ValueError, match=r"\|scale\| must be <= 2\*\*64"):
            sa.sparse_attention(q, k, v, sa.causal(), scale=scale, backend=backend)


def test_float64_takes_any_finite_scale():
    q, k, v = (randn(1, 1, 64, 16, seed=s, dtype=torch.float64) for s in range(3))
    got = sa.sparse_attention(q, k, v, sa.causal(), scale=1e300, backend="torch")
    want = attention_reference(q, k, v, sa.causal().mask(64), scale=1e300)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# -- 6. double backward --------------------------------------------------------------------------------------
def test_double_backward_names_the_limitation():
    q, k, v = (randn(1, 2, 64, 16, seed=s, dtype=torch.float64).requires_grad_() for s in range(3))
    out = sa.sparse_attention(q, k, v, sa.causal(), backend="torch")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)  # create_graph alone is fine
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        dq.square().sum().backward()


# -- 7. errors that say what was expected, fast ----------------------------------------------------------------
def _cpu_tensor(*shape):
    return torch.zeros(*shape)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: sa.global_tokens(None), TypeError, "int n or a sequence of int positions"),
        (lambda: sa.global_tokens([[1, 2]]), TypeError, "1-D sequence of ints"),
        (lambda: sa.causal().layout(100, block_size=10**9), ValueError, "block_size 1000000000 x"),
        (lambda: sa.causal().layout(100, block_size=8192), ValueError, "at most 4,194,304"),
        (lambda: sa.replace_attention(3, sa.causal()), TypeError, "takes an nn.Module"),
        (lambda: sa.per_head(sa.causal()), TypeError, "sequence of Patterns, one per head"),
        (lambda: sa.SparseMultiheadAttention(64, 2.0), TypeError, "num_heads must be a positive int"),
        (
            lambda: sa.sparse_attention(*[_cpu_tensor(1, 1, 8, 16)] * 3, sa.causal(), return_lse="no"),
            TypeError,
            "return_lse must be True or False",
        ),
        (
            lambda: sa.sparse_attention(*[torch.zeros(1, 1, 8, 16, device="meta")] * 3, sa.causal()),
            ValueError,
            "got meta tensors",
        ),
        (
            lambda: sa.merge_attention(
                [_cpu_tensor(1, 1, 4, 8)] * 2, [torch.full((1, 1, 4), float("nan"))] * 2
            ),
            ValueError,
            "lses\\[0\\] holds NaN or \\+inf",
        ),
        (
            lambda: sa.merge_attention(
                [_cpu_tensor(1, 1, 4, 8)] * 2, [torch.zeros(1, 1, 4), torch.full((1, 1, 4), float("inf"))]
            ),
            ValueError,
            "lses\\[1\\] holds NaN or \\+inf",
        ),
    ],
)
def test_bad_input_fails_fast_naming_what_was_expected(make, error, message):
    start = time.perf_counter()
    with pytest.raises(error, match=message):
        make()
    assert time.perf_counter() - start < 1.0


def test_huge_global_token_counts_cost_nothing_until_used():
    start = time.perf_counter()
    for n in (10**8, 10**12, 2**63):
        pattern = sa.global_tokens(n)
        assert repr(pattern) == f"global_tokens({n})"
        # Only the first kv_len positions exist: every pair of a 100-token sequence is visible.
        assert bool(pattern.layout(100, block_size=64).to_dense().all())
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "causal", "--seq", "-5"], "--seq must be >= 1, got -5"),
        (["show", "causal", "--seq", "10", "--kv-seq", "0"], "--kv-seq must be >= 1, got 0"),
        (["bench"], f"required: name ({', '.join(sorted(BENCH_SCRIPTS))})"),
    ],
)
def test_cli_errors_name_the_flag(argv, message, capsys, tmp_path):
    from sparse_attn.cli import main

    try:
        code = main([*argv, "-o", str(tmp_path / "x.png")] if argv[0] == "show" else argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


# -- 8. determinism across thread settings ---------------------------------------------------------------------
def test_results_are_bitwise_independent_of_threads_and_workers(monkeypatch):
    """Forward and gradients are the same bits with 1 or 2 threads and any SPARSE_ATTN_TORCH_WORKERS:
    chunk bounds (which fix the order dK/dV add up in) depend on the machine's CPU count only."""
    # Calls of 32 rows: old code cut them into 32- or 16-row chunks for 1 or 2 workers.
    pattern = sa.per_head([sa.sliding_window(64 * (h + 1), 0) | sa.global_tokens(1) for h in range(2)])
    q, grad_out = randn(1, 2, 2048, 16, seed=0), randn(1, 2, 2048, 16, seed=3)
    k, v = (randn(1, 1, 2048, 16, seed=s) for s in (1, 2))
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads, workers in ((1, ""), (2, ""), (2, "0"), (1, "3")):
            torch.set_num_threads(n_threads)
            monkeypatch.setenv(torch_backend.WORKERS_ENV, workers)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse = sa.sparse_attention(*leaves, pattern, return_lse=True, backend="torch")
            out.backward(grad_out)
            results.append((out, lse, *(t.grad for t in leaves)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


# -- property: NaN in every key the mask hides changes nothing ---------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_every_hidden_key_changes_nothing(backend):
    """Random patterns, lengths, GQA and key masks (left, right and scattered padding): the outputs, lse and
    gradients with NaN in every hidden key and value are bitwise those with clean ones."""
    gen = torch.Generator().manual_seed(12)
    atoms = [sa.causal(), sa.sliding_window(40), sa.global_tokens(3), sa.dilated(8, 8, 3)]
    for trial in range(1 if backend == "triton" else 12):
        pick = torch.randperm(len(atoms), generator=gen)[:2].tolist()
        pattern = atoms[pick[0]] | atoms[pick[1]] if trial % 2 else atoms[pick[0]] & atoms[pick[1]]
        q_len = int(torch.randint(1, 150, (), generator=gen))
        kv_len = int(torch.randint(q_len, 200, (), generator=gen))
        hkv = int(torch.randint(1, 3, (), generator=gen))
        key_mask = torch.rand(2, kv_len, generator=gen) < 0.8
        key_mask[0, : kv_len // 3] = False  # left padding
        key_mask[1, -kv_len // 4 :] = False  # right padding
        q = randn(2, 2 * hkv, q_len, 16, seed=trial)
        k, v = (randn(2, hkv, kv_len, 16, seed=100 + 2 * trial + s) for s in range(2))
        hidden = ~key_mask[:, None, :, None]
        grad_out = randn(2, 2 * hkv, q_len, 16, seed=7)
        results = []
        for kk, vv in ((k, v), (k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan")))):
            leaves = [t.clone().requires_grad_() for t in (q, kk, vv)]
            out, lse = sa.sparse_attention(
                *leaves, pattern, key_mask=key_mask, return_lse=True, backend=backend
            )
            out.backward(grad_out)
            results.append((out, lse, *(t.grad for t in leaves)))
        for clean, dirty in zip(*results, strict=True):
            assert torch.equal(clean, dirty), (trial, pattern, q_len, kv_len)
