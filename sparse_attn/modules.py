"""Drop-in modules: `SparseAttention`, `SparseMultiheadAttention` and `replace_attention`.

`SparseAttention` is the thin module: q/k/v in SDPA's layout, a pattern, and a small cache of layouts keyed
by (lengths, heads, device), so a training loop builds each layout once. Under `torch.compile`
(``dynamic=False``) the layout is built at trace time and enters the graph as constants: no graph break,
forward or backward.

`SparseMultiheadAttention` is a `torch.nn.MultiheadAttention` (same constructor, forward, parameters and
state dict) whose attention goes through `sparse_attention` with a pattern. nn's masks keep nn's
conventions (True = NOT allowed / padding; float masks of 0 and -inf); they are intersected with the
pattern. A query that sees no key gets output 0 (nn gives NaN there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .api import sparse_attention
from .checks import check_int, check_size
from .layout import BlockLayout
from .layout_cache import LayoutCache
from .patterns import Pattern, causal, documents
from .patterns.token_mask import TokenMask
from .patterns.topk import selects
from .patterns.window import dense
from .reference import dense_mask
from .selection import select_layout


class SparseAttention(nn.Module):
    """`sparse_attention` as a module, with a bounded cache of layouts per (q_len, kv_len, heads, device).

    Args:
        pattern: the `Pattern` every call uses.
        scale: multiplies ``q @ k^T``; defaults to ``1 / sqrt(D)``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see `sparse_attention`).
        cache_size: how many layouts to keep (least recently used ones are dropped).
        softcap, alibi_slopes: score modifiers of every call, as in `sparse_attention` (the slopes ``[Hq]``
            are a buffer: they follow the module's device).

    ``forward(q, k, v, key_mask=None, return_lse=False, document_ids=None, rel_bias=None)`` takes SDPA's layout
    ``[B, H, S, D]``; `rel_bias` ``[Hq, Sq + Skv - 1]`` is a per-call relative-position bias (differentiable). `document_ids` (int ``[Skv]`` or ``[B, Skv]``, non-decreasing: packed documents) keeps
    this call's documents apart: ``documents(document_ids) & pattern``, built for the call (not cached).
    """

    def __init__(
        self,
        pattern: Pattern,
        *,
        scale: float | None = None,
        backend: str = "auto",
        cache_size: int = 8,
        softcap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ):
        super().__init__()
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a sparse_attn Pattern, got {type(pattern).__name__}")
        backends.check_name(backend)
        check_int("cache_size", cache_size, 1, wrong_type=ValueError)
        if alibi_slopes is not None and (
            not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dim() != 1
        ):
            raise ValueError("alibi_slopes must be a 1-D tensor [Hq] (one slope per query head) or None")
        self.pattern, self.scale, self.backend, self.cache_size = pattern, scale, backend, cache_size
        self.softcap = softcap
        self.register_buffer("alibi_slopes", alibi_slopes)
        self._layouts = LayoutCache(cache_size)

    def _key(self, q_len: int, kv_len: int, heads: int, device) -> tuple:
        device = torch.device(device)
        # "auto" is resolved here so that the key names the backend (and its block size) actually used.
        backend = (
            self.backend if self.backend != backends.AUTO else backends.resolve(self.backend, device).name
        )
        per_head = self.pattern.num_heads is not None
        return q_len, kv_len, heads if per_head else None, str(device), backend

    def prepare(self, q_len: int, kv_len: int | None = None, *, heads: int = 1, device="cpu") -> BlockLayout:
        """The layout for these sizes, built once and cached (least recently used ones are dropped)."""
        if selects(self.pattern):
            raise TypeError(
                f"{self.pattern!r} selects its blocks from q and k on every call: there is no layout to "
                "prepare from sizes (select_layout(pattern, q, k) gives one call's layout)"
            )
        kv_len = q_len if kv_len is None else kv_len
        key = self._key(q_len, kv_len, heads, device)
        return self._layouts.get(key, lambda: self._build(heads, *key))

    def _build(self, heads, q_len, kv_len, head_key, device_name, backend) -> BlockLayout:
        if self.pattern.num_heads is not None and self.pattern.num_heads != heads:
            raise ValueError(
                f"pattern defines {self.pattern.num_heads} heads, but the input has {heads} heads"
            )
        block = backends.get(backend).default_block_size
        return self.pattern.layout(q_len, kv_len, block_size=block, heads=head_key, device=device_name)

    def forward(self, q, k, v, key_mask=None, *, return_lse: bool = False, document_ids=None, rel_bias=None):
        """``sparse_attention(q, k, v, pattern, ...)`` with the cached layout."""
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError("q, k and v must be 4-D tensors [B, H, S, D]")
        if self.pattern.reorders_tokens:
            if document_ids is not None:
                raise ValueError(
                    "document_ids need row-major token order; tile_major patterns reorder tokens"
                )
            # The pattern's layout is in its own token order; sparse_attention permutes around it.
            layout = self.pattern
        elif document_ids is not None:
            layout = documents(document_ids) & self.pattern
        elif torch.compiler.is_compiling() or selects(self.pattern):
            # sparse_attention builds (or fetches) the pattern's layout at trace time, as graph constants;
            # a topk_blocks pattern is selected from q and k in every call.
            layout = self.pattern
        else:
            layout = self.prepare(q.shape[2], k.shape[2], heads=q.shape[1], device=q.device)
        return sparse_attention(
            q,
            k,
            v,
            layout,
            scale=self.scale,
            key_mask=key_mask,
            return_lse=return_lse,
            backend=self.backend,
            softcap=self.softcap,
            alibi_slopes=self.alibi_slopes,
            rel_bias=rel_bias,
        )

    def extra_repr(self) -> str:
        mods = f", softcap={self.softcap}" if self.softcap is not None else ""
        mods += ", alibi=True" if self.alibi_slopes is not None else ""
        return (
            f"pattern={self.pattern!r}, backend={self.backend!r}{mods}, cached_layouts={len(self._layouts)}"
        )


def _keep_off_fused_path(module, args):
    """A forward pre-hook that does nothing: its presence keeps nn.TransformerEncoderLayer off its fused path.

    In eval mode without gradients, `nn.TransformerEncoderLayer` would otherwise call
    ``torch._transformer_encoder_layer_fwd`` with `self_attn`'s weights, bypassing `self_attn.forward` (and
    so the pattern). It skips that path whenever any submodule has forward hooks.
    """
    return None


class SparseMultiheadAttention(nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` whose attention follows a sparsity `pattern`, exactly.

    Same constructor and forward as nn's, plus keyword-only `pattern` (None: dense) and `backend`.
    Supported: `batch_first`, `kdim`/`vdim`, `bias`, unbatched inputs, `key_padding_mask` (bool, True =
    padding, or float 0/-inf), `attn_mask` (bool, True = not allowed, or float 0/-inf; ``[L, S]`` or
    ``[N * num_heads, L, S]``), intersected with the pattern, `is_causal` (with an `attn_mask`, a hint as
    in nn: the mask decides; without one, where nn raises, it adds `causal()`, bottom-right aligned), and
    `need_weights` (weights recomputed densely from the kernel's logsumexp: O(L*S) memory,
    as nn's). Not supported, with a clear error: `add_bias_kv`, `add_zero_attn`, attention dropout in
    training mode, and float masks holding finite non-zero (additive bias) values.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
        *,
        pattern: Pattern | None = None,
        backend: str = "auto",
    ):
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise TypeError(f"num_heads must be a positive int, got {num_heads!r}")
        check_size("num_heads", num_heads)
        check_size("embed_dim", embed_dim)
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None:
                check_size(name, dim)
        if add_bias_kv:
            raise ValueError(
                "SparseMultiheadAttention does not support add_bias_kv=True (the appended bias key would sit "
                "outside every sparsity pattern); use add_bias_kv=False"
            )
        if add_zero_attn:
            raise ValueError(
                "SparseMultiheadAttention does not support add_zero_attn=True; use add_zero_attn=False"
            )
        super().__init__(
            embed_dim,
            num_heads,
            dropout,
            bias,
            add_bias_kv,
            add_zero_attn,
            kdim,
            vdim,
            batch_first,
            device,
            dtype,
        )
        pattern = dense() if pattern is None else pattern
        self.attention = SparseAttention(pattern, backend=backend)
        # is_causal=True uses this one, so both variants keep cached layouts (and compile without a break).
        self.causal_attention = SparseAttention(pattern & causal(), backend=backend)
        if self.attention.pattern.num_heads not in (None, num_heads):
            raise ValueError(
                f"pattern defines {self.attention.pattern.num_heads} heads, but num_heads={num_heads}"
            )
        self.register_forward_pre_hook(_keep_off_fused_path)

    @property
    def pattern(self) -> Pattern:
        return self.attention.pattern

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, pattern: Pattern | None, *, backend: str = "auto"):
        """A `SparseMultiheadAttention` with `mha`'s configuration and a copy of its weights."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_dense expects an nn.MultiheadAttention, got {type(mha).__name__}")
        weight = mha.out_proj.weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=weight.device,
            dtype=weight.dtype,
            pattern=pattern,
            backend=backend,
        )
        new.load_state_dict(mha.state_dict())
        # Frozen weights stay frozen (state_dict carries values only).
        frozen = {name for name, p in mha.named_parameters() if not p.requires_grad}
        for name, p in new.named_parameters():
            p.requires_grad_(name not in frozen)
        new.train(mha.training)
        return new

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
        *,
        document_ids=None,
    ):
        """nn.MultiheadAttention's forward; `document_ids` (int ``[S]`` or ``[N, S]`` over the keys,
        non-decreasing) keeps packed documents apart in this call (``documents(document_ids) & pattern``)."""
        if self.training and self.dropout > 0:
            raise ValueError(
                f"SparseMultiheadAttention cannot apply attention dropout ({self.dropout}) in training: "
                "the fused kernel never forms the attention matrix. Set module.dropout = 0.0 "
                "(or replace_attention(..., dropout=0.0))"
            )
        self._check_inputs(query, key, value)
        unbatched = query.dim() == 2
        q_in, k_in, v_in = (self._to_batch_first(t, unbatched) for t in (query, key, value))
        batch, q_len, _ = q_in.shape
        kv_len = k_in.shape[1]
        q, k, v = self._project(q_in, k_in, v_in)  # [N, H, L|S, hd]
        key_mask = _key_mask(key_padding_mask, batch, kv_len, unbatched)
        allowed = _allowed(attn_mask, batch, self.num_heads, q_len, kv_len, unbatched)
        causal_mask = _is_square_causal(allowed)
        if causal_mask:
            # nn.TransformerEncoder/Decoder pass the causal mask (with is_causal=True): the cached causal
            # layout is exactly that mask (L == S), with no token-mask layout to build from it.
            allowed = None
        # As in nn, is_causal is a hint that attn_mask is the causal mask: a given mask decides (nn's causal
        # is top-left aligned, so adding our bottom-right causal() would differ when L > S). Without a mask
        # (which nn refuses), is_causal adds causal().
        attention = (
            self.causal_attention if causal_mask or (is_causal and allowed is None) else self.attention
        )
        out, lse = self._attend(q, k, v, attention, key_mask, allowed, document_ids)
        pattern = attention.pattern if document_ids is None else documents(document_ids) & attention.pattern
        out = self.out_proj(out.transpose(1, 2).reshape(batch, q_len, self.embed_dim))
        weights = None
        if need_weights:
            weights = self._weights(q, k, lse, pattern, key_mask, allowed, average_attn_weights)
            weights = weights.squeeze(0) if unbatched else weights
        if unbatched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _check_inputs(self, query, key, value):
        if any(getattr(t, "is_nested", False) for t in (query, key, value)):
            raise ValueError(
                "SparseMultiheadAttention takes dense (padded) tensors, got a nested tensor: nn.TransformerEncoder "
                "makes them when use_nested_tensor is True; set encoder.use_nested_tensor = False "
                "(replace_attention does this for the encoders it sees)"
            )
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 3-D (batched) or all 2-D (unbatched), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
            )
        for name, t, dim in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.shape[-1] != dim:
                raise ValueError(f"{name} must have last dimension {dim}, got shape {tuple(t.shape)}")
        batch_dim = 0 if self.batch_first else 1
        if key.shape[:-1] != value.shape[:-1] or (
            query.dim() == 3 and key.shape[batch_dim] != query.shape[batch_dim]
        ):
            raise ValueError(
                f"key and value must share batch and length, and the batch of query "
                f"({'batch_first' if self.batch_first else 'sequence first'}); got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
            )

    def _to_batch_first(self, t, unbatched):
        if unbatched:
            return t.unsqueeze(0)
        return t if self.batch_first else t.transpose(0, 1)

    def _project(self, q_in, k_in, v_in):
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        heads, head_dim = self.num_heads, self.head_dim
        split = lambda t: t.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        return (
            split(F.linear(q_in, w_q, b_q)),
            split(F.linear(k_in, w_k, b_k)),
            split(F.linear(v_in, w_v, b_v)),
        )

    def _attend(self, q, k, v, attention, key_mask, allowed, document_ids=None):
        pattern, backend = attention.pattern, attention.backend
        if allowed is None:
            return attention(q, k, v, key_mask, return_lse=True, document_ids=document_ids)
        if document_ids is not None:
            pattern = documents(document_ids) & pattern
        if torch.compiler.is_compiling():
            # Without fullgraph, torch.compile runs this frame eagerly instead (a graph break).
            raise ValueError(
                "SparseMultiheadAttention cannot compile an attn_mask into the graph: the mask's values decide "
                "the block layout, which torch.compile builds at trace time. Without fullgraph=True this is "
                "a graph break; or express the mask as the module's pattern (is_causal=True for causal)"
            )
        if allowed.shape[0] == 1:
            mask = allowed[0] if allowed.shape[1] > 1 else allowed[0, 0]
            return sparse_attention(
                q, k, v, pattern & TokenMask(mask), key_mask=key_mask, return_lse=True, backend=backend
            )
        # A per-batch mask is not a pattern (patterns are per head at most): attend one batch row at a time.
        outs, lses = [], []
        for b in range(allowed.shape[0]):
            rows = slice(b, b + 1)
            row_pattern = pattern
            if document_ids is not None and document_ids.dim() == 2:
                row_pattern = documents(document_ids[b]) & attention.pattern
            out, lse = sparse_attention(
                q[rows],
                k[rows],
                v[rows],
                row_pattern & TokenMask(allowed[b]),
                key_mask=None if key_mask is None else key_mask[rows],
                return_lse=True,
                backend=backend,
            )
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    def _selected(self, q, k, pattern, key_mask, allowed) -> torch.Tensor:
        """Token mask ``[N, H|1, L, S]`` of the blocks `_attend` selected (with the same attn_mask)."""
        block = backends.resolve(self.attention.backend, q.device).default_block_size
        if allowed is None:
            return select_layout(pattern, q, k, block_size=block, key_mask=key_mask).to_dense()
        masks = []
        for b in range(q.shape[0]):
            mask = allowed[b if allowed.shape[0] > 1 else 0]
            mask = mask if mask.shape[0] > 1 else mask[0]
            rows = slice(b, b + 1)
            km = None if key_mask is None else key_mask[rows]
            layout = select_layout(pattern & TokenMask(mask), q[rows], k[rows], block_size=block, key_mask=km)
            masks.append(layout.to_dense()[0].expand(q.shape[1], -1, -1))
        return torch.stack(masks)

    def _weights(self, q, k, lse, pattern, key_mask, allowed, average):
        """Attention probabilities ``[N, H, L, S]`` (or head-averaged ``[N, L, S]``) from the kernel's lse."""
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
        if selects(pattern):
            visible = self._selected(q, k, pattern, key_mask, allowed)  # [N, H|1, L, S]
        else:
            visible = dense_mask(pattern, q_len, kv_len, heads, q.device)
            visible = visible if visible.dim() == 4 else visible[None]  # [B|1, H|1, L, S]
        if allowed is not None:
            visible = visible & allowed
        if key_mask is not None:
            visible = visible & key_mask[:, None, None, :]
        # In at least float32: exp(scores - lse) in fp16/bf16 would be several times less accurate than nn.
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) / math.sqrt(head_dim)
        finite = torch.isfinite(lse)
        shift = torch.where(finite, lse, torch.zeros_like(lse)).to(acc)
        probs = torch.exp(scores - shift[..., None]) * visible
        return (probs.mean(1) if average else probs).to(q.dtype)


def _mask_to_bool(mask: torch.Tensor, name: str) -> torch.Tensor:
    """nn's mask convention -> bool "blocked": bool as is; float masks must hold only 0 and -inf."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or float tensor, got {mask.dtype}")
    blocked = torch.isneginf(mask)
    if not bool(((mask == 0) | blocked).all()):
        raise ValueError(
            f"{name}: float masks may hold only 0 (allowed) and -inf (blocked); additive biases are not "
            "supported by sparse attention"
        )
    return blocked


def _key_mask(key_padding_mask, batch, kv_len, unbatched):
    """nn's key_padding_mask (True = padding) -> sparse_attention's key_mask (True = real key)."""
    if key_padding_mask is None:
        return None
    blocked = _mask_to_bool(key_padding_mask, "key_padding_mask")
    blocked = blocked.unsqueeze(0) if unbatched else blocked
    if tuple(blocked.shape) != (batch, kv_len):
        raise ValueError(
            f"key_padding_mask must be [N={batch}, S={kv_len}] (or [S] unbatched), got {tuple(blocked.shape)}"
        )
    return ~blocked


def _allowed(attn_mask, batch, heads, q_len, kv_len, unbatched):
    """nn's attn_mask (True = not allowed) -> bool "allowed" ``[N|1, H|1, L, S]``, or None."""
    if attn_mask is None:
        return None
    allowed = ~_mask_to_bool(attn_mask, "attn_mask")
    if allowed.dim() == 2 and tuple(allowed.shape) == (q_len, kv_len):
        return allowed[None, None]
    n = 1 if unbatched else batch
    if allowed.dim() == 3 and tuple(allowed.shape) == (n * heads, q_len, kv_len):
        return allowed.view(n, heads, q_len, kv_len)
    raise ValueError(
        f"attn_mask must be [L={q_len}, S={kv_len}] or [N*num_heads={n * heads}, L, S], "
        f"got {tuple(attn_mask.shape)}"
    )


def _is_square_causal(allowed) -> bool:
    """Whether an "allowed" mask ``[N|1, H|1, L, S]`` is the square causal mask shared by all rows."""
    if allowed is None or allowed.shape[:2] != (1, 1) or allowed.shape[2] != allowed.shape[3]:
        return False
    n = allowed.shape[2]
    return bool(torch.equal(allowed[0, 0], torch.ones(n, n, dtype=torch.bool, device=allowed.device).tril()))


def replace_attention(
    model: nn.Module, pattern: Pattern | None, *, dropout: float | None = None, backend="auto"
) -> int:
    """Swap every `nn.MultiheadAttention` inside `model` for a `SparseMultiheadAttention` with `pattern`.

    The new layers share the replaced layers' parameters (the same Parameter objects), so an optimizer
    built before the swap still trains them and tied weights stay tied; modules shared between parents
    stay shared. `dropout` overrides the attention dropout of the new layers (nn.TransformerEncoderLayer's
    default is 0.1, which sparse attention cannot apply in training). Returns how many were replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_attention takes an nn.Module (a model), got {type(model).__name__}")
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError(
            "replace_attention swaps children of a module; "
            "for a single layer use SparseMultiheadAttention.from_dense"
        )
    replaced: dict[int, SparseMultiheadAttention] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.MultiheadAttention) or isinstance(child, SparseMultiheadAttention):
                continue
            if id(child) not in replaced:
                new = SparseMultiheadAttention.from_dense(child, pattern, backend=backend)
                for param_name, param in child.named_parameters(recurse=False):
                    setattr(new, param_name, param)
                new.out_proj = child.out_proj
                if dropout is not None:
                    new.dropout = float(dropout)
                replaced[id(child)] = new
            setattr(parent, name, replaced[id(child)])
    for module in model.modules():
        # nn.TransformerEncoder packs padded batches into nested tensors on its fast path; we take dense ones.
        if isinstance(module, nn.TransformerEncoder) and replaced:
            module.use_nested_tensor = False
    return len(replaced)
