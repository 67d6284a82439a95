"""How long, and how much memory, building a block layout takes: sparse-attn's analytic build vs FlexAttention.

Question: can a layout for a 128k-token Longformer-style mask be built in <= 50 ms and <= 200 MB on a 2-core
CPU, and a 1M-token sliding window in under a second? FlexAttention's eager `create_block_mask` evaluates
the whole S x S grid; it is measured on the same mask where it fits.

Each measurement runs in a fresh subprocess: peak memory is the rise of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs just before the build) over its resident set before it.

    python bench/layout_build.py            # the full table (FlexAttention up to 32k tokens, ~10 GB)
    python bench/layout_build.py --quick    # small sizes only, a few seconds
    python bench/layout_build.py --flex-max 16384   # less memory
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW, GLOBALS, BLOCK = 512, 128, 128

# Runs in the child: build `repeats` times, report the times and the peak memory rise of the first build.
CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
which, seq, repeats, window, n_global, block = sys.argv[1], *map(int, sys.argv[2:])

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

if which == "sparse_attn":
    import sparse_attn as sa
    # A new pattern per build: patterns keep their recent layouts, and a cache hit is not a build.
    make = lambda: sa.sliding_window(window) | sa.global_tokens(n_global) if n_global else sa.sliding_window(window)
    build = lambda: make().layout(seq, block_size=block)
    sa.sliding_window(4).layout(64, block_size=16)  # warm up the code paths on a tiny case
else:
    from torch.nn.attention.flex_attention import create_block_mask
    def mask_mod(b, h, q, kv):
        local = (q - kv <= window) & (kv - q <= window)
        return local | (q < n_global) | (kv < n_global) if n_global else local
    build = lambda: create_block_mask(mask_mod, None, None, seq, seq, device="cpu", BLOCK_SIZE=block)
    create_block_mask(mask_mod, None, None, 256, 256, device="cpu", BLOCK_SIZE=block)

before = rss_kib("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
times = []
for r in range(repeats):
    t0 = time.perf_counter()
    result = build()
    times.append(time.perf_counter() - t0)
    if r == 0:
        peak = rss_kib("VmHWM:")
    del result
print(json.dumps({"times": times, "peak_mib": (peak - before) / 1024}))
"""


def measure(which: str, seq: int, repeats: int, n_global: int = GLOBALS) -> dict:
    args = [
        sys.executable,
        "-c",
        CHILD,
        which,
        str(seq),
        str(repeats),
        str(WINDOW),
        str(n_global),
        str(BLOCK),
    ]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["median_s"] = statistics.median(result["times"])
    return result


def cases(quick: bool, flex_max: int):
    """(implementation, tokens, repeats, global tokens) in the order they run."""
    ours = [4096, 16384, 32768] if quick else [16384, 32768, 131072, 262144, 1048576]
    flex = [s for s in ([1024, 4096] if quick else [4096, 8192, 16384, 32768, 65536]) if s <= flex_max]
    for seq in ours:
        yield "sparse_attn", seq, 3 if seq >= 1 << 20 else 11, GLOBALS
    if not quick:
        yield "sparse_attn", 1 << 20, 5, 0  # the plain 1M-token sliding window
    for seq in flex:
        yield "flex_attention", seq, 1 if seq >= 16384 else 3, GLOBALS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument(
        "--flex-max", type=int, default=32768, help="largest length for FlexAttention (memory!)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    rows = []
    todo = list(cases(args.quick, args.flex_max))
    for which, seq, repeats, n_global in tqdm(todo, desc="layout builds", unit="case"):
        rows.append(
            {"impl": which, "tokens": seq, "globals": n_global, **measure(which, seq, repeats, n_global)}
        )
    print_table(rows)
    save(rows, args.out, "layout_build" + ("-quick" if args.quick else ""))
    return 0


def print_table(rows):
    print(f"\nsliding_window({WINDOW}) | global_tokens(n), block {BLOCK}, {platform.machine()}, 2 threads")
    print(f"{'impl':<16}{'tokens':>10}{'globals':>9}{'median ms':>12}{'peak MiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<16}{r['tokens']:>10}{r['globals']:>9}  failed: {r['error']}")
        else:
            print(
                f"{r['impl']:<16}{r['tokens']:>10}{r['globals']:>9}{r['median_s'] * 1e3:>12.1f}{r['peak_mib']:>10.1f}"
            )
    ours = {r["tokens"]: r for r in rows if r["impl"] == "sparse_attn" and r["globals"] and "error" not in r}
    for r in rows:
        if r["impl"] == "flex_attention" and "error" not in r and r["tokens"] in ours:
            speedup = r["median_s"] / ours[r["tokens"]]["median_s"]
            print(f"at {r['tokens']} tokens sparse-attn builds {speedup:,.0f}x faster than create_block_mask")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save(rows, out: Path, name: str):
    out.mkdir(parents=True, exist_ok=True)
    import datetime

    import torch

    meta = {
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "threads": 2,
        "block": BLOCK,
        "date": datetime.date.today().isoformat(),
        "command": "python bench/layout_build.py " + " ".join(sys.argv[1:]),
    }
    (out / f"{name}-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, colour in (("sparse_attn", "tab:blue"), ("flex_attention", "tab:red")):
        pts = [r for r in rows if r["impl"] == impl and r["globals"] and "error" not in r]
        if not pts:
            continue
        label = (
            "sparse-attn analytic build"
            if impl == "sparse_attn"
            else "FlexAttention create_block_mask (eager)"
        )
        ax_t.plot(
            [p["tokens"] for p in pts], [p["median_s"] * 1e3 for p in pts], "o-", color=colour, label=label
        )
        ax_m.plot(
            [p["tokens"] for p in pts],
            [max(p["peak_mib"], 0.1) for p in pts],
            "o-",
            color=colour,
            label=label,
        )
    ax_t.axhline(50, color="grey", ls="--", lw=1, label="target 50 ms")
    ax_m.axhline(200, color="grey", ls="--", lw=1, label="target 200 MB")
    for ax, ylabel in ((ax_t, "build time, median (ms)"), (ax_m, "peak memory rise (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Layout build: sliding_window({WINDOW}) | global_tokens({GLOBALS}), block {BLOCK}, 2-core CPU"
    )
    fig.tight_layout()
    fig.savefig(out / f"{name}-cpu.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
