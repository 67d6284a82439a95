"""Score modifiers: logit soft-capping, ALiBi and a learned relative-position bias. One home for their
checks, their positions and their dense math (the reference); the backends apply the same math per tile.

For a visible pair (query row i, key j) with ``qpos = i + Skv - Sq`` (bottom-right alignment) and
``rel = j - qpos``, the score is, in this order:

- ``s = scale * q_i . k_j``;
- ``softcap`` c: ``s = c * tanh(s / c)`` (Gemma 2), derivative ``1 - tanh(s / c)**2``;
- ``alibi_slopes`` m ``[Hq]`` or ``[B, Hq]``: ``s += -m[b, h] * |rel|`` (FlashAttention's convention: a
  positive slope penalises distant keys, in either direction);
- ``rel_bias`` ``[Hq, Sq + Skv - 1]``: ``s += rel_bias[h, rel + Skv - 1]`` (index ``j - i + Sq - 1``): a
  per-head bias that depends only on the relative position, differentiable; its gradient is the sum of dS
  over each diagonal;
- then the mask (invisible pairs get -inf, whatever the modifiers gave them).

A modifier costs no S x S tensor in any backend: the bias of a tile is computed from its row and column
positions (ALiBi) or gathered from the ``Sq + Skv - 1`` diagonals (rel_bias).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

#: The softcaps float32 scores take (fp16, bf16, fp32 inputs): c and 1 / c stay far inside float32's range.
MIN_SOFTCAP, MAX_SOFTCAP = 2.0**-64, 2.0**64


@dataclass(frozen=True)
class ScoreMods:
    """Checked modifiers of one call (see the module docstring). `alibi_slopes` is float32 (float64 if given so)
    ``[B or 1, Hq]`` contiguous; `rel_bias` is ``[Hq, Sq + Skv - 1]`` contiguous in its own floating dtype."""

    softcap: float | None = None
    alibi_slopes: torch.Tensor | None = None
    rel_bias: torch.Tensor | None = None

    @property
    def any(self) -> bool:
        return self.softcap is not None or self.alibi_slopes is not None or self.rel_bias is not None


def check_score_mods(softcap, alibi_slopes, rel_bias, q: torch.Tensor, k: torch.Tensor) -> ScoreMods | None:
    """The call's modifiers, checked against q ``[B, Hq, Sq, D]`` and k ``[B, Hkv, Skv, D]``; None when
    there are none. Raises TypeError/ValueError naming what was expected."""
    batch, heads, q_len = q.shape[0], q.shape[1], q.shape[2]
    kv_len = k.shape[2]
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be a positive real number or None, got {softcap!r}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a finite number > 0, got {softcap!r}")
        softcap = float(softcap)
        if q.dtype != torch.float64 and not MIN_SOFTCAP <= softcap <= MAX_SOFTCAP:
            # Scores are float32 below float64: a cap (or its inverse, which the kernels multiply by) outside
            # float32's normal range becomes inf or 0 there, and the kernels would return garbage or NaN.
            raise ValueError(
                f"softcap must lie in [2**-64, 2**64] for {q.dtype} inputs (scores are computed in float32), "
                f"got {softcap!r}; pass softcap=None for no cap"
            )
    if alibi_slopes is not None:
        _check_float_tensor("alibi_slopes", alibi_slopes, q)
        if alibi_slopes.shape not in ((heads,), (batch, heads)):
            raise ValueError(
                f"alibi_slopes must be [Hq={heads}] or [B={batch}, Hq={heads}], got {tuple(alibi_slopes.shape)}"
            )
        if alibi_slopes.requires_grad:
            raise ValueError(
                "alibi_slopes get no gradient (as in FlashAttention): pass a tensor that does not require "
                "grad (e.g. alibi_slopes.detach())"
            )
        # float32 (what the kernels compute in), float64 kept for float64 oracles.
        dtype = torch.float64 if alibi_slopes.dtype == torch.float64 else torch.float32
        alibi_slopes = alibi_slopes.to(dtype).reshape(-1, heads).contiguous()
    if rel_bias is not None:
        _check_float_tensor("rel_bias", rel_bias, q)
        want = (heads, q_len + kv_len - 1)
        if tuple(rel_bias.shape) != want:
            raise ValueError(
                f"rel_bias must be [Hq={heads}, Sq + Skv - 1={want[1]}] (Sq={q_len}, Skv={kv_len}), "
                f"got {tuple(rel_bias.shape)}"
            )
        rel_bias = rel_bias.contiguous()
    mods = ScoreMods(softcap, alibi_slopes, rel_bias)
    return mods if mods.any else None


def _check_float_tensor(name: str, t, q: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on {q.device} (q's device), got {t.device}")


def relative_positions(rows: torch.Tensor, cols: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """``j - qpos`` for query rows `rows` ``[..., M]`` and keys `cols` ``[..., N]``: ``[..., M, N]`` int64."""
    return cols[..., None, :] - (rows[..., :, None] + (kv_len - q_len))


def modify_scores(
    scores: torch.Tensor, rel: torch.Tensor, mods: ScoreMods | None, heads, kv_len: int, batch=None
) -> torch.Tensor:
    """Scores ``[..., M, N]`` (already scaled) after softcap and the biases, in `scores`' dtype.

    `rel` is ``j - qpos`` broadcastable to the scores; `heads` the query head (an int tensor broadcastable
    to ``scores.shape[:-2]``); `batch` the batch element (for ``[B, Hq]`` slopes; None when the
    slopes are shared). Differentiable in `scores` and in `mods.rel_bias`.
    """
    if mods is None:
        return scores
    if mods.softcap is not None:
        scores = mods.softcap * torch.tanh(scores / mods.softcap)
    if mods.alibi_slopes is not None:
        slopes = mods.alibi_slopes
        slope = slopes[0 if batch is None or slopes.shape[0] == 1 else batch, heads]
        scores = scores - slope.to(scores.dtype)[..., None, None] * rel.abs().to(scores.dtype)
    if mods.rel_bias is not None:
        bias = mods.rel_bias.to(scores.dtype)[heads[..., None, None], rel + (kv_len - 1)]
        scores = scores + bias
    return scores
