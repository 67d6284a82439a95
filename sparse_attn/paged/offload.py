"""`sparse_attention_offloaded`: decoding over a paged cache whose cold pages live in host memory.

The pages are planned once, on q's device, from the pattern (`sparse_attn.paged.plan`). The planned pages
then split by where they live: the device part runs on the call's backend over the device cache, the host
part on the CPU engine (`sparse_attn.paged.torch_engine`) over the host cache, with q and the bias of its
pages copied to the CPU (nothing of the cache crosses); the two partial results merge exactly by their lse
(`sparse_attn.merge`), as disjoint key shards. Cold pages are never copied to the device.
"""

from __future__ import annotations

import torch

from ..patterns.topk import selects
from . import torch_engine
from .api import cache_page_means, check_paged, merge_parts, physical_pages, plan_step, run_engine
from .plan import compact


def sparse_attention_offloaded(
    q, device_cache, host_cache, block_table, on_host, cache_seqlens, pattern, *, scale=None,
    return_lse=False, backend=None, softcap=None, alibi_slopes=None, rel_bias=None,
):  # fmt: skip
    """`sparse_attention_paged` over pages split between the device and host memory; forward only.

    Args:
        q: ``[B, Hq, Sq, D]`` on the device (any device, the CPU included).
        device_cache: ``(k_cache, v_cache)``, each ``[num_device_pages, page_size, Hkv, D]`` on q's device.
        host_cache: ``(k_cache, v_cache)``, each ``[num_host_pages, page_size, Hkv, D]`` CPU tensors.
        block_table: int32 ``[B, max_pages]`` on q's device: a page of the host cache where `on_host`, else
            of the device cache. on_host: bool ``[B, max_pages]`` on q's device.
        cache_seqlens, pattern, scale, return_lse, backend, softcap, alibi_slopes, rel_bias: as in
            `sparse_attention_paged` (`backend` runs the device part; the host part runs on the CPU engine).
    """
    (k_dev, v_dev), (k_host, v_host) = device_cache, host_cache
    spec, scale, mods = check_paged(q, k_dev, v_dev, block_table, cache_seqlens, pattern, scale, return_lse,
                                    backend, softcap, alibi_slopes, rel_bias, check_pages=False)  # fmt: skip
    _check_host(q, k_dev, k_host, v_host, on_host, block_table, cache_seqlens)
    page_means = None
    if selects(pattern):
        on_device = cache_page_means(k_dev, block_table, cache_seqlens)
        cold = cache_page_means(k_host, block_table.cpu(), cache_seqlens.cpu()).to(q.device)
        page_means = torch.where(on_host[:, None, :, None], cold, on_device)
    step = plan_step(q, k_dev, block_table, cache_seqlens, pattern, mods, page_means)
    cold = torch.gather(
        on_host.expand(step.pages.shape[1], -1, -1).transpose(0, 1), -1, step.pages.clamp(min=0)
    )
    hot_pages, hot_bias = compact(torch.where(cold, -1, step.pages), step.bias, k_dev.shape[1])
    cold_pages, cold_bias = compact(torch.where(cold, step.pages, -1).cpu(), step.bias.cpu(), k_dev.shape[1])
    hot = run_engine(spec.name, q, k_dev, v_dev, block_table, hot_pages, hot_bias, scale, mods)
    phys = physical_pages(block_table.cpu(), cold_pages, k_host.shape[0])
    splits = torch_engine.default_splits(q.shape[0], k_host.shape[2], cold_pages.shape[-1])
    softcap = None if mods is None else mods.softcap
    cold = torch_engine.decode_partials(q.cpu(), k_host, v_host, phys, cold_bias, scale, softcap, splits)
    out, lse = merge_parts([hot, tuple(t.to(q.device) for t in cold)])
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _check_host(q, k_dev, k_host, v_host, on_host, block_table, cache_seqlens) -> None:
    """Host cache shaped like the device cache, on the CPU; every used page inside its cache (one read)."""
    for name, t in (("host k_cache", k_host), ("host v_cache", v_host)):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got {getattr(t, 'device', type(t).__name__)}")
        if t.dim() != 4 or t.shape[1:] != k_dev.shape[1:] or t.dtype != k_dev.dtype:
            raise ValueError(
                f"{name} must be [num_host_pages, {', '.join(map(str, k_dev.shape[1:]))}] {k_dev.dtype} like the "
                f"device cache, got {tuple(t.shape)} {t.dtype}"
            )
    if (
        not isinstance(on_host, torch.Tensor)
        or on_host.dtype != torch.bool
        or on_host.shape != block_table.shape
    ):
        raise TypeError(f"on_host must be a bool tensor shaped like block_table {tuple(block_table.shape)}")
    if on_host.device != q.device:
        raise ValueError(f"on_host must be on q's device {q.device}, got {on_host.device}")
    if torch.compiler.is_compiling():
        return
    page_size, max_pages = k_dev.shape[1], block_table.shape[1]
    lengths = cache_seqlens.long()
    used = torch.arange(max_pages, device=q.device)[None, :] * page_size < lengths[:, None]
    limit = torch.where(on_host, k_host.shape[0], k_dev.shape[0])
    bad = used & ((block_table < 0) | (block_table >= limit))
    if bool(bad.any()) or bool(((lengths < 0) | (lengths > max_pages * page_size)).any()):
        if bool(((lengths < 0) | (lengths > max_pages * page_size)).any()):
            raise ValueError(
                f"cache_seqlens must lie in [0, max_pages * page_size = {max_pages * page_size}]"
            )
        b, p = (int(x) for x in torch.nonzero(bad)[0])
        where = "host" if bool(on_host[b, p]) else "device"
        raise IndexError(
            f"block_table[{b}, {p}] = {int(block_table[b, p])} is not a page of the {where} cache [0, "
            f"{int(limit[b, p])}) but holds positions below cache_seqlens[{b}] = {int(lengths[b])}"
        )
