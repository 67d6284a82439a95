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
