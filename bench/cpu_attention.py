"""The PyTorch backend on the CPU against dense SDPA and compiled FlexAttention, side by side in one process.

Question (issue 4): with B=1, H=8, S=8192, D=64, fp32, ``sliding_window(256, 256)`` and 2 threads, is
sparse-attn's forward >= 8x faster than dense ``F.scaled_dot_product_attention`` and no slower than
FlexAttention compiled on the CPU; forward + backward >= 5x faster than dense SDPA's; a BigBird-style
pattern at ~10% density >= 4x faster forward; and forward + backward at S=65,536 under 3 GB peak?

Timings are medians over repeats, the implementations interleaved round-robin so that machine noise hits
them alike. The memory case runs in a fresh subprocess: its peak resident set (VmHWM) for the whole
process, torch included.

    python bench/cpu_attention.py            # the full table (FlexAttention compiles for ~30 s)
    python bench/cpu_attention.py --quick    # a small smoke run, a few seconds, no FlexAttention
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"fwd_vs_sdpa": 8.0, "fwd_vs_flex": 1.0, "fwdbwd_vs_sdpa": 5.0, "bigbird_vs_sdpa": 4.0}
MEMORY_LIMIT_GB = 3.0

# Runs in the child: one forward + backward at `seq` tokens; prints the peak resident set in GiB.
MEMORY_CHILD = r"""
import json, sys, torch
import sparse_attn as sa
torch.set_num_threads(int(sys.argv[2]))
seq, heads, dim, window = int(sys.argv[1]), 8, 64, 256
q, k, v = (torch.randn(1, heads, seq, dim, requires_grad=True) for _ in range(3))
out = sa.sparse_attention(q, k, v, sa.sliding_window(window), backend="torch")
out.backward(torch.ones_like(out))
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_gib": peak_kib / 2**20, "peak_gb": peak_kib * 1024 / 1e9}))
"""


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _inputs(seq: int, heads: int, dim: int, grad: bool):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, seq, dim, generator=gen).requires_grad_(grad) for _ in range(3)]


def _flex_forward(q, k, v, window: int):
    """Compiled FlexAttention with the same window, or None if it cannot run here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def window_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= window) & (kv_idx - q_idx <= window)

    seq = q.shape[2]
    try:
        block_mask = create_block_mask(window_mod, None, None, seq, seq, device="cpu", _compile=True)
    except Exception:  # noqa: BLE001 - fall back to the eager build (O(S^2) but fine at 8k)
        block_mask = create_block_mask(window_mod, None, None, seq, seq, device="cpu")
    compiled = torch.compile(flex_attention)

    def run():
        with torch.no_grad():
            return compiled(q, k, v, block_mask=block_mask)

    return run


def _fwd(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def _fwd_bwd(fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    return run


def _interleaved(fns: dict, repeats: int, progress) -> dict:
    """Median seconds of each callable, warmed up once, run round-robin `repeats` times."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        progress.update(1)
    return {name: statistics.median(t) for name, t in times.items()}


def _memory(seq: int, threads: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(seq), str(threads)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool, repeats: int, threads: int, flex: bool, memory: bool) -> dict:
    from tqdm import tqdm

    import sparse_attn as sa
    from sparse_attn import backends

    torch.set_num_threads(threads)
    seq, heads, dim, window = (1024, 2, 64, 128) if quick else (8192, 8, 64, 256)
    window_pat = sa.sliding_window(window)
    big = (
        sa.bigbird(window=256, global_tokens=64, num_random_blocks=3) if not quick else sa.bigbird(64, 32, 2)
    )
    block = backends.get("torch").default_block_size
    q, k, v = _inputs(seq, heads, dim, grad=True)
    sparse = lambda pattern: lambda: sa.sparse_attention(q, k, v, pattern, backend="torch")
    dense = lambda: F.scaled_dot_product_attention(q, k, v)

    results = {"config": {"B": 1, "H": heads, "S": seq, "D": dim, "dtype": "float32", "threads": threads}}
    results["config"]["density_window"] = window_pat.layout(seq, block_size=block).density()
    results["config"]["density_bigbird"] = big.layout(seq, block_size=block).density()
    bar = tqdm(total=3 * repeats + (1 if flex else 0), desc="cpu attention", unit="round")
    fwd = {"sparse_attn": _fwd(sparse(window_pat)), "sdpa": _fwd(dense)}
    if flex:
        bar.set_postfix_str("compiling FlexAttention")
        flex_run = _flex_forward(q.detach(), k.detach(), v.detach(), window)
        if flex_run is not None:
            fwd["flex_compiled"] = flex_run
        bar.update(1)
    bar.set_postfix_str("forward")
    results["forward"] = _interleaved(fwd, repeats, bar)
    bar.set_postfix_str("forward + backward")
    both = {"sparse_attn": _fwd_bwd(sparse(window_pat), (q, k, v)), "sdpa": _fwd_bwd(dense, (q, k, v))}
    results["forward_backward"] = _interleaved(both, repeats, bar)
    bar.set_postfix_str("bigbird forward")
    results["bigbird_forward"] = _interleaved(
        {"sparse_attn": _fwd(sparse(big)), "sdpa": _fwd(dense)}, repeats, bar
    )
    bar.close()

    ratios = {
        "fwd_vs_sdpa": results["forward"]["sdpa"] / results["forward"]["sparse_attn"],
        "fwdbwd_vs_sdpa": results["forward_backward"]["sdpa"] / results["forward_backward"]["sparse_attn"],
        "bigbird_vs_sdpa": results["bigbird_forward"]["sdpa"] / results["bigbird_forward"]["sparse_attn"],
    }
    if "flex_compiled" in results["forward"]:
        ratios["fwd_vs_flex"] = results["forward"]["flex_compiled"] / results["forward"]["sparse_attn"]
    results["speedups"] = ratios
    if memory:
        mem_seq = 8192 if quick else 65536
        results["memory_fwd_bwd"] = {"S": mem_seq, **_memory(mem_seq, threads)}
    return results


def _table(results: dict) -> str:
    lines = [f"{'case':<20}{'impl':<16}{'median ms':>12}"]
    for case in ("forward", "forward_backward", "bigbird_forward"):
        for impl, seconds in results[case].items():
            lines.append(f"{case:<20}{impl:<16}{seconds * 1e3:>12.1f}")
    lines.append("")
    full_config = results["config"]["S"] == 8192
    for name, ratio in results["speedups"].items():
        verdict = (
            ("meets" if ratio >= TARGETS[name] else "MISSES") if full_config else "(targets: full run only)"
        )
        lines.append(f"{name:<20}{ratio:>8.2f}x   target >= {TARGETS[name]:g}x: {verdict}")
    mem = results.get("memory_fwd_bwd")
    if mem:
        if "error" in mem:
            lines.append(f"memory fwd+bwd S={mem['S']}: error {mem['error']}")
        else:
            verdict = "meets" if mem["peak_gb"] < MEMORY_LIMIT_GB else "MISSES"
            lines.append(
                f"memory fwd+bwd S={mem['S']}: peak RSS {mem['peak_gb']:.2f} GB   target < 3 GB: {verdict}"
            )
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = ("forward", "forward_backward", "bigbird_forward")
    impls = ("sparse_attn", "flex_compiled", "sdpa")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.27
    for i, impl in enumerate(impls):
        values = [results[c].get(impl, float("nan")) * 1e3 for c in cases]
        bars = ax.bar([x + (i - 1) * width for x in range(len(cases))], values, width, label=impl)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    cfg = results["config"]
    ax.set_xticks(range(len(cases)), ["forward\n(window)", "fwd + bwd\n(window)", "forward\n(bigbird)"])
    ax.set_ylabel("median ms (lower is better)")
    ax.set_yscale("log")
    ax.set_title(
        f"B=1 H={cfg['H']} S={cfg['S']} D={cfg['D']} fp32, {cfg['threads']} threads\n{results['hardware']}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (no FlexAttention)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per case (default 7, quick 2)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    parser.add_argument("--no-memory", action="store_true", help="skip the S=65,536 memory subprocess")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    results = run(
        args.quick, repeats, args.threads, flex=not (args.quick or args.no_flex), memory=not args.no_memory
    )
    results["hardware"] = f"{_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results["command"] = "python bench/cpu_attention.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cpu_attention-quick-cpu" if args.quick else "cpu_attention-cpu"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / f"{name}.png")
    print(f"saved {args.out / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
