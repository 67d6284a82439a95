"""Packed documents on the CPU: how fast the layout builds, and what a packed training step costs.

Questions (issue 13):
1. Layout build for 131,072 tokens packed from 64 random-length documents, ``documents(ids) & causal()``,
   block 128: at most 5 ms and 20 MB? FlexAttention's eager ``create_block_mask`` for the same mask is
   quoted in the same run, at the sizes it can handle (it evaluates the whole S x S grid).
2. Packed training step, B=1, H=8, D=64, 8 documents of 4,096 tokens (issue 22; ``--step-docs``,
   ``--step-tokens``, ``--random-lengths`` for others, e.g. issue 13's 16 random-length documents in
   16,384 tokens), fp32, forward +
   backward through the PyTorch backend: at least 10x faster than dense SDPA with the equivalent boolean
   mask, and within 1.25x of running the 16 documents one by one through SDPA with ``is_causal=True``
   (which computes no wasted pair: the practical limit)?

Builds run in fresh subprocesses (peak memory = rise of VmHWM, reset just before the build; time = median
over repeats, a new pattern per build, so the ids are read each time). Training-step timings are medians
over repeats, the three implementations interleaved round-robin so that machine noise hits them alike.

    python bench/documents.py            # the full table
    python bench/documents.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import datetime
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
BLOCK = 128
TARGETS = {"build_ms": 5.0, "build_mib": 20.0, "vs_dense": 10.0, "vs_per_doc": 1.25}

# Runs in the child: `repeats` builds of documents & causal over `seq` tokens of `docs` documents.
BUILD_CHILD = r"""
import json, sys, time, torch
which, seq, docs, repeats, block, threads = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(threads)

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

g = torch.Generator().manual_seed(0)
cuts = torch.sort(torch.randperm(seq - 1, generator=g)[: docs - 1] + 1).values
lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq])]))
ids = torch.repeat_interleave(torch.arange(docs), lengths)
if which == "sparse_attn":
    import sparse_attn as sa
    build = lambda: (sa.documents(ids) & sa.causal()).layout(seq, block_size=block)
    (sa.documents(ids[:512]) & sa.causal()).layout(512, block_size=block)  # warm up the code paths
else:
    from torch.nn.attention.flex_attention import create_block_mask
    def mask_mod(b, h, q, kv):
        return (ids[q] == ids[kv]) & (kv <= q)
    build = lambda: create_block_mask(mask_mod, None, None, seq, seq, device="cpu", BLOCK_SIZE=block)
before = rss_kib("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
times, cpu_times = [], []
for r in range(repeats):
    t0, c0 = time.perf_counter(), time.thread_time()
    result = build()
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.thread_time() - c0)  # this thread's CPU time: machine load barely moves it
    if r == 0:
        peak = rss_kib("VmHWM:")
    del result
print(json.dumps({"times": times, "cpu_times": cpu_times, "peak_mib": (peak - before) / 1024}))
"""


def measure_build(which: str, seq: int, docs: int, repeats: int, threads: int = 2) -> dict:
    args = [sys.executable, "-c", BUILD_CHILD, which, *map(str, (seq, docs, repeats, BLOCK, threads))]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["median_ms"] = statistics.median(result["times"]) * 1e3
    result["median_cpu_ms"] = statistics.median(result["cpu_times"]) * 1e3
    return result


def random_lengths(seq: int, docs: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(seq - 1, generator=g)[: docs - 1] + 1).values
    return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq])])).tolist()


def training_step(
    seq: int, docs: int, heads: int, dim: int, repeats: int, dense: bool, equal: bool = False
) -> dict:
    """Median forward + backward seconds of sparse-attn, per-document SDPA and (optionally) dense SDPA;
    documents of equal lengths (`equal`) or random ones."""
    import sparse_attn as sa

    lengths = [seq // docs] * docs if equal else random_lengths(seq, docs)
    lengths[-1] += seq - sum(lengths)
    ids = torch.repeat_interleave(torch.arange(docs), torch.tensor(lengths))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=gen).requires_grad_(True) for _ in range(3))
    grad = torch.randn(1, heads, seq, dim, generator=gen)

    def ours():
        # A new pattern per step, as a training loop with new documents per batch builds one.
        out = sa.sparse_attention(q, k, v, sa.documents(ids) & sa.causal(), backend="torch")
        out.backward(grad)

    def per_doc():
        start = 0
        for n in lengths:
            rows = slice(start, start + n)
            out = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], is_causal=True)
            out.backward(grad[:, :, rows])
            start += n

    def dense_sdpa():
        mask = (ids[:, None] == ids[None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(grad)

    impls = {"sparse_attn": ours, "sdpa_per_document": per_doc}
    if dense:
        impls["sdpa_dense_mask"] = dense_sdpa
    times = {name: [] for name in impls}
    for fn in impls.values():
        fn()  # warm up
    for r in range(repeats):
        for name, fn in impls.items():
            if name == "sdpa_dense_mask" and r >= max(1, repeats // 3):
                continue  # dense is slow: a few repeats are enough for a ratio
            for t in (q, k, v):
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"times": ts, "median_s": statistics.median(ts)} for name, ts in times.items()}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed training steps per implementation")
    parser.add_argument(
        "--step-docs", type=int, default=8, help="documents in the training step (default 8, issue 22)"
    )
    parser.add_argument(
        "--step-tokens", type=int, default=32768, help="tokens in the training step (default 8 x 4096)"
    )
    parser.add_argument(
        "--random-lengths", action="store_true", help="random document lengths in the step (default: equal)"
    )
    parser.add_argument("--no-build", action="store_true", help="skip the layout-build measurements")
    parser.add_argument("--build-only", action="store_true", help="only the 131k-token layout build")
    parser.add_argument("--build-threads", type=int, default=2, help="intra-op threads of the build child")
    parser.add_argument("--build-repeats", type=int, default=21, help="timed builds (a new pattern each)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    build_seq = 16384 if args.quick else 131072
    flex_seqs = [2048] if args.quick else [8192, 16384]
    builds = [
        {
            "impl": "sparse_attn",
            "tokens": build_seq,
            "docs": 64,
            **measure_build("sparse_attn", build_seq, 64, args.build_repeats, args.build_threads),
        }
    ]
    if args.build_only:
        print_builds(builds, args.build_threads)
        return 0
    if args.no_build:
        builds, flex_seqs = builds[:1], []
    for seq in sorted({*flex_seqs}):
        builds.append(
            {"impl": "sparse_attn", "tokens": seq, "docs": 64, **measure_build("sparse_attn", seq, 64, 21)}
        )
    for seq in flex_seqs:
        builds.append(
            {
                "impl": "flex_attention",
                "tokens": seq,
                "docs": 64,
                **measure_build("flex_attention", seq, 64, 1),
            }
        )
    step_seq, step_docs = (2048, 16) if args.quick else (args.step_tokens, args.step_docs)
    equal = not (args.random_lengths or args.quick)
    step = training_step(step_seq, step_docs, 8, 64, 3 if args.quick else args.repeats, True, equal)
    report = {
        "meta": {
            "cpu": _cpu_name(),
            "torch": torch.__version__,
            "threads": args.threads,
            "build_threads": args.build_threads,
            "block": BLOCK,
            "date": datetime.date.today().isoformat(),
            "load_average": list(__import__("os").getloadavg()),
            "command": "python bench/documents.py " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "targets": TARGETS,
        "layout_build": builds,
        "training_step": {
            "tokens": step_seq,
            "docs": step_docs,
            "lengths": "equal" if equal else "random",
            "heads": 8,
            "dim": 64,
            **step,
        },
    }
    print_report(report)
    name = "documents" + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}-cpu.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"{name}-cpu.png")
    return 0


def print_builds(builds, threads):
    print(
        f"{_cpu_name()}; documents(ids) & causal(), 64 random-length documents, block {BLOCK}: layout build"
    )
    print(f"{'impl':<16}{'tokens':>10}{'median ms':>12}{'cpu ms':>10}{'peak MiB':>10}   ({threads} threads)")
    for r in builds:
        if "error" in r:
            print(f"{r['impl']:<16}{r['tokens']:>10}  failed: {r['error']}")
        else:
            print(
                f"{r['impl']:<16}{r['tokens']:>10}{r['median_ms']:>12.2f}{r['median_cpu_ms']:>10.2f}"
                f"{r['peak_mib']:>10.1f}"
            )


def print_report(report):
    meta = report["meta"]
    print(f"\n{meta['cpu']}, {meta['threads']} threads, load average {meta['load_average'][0]:.1f}")
    print_builds(report["layout_build"], meta.get("build_threads", 2))
    s = report["training_step"]
    print(
        f"\npacked training step: B=1 H=8 D=64, {s['tokens']} tokens of {s['docs']} documents, fp32, fwd+bwd"
    )
    for name in ("sparse_attn", "sdpa_per_document", "sdpa_dense_mask"):
        if name in s:
            print(f"{name:<20}{s[name]['median_s'] * 1e3:>10.1f} ms")
    ours = s["sparse_attn"]["median_s"]
    if "sdpa_dense_mask" in s:
        print(
            f"dense SDPA / sparse-attn: {s['sdpa_dense_mask']['median_s'] / ours:.1f}x (target >= {TARGETS['vs_dense']}x)"
        )
    print(
        f"sparse-attn / per-document SDPA: {ours / s['sdpa_per_document']['median_s']:.2f}x (target <= {TARGETS['vs_per_doc']}x)"
    )


def plot(report, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_b, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, colour in (("sparse_attn", "tab:blue"), ("flex_attention", "tab:red")):
        pts = sorted(
            (r["tokens"], r["median_ms"])
            for r in report["layout_build"]
            if r["impl"] == impl and "error" not in r
        )
        if pts:
            label = (
                "sparse-attn documents & causal"
                if impl == "sparse_attn"
                else "FlexAttention create_block_mask"
            )
            ax_b.plot(*zip(*pts, strict=True), "o-", color=colour, label=label)
    ax_b.axhline(TARGETS["build_ms"], color="grey", ls="--", lw=1, label="target 5 ms (131k tokens)")
    ax_b.set(xscale="log", yscale="log", xlabel="tokens (64 documents)", ylabel="layout build, median (ms)")
    ax_b.legend(fontsize=8)
    ax_b.grid(True, which="both", alpha=0.3)
    s = report["training_step"]
    names = [n for n in ("sparse_attn", "sdpa_per_document", "sdpa_dense_mask") if n in s]
    ax_s.bar(
        names,
        [s[n]["median_s"] * 1e3 for n in names],
        color=["tab:blue", "tab:green", "tab:red"][: len(names)],
    )
    ax_s.set(yscale="log", ylabel="forward + backward, median (ms)")
    ax_s.set_title(f"{s['tokens']} tokens, {s['docs']} documents, H=8 D=64 fp32", fontsize=9)
    fig.suptitle(
        f"Packed documents on {report['meta']['cpu']} ({report['meta']['threads']} threads)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
