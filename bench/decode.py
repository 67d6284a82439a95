"""Sparse decoding over a paged KV cache on the CPU: one decode step's attention time against cache length.

B=1, Hq=8, Hkv=2, D=128, fp32, page 64, one query row per step, cache lengths 4k .. 1M. Compared, in one
process, interleaved round-robin, medians:

- dense: ``F.scaled_dot_product_attention`` of the query over the whole cache, laid out contiguous
  ``[B, Hkv, L, D]`` (dense decode's best case);
- window: `PagedKVCache.attention` with ``sliding_window(4096, 0)`` (the pages of the last 4097 positions);
- topk: `PagedKVCache.attention` with ``topk_blocks(32) | sliding_window(256, 0)``, the 32 pages whose mean
  key (kept beside the cache, updated on append) best matches the query, plus the recent positions.

Also the bytes of K/V each step reads (the listed pages; top-k adds the page means it scores) against the
whole cache. Target (issue 25): at 1M cached tokens the window step reads <= 1% of the cache and is >= 50x
faster than dense decode.

FlexAttention's decoding kernel (FlexDecoding) is a Triton GPU kernel; on the CPU `flex_attention`
compiles to a C++ template that evaluates the block mask's mask_mod for the query row over every key block
of the sequence (there is no CPU split-KV decode path), and `create_block_mask` is built for each new
length (a recompile per cache length under torch.compile), so it is not a per-step decode baseline here.

    python bench/decode.py            # 4k .. 1M (about 6 GB of memory at 1M)
    python bench/decode.py --quick    # 4k and 16k, D=64, a smoke run of a few seconds

Saves ``bench/results/decode-cpu.json`` and ``.png`` (``decode-cpu-quick`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.paged.api import plan_step

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"window_read_fraction_max": 0.01, "window_speedup_min": 50.0}


def _cpu() -> dict:
    name, flags = platform.processor() or platform.machine(), []
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1].split()
    isa = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return {"model": name, "isa": isa, "threads": torch.get_num_threads()}


def _medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, warmed up once, run round-robin `repeats` times."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _fill(length: int, kv_heads: int, dim: int, page: int) -> sa.PagedKVCache:
    cache = sa.PagedKVCache(1, length, kv_heads, dim, page_size=page, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    chunk = 1 << 16
    for start in range(0, length, chunk):
        n = min(chunk, length - start)
        k = torch.randn(1, kv_heads, n, dim, generator=g)
        cache.append(k, torch.randn(1, kv_heads, n, dim, generator=g))
    return cache


def _bytes_read(cache: sa.PagedKVCache, q, pattern) -> int:
    """K/V bytes the step reads: listed pages x page x D x 2 (k and v), plus the page means top-k scores."""
    means = cache.page_means() if "topk" in repr(pattern) else None
    step = plan_step(q, cache.k_cache, cache.block_table, cache.cache_seqlens, pattern, None, means)
    kv_heads, dim = cache.k_cache.shape[2], cache.k_cache.shape[3]
    per_head = 1 if step.pages.shape[1] > 1 else kv_heads
    page_bytes = cache.page_size * dim * 2 * cache.k_cache.element_size()
    listed = int((step.pages >= 0).sum()) * per_head * page_bytes
    return listed + (0 if means is None else means.numel() * means.element_size())


def run_length(length: int, args) -> dict:
    kv_heads, heads, dim, page = 2, 8, args.dim, 64
    cache = _fill(length, kv_heads, dim, page)
    # Dense decode's best case: the cache contiguous as [B, Hkv, L, D].
    k = cache.k_cache.view(-1, kv_heads, dim)[:length].permute(1, 0, 2).contiguous()[None]
    v = cache.v_cache.view(-1, kv_heads, dim)[:length].permute(1, 0, 2).contiguous()[None]
    q = torch.randn(1, heads, 1, dim, generator=torch.Generator().manual_seed(1))
    window, topk = sa.sliding_window(4096, 0), sa.topk_blocks(32) | sa.sliding_window(256, 0)
    with torch.inference_mode():
        fns = {
            "dense": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            "window": lambda: cache.attention(q, window),
            "topk": lambda: cache.attention(q, topk),
        }
        seconds = _medians(fns, args.repeats)
        dense_out = fns["dense"]()
        window_out = fns["window"]()
        # The window's keys only (the float64 oracle over 1M keys would need 4 GB more).
        tail = slice(max(0, length - 4097), length)
        truth = sa.attention_reference(q.double(), k[:, :, tail].double(), v[:, :, tail].double())[0]
        error = (window_out.double() - truth).abs().max().item()
        total = 2 * k.numel() * k.element_size()
        read = {"dense": total, "window": _bytes_read(cache, q, window), "topk": _bytes_read(cache, q, topk)}
    del dense_out
    row = {
        "length": length,
        "seconds": seconds,
        "bytes_read": read,
        "cache_bytes": total,
        "window_error": error,
    }
    row["speedup"] = {n: seconds["dense"] / seconds[n] for n in ("window", "topk")}
    row["read_fraction"] = {n: read[n] / total for n in read}
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    lengths = [r["length"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("dense", "window", "topk"):
        ax1.plot(lengths, [r["seconds"][name] * 1e3 for r in rows], marker="o", label=name)
        ax2.plot(lengths, [r["bytes_read"][name] / 2**20 for r in rows], marker="o", label=name)
    for ax, label in ((ax1, "decode step attention (ms)"), (ax2, "K/V read per step (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached tokens")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    cpu = result["cpu"]
    fig.suptitle(
        f"paged decode, B=1 Hq=8 Hkv=2 D={result['dim']} fp32 - {cpu['model']} ({cpu['threads']} threads)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4k and 16k, D=64: a smoke run")
    parser.add_argument("--lengths", default=None, help="comma-separated cache lengths")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG")
    args = parser.parse_args(argv)
    default = "4096,16384" if args.quick else "4096,16384,65536,262144,1048576"
    args.lengths = [int(x) for x in (args.lengths or default).split(",")]
    args.dim = args.dim or (64 if args.quick else 128)
    args.repeats = args.repeats or (2 if args.quick else 7)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"cpu": _cpu(), "torch": torch.__version__, "dim": args.dim, "repeats": args.repeats}
    print(
        f"CPU: {result['cpu']['model']} ISA {' '.join(result['cpu']['isa'])}, {result['cpu']['threads']} threads"
    )
    print(f"{'length':>8} {'dense ms':>9} {'window ms':>9} {'topk ms':>9} {'win x':>7} {'topk x':>7} "
          f"{'win read':>9} {'topk read':>9}")  # fmt: skip
    rows = []
    for length in args.lengths:
        row = run_length(length, args)
        rows.append(row)
        s, x, f = row["seconds"], row["speedup"], row["read_fraction"]
        print(f"{length:>8} {s['dense'] * 1e3:9.2f} {s['window'] * 1e3:9.2f} {s['topk'] * 1e3:9.2f} "
              f"{x['window']:7.1f} {x['topk']:7.1f} {f['window']:9.4%} {f['topk']:9.4%}", flush=True)  # fmt: skip
    result["rows"], result["targets"] = rows, TARGETS
    last = rows[-1]
    met = last["read_fraction"]["window"] <= TARGETS["window_read_fraction_max"] and (
        last["speedup"]["window"] >= TARGETS["window_speedup_min"]
    )
    result["target_met_at_longest"] = met
    print(f"at {last['length']} tokens: window reads {last['read_fraction']['window']:.4%} of the cache, "
          f"{last['speedup']['window']:.1f}x faster than dense (targets <= 1%, >= 50x at 1M): "
          f"{'met' if met else 'NOT met'}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "decode-cpu" + ("-quick" if args.quick else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{name}.png")
    print(f"saved {out / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
