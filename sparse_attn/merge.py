"""`merge_attention`: combine attention computed over disjoint key shards, exactly.

Sequence- and context-parallel (ring) attention split the keys into shards, attend each query to every
shard separately, and merge. With ``lse_i`` the logsumexp of shard i, the full softmax gives shard i the
weight ``exp(lse_i - lse)`` where ``lse = logsumexp_i(lse_i)``, so

    out = sum_i exp(lse_i - lse) * out_i.

Empty shards (``lse_i = -inf``) get weight 0; a query that sees no key in any shard gets out 0 and
lse -inf, as `sparse_attention` gives. Differentiable in every ``out_i`` and ``lse_i``, never NaN.
"""

from __future__ import annotations

import torch


def merge_attention(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-shard ``(out_i [..., S, D], lse_i [..., S])`` into the attention over all shards.

    Args:
        outs: a sequence of outputs over disjoint key shards, each ``[B, H, S, D]`` (any leading dims).
        lses: their natural-log logsumexps, each ``[B, H, S]`` (``sparse_attention(..., return_lse=True)``).

    Returns:
        ``(out, lse)``: out in the outputs' dtype, lse in the lses' dtype.
    """
    outs, lses = _check(outs, lses)
    return merge_stacked(torch.stack(outs), torch.stack(lses))


def merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_attention` over shards stacked on the first dim, ``outs [n, ..., S, D]``, ``lses [n, ..., S]``,
    unchecked: for callers whose shards come from one kernel (split-KV decode), with no host read."""
    peak = lses.amax(0)
    # A query empty in every shard has peak -inf; shift by 0 there so nothing becomes inf - inf.
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(lses - peak)  # exp(-inf) = 0 for empty shards
    total = weights.sum(0)
    has_key = total > 0
    safe_total = torch.where(has_key, total, torch.ones_like(total))
    lse = torch.where(has_key, peak + torch.log(safe_total), torch.full_like(peak, float("-inf")))
    shares = weights / safe_total  # [n, ..., S]
    acc_dtype = torch.promote_types(outs.dtype, torch.float32)
    # A shard's rows of weight 0 are left out, not multiplied by 0: some attention kernels write NaN (not 0)
    # for a query with no visible key, and 0 * NaN would spread it.
    out = (shares[..., None].to(acc_dtype) * torch.where(shares[..., None] > 0, outs.to(acc_dtype), 0.0)).sum(
        0
    )
    return out.to(outs.dtype), lse


def merge_pair(out1, lse1, out2, lse2, out, lse):
    """Merge two segments over disjoint keys into `out` and `lse` (which may alias a segment: every element
    is read before it is written), in place and without autograd; returns ``(out, lse)``. The PyTorch
    backend's inner step: the weight of segment 2 is ``exp(lse2 - lse) = sigmoid(lse2 - lse1)``."""
    # NaN only when both segments are empty (-inf): weight 0 then, and both outputs are 0.
    w2 = torch.sigmoid(lse2 - lse1).nan_to_num_(0.0).unsqueeze(-1)
    torch.logaddexp(lse1, lse2, out=lse)
    if out1.dtype in (torch.float32, torch.float64):
        torch.lerp(out1, out2, w2.to(out1.dtype), out=out)
    else:
        out.copy_(torch.lerp(out1.float(), out2.float(), w2.float()))
    return out, lse


def _check(outs, lses):
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"expected as many outs as lses (at least one), got {len(outs)} and {len(lses)}")
    for i, (o, s) in enumerate(zip(outs, lses, strict=True)):
        if not isinstance(o, torch.Tensor) or not isinstance(s, torch.Tensor):
            raise TypeError(f"outs[{i}] and lses[{i}] must be tensors")
        if o.shape[:-1] != s.shape:
            raise ValueError(
                f"outs[{i}] must be [..., S, D] with lses[{i}] [..., S]; "
                f"got {tuple(o.shape)} and {tuple(s.shape)}"
            )
        if o.shape != outs[0].shape or o.dtype != outs[0].dtype or s.dtype != lses[0].dtype:
            raise ValueError(f"all shards must share shapes and dtypes; shard {i} differs from shard 0")
    for i, s in enumerate(lses):
        # -inf (no key in the shard) and finite values are lses; NaN or +inf would poison the merge. Checked
        # eagerly only (a data-dependent branch would break a torch.compile graph).
        if not torch.compiler.is_compiling() and bool((s.isnan() | s.isposinf()).any()):
            raise ValueError(
                f"lses[{i}] holds NaN or +inf; an lse is finite, or -inf for a query with no key"
            )
    return outs, lses
