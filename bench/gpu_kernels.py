"""GPU kernel microbenchmark: sparse-attn's Triton kernels against dense FlashAttention, FlexAttention, xformers.

Question: how fast are the block-sparse kernels, forward, backward and forward + backward, and how much of
the ideal ``1 / density`` speedup over dense FlashAttention do they reach?

For each sequence length (1k to 64k), pattern and density, head dim (64, 128) and dtype (fp16, bf16), every
method runs on the same inputs in one process, timed with `triton.testing.do_bench` (median and 20/80%
quantiles, in ms):
- ``sparse_attn``: `sparse_attention(q, k, v, layout, backend="triton")` with a prebuilt layout;
- ``dense_flash``: SDPA restricted to the FlashAttention backend, no mask (the dense baseline; for the
  causal pattern also ``flash_causal``, the same mask);
- ``flex``: `torch.compile(flex_attention)` with a BlockMask built straight from the layout's block lists
  (`BlockMask.from_kv_blocks`, no S x S evaluation) and the pattern's mask_mod for partial blocks;
- ``xformers``: `memory_efficient_attention` with the matching bias: its own mask type where one exists
  (sliding window, causal), else a materialised additive bias while it fits in ``--bias-max-gib``.

TFLOP/s count ``4 * D`` flops per computed query-key pair forward (2.5x that backward, 3.5x both), over the
sparse layout's computed blocks (``layout.density()``) for every masked method and over S x S for dense.
"fraction of ideal" is ``(t_dense / t_sparse) / (1 / density)``.

    python bench/gpu_kernels.py              # the full sweep (tens of minutes on one GPU)
    python bench/gpu_kernels.py --quick      # 1k, 4k and 16k tokens, fp16, head dim 128
    python bench/gpu_kernels.py --lengths 8192,65536 --dtypes bf16 --head-dims 64 --passes fwd

On a machine without CUDA it says so and exits 0. Results: bench/results/gpu_kernels-<device>.json / .png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
QUICK_LENGTHS = (1024, 4096, 16384)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PASSES = ("fwd", "bwd", "fwd_bwd")
#: sparse_attn with one score modifier each (softcap as Gemma 2's 50; ALiBi's geometric slopes; a random
#: rel_bias that requires grad, so its gradient is part of the backward), timed beside the plain kernels.
MOD_METHODS = ("sparse_attn+softcap", "sparse_attn+alibi", "sparse_attn+rel_bias")
METHODS = ("sparse_attn", *MOD_METHODS, "dense_flash", "flash_causal", "flex", "xformers")
#: Backward runs five matmuls per pair (recomputed scores, dV, dP, dQ, dK) to the forward's two.
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
QUANTILES = [0.5, 0.2, 0.8]
FULL_DEFAULTS = {
    "lengths": LENGTHS,
    "densities": (0.03, 0.1, 0.3),
    "families": ("window", "longformer", "blocks", "causal"),
    "head_dims": (64, 128),
    "dtypes": ("fp16", "bf16"),
}
QUICK_DEFAULTS = {
    "lengths": QUICK_LENGTHS,
    "densities": (0.1,),
    "families": ("window", "blocks", "causal"),
    "head_dims": (128,),
    "dtypes": ("fp16",),
}
FLEX_BLOCK = 128
GLOBAL_TOKENS = 64
CELL = 128  # random block-sparse cells: whole 128 x 128 tiles, full for every method's block size


# -- pure helpers (tested on the CPU) -------------------------------------------------------------------
def attention_flops(pairs: float, batch: int, heads: int, head_dim: int, which: str) -> float:
    """Flops of attention over `pairs` query-key pairs per head: ``4 * D`` a pair forward (QK^T and PV)."""
    if which not in PASS_FLOP_FACTOR:
        raise ValueError(f"pass must be one of {PASSES}, got {which!r}")
    return 4.0 * pairs * batch * heads * head_dim * PASS_FLOP_FACTOR[which]


def tflops(flops: float, ms: float | None) -> float | None:
    return None if ms is None or ms <= 0 else flops / (ms * 1e-3) / 1e12


def fraction_of_ideal(dense_ms: float | None, sparse_ms: float | None, density: float) -> float | None:
    """Speedup over dense divided by the ideal ``1 / density`` (1.0: the kernels skip work perfectly)."""
    if dense_ms is None or sparse_ms is None or sparse_ms <= 0:
        return None
    return (dense_ms / sparse_ms) * density


def device_tag(name: str) -> str:
    """A file-name-safe device name: 'NVIDIA A100-SXM4-80GB' -> 'nvidia-a100-sxm4-80gb'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def window_for_density(density: float, seq: int) -> int:
    """Half-width w of a sliding window whose visible pairs ``(2w+1) S - w (w+1)`` are `density` of S^2."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    b = 2 * seq - 1
    disc = b * b - 4 * (density * seq * seq - seq)
    w = (b - math.sqrt(max(disc, 0.0))) / 2
    return int(min(max(round(w), 0), seq - 1))


def random_cells(density: float, seq: int, seed: int = 0) -> torch.Tensor:
    """bool ``[n, n]`` cells of `CELL` tokens: the diagonal plus random cells, the same count in every row
    (balanced work per query block), about `density` of all cells."""
    n = -(-seq // CELL)
    per_row = min(n, max(1, round(density * n)))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, n, generator=gen)
    scores[torch.arange(n), torch.arange(n)] = 2.0  # the diagonal first
    keep = torch.zeros(n, n, dtype=torch.bool)
    keep.scatter_(1, scores.topk(per_row, dim=1).indices, True)
    return keep


def layout_to_flex_tensors(layout):
    """``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)`` for `BlockMask.from_kv_blocks`,
    shaped ``[1, H, nqb]`` and ``[1, H, nqb, nkb]`` (int32), straight from the layout's row lists."""
    from sparse_attn.interop import flex_rows

    return (*flex_rows(layout, "part"), *flex_rows(layout, "full"))


def flex_block_mask(layout, mask_mod):
    """A FlexAttention BlockMask with exactly the layout's blocks (the layout's block size must be Flex's)."""
    from torch.nn.attention.flex_attention import BlockMask

    part_n, part_idx, full_n, full_idx = layout_to_flex_tensors(layout)
    return BlockMask.from_kv_blocks(
        part_n,
        part_idx,
        full_n,
        full_idx,
        BLOCK_SIZE=(layout.block_q, layout.block_k),
        mask_mod=mask_mod,
        seq_lengths=(layout.q_len, layout.kv_len),
    )


@dataclass(frozen=True)
class Case:
    """One pattern at one target density: how sparse-attn, Flex and xformers each express it."""

    family: str  # window | longformer | blocks | causal
    target: float  # target density (causal: 0.5)

    def pattern(self, seq: int):
        import sparse_attn as sa

        if self.family == "window":
            return sa.sliding_window(window_for_density(self.target, seq))
        if self.family == "longformer":
            return sa.longformer(window_for_density(self.target, seq), GLOBAL_TOKENS)
        if self.family == "blocks":
            return sa.block_sparse(random_cells(self.target, seq), CELL)
        if self.family == "causal":
            return sa.causal()
        raise ValueError(f"unknown pattern family {self.family!r}")

    def mask_mod(self, seq: int, device="cuda"):
        """The token predicate for Flex's partial blocks (queries and keys aligned: Sq == Skv)."""
        if self.family in ("window", "longformer"):
            w = window_for_density(self.target, seq)
            if self.family == "window":
                return lambda b, h, q, kv: (q - kv <= w) & (kv - q <= w)
            return lambda b, h, q, kv: (
                ((q - kv <= w) & (kv - q <= w)) | (q < GLOBAL_TOKENS) | (kv < GLOBAL_TOKENS)
            )
        if self.family == "causal":
            return lambda b, h, q, kv: q >= kv
        # blocks: every kept block is full, so the compiled kernel never calls this, but Flex's eager
        # path masks with mask_mod alone; a lookup keeps both exact.
        cells = random_cells(self.target, seq).to(device)
        return lambda b, h, q, kv: cells[q // CELL, kv // CELL]

    def xformers_bias(self, seq: int):
        """xformers' own mask type for this pattern, or None when only a materialised bias matches."""
        from xformers.ops.fmha import attn_bias

        if self.family == "window":
            w = window_for_density(self.target, seq)
            return attn_bias.LocalAttentionFromBottomRightMask(window_left=w, window_right=w)
        if self.family == "causal":
            return attn_bias.LowerTriangularFromBottomRightMask()
        return None

    @property
    def label(self) -> str:
        return self.family if self.family == "causal" else f"{self.family}@{self.target:g}"


def make_cases(families, densities) -> list[Case]:
    cases = []
    for family in families:
        if family == "causal":
            cases.append(Case("causal", 0.5))
        else:
            cases += [Case(family, d) for d in densities]
    return cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1k/4k/16k tokens, fp16, head dim 128, 3 cases")
    p.add_argument("--lengths", type=_ints, help="comma list (default 1k..64k)")
    p.add_argument("--densities", type=_floats, help="target densities (default 0.03,0.1,0.3)")
    p.add_argument("--families", type=_words, help="window,longformer,blocks,causal (default all)")
    p.add_argument("--head-dims", type=_ints, help="default 64,128")
    p.add_argument("--dtypes", type=_words, help="fp16,bf16 (default both)")
    p.add_argument("--passes", type=_words, default=PASSES)
    p.add_argument("--methods", type=_words, default=METHODS)
    p.add_argument("--tokens-per-batch", type=int, default=32768, help="batch = max(1, this // seq)")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // head_dim")
    p.add_argument("--bias-max-gib", type=float, default=2.0, help="largest materialised xformers bias")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    # --quick only narrows what was not given explicitly.
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, values, allowed in (
        ("dtypes", args.dtypes, DTYPES),
        ("passes", args.passes, PASSES),
        ("methods", args.methods, METHODS),
        ("families", args.families, ("window", "longformer", "blocks", "causal")),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {list(allowed)}")
    return args


def _ints(text):
    return tuple(int(v) for v in text.split(","))


def _floats(text):
    return tuple(float(v) for v in text.split(","))


def _words(text):
    return tuple(v.strip() for v in text.split(",") if v.strip())


# -- measuring (CUDA only) ------------------------------------------------------------------------------
def _bench(fn, args, grads=None):
    """(median, p20, p80) ms, or None with a note if the method fails (out of memory, unsupported)."""
    import triton.testing

    try:
        ms = triton.testing.do_bench(
            fn, warmup=args.warmup, rep=args.rep, grad_to_none=grads, quantiles=QUANTILES
        )
        return tuple(float(m) for m in ms), None
    except torch.cuda.OutOfMemoryError:
        return None, "out of memory"
    except Exception as e:  # a method that cannot run this case is reported, not fatal
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        torch.cuda.empty_cache()


def _timed_passes(attn, q, k, v, args):
    """Time forward, backward and forward + backward of ``attn(q, k, v) -> out [B, H, S, D]``."""
    results = {}
    grads = [q, k, v]
    if "fwd" in args.passes:
        with torch.no_grad():
            results["fwd"] = _bench(lambda: attn(q, k, v), args)
    if {"bwd", "fwd_bwd"} & set(args.passes):
        try:
            out = attn(q, k, v)
            dout = torch.randn_like(out)
        except Exception as e:
            note = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}"
            for which in ("bwd", "fwd_bwd"):
                results[which] = (None, note)
            return results
        if "bwd" in args.passes:
            results["bwd"] = _bench(lambda: out.backward(dout, retain_graph=True), args, grads)
        del out
        if "fwd_bwd" in args.passes:
            results["fwd_bwd"] = _bench(lambda: attn(q, k, v).backward(dout), args, grads)
    return results


def _methods_for(case, seq, args, dtype):
    """{name: attn(q, k, v)} for every requested method that can express this case, and notes for the rest."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import sparse_attn as sa
    from sparse_attn import backends

    pattern = case.pattern(seq)
    layout = pattern.layout(seq, block_size=backends.get("triton").default_block_size, device="cuda")
    methods, notes = {}, {}

    def flash(is_causal):
        def run(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

        return run

    if "sparse_attn" in args.methods:
        methods["sparse_attn"] = lambda q, k, v: sa.sparse_attention(q, k, v, layout, backend="triton")
    for name in MOD_METHODS:
        if name in args.methods:
            methods[name] = _modified_method(name, layout)
    if "dense_flash" in args.methods:
        methods["dense_flash"] = flash(False)
    if "flash_causal" in args.methods and case.family == "causal":
        methods["flash_causal"] = flash(True)
    if "flex" in args.methods:
        try:
            methods["flex"] = _flex_method(case, pattern, seq)
        except Exception as e:
            notes["flex"] = f"{type(e).__name__}: {e}"[:160]
    if "xformers" in args.methods:
        try:
            methods["xformers"] = _xformers_method(case, pattern, seq, dtype, args)
        except Exception as e:
            notes["xformers"] = f"{type(e).__name__}: {e}"[:160]
    return layout, methods, notes


def modifier_kwargs(name: str, heads: int, q_len: int, kv_len: int, device="cpu") -> dict:
    """The score-modifier arguments of method `name` (one of MOD_METHODS) for `heads` query heads."""
    if name == "sparse_attn+softcap":
        return {"softcap": 50.0}
    if name == "sparse_attn+alibi":
        return {"alibi_slopes": 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device) / heads)}
    if name == "sparse_attn+rel_bias":
        g = torch.Generator(device=device).manual_seed(0)
        bias = torch.randn(heads, q_len + kv_len - 1, generator=g, device=device)
        return {"rel_bias": bias.requires_grad_(True)}
    raise ValueError(f"no modifier method {name!r}")


def _modified_method(name, layout):
    import sparse_attn as sa

    cache = {}

    def run(q, k, v):
        key = (q.shape[1], q.shape[2], k.shape[2])
        if key not in cache:
            cache[key] = modifier_kwargs(name, *key, device=q.device)
        return sa.sparse_attention(q, k, v, layout, backend="triton", **cache[key])

    return run


_FLEX = None


def _flex_method(case, pattern, seq):
    global _FLEX
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    if _FLEX is None:
        # One compiled graph per shape and mask_mod; the sweep needs more than dynamo's default cache.
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 1024)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    flex_layout = pattern.layout(seq, block_size=FLEX_BLOCK, device="cuda")
    block_mask = flex_block_mask(flex_layout, case.mask_mod(seq, "cuda"))
    return lambda q, k, v: _FLEX(q, k, v, block_mask=block_mask)


def _xformers_method(case, pattern, seq, dtype, args):
    import xformers.ops as xops

    bias = case.xformers_bias(seq)
    if bias is None:
        gib = seq * (seq + 8) * torch.finfo(dtype).bits / 8 / 2**30
        if gib > args.bias_max_gib:
            raise MemoryError(
                f"a materialised bias needs {gib:.1f} GiB (> --bias-max-gib {args.bias_max_gib})"
            )
        bias = _materialised_bias(pattern, seq, dtype)

    def run(q, k, v):
        b, h = q.shape[:2]
        attn_bias = bias if not isinstance(bias, torch.Tensor) else bias.expand(b, h, seq, seq)
        # xformers takes [B, S, H, D].
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias
        )
        return out.transpose(1, 2)

    return run


def _materialised_bias(pattern, seq, dtype):
    """Additive bias ``[1, 1, S, S]`` (0 visible, -inf masked), rows padded to a multiple of 8 as xformers
    requires for alignment; built a band of rows at a time from the pattern's token truth."""
    padded = torch.empty(1, 1, seq, -(-seq // 8) * 8, dtype=dtype, device="cuda")
    bias = padded[..., :seq]
    step = max(1, (1 << 26) // seq)
    for r in range(0, seq, step):
        rows = min(step, seq - r)
        band = mask_rows(pattern, seq, r, rows).to("cuda")
        bias[0, 0, r : r + rows] = torch.where(band, 0.0, float("-inf")).to(dtype)
    return bias


def mask_rows(pattern, seq: int, start: int, rows: int) -> torch.Tensor:
    """Rows ``start .. start + rows`` of a shared pattern's S x S token mask (Sq == Skv), bool on the CPU."""
    from sparse_attn.geometry import Geometry

    g = Geometry(seq, seq, 1, 1)
    i = torch.arange(start, start + rows)[None, :, None]
    j = torch.arange(seq)[None, None, :]
    return pattern.visible(g, torch.zeros(1, 1, 1, dtype=torch.long), i, j)[0].expand(rows, seq)


def _inputs(seq, head_dim, dtype, args):
    batch = max(1, args.tokens_per_batch // seq)
    heads = max(1, args.model_dim // head_dim)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        for _ in range(3)
    )
    return q, k, v


def run_case(case, seq, head_dim, dtype_name, args, dense_cache):
    """All methods and passes of one case; returns result rows."""
    dtype = DTYPES[dtype_name]
    q, k, v = _inputs(seq, head_dim, dtype, args)
    batch, heads = q.shape[:2]
    layout, methods, notes = _methods_for(case, seq, args, dtype)
    density = layout.density()
    check = _check_against_flex(methods, q, k, v)
    rows = []
    for name, attn in methods.items():
        key = (seq, head_dim, dtype_name)
        if name == "dense_flash" and key in dense_cache:
            timed = dense_cache[key]
        else:
            timed = _timed_passes(attn, q, k, v, args)
            if name == "dense_flash":
                dense_cache[key] = timed
        pairs = seq * seq if name == "dense_flash" else density * seq * seq
        for which, (ms, note) in timed.items():
            flops = attention_flops(pairs, batch, heads, head_dim, which)
            rows.append(
                {
                    "case": case.label,
                    "family": case.family,
                    "target_density": case.target,
                    "density": density,
                    "seq": seq,
                    "batch": batch,
                    "heads": heads,
                    "head_dim": head_dim,
                    "dtype": dtype_name,
                    "pass": which,
                    "method": name,
                    "median_ms": ms[0] if ms else None,
                    "p20_ms": ms[1] if ms else None,
                    "p80_ms": ms[2] if ms else None,
                    "tflops": tflops(flops, ms[0] if ms else None),
                    "note": note,
                    "max_abs_diff_vs_flex": check,
                }
            )
    for name, note in notes.items():
        rows.append(
            {
                "case": case.label,
                "seq": seq,
                "head_dim": head_dim,
                "dtype": dtype_name,
                "method": name,
                "note": note,
            }
        )
    del q, k, v, methods
    torch.cuda.empty_cache()
    return rows


def _check_against_flex(methods, q, k, v):
    """max |sparse_attn - flex| of the forward (both exact on the same mask), or None."""
    if "sparse_attn" not in methods or "flex" not in methods:
        return None
    try:
        with torch.no_grad():
            return float(
                (methods["sparse_attn"](q, k, v).float() - methods["flex"](q, k, v).float()).abs().max()
            )
    except Exception:
        return None


def add_derived(rows):
    """Speedup over dense flash and the fraction of the ideal 1/density speedup, per sparse_attn row."""
    dense = {
        (r["seq"], r["head_dim"], r["dtype"], r["pass"]): r["median_ms"]
        for r in rows
        if r.get("method") == "dense_flash"
    }
    for r in rows:
        if r.get("method") in ("sparse_attn", *MOD_METHODS, "flex", "xformers") and r.get("median_ms"):
            d = dense.get((r["seq"], r["head_dim"], r["dtype"], r["pass"]))
            r["speedup_vs_dense"] = None if d is None else d / r["median_ms"]
            r["ideal_speedup"] = 1.0 / r["density"]
            r["fraction_of_ideal"] = fraction_of_ideal(d, r["median_ms"], r["density"])
    return rows


def modifier_cost(plain: dict, modified: dict) -> float | None:
    """Time with a modifier over time without (same case, pass and inputs), or None."""
    if not plain.get("median_ms") or not modified.get("median_ms"):
        return None
    return modified["median_ms"] / plain["median_ms"]


def format_table(rows) -> str:
    """One line per (case, length, head dim, dtype, pass): every method's median ms side by side."""
    grouped = {}
    for r in rows:
        if "pass" not in r:
            continue
        key = (r["case"], r["seq"], r["head_dim"], r["dtype"], r["pass"])
        grouped.setdefault(key, {})[r["method"]] = r
    head = (
        f"{'case':16s}{'seq':>7s}{'D':>5s}{'dtype':>6s}{'pass':>8s}{'density':>9s}"
        f"{'sparse ms [p20-p80]':>24s}{'TFLOP/s':>9s}{'dense':>9s}{'flex':>9s}{'xformers':>9s}"
        f"{'x dense':>9s}{'ideal':>8s}{'of ideal':>9s}"
        + "".join(f"{'x ' + name.split('+')[1]:>12s}" for name in MOD_METHODS)
    )
    lines = [head, "-" * len(head)]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for (case, seq, d, dtype, which), by in grouped.items():
        s = by.get("sparse_attn", {})
        spread = (
            f"{s['median_ms']:.3f} [{s['p20_ms']:.3f}-{s['p80_ms']:.3f}]"
            if s.get("median_ms")
            else s.get("note") or "-"
        )
        density = next(iter(by.values()))["density"]
        lines.append(
            f"{case:16s}{seq:7d}{d:5d}{dtype:>6s}{which:>8s}{density:9.4f}{spread[:23]:>24s}"
            f"{fmt(s.get('tflops'), '.1f'):>9s}{fmt(by.get('dense_flash', {}).get('median_ms'), '.3f'):>9s}"
            f"{fmt(by.get('flex', {}).get('median_ms'), '.3f'):>9s}{fmt(by.get('xformers', {}).get('median_ms'), '.3f'):>9s}"
            f"{fmt(s.get('speedup_vs_dense'), '.2f'):>9s}{fmt(s.get('ideal_speedup'), '.1f'):>8s}"
            f"{fmt(s.get('fraction_of_ideal'), '.0%'):>9s}"
            + "".join(f"{fmt(modifier_cost(s, by.get(name, {})), '.2f'):>12s}" for name in MOD_METHODS)
        )
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    """ms vs length (sparse solid, Flex dashed, dense black) and fraction of ideal, one column per pass,
    for the first dtype and the largest head dim measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("median_ms")]
    if not timed:
        return
    dtype = timed[0]["dtype"]
    head_dim = max(r["head_dim"] for r in timed)
    sel = [r for r in timed if r["dtype"] == dtype and r["head_dim"] == head_dim]
    passes = [p for p in PASSES if any(r["pass"] == p for r in sel)]
    fig, axes = plt.subplots(
        2, len(passes), figsize=(5.2 * len(passes), 8.4), squeeze=False, constrained_layout=True
    )
    cases = list(dict.fromkeys(r["case"] for r in sel if r["method"] == "sparse_attn"))
    for col, which in enumerate(passes):
        top, bottom = axes[0, col], axes[1, col]
        for n, case in enumerate(cases):
            colour = f"C{n % 10}"
            for method, style in (("sparse_attn", "o-"), ("flex", "x--")):
                pts = sorted(
                    (r["seq"], r)
                    for r in sel
                    if r["case"] == case and r["pass"] == which and r["method"] == method
                )
                if pts:
                    label = f"{case} ({'sparse-attn' if method == 'sparse_attn' else 'Flex'})"
                    top.plot(
                        [s for s, _ in pts],
                        [r["median_ms"] for _, r in pts],
                        style,
                        color=colour,
                        label=label,
                    )
                    ys = [r.get("fraction_of_ideal") for _, r in pts]
                    bottom.plot(
                        [s for s, _ in pts],
                        [y if y is not None else float("nan") for y in ys],
                        style,
                        color=colour,
                        label=label,
                    )
        # Dense rows repeat once per case (one cached timing); one point per length.
        dense = dict(
            sorted(
                (r["seq"], r["median_ms"]) for r in sel if r["method"] == "dense_flash" and r["pass"] == which
            )
        )
        if dense:
            top.plot(
                list(dense), list(dense.values()), "k-", linewidth=2, label="dense FlashAttention (SDPA)"
            )
        lengths = sorted({r["seq"] for r in sel})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel("sequence length (tokens)")
            ax.grid(True, which="both", alpha=0.3)
        fractions = [r.get("fraction_of_ideal") or 0 for r in sel if r["pass"] == which]
        bottom.set_ylim(0, max([1.1, *fractions]) * 1.05)
        top.set_yscale("log")
        top.set_ylabel("median time (ms)")
        top.set_title(f"{which}: time")
        bottom.set_ylabel("fraction of ideal 1/density speedup")
        bottom.axhline(1.0, color="0.4", linestyle=":")
        bottom.set_title(f"{which}: speedup over dense x density (1 = ideal)")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle(f"{title} ({dtype}, head dim {head_dim})")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "CUDA is not available: the GPU kernel benchmark needs an NVIDIA GPU, so there is nothing to measure "
            "on this machine. (See bench/README.md for the CPU benchmarks.)"
        )
        return 0
    from tqdm.auto import tqdm

    name = torch.cuda.get_device_name()
    cases = make_cases(args.families, args.densities)
    grid = [(c, s, d, t) for t in args.dtypes for d in args.head_dims for s in args.lengths for c in cases]
    rows, dense_cache = [], {}
    for case, seq, head_dim, dtype_name in tqdm(grid, desc="gpu kernels"):
        rows += run_case(case, seq, head_dim, dtype_name, args, dense_cache)
    add_derived(rows)
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu_kernels-{device_tag(name)}"
    meta = {
        "device": name,
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(
            ["python", "bench/gpu_kernels.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "flops": "4*D per computed pair forward, x2.5 backward, x3.5 both; masked methods over the sparse "
        "layout's computed blocks, dense over S*S",
    }
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, stem.with_suffix(".png"), f"sparse-attn kernels on {name}")
    print(f"saved {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
