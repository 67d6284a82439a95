"""Context parallelism: bytes each rank receives, and a real run of 4 gloo processes on this machine.

Questions (issue 15):
1. Accounting only (nothing runs): at 1,048,576 tokens over 4 and 8 ranks (B=1, H=8, D=64, fp32), how many
   bytes does each rank receive in the forward pass for ``sliding_window(512)``, ``longformer(512, 16)``,
   ``bigbird()`` and ``causal()`` (contiguous and zigzag), against an all-gather of K/V (what PyTorch's
   context parallelism sends)? Target for the window: at most 1% of the all-gather.
2. A real run: 4 gloo processes (loopback), 262,144 tokens, B=1, H=8, D=64, ``sliding_window(256)``, fp32,
   forward + backward: does it complete, match one process doing the whole sequence, and peak under 2 GB
   per process (VmHWM, torch included)? Time against that one process.

Causal's layout at 1M tokens has 134M blocks of 64; its plan is computed with blocks of 1024 instead, which
changes no byte (every rank needs whole earlier shards), as checked here at 262,144 tokens with both sizes.

    python bench/context_parallel.py            # both parts (the real run takes a few minutes)
    python bench/context_parallel.py --quick    # accounting at 65,536 tokens and a 16,384-token run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparse_attn as sa
from sparse_attn.distributed import communication_plan, context_parallel_attention

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, DIM = 8, 64
WINDOW_TARGET = 0.01
MEMORY_LIMIT_GB = 2.0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def accounting(seq_len: int, worlds=(4, 8)) -> list[dict]:
    cases = [
        ("sliding_window(512)", sa.sliding_window(512), "contiguous", 64),
        ("longformer(512, 16)", sa.longformer(512, 16), "contiguous", 64),
        ("bigbird()", sa.bigbird(), "contiguous", 64),
        ("causal()", sa.causal(), "contiguous", 1024),
        ("causal() zigzag", sa.causal(), "zigzag", 1024),
    ]
    rows = []
    for world in worlds:
        for name, pattern, order, block in cases:
            start = time.perf_counter()
            volume = communication_plan(
                pattern, seq_len, world, heads=HEADS, head_dim=DIM, order=order, block_size=block
            )
            received = volume.received()
            row = {
                "pattern": name,
                "world": world,
                "block_size": block,
                "received_per_rank": received.tolist(),
                "received_backward_per_rank": volume.received("backward").tolist(),
                "all_gather_per_rank": volume.all_gather,
                "max_fraction_of_all_gather": float(received.max()) / volume.all_gather,
                "blocks_computed_per_rank": volume.blocks_computed.tolist(),
                "plan_seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(
                f"  {name:22s} P={world}: max received {int(received.max()) / 2**20:9.2f} MiB "
                f"({100 * row['max_fraction_of_all_gather']:7.3f}% of an all-gather of "
                f"{volume.all_gather / 2**20:.0f} MiB); per rank {[f'{b / 2**20:.2f}' for b in received.tolist()]} MiB; "
                f"work (blocks) max/mean {float(volume.blocks_computed.max() / volume.blocks_computed.float().mean()):.2f}",
                flush=True,
            )
    return rows


def causal_block_size_check(seq_len: int) -> bool:
    """Causal bytes with blocks of 64 and of 1024 agree (4 ranks, both orders)."""
    for order in ("contiguous", "zigzag"):
        a, b = (
            communication_plan(sa.causal(), seq_len, 4, heads=HEADS, head_dim=DIM, order=order, block_size=s)
            for s in (64, 1024)
        )
        if not (a.forward.equal(b.forward) and a.backward.equal(b.backward)):
            return False
    return True


# -- the real run ----------------------------------------------------------------------------------------
def _chunk(name: str, index: int, chunk: int) -> torch.Tensor:
    """Chunk `index` of the whole-sequence tensor `name`, drawn from its own seed (no rank builds the whole)."""
    seed = {"q": 1, "k": 2, "v": 3, "do": 4}[name] * 1_000_003 + index
    return torch.randn(1, HEADS, chunk, DIM, generator=torch.Generator().manual_seed(seed))


def _peak_gb() -> float:
    kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return kib * 1024 / 1e9


def _rank_main(rank: int, world: int, seq_len: int, window: int, repeats: int, port: int, out_dir: str):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=10),
    )
    try:
        shard = seq_len // world
        q, k, v = (_chunk(n, rank, shard).requires_grad_() for n in "qkv")
        d_out = _chunk("do", rank, shard)
        times = []
        for _ in range(repeats):
            for t in (q, k, v):
                t.grad = None
            dist.barrier()
            start = time.perf_counter()
            out = context_parallel_attention(q, k, v, sa.sliding_window(window))
            out.backward(d_out)
            times.append(time.perf_counter() - start)
        torch.save(
            {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}, f"{out_dir}/rank{rank}.pt"
        )
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"seconds": times, "peak_gb": _peak_gb()}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_run(seq_len: int, world: int, window: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        print(
            f"  {world} gloo processes, {seq_len:,} tokens, {repeats} forward + backward each ...", flush=True
        )
        mp.spawn(_rank_main, args=(world, seq_len, window, repeats, _free_port(), out_dir), nprocs=world)
        per_rank = [json.loads(Path(f"{out_dir}/rank{r}.json").read_text()) for r in range(world)]
        print("  one process, the whole sequence ...", flush=True)
        shard = seq_len // world
        q, k, v = (torch.cat([_chunk(n, r, shard) for r in range(world)], 2).requires_grad_() for n in "qkv")
        d_out = torch.cat([_chunk("do", r, shard) for r in range(world)], 2)
        single = []
        for _ in range(repeats):
            for t in (q, k, v):
                t.grad = None
            start = time.perf_counter()
            out = sa.sparse_attention(q, k, v, sa.sliding_window(window))
            out.backward(d_out)
            single.append(time.perf_counter() - start)
        single_peak = _peak_gb()  # before the comparison below loads the ranks' results
        worst = {}
        for r in range(world):
            got = torch.load(f"{out_dir}/rank{r}.pt")
            rows = slice(r * shard, (r + 1) * shard)
            want = {
                "out": out.detach()[:, :, rows],
                "dq": q.grad[:, :, rows],
                "dk": k.grad[:, :, rows],
                "dv": v.grad[:, :, rows],
            }
            for name, tensor in want.items():
                err = float((got[name] - tensor).abs().max() / tensor.abs().max())
                worst[name] = max(worst.get(name, 0.0), err)
    cp_seconds = max(statistics.median(p["seconds"]) for p in per_rank)
    return {
        "seq_len": seq_len,
        "world": world,
        "pattern": f"sliding_window({window})",
        "threads_per_process": 1,
        "cp_seconds_median_slowest_rank": cp_seconds,
        "cp_seconds_per_rank": [p["seconds"] for p in per_rank],
        "single_process_seconds": single,
        "single_process_threads": torch.get_num_threads(),
        "single_process_seconds_median": statistics.median(single),
        "peak_gb_per_rank": [p["peak_gb"] for p in per_rank],
        "single_process_peak_gb": single_peak,
        "max_relative_error_vs_single": worst,
        "matches": all(e < 1e-5 for e in worst.values()),
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.5), sharey=True)
    for ax, world in zip(axes if len(worlds) > 1 else [axes], worlds, strict=True):
        mine = [r for r in rows if r["world"] == world]
        width = 0.8 / world
        for rank in range(world):
            fractions = [max(r["received_per_rank"][rank] / r["all_gather_per_rank"], 1e-6) for r in mine]
            ax.bar([i + rank * width for i in range(len(mine))], fractions, width, label=f"rank {rank}")
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.axhline(WINDOW_TARGET, color="r", lw=1, ls=":")
        ax.set_yscale("log")
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(mine))], [r["pattern"] for r in mine], rotation=20
        )
        ax.set_title(f"{world} ranks")
        ax.set_ylabel("forward bytes received / all-gather of K/V (0 drawn at 1e-6)")
    axes_list = axes if len(worlds) > 1 else [axes]
    axes_list[-1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--repeats", type=int, default=2, help="forward + backward runs timed in the real run"
    )
    args = parser.parse_args()
    seq_acc = 1 << 16 if args.quick else 1 << 20
    seq_run = 1 << 14 if args.quick else 1 << 18
    print(
        f"accounting at {seq_acc:,} tokens, B=1 H={HEADS} D={DIM} fp32 (bytes received, forward):", flush=True
    )
    rows = accounting(seq_acc)
    check_len = 1 << 14 if args.quick else 1 << 18
    same = causal_block_size_check(check_len)
    print(f"  causal bytes identical with blocks of 64 and 1024 at {check_len:,} tokens: {same}", flush=True)
    print("real run:", flush=True)
    run = real_run(seq_run, 4, 256, repeats=args.repeats)
    print(
        f"  4 processes (1 thread each): {run['cp_seconds_median_slowest_rank']:.2f} s forward + backward "
        f"(slowest rank, median); one process ({run['single_process_threads']} threads): "
        f"{run['single_process_seconds_median']:.2f} s; ratio {run['cp_seconds_median_slowest_rank'] / run['single_process_seconds_median']:.2f}x",
        flush=True,
    )
    print(
        f"  peak per process {[f'{g:.2f}' for g in run['peak_gb_per_rank']]} GB (limit {MEMORY_LIMIT_GB}); one "
        f"process {run['single_process_peak_gb']:.2f} GB; max relative error vs one process "
        f"{run['max_relative_error_vs_single']}",
        flush=True,
    )
    window_rows = [r for r in rows if r["pattern"].startswith("sliding_window")]
    verdict = {
        "window_within_1pct": all(r["max_fraction_of_all_gather"] <= WINDOW_TARGET for r in window_rows),
        "causal_block_size_invariant": same,
        "real_run_matches": run["matches"],
        "real_run_under_2gb": max(run["peak_gb_per_rank"]) < MEMORY_LIMIT_GB,
    }
    print("verdict:", verdict, flush=True)
    device = "cpu"
    result = {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "load": os.getloadavg(),
        },
        "quick": args.quick,
        "accounting_seq_len": seq_acc,
        "accounting": rows,
        "real_run": run,
        "verdict": verdict,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = f"context_parallel-{device}" + ("-quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(
        rows,
        RESULTS / f"{stem}.png",
        f"bytes received per rank at {seq_acc:,} tokens vs an all-gather of K/V ({_cpu_name()})",
    )
    print(f"saved {RESULTS / stem}.json and .png")
    sys.exit(0 if all(verdict.values()) else 1)


if __name__ == "__main__":
    main()
