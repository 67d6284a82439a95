"""The README's main job: a Longformer pattern, sparse attention against dense attention, and a picture.

`run_demo` builds ``longformer(window, global_tokens)`` for a few thousand tokens, runs `sparse_attention`
(the default backend for the device: the PyTorch backend on the CPU) and dense SDPA with the same boolean
mask on the same inputs, measures both (median of a few runs), checks both against a float64 reference,
prints density, errors and times, and saves a picture of the pattern.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from . import api, backends
from .patterns import longformer
from .reference import attention_reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Absolute error allowed on top of 4x dense SDPA's own error (outputs are O(1) for random inputs).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _median_ms(fn, repeats: int) -> float:
    """Median wall time of `fn` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _truth(q, k, v, mask, heads_per_chunk: int = 2):
    """float64 reference output, a few heads at a time (bounds the S x S float64 scores)."""
    outs = []
    for h in range(0, q.shape[1], heads_per_chunk):
        sl = slice(h, h + heads_per_chunk)
        out, _ = attention_reference(q[:, sl].double(), k[:, sl].double(), v[:, sl].double(), mask)
        outs.append(out)
    return torch.cat(outs, 1)


def run_demo(
    seq: int = 4096,
    window: int = 256,
    global_tokens: int = 4,
    *,
    heads: int = 8,
    head_dim: int = 64,
    batch: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    backend: str = "auto",
    repeats: int = 3,
    output: str | Path | None = "out/demo_pattern.png",
    seed: int = 0,
    progress: bool = True,
    echo=print,
) -> dict:
    """Run the demo; return its figures (and print them with `echo`). See the module docstring."""
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    # disable=None: a bar on a terminal, nothing in logs.
    steps = tqdm(total=6, desc="demo", disable=None if progress else True, leave=False)

    def step(name):
        steps.set_description(f"demo: {name}")

    step("building the layout")
    pattern = longformer(window, global_tokens)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(batch, heads, seq, head_dim, generator=gen).to(device, torch_dtype) for _ in range(3)
    )
    chosen = backends.resolve(backend, q.device)
    backend_name, block_size = chosen.name, chosen.default_block_size
    # Warm up the code paths on a tiny case, so the time below is the build's own, not first-call set-up.
    pattern.layout(min(seq, 256), block_size=block_size)
    start = time.perf_counter()
    layout = pattern.layout(seq, block_size=block_size, device=q.device)
    build_ms = (time.perf_counter() - start) * 1e3
    steps.update()

    step("sparse attention")
    with torch.no_grad():
        sparse_out = api.sparse_attention(q, k, v, layout, backend=backend)
        sparse_ms = _median_ms(lambda: api.sparse_attention(q, k, v, layout, backend=backend), repeats)
    steps.update()

    step("dense attention, same mask")
    mask = pattern.mask(seq, device=q.device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        dense_out = sdpa(q, k, v, attn_mask=mask)
        dense_ms = _median_ms(lambda: sdpa(q, k, v, attn_mask=mask), repeats)
    steps.update()

    step("dense attention, no mask")
    with torch.no_grad():
        full_ms = _median_ms(lambda: sdpa(q, k, v), repeats)
    steps.update()

    step("float64 reference")
    truth = _truth(q.cpu(), k.cpu(), v.cpu(), mask.cpu())
    sparse_err = float((sparse_out.cpu().double() - truth).abs().max())
    dense_err = float((dense_out.cpu().double() - truth).abs().max())
    steps.update()

    step("drawing the pattern")
    picture = _save_picture(layout, output, pattern) if output else None
    steps.update()
    steps.close()

    tolerance = 4 * dense_err + ATOL[torch_dtype]
    result = {
        "seq": seq,
        "window": window,
        "global_tokens": global_tokens,
        "shape": [batch, heads, seq, head_dim],
        "dtype": dtype,
        "device": str(q.device),
        "backend": backend_name,
        "block_size": block_size,
        "layout_build_ms": build_ms,
        "density": layout.density(),
        "visible_fraction": float(mask.float().mean()),
        "sparse_ms": sparse_ms,
        "dense_masked_ms": dense_ms,
        "dense_full_ms": full_ms,
        "sparse_max_error": sparse_err,
        "dense_max_error": dense_err,
        "tolerance": tolerance,
        "ok": sparse_err <= tolerance,
        "picture": str(picture) if picture else None,
    }
    _report(result, layout, echo)
    return result


def _save_picture(layout, output, pattern) -> Path:
    import matplotlib.pyplot as plt

    from .viz import plot_pattern

    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_pattern(layout, title=f"demo: {pattern!r}")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _report(r: dict, layout, echo) -> None:
    b, h, s, d = r["shape"]
    echo(
        f"sparse-attn demo: Longformer pattern (window {r['window']} each side, {r['global_tokens']} global "
        f"tokens), {s} tokens"
    )
    echo(f"  q, k, v: [{b}, {h}, {s}, {d}] {r['dtype']} on {r['device']}; backend {r['backend']!r}")
    echo(
        f"  layout: blocks {layout.block_q}x{layout.block_k}, grid {layout.num_q_blocks}x{layout.num_k_blocks}, "
        f"{layout.num_full} full + {layout.num_partial} partial blocks, built in {r['layout_build_ms']:.1f} ms"
    )
    echo(
        f"  density: {r['density']:.4f} of the pairs computed ({r['visible_fraction']:.4f} visible; "
        f"dense attention computes 1.0)"
    )
    echo(f"  {'':36s}{'median ms':>12s}{'max |error| vs float64':>26s}")
    echo(f"  {'sparse_attention':36s}{r['sparse_ms']:12.2f}{r['sparse_max_error']:26.2e}")
    echo(f"  {'dense SDPA, same boolean mask':36s}{r['dense_masked_ms']:12.2f}{r['dense_max_error']:26.2e}")
    echo(f"  {'dense SDPA, no mask (other result)':36s}{r['dense_full_ms']:12.2f}{'-':>26s}")
    echo(
        f"  sparse vs dense with the same mask: {r['dense_masked_ms'] / r['sparse_ms']:.2f}x "
        f"(vs unmasked dense: {r['dense_full_ms'] / r['sparse_ms']:.2f}x)"
    )
    verdict = "OK" if r["ok"] else "FAILED"
    echo(f"  check: {verdict} (sparse error {r['sparse_max_error']:.2e} <= {r['tolerance']:.2e})")
    if r["picture"]:
        echo(f"  pattern picture: {r['picture']}")
