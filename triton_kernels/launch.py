"""Launchers for the block-sparse attention kernels: allocate, pick a config, build the grid, call.

`attention_fwd` returns ``(out, lse)``; `attention_bwd` returns ``(dq, dk, dv, d_rel_bias)`` (d_rel_bias None
without a rel_bias). Both take the score modifiers as a `sparse_attn.score_mods.ScoreMods` or None: each
modifier is a constexpr flag (HAS_SOFTCAP, HAS_ALIBI, HAS_REL_BIAS), so a call without one compiles to the
kernels it always had. No autograd here (that is `sparse_attn._ops`). Configs are a short list per kernel, pruned by head dim (`configs_for`) and by the
layout block size (a tile must divide it); the autotune key is head dim, layout block, dtype and flags,
never a sequence length.

Pinning: under the interpreter (``TRITON_INTERPRET=1``), with ``SPARSE_ATTN_PIN_CONFIG=1`` or with the module
switch ``PIN_CONFIG = True``, the first fitting config runs and nothing is benchmarked; a launcher's
``config=`` argument forces one config (the autotune sweep test uses that).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from .bsattn import DIAG_CHUNK as _DIAG_CHUNK
from .bsattn import (
    _bsattn_bwd_dkdv_kernel,
    _bsattn_bwd_dq_kernel,
    _bsattn_bwd_preprocess,
    _bsattn_fwd_kernel,
    _bsattn_rel_bias_reduce,
)

#: Run the first fitting config instead of autotuning.
PIN_CONFIG = False
PREPROCESS_BLOCK_M = 64
LOG2E = math.log2(math.e)
#: Diagonals per chunk of the rel_bias gradient's reduction (the kernels' constexpr, as an int).
DIAG_CHUNK = int(_DIAG_CHUNK.value)


@dataclass(frozen=True)
class TileConfig:
    """One kernel config: the tile (BLOCK_M queries x BLOCK_N keys), warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    #: ptxas' register ceiling (``.maxnreg``); None leaves ptxas its own choice, which for some tiles is 128
    #: registers and a few spilled bytes rather than more registers.
    maxnreg: int | None = None

    def kwargs(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}

    def __str__(self) -> str:
        regs = f"-r{self.maxnreg}" if self.maxnreg else ""
        return f"M{self.block_m}xN{self.block_n}-w{self.num_warps}-s{self.num_stages}{regs}"

    def options(self) -> dict:
        """Compile options: warps, stages and (if set) the register ceiling."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return opts | ({"maxnreg": self.maxnreg} if self.maxnreg else {})


# Shipped configs per kernel and head-dim class (<= 64, <= 128, <= 256), best guess first (the first fitting
# one is the pinned config). Every config at head dim <= 128 compiles for sm_80 and sm_90a, fp16 and bf16,
# in all 16 variants of the EVEN_M/EVEN_N/HAS_KEY_MASK/PER_HEAD_LAYOUT flags, with no spills and on tensor
# cores (`python -m sparse_attn kernel-report`; ptxas allocates each variant on its own); head dim 256
# configs were checked spill-free on sm_80 with `--head-dims 256`. Pruned by that report: at head dim 128,
# 64x64 forward/dQ tiles with 4 warps and 64-key dK/dV tiles with 4 warps; at head dim <= 64, the 64x64
# 8-warp dQ tile (spills in the common even, unmasked variants) and the 32x32 4-warp dK/dV tile (held at
# 128 registers, it spills with a key mask and an even axis), replaced by the same tile with 2 warps.
# 32x32 tiles are the fallback that fits 32-row (32-key) layout blocks.
_C = TileConfig
SHIPPED_CONFIGS = {
    "fwd": {
        64: [_C(64, 64, 4, 3), _C(64, 32, 4, 3), _C(32, 32, 4, 2)],
        # 32x32 at D=128 with 8 warps: with 4 it spilled (12 B) on sm_90a in key-mask variants.
        128: [_C(64, 64, 8, 2), _C(64, 32, 4, 3), _C(32, 32, 8, 2)],
        256: [_C(64, 32, 8, 2), _C(32, 32, 8, 2)],
    },
    "dkdv": {
        64: [_C(32, 64, 8, 2), _C(32, 32, 2, 2)],
        128: [_C(32, 64, 8, 2), _C(32, 32, 4, 2)],
        256: [_C(32, 32, 8, 2)],
    },
    "dq": {
        64: [_C(64, 32, 4, 2), _C(32, 32, 4, 2)],
        # 32x32 at D=128 with 8 warps: with 4 it spilled (44 B) on sm_90a in key-mask variants.
        128: [_C(64, 32, 4, 2), _C(64, 64, 8, 2), _C(32, 32, 8, 2)],
        256: [_C(32, 32, 8, 2), _C(64, 32, 8, 2)],
    },
    # dK/dV with any score modifier. At head dim 64 the 32x64 8-warp tile already holds 248 registers on sm_80
    # and spills with a softcap or a rel_bias (24-32 B), the 2-warp 32x32 one with all three; the 4-warp 32x32
    # tile with one stage is clean once ptxas may use more than 128 registers (it chose 128 and spilled 8-24 B
    # in even variants on sm_90a). At head dim 128 the 32x64 8-warp tile spilled 4 B with all three on sm_90a.
    "dkdv_mods": {
        64: [_C(32, 32, 4, 1, maxnreg=255)],
        128: [_C(32, 32, 4, 2)],
        256: [_C(32, 32, 8, 2)],
    },
    # dQ with a rel_bias: the tile also reduces dS along its diagonals through a [BLOCK_M, BLOCK_M + BLOCK_N]
    # skewed copy, so it takes square 32x32 tiles (the buffers of the per-tile sums are sized for them).
    "dq_rel": {
        64: [_C(32, 32, 4, 2)],
        128: [_C(32, 32, 8, 2)],
        256: [_C(32, 32, 8, 2)],
    },
}
#: The dQ tile of rel_bias calls, and the per-tile diagonal sums it stores (entry 0 is always 0).
REL_BIAS_TILE = 32
REL_BIAS_DIAGS = 2 * REL_BIAS_TILE
#: Warps of the rel_bias reduction (one 32-diagonal chunk per program).
REDUCE_NUM_WARPS = 1
assert all(
    (c.block_m, c.block_n) == (REL_BIAS_TILE, REL_BIAS_TILE)
    for cs in SHIPPED_CONFIGS["dq_rel"].values()
    for c in cs
)


def family_for(kernel: str, softcap=False, alibi=False, rel_bias=False) -> str:
    """The config family (key of SHIPPED_CONFIGS) kernel "fwd", "dkdv" or "dq" runs with for these modifiers."""
    if kernel == "dq" and rel_bias:
        return "dq_rel"
    if (softcap or alibi or rel_bias) and f"{kernel}_mods" in SHIPPED_CONFIGS:
        return f"{kernel}_mods"
    return kernel


def configs_for(kernel: str, head_dim: int) -> list[TileConfig]:
    """The shipped configs of `kernel` ("fwd", "dkdv", "dq") for a head dim."""
    for limit in (64, 128, 256):
        if head_dim <= limit:
            return SHIPPED_CONFIGS[kernel][limit]
    raise ValueError(f"head dim {head_dim} is over 256")


def fits(config: TileConfig, block_q: int, block_k: int) -> bool:
    """A tile fits a layout block when it divides it in both directions."""
    return block_q % config.block_m == 0 and block_k % config.block_n == 0


def fitting_configs(kernel: str, head_dim: int, block_q: int, block_k: int) -> list[TileConfig]:
    """Shipped configs whose tile divides the layout block; ValueError when none does."""
    found = [c for c in configs_for(kernel, head_dim) if fits(c, block_q, block_k)]
    if not found:
        tiles = sorted({(c.block_m, c.block_n) for c in configs_for(kernel, head_dim)})
        raise ValueError(
            f"layout block size ({block_q}, {block_k}) must be a multiple of a kernel tile; the Triton kernels "
            f"at head dim {head_dim} use tiles (BLOCK_M, BLOCK_N) in {tiles}"
        )
    return found


def pinned() -> bool:
    """True when launches use one config instead of autotuning (always under the interpreter)."""
    return (
        PIN_CONFIG
        or os.environ.get("SPARSE_ATTN_PIN_CONFIG") == "1"
        or os.environ.get("TRITON_INTERPRET") == "1"
    )


# -- kernel wrappers: heuristics (EVEN_*) always; autotuning built lazily, on first unpinned launch -------
# Even at layout-block granularity: a tile divides its layout block, so no tile or sub-tile then crosses the end.
_even_m = lambda args: args["q_len"] % args["LAYOUT_BQ"] == 0
_even_n = lambda args: args["kv_len"] % args["LAYOUT_BK"] == 0
_KERNELS = {
    "fwd": triton.heuristics({"EVEN_M": _even_m, "EVEN_N": _even_n})(_bsattn_fwd_kernel),
    "dkdv": triton.heuristics({"EVEN_M": _even_m, "EVEN_N": _even_n})(_bsattn_bwd_dkdv_kernel),
    "dq": triton.heuristics({"EVEN_M": _even_m, "EVEN_N": _even_n})(_bsattn_bwd_dq_kernel),
    "dq_rel": triton.heuristics({"EVEN_M": _even_m, "EVEN_N": _even_n})(_bsattn_bwd_dq_kernel),
    "dkdv_mods": triton.heuristics({"EVEN_M": _even_m, "EVEN_N": _even_n})(_bsattn_bwd_dkdv_kernel),
}
_AUTOTUNE_KEY = [
    "HEAD_DIM", "LAYOUT_BQ", "LAYOUT_BK", "PER_HEAD_LAYOUT", "PER_BATCH_LAYOUT", "HAS_KEY_MASK", "DOT_PRECISION",
    "HAS_SOFTCAP", "HAS_ALIBI", "HAS_REL_BIAS",
]  # fmt: skip
_autotuned: dict = {}


def _autotuned_kernel(name: str):
    """`triton.autotune` over every shipped config of `name`, pruned per launch by head dim and layout block."""
    if name not in _autotuned:
        every = {
            c: triton.Config(c.kwargs(), **c.options()) for d in (64, 128, 256) for c in configs_for(name, d)
        }

        def prune(configs, named_args, **kwargs):
            keep = fitting_configs(name, kwargs["HEAD_DIM"], kwargs["LAYOUT_BQ"], kwargs["LAYOUT_BK"])
            return [every[c] for c in keep]

        _autotuned[name] = triton.autotune(
            configs=list(every.values()), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune}
        )(_KERNELS[name])
    return _autotuned[name]


def _launch(name: str, grid, args: list, meta: dict, config: TileConfig | None, block_q: int, block_k: int):
    """Run kernel `name` with `config`, the first fitting config (pinned) or the autotuner's choice."""
    fitting = fitting_configs(name, meta["HEAD_DIM"], block_q, block_k)
    if config is None and not pinned() and len(fitting) > 1:
        _autotuned_kernel(name)[grid](*args, **meta)
        return
    config = config or fitting[0]
    if not fits(config, block_q, block_k):
        raise ValueError(f"config {config} does not fit layout block size ({block_q}, {block_k})")
    _KERNELS[name][grid](*args, **meta, **config.kwargs(), **config.options())


# -- helpers ----------------------------------------------------------------------------------------------
def empty_buffer(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh contiguous buffer for a kernel to write (the tests wrap it to fill it with NaN first)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """Kernels take a pointer even to an unused, empty index array: give them one valid element."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _with_strides(t: torch.Tensor) -> list:
    """A tensor argument as the kernels take it: the pointer, then its four strides."""
    return [t, *t.stride()]


def _common_meta(q: torch.Tensor, layout, key_mask, mods=None) -> dict:
    head_dim = q.shape[-1]
    return {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": max(16, triton.next_power_of_2(head_dim)),
        "LAYOUT_BQ": layout.block_q,
        "LAYOUT_BK": layout.block_k,
        "WORDS": -(-layout.block_k // 32),
        "PER_HEAD_LAYOUT": layout.num_heads > 1,
        "PER_BATCH_LAYOUT": layout.batch is not None and layout.batch > 1,
        "HAS_KEY_MASK": key_mask is not None,
        # fp32 stays exact fp32 math (no TF32) so it matches the fp32 reference.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "HAS_SOFTCAP": mods is not None and mods.softcap is not None,
        "HAS_ALIBI": mods is not None and mods.alibi_slopes is not None,
        "HAS_REL_BIAS": mods is not None and mods.rel_bias is not None,
    }


def _mod_args(mods, q, layout) -> list:
    """``softcap2, Slopes, stride_slb, RelBias, stride_rbh, rb_zero``: the modifiers in log2 units, as the
    kernels take them (the scores are in log2 units): ``c * log2(e)``, float32 slopes ``[1 or B, Hq]`` times
    log2(e) with their batch stride (0 when shared), float32 ``rel_bias * log2(e)`` ``[Hq, Sq + Skv - 1]``
    padded with zeros on both sides to the layout-block-rounded lengths (every tile's diagonals fall inside:
    no masked loads), its row stride and where diagonal 0 sits; dummies when absent."""
    softcap2, slopes, stride_slb, rel_bias, stride_rbh, rb_zero = 0.0, q, 0, q, 0, 0
    if mods is not None and mods.softcap is not None:
        softcap2 = float(mods.softcap) * LOG2E
    if mods is not None and mods.alibi_slopes is not None:
        slopes = (mods.alibi_slopes.to(torch.float32) * LOG2E).contiguous()
        stride_slb = slopes.shape[1] if slopes.shape[0] > 1 else 0
    if mods is not None and mods.rel_bias is not None:
        g = layout.geometry
        rb_zero = g.num_q_blocks * g.block_q - g.q_len
        pad_right = g.num_k_blocks * g.block_k - g.kv_len
        rel_bias = torch.nn.functional.pad(mods.rel_bias.to(torch.float32) * LOG2E, (rb_zero, pad_right))
        stride_rbh = rel_bias.shape[1]
    return [softcap2, slopes, stride_slb, rel_bias, stride_rbh, rb_zero]


def _key_mask_arg(key_mask, q) -> list:
    """uint8 ``[B, Skv]`` key mask and its batch stride (a dummy pointer when absent)."""
    if key_mask is None:
        return [q, 0]
    # The kernels index keys with unit stride; `.to` alone keeps a transposed view's strides.
    km = key_mask.to(torch.uint8).contiguous()
    return [km, km.stride(0)]


def _row_lists(layout):
    return [_nonempty(getattr(layout, n)) for n in ("row_full_ptr", "row_full_idx", "row_part_ptr", "row_part_idx",
                                                     "row_part_tile", "tiles")]  # fmt: skip


def _col_lists(layout):
    return [_nonempty(getattr(layout, n)) for n in ("col_full_ptr", "col_full_idx", "col_part_ptr", "col_part_idx",
                                                     "col_part_tile", "tiles")]  # fmt: skip


# -- launchers ----------------------------------------------------------------------------------------------
def attention_fwd(q, k, v, layout, scale: float, key_mask=None, config: TileConfig | None = None, mods=None):
    """Forward: ``(out [B, Hq, Sq, D] like q, lse [B, Hq, Sq] float32)``; `mods` a ScoreMods or None."""
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    out = empty_buffer(q.shape, like=q)
    lse = empty_buffer((batch, heads, q_len), like=q, dtype=torch.float32)
    args = [*_with_strides(q), *_with_strides(k), *_with_strides(v), *_with_strides(out), lse]
    args += [*_key_mask_arg(key_mask, q), *_row_lists(layout)]
    args += [heads, heads // kv_heads, q_len, kv_len, layout.num_q_blocks, layout.num_heads, scale * LOG2E]
    args += _mod_args(mods, q, layout)
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)
    _launch(
        "fwd", grid, args, _common_meta(q, layout, key_mask, mods), config, layout.block_q, layout.block_k
    )
    return out, lse


def attention_bwd(
    do, dlse, q, k, v, out, lse, layout, scale: float, key_mask=None, configs: dict | None = None, mods=None
):
    """Backward: ``(dq, dk, dv, d_rel_bias)``, the first three shaped like q, k, v; d_rel_bias like
    ``mods.rel_bias`` (its dtype), or None without one. `configs` may force {"dkdv": ..., "dq": ...} (and
    "dq_rel", the dQ config of rel_bias calls)."""
    configs = configs or {}
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    meta = _common_meta(q, layout, key_mask, mods)
    mod_args = _mod_args(mods, q, layout)
    lse = lse.float().contiguous()
    delta = empty_buffer((batch, heads, q_len), like=q, dtype=torch.float32)
    has_dlse = dlse is not None
    dlse_arg = dlse.float().contiguous() if has_dlse else lse
    pre_grid = (triton.cdiv(q_len, PREPROCESS_BLOCK_M), batch * heads)
    _bsattn_bwd_preprocess[pre_grid](
        *_with_strides(out), *_with_strides(do), dlse_arg, lse, delta, heads, q_len,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=meta["HEAD_DIM_PAD"], HAS_DLSE=has_dlse, BLOCK_M=PREPROCESS_BLOCK_M,
    )  # fmt: skip

    dq = empty_buffer(q.shape, like=q)
    dk = empty_buffer(k.shape, like=k)
    dv = empty_buffer(v.shape, like=v)
    inputs = [*_with_strides(q), *_with_strides(k), *_with_strides(v), *_with_strides(do), lse, delta]
    key_mask_arg = _key_mask_arg(key_mask, q)
    args = [*inputs, *_with_strides(dk), *_with_strides(dv), *key_mask_arg, *_col_lists(layout)]
    args += [
        heads,
        kv_heads,
        heads // kv_heads,
        q_len,
        kv_len,
        layout.num_k_blocks,
        layout.num_heads,
        scale * LOG2E,
        scale,
        *mod_args,
    ]
    grid = lambda m: (triton.cdiv(kv_len, m["BLOCK_N"]), batch * kv_heads)
    flags = (meta["HAS_SOFTCAP"], meta["HAS_ALIBI"], meta["HAS_REL_BIAS"])
    _launch(family_for("dkdv", *flags), grid, args, meta, configs.get("dkdv"), layout.block_q, layout.block_k)

    args = [*inputs, *_with_strides(dq), *key_mask_arg, *_row_lists(layout)]
    args += [
        heads,
        heads // kv_heads,
        q_len,
        kv_len,
        layout.num_q_blocks,
        layout.num_heads,
        scale * LOG2E,
        scale,
        *mod_args,
    ]
    grid = lambda m: (triton.cdiv(q_len, m["BLOCK_M"]), batch * heads)
    if not meta["HAS_REL_BIAS"]:
        args += [q, q, 0, 0, 0, 0]
        _launch(family_for("dq", *flags), grid, args, meta, configs.get("dq"), layout.block_q, layout.block_k)
        return dq, dk, dv, None
    rel = _RelBiasGrad(layout, batch, heads, q_len, kv_len, q.device)
    args += [rel.part, rel.keys, rel.num_full_entries, rel.part_groups, rel.num_chunks, rel.chunk_shift]
    # Forced with configs={"dq_rel": ...}: the buffers are sized for REL_BIAS_TILE tiles.
    _launch(family_for("dq", *flags), grid, args, meta, configs.get("dq_rel"), layout.block_q, layout.block_k)
    return dq, dk, dv, rel.reduce(mods.rel_bias.dtype)


class _RelBiasGrad:
    """d rel_bias without atomics, in memory proportional to the kept tiles.

    1. The dQ kernel (32x32 tiles, one program per query tile and (batch, head)) stores each visited tile's
       64 per-diagonal sums of dS in `part` ``[slots, part_groups, 64]``: a slot per (layout entry, key
       sub-tile, query sub-tile) of the layout's row lists (unique, so no two programs write one place), a
       column per (batch, head) sharing the layout sequence; and in `keys[slot]` the sort key of the tile's
       first 32-diagonal chunk (``head_key * num_chunks + chunk index``; slots no program visits keep the
       sentinel, sorted last and never read).
    2. Here: the two chunks of every slot, sorted by key (a stable sort: the order is the slots' order), and
       the offsets of each key in that order (`searchsorted`).
    3. `_bsattn_rel_bias_reduce`: one program per (32-diagonal chunk, head) adds its tile chunks, and the
       batch columns, in that fixed order. Every step has a fixed order, so the result is bitwise
       reproducible; the diagonals are then sliced out of the chunk grid.
    """

    def __init__(self, layout, batch, heads, q_len, kv_len, device):
        tile = REL_BIAS_TILE
        per_head, per_batch = layout.num_heads > 1, layout.batch is not None and layout.batch > 1
        subs = (layout.block_q // tile) * (layout.block_k // tile)
        self.num_full_entries = _nonempty(layout.row_full_idx).numel()
        n_slots = (self.num_full_entries + _nonempty(layout.row_part_idx).numel()) * subs
        self.batch_groups = 1 if per_batch else batch
        self.part_groups = self.batch_groups * (1 if per_head else heads)
        self.head_keys = heads if per_head else 1
        self.heads, self.per_head, self.q_len, self.kv_len = heads, per_head, q_len, kv_len
        # Diagonal j - i of a tile's entry 0 is n_start - m_start - 32 >= -ceil(Sq / 32) * 32 = -chunk_shift.
        self.chunk_shift = triton.cdiv(q_len, tile) * tile
        self.num_chunks = (self.chunk_shift + layout.num_k_blocks * layout.block_k) // DIAG_CHUNK
        self.sentinel = self.head_keys * self.num_chunks
        self.part = empty_buffer((n_slots, self.part_groups, REL_BIAS_DIAGS), like=torch.empty(0, device=device),
                                 dtype=torch.float32)  # fmt: skip
        self.keys = torch.full((n_slots,), self.sentinel, dtype=torch.int32, device=device)

    def reduce(self, dtype) -> torch.Tensor:
        per_tile = REL_BIAS_DIAGS // DIAG_CHUNK
        item_keys = (self.keys.long()[:, None] + torch.arange(per_tile, device=self.keys.device)).flatten()
        sorted_keys, order = torch.sort(item_keys, stable=True)
        bounds = torch.arange(self.sentinel + 1, device=self.keys.device)
        chunk_ptr = torch.searchsorted(sorted_keys, bounds).to(torch.int32)
        out = empty_buffer((self.heads, self.num_chunks * DIAG_CHUNK), like=self.part)
        _bsattn_rel_bias_reduce[(self.num_chunks, self.heads)](
            self.part, order.to(torch.int32), chunk_ptr, out,
            self.num_chunks, self.part_groups, self.batch_groups, self.heads,
            DIAGS=REL_BIAS_DIAGS, PER_HEAD_LAYOUT=self.per_head, num_warps=REDUCE_NUM_WARPS,
        )  # fmt: skip
        # Chunk grid position p holds diagonal j - i = p - chunk_shift, i.e. rel_bias index p - chunk_shift + Sq - 1.
        first = self.chunk_shift - self.q_len + 1
        return out[:, first : first + self.q_len + self.kv_len - 1].to(dtype)
