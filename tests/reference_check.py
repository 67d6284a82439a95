"""The comparison every backend test makes: a result against the float64 reference, within twice the error
the plain reference math has in the input dtype, plus a small floor (shared by the test matrix and the
Triton kernel tests)."""

from __future__ import annotations

import torch

FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NAMES = ("out", "lse", "dq", "dk", "dv")


def loss_of(out, lse, seed: int = 1):
    """A random linear loss of out and of the finite lse (so dlse is exercised)."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(out.device)
    finite = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
    return (out.double() * w_out).sum() + (finite.double() * w_lse).sum()


def max_err(got, truth) -> float:
    """Max abs error; -inf entries (empty rows' lse) must match exactly and are then left out."""
    got, truth = got.double(), truth.double()
    inf = truth.isinf()
    assert torch.equal(got.isinf(), inf), "-inf entries of lse differ from the reference"
    return (got - truth).masked_fill(inf, 0).abs().max().item() if got.numel() else 0.0


def assert_close_to_reference(got, truth, plain, dtype) -> None:
    """`got`, `truth` (float64) and `plain` (the reference in `dtype`) are ``(out, lse, dq, dk, dv)``."""
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, g, t, p in zip(NAMES, got, truth, plain, strict=True):
        assert not g.isnan().any(), f"{name} has NaN"
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert g.dtype == (lse_dtype if name == "lse" else dtype), f"{name}: dtype {g.dtype}"
        err, allowed = max_err(g, t), 2 * max_err(p, t) + FLOORS[dtype]
        assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g}"


# -- score modifiers (softcap, ALiBi, rel_bias): the same comparison with d_rel_bias as a sixth result ----------
NAMES_WITH_BIAS = (*NAMES, "d_rel_bias")
#: Named modifier sets the modifier tests parametrize over (see `make_mods`).
MOD_SETS = {
    "softcap": ("softcap",),
    "alibi": ("alibi",),
    "alibi-per-batch": ("alibi_batch",),
    "rel_bias": ("rel_bias",),
    "all": ("softcap", "alibi_batch", "rel_bias"),
}


def make_mods(names, b, hq, sq, skv, seed=1, softcap=1.5, max_slope=0.3) -> dict:
    """`sparse_attention` keyword arguments for the modifiers `names` (float64 tensors); a small `softcap`
    bends the scores."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    if "softcap" in names:
        mods["softcap"] = softcap
    if "alibi" in names:
        mods["alibi_slopes"] = torch.rand(hq, generator=g, dtype=torch.float64) * max_slope
    if "alibi_batch" in names:
        mods["alibi_slopes"] = torch.rand(b, hq, generator=g, dtype=torch.float64) * max_slope
    if "rel_bias" in names:
        mods["rel_bias"] = torch.randn(hq, sq + skv - 1, generator=g, dtype=torch.float64)
    return mods


def run_with_grads(fn, q, k, v, mods: dict, dtype):
    """``(out, lse, dq, dk, dv, d_rel_bias or None)`` of ``fn(q, k, v, **mods) -> (out, lse)`` on copies in
    `dtype`, the gradients those of `loss_of`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    mods = {n: (t.detach().to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in mods.items()}
    if "rel_bias" in mods:
        leaves.append(mods["rel_bias"].requires_grad_(True))
    out, lse = fn(*leaves[:3], **mods)
    grads = torch.autograd.grad(loss_of(out, lse), leaves)
    return (out.detach(), lse.detach(), *grads, *([None] if len(grads) == 3 else []))


def assert_close_with_mods(got, truth, plain, dtype) -> None:
    """`assert_close_to_reference` for ``(out, lse, dq, dk, dv, d_rel_bias)`` (d_rel_bias None when no
    rel_bias); the floor scales with the values' size (d_rel_bias sums dS over whole diagonals)."""
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, g, t, p in zip(NAMES_WITH_BIAS, got, truth, plain, strict=True):
        if t is None:
            assert g is None, f"{name} should be None"
            continue
        assert not g.isnan().any(), f"{name} has NaN"
        want_dtype = lse_dtype if name == "lse" else dtype
        assert g.shape == t.shape and g.dtype == want_dtype, f"{name}: {tuple(g.shape)} {g.dtype}"
        err = max_err(g, t)
        allowed = 2 * max_err(p, t) + FLOORS[dtype] * max(1.0, t.abs().max().item())
        assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g}"
