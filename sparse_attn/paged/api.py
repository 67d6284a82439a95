"""`sparse_attention_paged`: decoding over a paged KV cache (FlashAttention's paged-KV convention).

One way down: check the inputs -> plan the pages and the bias from the pattern on the device
(`sparse_attn.paged.plan`) -> split-KV partials from an engine (`sparse_attn.paged.torch_engine` on the
"torch" backend, `triton_kernels.decode` on "triton") -> the splits merged by their lse
(`sparse_attn.merge.merge_stacked`, `merge_attention`'s math without its per-shard host check).
Forward only: decoding needs no gradient, and a call that would need one raises.
"""

from __future__ import annotations

import torch

from .. import backends
from ..api import check_scale
from ..merge import merge_stacked
from ..patterns import Pattern
from ..patterns.topk import selects
from ..score_mods import check_score_mods
from . import torch_engine
from .plan import PagePlan, plan

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def sparse_attention_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
):
    """Attention of new queries over a paged KV cache, restricted to `pattern`, exactly; forward only.

    Args:
        q: ``[B, Hq, Sq, D]``, ``Sq >= 1`` (one query per step, or a few for speculative decoding).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``, ``Hq % Hkv == 0``, q's dtype and device.
        block_table: int32 ``[B, max_pages]``: cache position p of sequence b is row ``p % page_size`` of
            page ``block_table[b, p // page_size]``.
        cache_seqlens: int32 ``[B]``, the cached length of each sequence (the queries included: query r
            sits at position ``cache_seqlens[b] - Sq + r``, bottom-right aligned).
        pattern: any `Pattern`; it applies to cache positions exactly as `sparse_attention` on the gathered
            keys ``[0, cache_seqlens[b])`` would. ``topk_blocks(k)`` selects pages (a page is the key block,
            the Sq rows the query block); here the page means are computed from the cache, reading every
            candidate page once: keep them beside the cache with `PagedKVCache` to avoid that.
        backend: None or ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
        softcap, alibi_slopes: as in `sparse_attention`.
        rel_bias: ``[Hq, Sq + C - 1]`` with ``C = max_pages * page_size`` (the table's capacity): adds
            ``rel_bias[h, j - qpos + C - 1]``, so one tensor serves every cached length (for a sequence of
            length L it is ``sparse_attention``'s ``rel_bias[:, C - L:]``).

    Returns ``out`` like q, and with ``return_lse=True`` also ``lse`` float32 ``[B, Hq, Sq]`` (float64 for
    float64 inputs). A query with no visible key gets 0 and lse -inf. Pages the pattern does not need are
    never read; which ones are needed is computed on the device from `cache_seqlens` (patterns other than
    bands, chunks, global tokens and top-k read the lengths once on the host). Not differentiable.
    """
    return paged_attention(
        q, k_cache, v_cache, block_table, cache_seqlens, pattern, scale=scale, return_lse=return_lse,
        backend=backend, softcap=softcap, alibi_slopes=alibi_slopes, rel_bias=rel_bias,
    )  # fmt: skip


def paged_attention(
    q, k_cache, v_cache, block_table, cache_seqlens, pattern, *, scale=None, return_lse=False, backend=None,
    softcap=None, alibi_slopes=None, rel_bias=None, page_means=None, key_mask=None, check_pages=True,
):  # fmt: skip
    """`sparse_attention_paged` with optional page means ``[B, Hkv, max_pages, D]`` (from `PagedKVCache`), a
    bool ``key_mask [B, max_pages * page_size]`` over positions (padding; not with top-k), and the page
    check off for a block table its caller built (the transformers integration's static caches)."""
    spec, scale, mods = check_paged(q, k_cache, v_cache, block_table, cache_seqlens, pattern, scale,
                                    return_lse, backend, softcap, alibi_slopes, rel_bias,
                                    check_pages=check_pages)  # fmt: skip
    if key_mask is not None and selects(pattern):
        raise ValueError("a key_mask with a topk_blocks pattern is not supported over paged caches")
    if selects(pattern) and page_means is None:
        page_means = cache_page_means(k_cache, block_table, cache_seqlens)
    step = plan_step(q, k_cache, block_table, cache_seqlens, pattern, mods, page_means, key_mask)
    parts = [run_engine(spec.name, q, k_cache, v_cache, block_table, step.pages, step.bias, scale, mods)]
    out, lse = merge_parts(parts)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def plan_step(
    q, k_cache, block_table, cache_seqlens, pattern, mods, page_means=None, key_mask=None
) -> PagePlan:
    """The step's pages and bias (`sparse_attn.paged.plan`)."""
    page_size, kv_heads, max_pages = k_cache.shape[1], k_cache.shape[2], block_table.shape[1]
    with torch.no_grad():
        return plan(pattern, q, cache_seqlens, page_size, max_pages, kv_heads, mods, page_means, key_mask)


def run_engine(backend: str, q, k_cache, v_cache, block_table, pages, bias, scale, mods):
    """Split-KV partials ``(out [B, Hq, S, Sq, D], lse [B, Hq, S, Sq])`` over the logical `pages`."""
    phys = physical_pages(block_table, pages, k_cache.shape[0])
    softcap = None if mods is None else mods.softcap
    batch, kv_heads = q.shape[0], k_cache.shape[2]
    if backend == "triton":
        from ..triton_kernels.decode import decode_partials, default_splits

        splits = default_splits(batch, kv_heads, pages.shape[-1], q.device)
        return decode_partials(q, k_cache, v_cache, phys, bias, scale, softcap, splits)
    splits = torch_engine.default_splits(batch, kv_heads, pages.shape[-1])
    return torch_engine.decode_partials(q, k_cache, v_cache, phys, bias, scale, softcap, splits)


def merge_parts(parts):
    """Merge the splits of every engine call by their lse (`sparse_attn.merge`; no host read):
    ``(out [B, Hq, Sq, D], lse [B, Hq, Sq])``."""
    outs = torch.cat([out for out, _ in parts], 2).movedim(2, 0)
    lses = torch.cat([lse for _, lse in parts], 2).movedim(2, 0)
    return merge_stacked(outs, lses)


def physical_pages(block_table, pages, num_pages: int) -> torch.Tensor:
    """Physical page of each listed logical page, -1 for none (and for an index outside the cache, which
    `check_paged` reports eagerly; under torch.compile it is skipped instead of read)."""
    batch = block_table.shape[0]
    safe = pages.clamp(min=0)
    phys = torch.gather(
        block_table.long().expand(batch, -1)[:, None, :].expand(-1, pages.shape[1], -1), -1, safe
    )
    return torch.where((pages >= 0) & (phys >= 0) & (phys < num_pages), phys, -1)


def cache_page_means(k_cache, block_table, cache_seqlens) -> torch.Tensor:
    """float32 ``[B, Hkv, max_pages, D]``: the mean key of every page of every sequence (reads the cache)."""
    num_pages, page_size, kv_heads, dim = k_cache.shape
    max_pages = block_table.shape[1]
    pages = torch.arange(max_pages, device=k_cache.device)
    phys = block_table.long().clamp(0, num_pages - 1)
    with torch.no_grad():
        keys = k_cache[phys].float()  # [B, max_pages, ps, Hkv, D]
        pos = pages[:, None] * page_size + torch.arange(page_size, device=k_cache.device)
        real = pos[None] < cache_seqlens.long()[:, None, None]  # [B, max_pages, ps]
        keys = torch.where(real[..., None, None], keys, 0.0)
        means = keys.sum(2) / real.sum(-1).clamp(min=1)[..., None, None]
    return means.permute(0, 2, 1, 3)


# -- checks ----------------------------------------------------------------------------------------------
def check_paged(q, k_cache, v_cache, block_table, cache_seqlens, pattern, scale, return_lse, backend,
                softcap, alibi_slopes, rel_bias, *, check_pages=True):  # fmt: skip
    """Validate a paged call: ``(backend spec, scale, ScoreMods or None)``; ValueError/TypeError naming
    what was expected. Page indices and lengths are checked eagerly (one host read), not under compile."""
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False, got {return_lse!r}")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = "[B, H, Sq, D]" if name == "q" else "[num_pages, page_size, H_kv, D]"
            raise ValueError(f"{name} must be 4-D {want}, got shape {tuple(t.shape)}")
    spec = backends.resolve("auto" if backend is None else backend, q.device)
    dtypes = (*_FLOATS, torch.float64) if spec.name == "torch" else _FLOATS
    if q.dtype not in dtypes:
        raise TypeError(
            f"q must be one of {[str(d) for d in dtypes]} for backend {spec.name!r}, got {q.dtype}"
        )
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table),
                    ("cache_seqlens", cache_seqlens)):  # fmt: skip
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    batch, heads, q_len, dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_pages, page_size, kv_heads, cache_dim = k_cache.shape
    if cache_dim != dim:
        raise ValueError(
            f"k_cache must be [num_pages, page_size, H_kv, D={dim}] to match q, got {tuple(k_cache.shape)}"
        )
    if min(batch, heads, q_len, dim, num_pages, page_size, kv_heads) == 0:
        raise ValueError(
            f"every dimension must be >= 1, got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}"
        )
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if spec.head_dims is not None and not spec.head_dims[0] <= dim <= spec.head_dims[1]:
        raise ValueError(
            f"{spec.label} supports head dims {spec.head_dims[0]} to {spec.head_dims[1]}, got {dim}"
        )
    for name, t, shape in (
        ("block_table", block_table, "[B, max_pages]"),
        ("cache_seqlens", cache_seqlens, "[B]"),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"{name} must be an int32 tensor {shape}, got {getattr(t, 'dtype', type(t).__name__)}"
            )
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise ValueError(f"block_table must be [B={batch}, max_pages >= 1], got {tuple(block_table.shape)}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be [B={batch}], got {tuple(cache_seqlens.shape)}")
    if pattern.num_heads is not None and pattern.num_heads != heads:
        raise ValueError(f"pattern defines {pattern.num_heads} heads, but q has {heads} heads")
    if pattern.batch_size not in (None, 1, batch):
        raise ValueError(
            f"pattern was built for {pattern.batch_size} batch elements, but q has batch size {batch}"
        )
    _check_no_grad(q, k_cache, v_cache, rel_bias)
    capacity = block_table.shape[1] * page_size
    meta = torch.empty(batch, kv_heads, capacity, dim, device="meta")
    mods = check_score_mods(softcap, alibi_slopes, rel_bias, q, meta)
    if check_pages and not torch.compiler.is_compiling():
        _check_pages(block_table, cache_seqlens, num_pages, page_size)
    return spec, check_scale(scale, dim, q.dtype), mods


def _check_no_grad(*tensors) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise ValueError(
            "sparse_attention_paged is forward only (decoding): its inputs must not require grad; call it "
            "under torch.no_grad() or torch.inference_mode(), or detach them. Use sparse_attention to train"
        )


def _check_pages(block_table, cache_seqlens, num_pages: int, page_size: int) -> None:
    """Lengths within the table and every page a length uses inside the cache (one host read)."""
    max_pages = block_table.shape[1]
    lengths = cache_seqlens.long()
    used = torch.arange(max_pages, device=block_table.device)[None, :] * page_size < lengths[:, None]
    bad_page = used & ((block_table < 0) | (block_table >= num_pages))
    bad_length = (lengths < 0) | (lengths > max_pages * page_size)
    if not bool(bad_page.any() | bad_length.any()):
        return
    if bool(bad_length.any()):
        b = int(torch.nonzero(bad_length)[0, 0])
        raise ValueError(
            f"cache_seqlens[{b}] = {int(lengths[b])} is outside [0, max_pages * page_size = "
            f"{max_pages * page_size}] (the positions block_table can hold)"
        )
    b, p = (int(x) for x in torch.nonzero(bad_page)[0])
    raise IndexError(
        f"block_table[{b}, {p}] = {int(block_table[b, p])} is not a page of the cache [0, {num_pages}) but "
        f"holds positions below cache_seqlens[{b}] = {int(lengths[b])}"
    )
