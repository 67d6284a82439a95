"""Content-selected blocks (`topk_blocks`) on the CPU: speed against dense causal SDPA, and quality.

Speed (issue 14): B=1, Hq=8, Hkv=2, D=64, fp32, 32,768 tokens, ``topk_blocks(16) & causal()`` at block 64
(about 3% density against the ~50% causal SDPA computes). Is selection + forward >= 10x faster than dense
causal SDPA, with the selection <= 10% of that time, and forward + backward >= 7x faster than dense causal
SDPA's forward + backward? Timings are medians over repeats, the implementations interleaved round-robin
so that machine noise hits them alike.

Quality: on the synthetic needle task (`sparse_attn.needle`), the fraction of dense causal attention's
probability mass the selected blocks keep, and the needle recall, for k in {4, 8, 16, 32}, next to a causal
sliding window of the same size (position instead of content).

    python bench/topk_attention.py            # the full run (dense SDPA at 32k takes a while)
    python bench/topk_attention.py --quick    # a small smoke run, a few seconds

Saves ``bench/results/topk_attention-cpu.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"select_fwd_vs_sdpa": 10.0, "select_share_max": 0.10, "fwdbwd_vs_sdpa": 7.0}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, warmed up once, run round-robin `repeats` times."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        print(f"  warm-up {name}", flush=True)
        fn()
    for r in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        print(
            f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()),
            flush=True,
        )
    return {name: statistics.median(t) for name, t in times.items()}


def speed(seq: int, repeats: int, threads: int) -> dict:
    import sparse_attn as sa

    torch.set_num_threads(threads)
    batch, hq, hkv, dim, kk, block = 1, 8, 2, 64, 16, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, seq, dim, generator=gen, requires_grad=True)
    k, v = (torch.randn(batch, hkv, seq, dim, generator=gen, requires_grad=True) for _ in range(2))
    grad = torch.randn(batch, hq, seq, dim, generator=gen)
    pattern = sa.topk_blocks(kk) & sa.causal()

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def sparse():
        return sa.sparse_attention(q, k, v, pattern, backend="torch")

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    def with_backward(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(grad)

        return run

    fns = {
        "select": no_grad(lambda: sa.select_layout(pattern, q, k, block_size=block)),
        "select_fwd": no_grad(sparse),
        "sdpa_fwd": no_grad(dense),
        "select_fwd_bwd": with_backward(sparse),
        "sdpa_fwd_bwd": with_backward(dense),
    }
    times = _interleaved(fns, repeats)
    layout = sa.select_layout(pattern, q.detach(), k.detach(), block_size=block)
    return {
        "shape": {"B": batch, "Hq": hq, "Hkv": hkv, "S": seq, "D": dim, "dtype": "float32"},
        "pattern": repr(pattern),
        "block": block,
        "density": layout.density(),
        "causal_density": sa.causal().layout(seq, block_size=block).density(),
        "seconds": times,
        "select_fwd_vs_sdpa": times["sdpa_fwd"] / times["select_fwd"],
        "select_share": times["select"] / times["select_fwd"],
        "fwdbwd_vs_sdpa": times["sdpa_fwd_bwd"] / times["select_fwd_bwd"],
    }


def quality(seq: int) -> list[dict]:
    from sparse_attn.needle import needle_task, quality_table

    return quality_table(needle_task(seq=seq, query_tokens=min(1024, seq // 8)))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    s = result["speed"]["seconds"]
    names = ["sdpa_fwd", "select_fwd", "select", "sdpa_fwd_bwd", "select_fwd_bwd"]
    labels = [
        "dense causal\nSDPA fwd",
        "top-k\nselect+fwd",
        "top-k\nselect",
        "dense causal\nfwd+bwd",
        "top-k\nfwd+bwd",
    ]
    colours = ["0.6", "C0", "C1", "0.6", "C0"]
    left.bar(labels, [s[n] for n in names], color=colours)
    left.set_yscale("log")
    left.set_ylabel("seconds (median)")
    sp = result["speed"]
    left.set_title(
        f"{sp['pattern']}, S={sp['shape']['S']:,}, Hq=8/Hkv=2, D=64 fp32\n"
        f"select+fwd {sp['select_fwd_vs_sdpa']:.1f}x, fwd+bwd {sp['fwdbwd_vs_sdpa']:.1f}x faster than SDPA; "
        f"{result['cpu']}, {result['threads']} threads",
        fontsize=8,
    )
    table = result["quality"]
    ks = [row["k"] for row in table]
    right.plot(ks, [row["mass"] for row in table], "o-", label="top-k & causal: dense mass kept")
    right.plot(ks, [row["recall"] for row in table], "s--", label="top-k & causal: needle recall")
    right.plot(
        ks, [row["window_mass"] for row in table], "x:", color="0.5", label="same-size causal window: mass"
    )
    right.set_xscale("log", base=2)
    right.set_xticks(ks, [str(k) for k in ks])
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("k (key blocks of 64 per query block)")
    right.set_title(f"Needle task, S={result['quality_seq']:,}: 8 needles per KV head", fontsize=9)
    right.legend(fontsize=8, loc="lower right")
    right.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    seq = args.seq or (4096 if args.quick else 32768)
    quality_seq = 4096 if args.quick else 8192
    print(f"speed at S={seq} ({args.repeats} repeats, {args.threads} threads)", flush=True)
    result = {"cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__}
    result["speed"] = speed(seq, args.repeats, args.threads)
    print(f"needle quality at S={quality_seq}", flush=True)
    result["quality"] = quality(quality_seq)
    result["quality_seq"] = quality_seq
    result["targets"] = TARGETS
    sp = result["speed"]
    print(f"density {sp['density']:.4f} (causal {sp['causal_density']:.4f})")
    for name, t in sp["seconds"].items():
        print(f"  {name:15s} {t * 1e3:10.1f} ms")
    print(f"selection + forward vs dense causal SDPA forward: {sp['select_fwd_vs_sdpa']:.2f}x (target >= 10)")
    print(f"selection share of selection + forward: {sp['select_share']:.3f} (target <= 0.10)")
    print(f"forward + backward vs dense causal SDPA: {sp['fwdbwd_vs_sdpa']:.2f}x (target >= 7)")
    print(f"{'k':>4} {'density':>8} {'mass':>6} {'recall':>7} {'window mass':>12}")
    for row in result["quality"]:
        print(
            f"{row['k']:>4} {row['density']:8.4f} {row['mass']:6.3f} {row['recall']:7.3f} {row['window_mass']:12.3f}"
        )
    name = "topk_attention-cpu" + ("-quick" if args.quick else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{name}.png")
    print(f"saved {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
