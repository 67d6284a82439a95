"""Video-sized N-D patterns on the CPU: a 3-D neighbourhood on a (16, 48, 80) grid (61,440 tokens), issue 26.

Question: how close does sparse-attn's CPU backend come to its ideal on NATTEN- and STA-style video patterns,
with and without tile-major token reordering, against dense SDPA and against NATTEN's way of running on
FlexAttention (a ``mask_mod`` with the neighbourhood, compiled ``flex_attention``)?

Cases (B=1, H=1 by default, D=64, fp32, forward):
- ``neighborhood(grid, (3, 11, 11))``: row-major, and ``tile_major(..., (2, 8, 8))``;
- ``sliding_tile(grid, (2, 8, 8), (3, 3, 3))`` (STA's tiles of 128 tokens): row-major and tile-major;
- dense ``F.scaled_dot_product_attention``; compiled FlexAttention with the neighbourhood's ``mask_mod``.

The ideal of a sparse case is dense SDPA's time times the fraction of pairs its layout computes (what a
kernel running at SDPA's per-pair speed would take); the table also gives the fraction of pairs that are
visible (0.59% for the neighbourhood) and the blocks' split into full and partial ones. Layout build times
are measured on one thread. FlexAttention's ``create_block_mask`` is measured in a subprocess (time, peak
memory, or why it failed); its forward then runs on that mask, or, if the mask cannot be built here, on
sparse-attn's block lists (`to_flex`) with the same ``mask_mod``.

Timings are medians, the implementations interleaved round-robin in one process; wall-clock and process CPU
time are both recorded (the machine may be shared). CPU model and ISA are printed and saved.

    python bench/neighborhood.py             # the full run (a few minutes; Flex compiles for ~1 min)
    python bench/neighborhood.py --quick     # a (6, 12, 32) grid, seconds, no FlexAttention
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"

# Runs in the child: create_block_mask for the neighbourhood; prints seconds and peak resident set.
FLEX_MASK_CHILD = r"""
import json, sys, time, torch
from torch.nn.attention.flex_attention import create_block_mask
sys.path.insert(0, sys.argv[1])
from neighborhood import natten_mask_mod
grid, kernel = json.loads(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
seq = 1
for n in grid:
    seq *= n
start = time.perf_counter()
create_block_mask(natten_mask_mod(grid, kernel), None, None, seq, seq, device="cpu", _compile=sys.argv[5] == "1")
seconds = time.perf_counter() - start
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_gib": peak_kib / 2**20}))
"""


def natten_mask_mod(grid, kernel):
    """FlexAttention ``mask_mod`` of NATTEN's neighbourhood (no dilation, stride or causality): per
    dimension, key y is visible from query x iff ``s <= y < s + k`` with ``s = clamp(x - k // 2, 0, n - k)``."""

    def coords(index):
        out = []
        for n in reversed(grid):
            out.append(index % n)
            index = index // n
        return out[::-1]

    def mask_mod(b, h, q_idx, kv_idx):
        visible = None
        for x, y, n, k in zip(coords(q_idx), coords(kv_idx), grid, kernel, strict=True):
            start = (x - k // 2).clamp(0, n - k)
            inside = (y >= start) & (y < start + k)
            visible = inside if visible is None else visible & inside
        return visible

    return mask_mod


def cpu_description() -> dict:
    """CPU model, the ISA extensions that matter for attention, and the load average."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = (
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
    )
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "model": model,
        "isa": [f for f in wanted if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "load_average": load,
    }


def interleaved(fns: dict, repeats: int) -> dict:
    """Median wall and CPU seconds of each callable, warmed up once, run round-robin `repeats` times."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for r in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
        print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr)
    return {
        name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name])} for name in fns
    }


def layout_stats(layout, visible_pairs: float) -> dict:
    total = layout.num_full + layout.num_partial
    return {
        "density": layout.density(),
        "visible": visible_pairs,
        "useful": visible_pairs / layout.density(),
        "full_blocks": layout.num_full,
        "partial_blocks": layout.num_partial,
        "full_fraction": layout.num_full / total if total else 0.0,
        "distinct_tiles": int(layout.tiles.shape[0]),
    }


def build_time(pattern, seq: int, block: int) -> dict:
    """Wall and CPU seconds to build the layout on one thread (a fresh pattern, so nothing is cached)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        pattern.layout(seq, block_size=block)
        return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    finally:
        torch.set_num_threads(threads)


def _limit_memory(gib: float):
    def apply():
        import resource

        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def flex_block_mask(grid, kernel, threads: int, compile_mask: bool, timeout: int, memory_gib: float) -> dict:
    """create_block_mask for the neighbourhood in a fresh subprocess (address space limited to
    `memory_gib`, so a shared machine is not pushed out of memory): seconds and peak memory, or the error."""
    args = [
        sys.executable,
        "-c",
        FLEX_MASK_CHILD,
        str(Path(__file__).resolve().parent),
        json.dumps(list(grid)),
        json.dumps(list(kernel)),
        str(threads),
        "1" if compile_mask else "0",
    ]
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory(memory_gib)
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        return {"error": lines[-1][:300], "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def flex_forward(q, k, v, grid, kernel, layout, block_mask_ok: bool):
    """Compiled flex_attention with NATTEN's mask_mod; the BlockMask from create_block_mask when it fits
    here, else from sparse-attn's block lists (same blocks, the mask_mod evaluates the partial ones)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    from sparse_attn.interop import flex_rows

    mask_mod = natten_mask_mod(grid, kernel)
    seq = q.shape[2]
    if block_mask_ok:
        block_mask = create_block_mask(mask_mod, None, None, seq, seq, device="cpu", _compile=True)
        source = "create_block_mask"
    else:
        kv_num, kv_idx = flex_rows(layout, "part")
        full_num, full_idx = flex_rows(layout, "full")
        block_mask = BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=layout.block_size,
            mask_mod=mask_mod,
            seq_lengths=(seq, seq),
        )
        source = "sparse-attn block lists"
    compiled = torch.compile(flex_attention)

    def run():
        with torch.no_grad():
            return compiled(q, k, v, block_mask=block_mask)

    return run, source


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a (6, 12, 32) grid, 1 repeat, no FlexAttention")
    p.add_argument("--grid", default=None, help="T,H,W (default 16,48,80; quick 6,12,32)")
    p.add_argument("--kernel", default=None, help="neighbourhood kernel T,H,W (default 3,11,11; quick 3,5,5)")
    p.add_argument(
        "--tile", default=None, help="tile for tile-major order and STA (default 2,8,8; quick 2,4,8)"
    )
    p.add_argument("--window", default="3,3,3", help="STA window in tiles (default 3,3,3)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument(
        "--flex-timeout", type=int, default=300, help="seconds for create_block_mask (default 300)"
    )
    p.add_argument(
        "--flex-memory-gib", type=float, default=12.0, help="address-space limit for it (default 12)"
    )
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG")
    args = p.parse_args(argv)
    ints = lambda text: tuple(int(x) for x in text.split(","))
    args.grid = ints(args.grid or ("6,12,32" if args.quick else "16,48,80"))
    args.kernel = ints(args.kernel or ("3,5,5" if args.quick else "3,11,11"))
    args.tile = ints(args.tile or ("2,4,8" if args.quick else "2,8,8"))
    args.window = ints(args.window)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.flex = not (args.quick or args.no_flex)
    return args


def main(argv=None) -> int:
    import sparse_attn as sa

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_description()
    seq = math.prod(args.grid)
    print(
        f"CPU: {cpu['model']} | ISA: {' '.join(cpu['isa'])} | torch {torch.__version__} "
        f"({cpu['torch_capability']}), {torch.get_num_threads()} threads | load {cpu['load_average']}"
    )
    print(f"grid {args.grid} = {seq:,} tokens, B=1, H={args.heads}, D={args.head_dim}, fp32, forward")

    block = sa.backends.get("torch").default_block_size
    natten = sa.neighborhood(args.grid, args.kernel)
    sta = sa.sliding_tile(args.grid, args.tile, args.window)
    patterns = {
        "neighborhood": natten,
        "neighborhood_tile_major": sa.tile_major(natten, args.tile),
        "sliding_tile": sta,
        "sliding_tile_tile_major": sa.tile_major(sta),
    }
    visible = {
        "neighborhood": math.prod(args.kernel) / seq,
        "sliding_tile": math.prod(
            min(w * t, n) for w, t, n in zip(args.window, args.tile, args.grid, strict=True)
        )
        / seq,
    }
    results = {
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "grid": args.grid,
        "kernel": args.kernel,
        "tile": args.tile,
        "window": args.window,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "block_size": block,
        "repeats": args.repeats,
        "cases": {},
    }
    layouts = {}
    for name, pattern in patterns.items():
        fresh = {
            "neighborhood": lambda: sa.neighborhood(args.grid, args.kernel),
            "neighborhood_tile_major": lambda: sa.tile_major(
                sa.neighborhood(args.grid, args.kernel), args.tile
            ),
            "sliding_tile": lambda: sa.sliding_tile(args.grid, args.tile, args.window),
            "sliding_tile_tile_major": lambda: sa.tile_major(
                sa.sliding_tile(args.grid, args.tile, args.window)
            ),
        }[name]
        seconds = build_time(fresh(), seq, block)
        layouts[name] = pattern.layout(seq, block_size=block)
        stats = layout_stats(layouts[name], visible[name.removesuffix("_tile_major")])
        results["cases"][name] = {"layout": stats, "build_1thread": seconds}
        print(
            f"  {name:26s} computed {stats['density']:.4f} (visible {stats['visible']:.4f}, "
            f"{stats['useful']:.0%} useful), full blocks {stats['full_fraction']:.0%}, "
            f"{stats['distinct_tiles']} tiles, built in {seconds['cpu_s'] * 1e3:.0f} ms CPU (1 thread)"
        )

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, seq, args.head_dim, generator=gen) for _ in range(3))
    fns = {
        name: (lambda p=p: sa.sparse_attention(q, k, v, p, backend="torch")) for name, p in patterns.items()
    }
    fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v)

    if args.flex:
        print("  FlexAttention: create_block_mask in a subprocess ...", file=sys.stderr)
        # Eager create_block_mask evaluates all S x S pairs (out of memory near 64k tokens): it runs on a
        # grid with half the sides; the compiled one is tried at full size too, under a memory limit.
        half = tuple(max(k, n // 2) for n, k in zip(args.grid, args.kernel, strict=True))
        for grid, compile_mask in ((half, False), (half, True), (args.grid, True)):
            key = (
                f"flex_create_block_mask_{'compiled' if compile_mask else 'eager'}_{'x'.join(map(str, grid))}"
            )
            results[key] = flex_block_mask(
                grid,
                args.kernel,
                torch.get_num_threads(),
                compile_mask,
                args.flex_timeout,
                args.flex_memory_gib,
            )
            print(f"  {key}: {results[key]}")
        ok = "seconds" in results[key]
        flex_layout = natten.layout(seq, block_size=128)  # Flex's CPU path wants 128 x 128 blocks
        try:
            run, source = flex_forward(q, k, v, args.grid, args.kernel, flex_layout, ok)
            print("  FlexAttention: compiling ...", file=sys.stderr)
            start = time.perf_counter()
            run()
            results["flex_compile_s"] = time.perf_counter() - start
            fns["flex_compiled"] = run
            results["flex_block_mask_source"] = source
            results["flex_density"] = flex_layout.density()
            # Exact: the same attention as ours.
            err = (run() - sa.sparse_attention(q, k, v, natten, backend="torch")).abs().max().item()
            results["flex_max_abs_diff"] = err
        except Exception as e:  # noqa: BLE001 - report why Flex could not run here
            results["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"  FlexAttention failed: {results['flex_error']}")

    with torch.no_grad():
        times = interleaved(fns, args.repeats)
    sdpa = times["sdpa"]
    results["sdpa"] = sdpa
    print(
        f"\n{'case':26s} {'wall ms':>10s} {'cpu ms':>10s} {'computed':>9s} {'of ideal':>9s} {'vs SDPA':>8s}"
    )
    print(f"{'dense SDPA':26s} {sdpa['wall_s'] * 1e3:10.1f} {sdpa['cpu_s'] * 1e3:10.1f} {1.0:9.4f}")
    for name in [*patterns, "flex_compiled"]:
        if name not in times:
            continue
        t = times[name]
        density = results["cases"][name]["layout"]["density"] if name in patterns else results["flex_density"]
        entry = results["cases"].setdefault(name, {})
        entry["time"] = t
        entry["of_ideal"] = {m: sdpa[m] * density / t[m] for m in ("wall_s", "cpu_s")}
        entry["speedup_vs_sdpa"] = {m: sdpa[m] / t[m] for m in ("wall_s", "cpu_s")}
        print(
            f"{name:26s} {t['wall_s'] * 1e3:10.1f} {t['cpu_s'] * 1e3:10.1f} {density:9.4f} "
            f"{entry['of_ideal']['cpu_s']:9.0%} {entry['speedup_vs_sdpa']['cpu_s']:7.1f}x"
        )
    results["load_average_after"] = cpu_description()["load_average"]
    save(results, Path(args.out), "neighborhood-cpu" + ("-quick" if args.quick else ""))
    return 0


def save(results: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=list))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"saved {out / f'{stem}.json'} (no matplotlib: no PNG)")
        return
    names = [n for n, c in results["cases"].items() if "time" in c]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    cpu_ms = [results["cases"][n]["time"]["cpu_s"] * 1e3 for n in names]
    left.barh(
        ["dense SDPA", *names], [results["sdpa"]["cpu_s"] * 1e3, *cpu_ms], color=["0.5"] + ["C0"] * len(names)
    )
    left.set_xscale("log")
    left.set_xlabel("forward, CPU time (ms, median; log)")
    left.invert_yaxis()
    frac = [results["cases"][n]["of_ideal"]["cpu_s"] for n in names]
    density = [
        results["cases"][n]["layout"]["density"]
        if "layout" in results["cases"][n]
        else results.get("flex_density", 0)
        for n in names
    ]
    right.barh(names, frac, color="C1")
    for y, (f, d) in enumerate(zip(frac, density, strict=True)):
        right.text(f, y, f" {f:.0%} (computes {d:.2%})", va="center", fontsize=8)
    right.set_xlabel("fraction of the ideal (dense SDPA time x fraction computed)")
    right.set_xlim(0, max(1.0, max(frac) * 1.35))
    right.invert_yaxis()
    cpu = results["cpu"]
    fig.suptitle(
        f"{results['grid']} grid ({math.prod(results['grid']):,} tokens), H={results['heads']}, D={results['head_dim']}, "
        f"fp32 forward\n{cpu['model']} ({' '.join(cpu['isa'])}), {results['threads']} threads, torch {results['torch']}",
        fontsize=9,
    )
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)
    print(f"saved {out / f'{stem}.json'} and {out / f'{stem}.png'}")


if __name__ == "__main__":
    sys.exit(main())
