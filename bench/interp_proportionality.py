"""Do the block-sparse kernels do work in proportion to density? Measured on Triton's interpreter (CPU).

At 1,024 tokens (64x64 layout blocks, a 16 x 16 block grid) and block densities 1, 1/2, 1/4, 1/8, each query
block row keeps the same number of key blocks (a rotating band, so every key column keeps as many too). For
each density we record:
- tiles visited, counted while the real kernels run: the interpreter executes the jit helpers `_fwd_tile`,
  `_bwd_dkdv_tile` and `_bwd_dq_tile` (one call = one (query tile, key tile) step) as Python calls, so we
  wrap them with counters; reported in total and per program;
- the median wall time of the forward and of the backward through ``sparse_attention(backend="triton")``.

The cost ratio is cost(density) / cost(1). Pass: the counted-tile ratio is within 30% of the density in
every pass. Wall time is reported too: raw, and marginal ``(t(d) - t(0)) / (t(1) - t(0))`` with the fixed
per-program cost (loading q, storing out, measured with an empty layout) removed; on this 2-core machine
the small low-density times are noisy, so time is shown, not judged.

Run: ``python bench/interp_proportionality.py [--quick]``; writes
``bench/results/interp_proportionality-cpu-interpreter.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

# The interpreter must be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sparse_attn as sa  # noqa: E402

DEVICE = "cpu-interpreter"
SEQ_LEN = 1024
BLOCK = 64
DENSITIES = (1.0, 0.5, 0.25, 0.125)
TOLERANCE = 0.30
RESULTS = Path(__file__).parent / "results"


def band_blocks(n_blocks: int, density: float) -> torch.Tensor:
    """bool [n, n]: row i keeps blocks (i + j * stride) % n for j < n * density, spread evenly."""
    keep = round(n_blocks * density)
    grid = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    if keep == 0:
        return grid
    stride = n_blocks // keep
    rows = torch.arange(n_blocks)[:, None]
    grid[rows, (rows + torch.arange(keep)[None, :] * stride) % n_blocks] = True
    return grid


TILE_STEPS = {"forward": "_fwd_tile", "dkdv": "_bwd_dkdv_tile", "dq": "_bwd_dq_tile"}


@contextmanager
def counting_tile_steps():
    """Count calls of the kernels' per-tile jit helpers (interpreter only: they run as Python calls)."""
    from sparse_attn.triton_kernels import bsattn

    counts = Counter()
    originals = {name: getattr(bsattn, name) for name in TILE_STEPS.values()}
    for key, name in TILE_STEPS.items():

        def counted(*args, _original=originals[name], _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        setattr(bsattn, name, counted)
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(bsattn, name, original)


def count_tiles(q, k, v, pattern) -> dict:
    """Tile steps each pass executes, and programs launched (query tiles or key tiles x heads)."""
    with counting_tile_steps() as counts:
        time_once(q, k, v, pattern)
    return dict(counts)


def time_once(q, k, v, pattern) -> tuple[float, float]:
    """(forward seconds, backward seconds) of one call."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    start = time.perf_counter()
    out = sa.sparse_attention(*leaves, pattern, backend="triton")
    middle = time.perf_counter()
    out.backward(torch.ones_like(out))
    return middle - start, time.perf_counter() - middle


def measure(repeats: int, head_dim: int = 64) -> list[dict]:
    """One record per density (0 first: the fixed per-program cost), medians over `repeats`, interleaved."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, SEQ_LEN, head_dim, generator=g) for _ in range(3))
    n_blocks = SEQ_LEN // BLOCK
    densities = (0.0, *DENSITIES)
    patterns = {d: sa.block_sparse(band_blocks(n_blocks, d), BLOCK) for d in densities}
    times = {d: ([], []) for d in densities}
    time_once(q[:, :, :BLOCK], k[:, :, :BLOCK], v[:, :, :BLOCK], sa.causal())  # warm-up
    # Interleave densities within each repeat, so drift in machine load hits them alike.
    for _ in tqdm(range(repeats), desc="repeats"):
        for d in densities:
            fwd, bwd = time_once(q, k, v, patterns[d])
            times[d][0].append(fwd)
            times[d][1].append(bwd)
    records = []
    for d in densities:
        layout = patterns[d].layout(SEQ_LEN, SEQ_LEN, block_size=BLOCK)
        records.append(
            {
                "density": d,
                "layout_density": layout.density(),
                "tiles_visited": {key: count_tiles(q, k, v, patterns[d]).get(key, 0) for key in TILE_STEPS},
                "forward_s": statistics.median(times[d][0]),
                "backward_s": statistics.median(times[d][1]),
            }
        )
    return records


def add_ratios(records: list[dict]) -> None:
    """Raw and marginal (fixed cost removed) cost ratios against density 1, and the pass flag."""
    base = next(r for r in records if r["density"] == 0.0)
    dense = next(r for r in records if r["density"] == 1.0)
    for r in records:
        for pass_name in ("forward", "backward"):
            t, t0, t1 = r[f"{pass_name}_s"], base[f"{pass_name}_s"], dense[f"{pass_name}_s"]
            r[f"{pass_name}_ratio"] = t / t1
            r[f"{pass_name}_marginal_ratio"] = (t - t0) / (t1 - t0)
        r["tile_ratio"] = {p: r["tiles_visited"][p] / dense["tiles_visited"][p] for p in TILE_STEPS}
        if r["density"] > 0:
            r["within_tolerance"] = all(
                abs(x / r["density"] - 1) <= TOLERANCE for x in r["tile_ratio"].values()
            )
            r["time_within_tolerance"] = all(
                abs(r[f"{p}_marginal_ratio"] / r["density"] - 1) <= TOLERANCE for p in ("forward", "backward")
            )


def print_table(records: list[dict]) -> None:
    programs = SEQ_LEN // BLOCK  # per head, at the pinned 64-row/64-key tiles
    header = f"{'density':>8} {'tiles fwd/dkdv/dq':>17} {'per prog':>8} {'tile ratio':>10} {'fwd s':>7} "
    header += (
        f"{'bwd s':>7} {'fwd t-ratio':>11} {'bwd t-ratio':>11} {'fwd marg':>8} {'bwd marg':>8}  tiles ok"
    )
    print(header)
    for r in records:
        t = r["tiles_visited"]
        print(
            f"{r['density']:>8.3f} {t['forward']:>5}/{t['dkdv']:>5}/{t['dq']:>5} {t['forward'] / programs:>8.1f} "
            f"{r['tile_ratio']['forward']:>10.3f} {r['forward_s']:>7.3f} {r['backward_s']:>7.3f} "
            f"{r['forward_ratio']:>11.3f} {r['backward_ratio']:>11.3f} {r['forward_marginal_ratio']:>8.3f} "
            f"{r['backward_marginal_ratio']:>8.3f}  {r.get('within_tolerance', '-')}"
        )


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["density"] > 0]
    d = [r["density"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(d, d, "k--", label="ideal (= density)")
    ax.fill_between(
        d, [x * (1 - TOLERANCE) for x in d], [x * (1 + TOLERANCE) for x in d], color="0.9", label="±30%"
    )
    ax.plot(d, [r["tile_ratio"]["forward"] for r in rows], "k^", label="tiles visited (every pass)")
    for key, style in (("forward", "o-"), ("backward", "s-")):
        ax.plot(d, [r[f"{key}_marginal_ratio"] for r in rows], style, label=f"{key} (fixed cost removed)")
        ax.plot(d, [r[f"{key}_ratio"] for r in rows], style, alpha=0.35, label=f"{key} (raw)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("block density")
    ax.set_ylabel("cost / cost at density 1")
    ax.set_title(f"Cost vs density, {SEQ_LEN} tokens, Triton interpreter (CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    records = measure(repeats)
    add_ratios(records)
    print_table(records)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"interp_proportionality-{DEVICE}"
    meta = {"seq_len": SEQ_LEN, "block": BLOCK, "head_dim": 64, "repeats": repeats, "device": DEVICE}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    try:
        plot(records, stem.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no PNG")
    ok = all(r["within_tolerance"] for r in records if r["density"] > 0)
    time_ok = all(r["time_within_tolerance"] for r in records if r["density"] > 0)
    print(f"saved {stem}.json/.png")
    print(f"tiles visited track density within {TOLERANCE:.0%}: {ok}; marginal time does too: {time_ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
