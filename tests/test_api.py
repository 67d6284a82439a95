"""The public function's input validation, and the reference oracle's own edge cases."""

import pytest
import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.reference import attention_reference


def qkv(b=1, hq=2, hkv=1, sq=8, skv=8, d=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, hq, sq, d, generator=gen, dtype=dtype),
        torch.randn(b, hkv, skv, d, generator=gen, dtype=dtype),
        torch.randn(b, hkv, skv, d, generator=gen, dtype=dtype),
    )


def test_reference_dense_equals_sdpa_with_gqa():
    q, k, v = qkv(b=2, hq=4, hkv=2, sq=13, skv=21, dtype=torch.float64)
    out, lse = attention_reference(q, k, v, None)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(out, expected)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4.0
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


def test_reference_empty_rows_are_zero_with_finite_gradients():
    q, k, v = (t.double().requires_grad_() for t in qkv(sq=6, skv=6))
    key_mask = torch.tensor([[False, False, False, True, True, True]])
    out, lse = attention_reference(q, k, v, sa.causal(), key_mask=key_mask)
    # Rows 0-2 see only padded keys.
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.isinf(lse[:, :, :3]).all() and (lse[:, :, :3] < 0).all()
    assert torch.isfinite(lse[:, :, 3:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :3], torch.zeros_like(q.grad[:, :, :3]))


def test_sparse_attention_dense_pattern_equals_sdpa():
    q, k, v = qkv(b=2, hq=2, hkv=2, sq=37, skv=37, dtype=torch.float64)
    full = sa.sliding_window(100)
    torch.testing.assert_close(sa.sparse_attention(q, k, v, full), F.scaled_dot_product_attention(q, k, v))
    causal = sa.sparse_attention(q, k, v, sa.causal())
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_layout_and_pattern_give_the_same_result():
    q, k, v = qkv(sq=50, skv=70)
    pattern = sa.longformer(5, 2)
    layout = pattern.layout(50, 70, block_size=16)
    out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, pattern)
    torch.testing.assert_close(out, ref_out)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 50)
    torch.testing.assert_close(lse, ref_lse)


def call(**overrides):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, "pattern_or_layout": sa.causal()}
    kwargs = {
        k_: overrides.pop(k_)
        for k_ in list(overrides)
        if k_ in ("scale", "key_mask", "backend", "return_lse")
    }
    args.update(overrides)
    return sa.sparse_attention(args["q"], args["k"], args["v"], args["pattern_or_layout"], **kwargs)


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        ({"q": torch.randn(2, 8, 16)}, ValueError, "4-D"),
        ({"k": torch.randn(1, 1, 8, 8), "v": torch.randn(1, 1, 8, 8)}, ValueError, "D=16"),
        ({"k": torch.randn(2, 1, 8, 16), "v": torch.randn(2, 1, 8, 16)}, ValueError, "B=1"),
        ({"v": torch.randn(1, 1, 9, 16)}, ValueError, "same shape"),
        ({"k": torch.randn(1, 3, 8, 16), "v": torch.randn(1, 3, 8, 16)}, ValueError, "multiple"),
        ({"q": torch.randn(1, 2, 8, 16, dtype=torch.float16)}, TypeError, "dtype"),
        ({"q": torch.randint(0, 3, (1, 2, 8, 16))}, TypeError, "float"),
        ({"q": [1, 2]}, TypeError, "torch.Tensor"),
        ({"v": torch.randn(1, 1, 8, 16, dtype=torch.float64)}, TypeError, "share a dtype"),
        (
            {"q": torch.randn(0, 2, 8, 16), "k": torch.randn(0, 1, 8, 16), "v": torch.randn(0, 1, 8, 16)},
            ValueError,
            "B=0",
        ),
        ({"q": torch.randn(1, 0, 8, 16)}, ValueError, "Hq=0"),
        ({"q": torch.randn(1, 2, 0, 16)}, ValueError, "Sq=0"),
        ({"pattern_or_layout": sa.causal().layout(8, 9)}, ValueError, "kv_len=9"),
        ({"pattern_or_layout": "causal"}, TypeError, "Pattern or a BlockLayout"),
        ({"pattern_or_layout": sa.causal().layout(9)}, ValueError, "q_len=9"),
        ({"pattern_or_layout": sa.per_head([sa.causal()] * 3)}, ValueError, "3 heads"),
        ({"pattern_or_layout": sa.per_head([sa.causal()] * 3).layout(8)}, ValueError, "heads"),
        ({"key_mask": torch.ones(1, 8)}, TypeError, "bool"),
        ({"key_mask": torch.ones(1, 7, dtype=torch.bool)}, ValueError, "Skv=8"),
        (
            {"key_mask": torch.ones(1, 8, dtype=torch.bool, device="meta")},
            ValueError,
            "key_mask must be on cpu",
        ),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"scale": "big"}, TypeError, "scale"),
        ({"scale": float("nan")}, TypeError, "scale"),
    ],
)
def test_bad_input_names_what_was_expected(overrides, error, message):
    with pytest.raises(error, match=message):
        call(**overrides)


def test_mismatched_devices_are_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="device"):
        sa.sparse_attention(q, k.to("meta"), v, sa.causal())


def test_triton_backend_head_dim_limits():
    q, k, v = qkv(d=8)
    with pytest.raises(ValueError, match="head dims 16 to 256"):
        sa.sparse_attention(q, k, v, sa.causal(), backend="triton")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sa.sparse_attention(q, k, v, sa.causal(), backend="triton")


def test_import_does_not_pull_optional_dependencies():
    import subprocess
    import sys

    code = (
        "import sys, sparse_attn; "
        "bad = [m for m in ('triton', 'transformers', 'xformers', 'matplotlib') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_top_level_triton_kernels_is_not_shadowed(tmp_path):
    """Installed, our kernels are `sparse_attn.triton_kernels`; a top-level `triton_kernels` is Triton's, not ours."""
    import subprocess
    import sys

    code = (
        "import importlib.util as u; ours = u.find_spec('sparse_attn.triton_kernels'); "
        "top = u.find_spec('triton_kernels'); "
        "print(ours.origin); print(top.origin if top else None)"
    )
    # Run outside the checkout, so the repository folder itself is not on sys.path.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours, top = result.stdout.split()
    assert ours.endswith("triton_kernels/__init__.py")
    assert top == "None" or top != ours
