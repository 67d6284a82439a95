"""The CPU path against its own ideal: sparse-attn's C++ kernel, the previous ATen-composition engine, dense
SDPA and compiled FlexAttention, side by side in one process (issue 17).

Question: with B=1, H=8, S=8192, D=64, ``sliding_window(256)`` and 2 threads, what fraction of its ideal
does each implementation reach? The ideal of a sparse pattern is dense SDPA's time on the same inputs
multiplied by the fraction of query-key pairs the layout computes (`BlockLayout.density()`): what a
kernel running at SDPA's per-pair speed would take. Targets: fp32 forward >= 75%, forward + backward
>= 70%; bf16 forward >= 60%, forward + backward >= 50%; a BigBird-style pattern (~10% computed) forward
>= 65% (fp32); peak memory of a 65,536-token fp32 forward + backward <= 2.07 GB.

Score modifiers (issue 16), fp32, the C++ kernel on the same window pattern and inputs: the time with
softcap (50, Gemma 2's), ALiBi (geometric slopes), rel_bias, and all three, over the time without a modifier,
interleaved in one process. Targets (forward): softcap <= 1.5x, ALiBi or rel_bias <= 1.2x. Forward +
backward is measured for "none" and "all" (rel_bias' gradient included).

Timings are medians over repeats, the implementations interleaved round-robin so that machine noise hits
them alike. Each is reported as wall-clock time and as the process's CPU time (all threads): on a shared
machine whose other load steals cores, CPU time is the steadier measure of the work done. The memory case
runs in a fresh subprocess: peak resident set (VmHWM) of the whole process, torch included.

    python bench/cpu_attention.py            # the full table (FlexAttention compiles for ~30 s per dtype)
    python bench/cpu_attention.py --quick    # a small smoke run, a few seconds, no FlexAttention
"""

from __future__ import annotations

import argparse
import json
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
# Minimum fraction of the ideal, per (dtype, case).
TARGETS = {
    ("float32", "forward"): 0.75,
    ("float32", "forward_backward"): 0.70,
    ("float32", "bigbird_forward"): 0.65,
    ("bfloat16", "forward"): 0.60,
    ("bfloat16", "forward_backward"): 0.50,
}
MEMORY_LIMIT_GB = 2.07
CASES = ("forward", "forward_backward", "bigbird_forward")
# Score modifiers: maximum forward time over the modifier-free forward's (issue 16).
MODIFIER_TARGETS = {"softcap": 1.5, "alibi": 1.2, "rel_bias": 1.2}
MODIFIERS = ("none", "softcap", "alibi", "rel_bias", "all")

# Runs in the child: one fp32 forward + backward at `seq` tokens; prints the peak resident set.
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


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _inputs(seq: int, heads: int, dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, seq, dim, generator=gen).to(dtype).requires_grad_(True) for _ in range(3)]


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

    try:
        run()
    except Exception:  # noqa: BLE001 - e.g. a dtype Flex's CPU path does not take
        return None
    return run


def _engine(name: str, fn, isa: str | None = None):
    """`fn` run with the "torch" backend's engine set to `name` ("kernel" or "aten"), the kernel's ISA build
    to `isa` (None: the best this CPU runs)."""
    from sparse_attn.backends import cpu_kernel

    def run():
        cpu_kernel.set_engine(name)
        before = os.environ.pop(cpu_kernel.ISA_ENV, None)
        if isa is not None:
            os.environ[cpu_kernel.ISA_ENV] = isa
        try:
            return fn()
        finally:
            cpu_kernel.set_engine(None)
            os.environ.pop(cpu_kernel.ISA_ENV, None)
            if before is not None:
                os.environ[cpu_kernel.ISA_ENV] = before

    return run


def _kernel_isas() -> list[str]:
    """The vector ISA builds this CPU runs, best first (the best is "sparse_attn", the others
    "sparse_attn_<isa>")."""
    from sparse_attn.backends import cpu_kernel

    isas = [isa for isa in cpu_kernel.supported_isas() if isa != "generic"] or ["generic"]
    return isas[::-1]


def _isa_report() -> dict:
    """The CPU's vector features, torch's dispatch level, the kernel builds measured and "auto"'s choice."""
    from sparse_attn.backends import cpu_kernel

    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16")
    wanted += ("amx_bf16", "amx_fp16", "amx_tile")
    return {
        "cpu_flags": [f for f in wanted if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_isas": _kernel_isas(),
        "auto_choice": {
            str(dt).removeprefix("torch."): cpu_kernel.auto_choice(dt)
            for dt in (torch.float32, torch.bfloat16)
        },
    }


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
    """Median wall and CPU seconds of each callable, warmed up once, run round-robin `repeats` times."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
        progress.update(1)
    return {
        name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name])} for name in fns
    }


def _memory(seq: int, threads: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(seq), str(threads)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fractions(case: dict, density: float) -> dict:
    """Each implementation's fraction of the ideal (dense SDPA x density), by wall and by CPU time."""
    out = {}
    for impl, t in case.items():
        if impl != "sdpa":
            out[impl] = {m: case["sdpa"][m] * density / t[m] for m in ("wall_s", "cpu_s")}
    return out


def _run_dtype(q, k, v, window_pat, big, window, density, repeats, flex, bar) -> dict:
    """Every case for inputs of one dtype."""
    import sparse_attn as sa

    name = str(q.dtype).removeprefix("torch.")
    sparse = lambda pattern: lambda: sa.sparse_attention(q, k, v, pattern, backend="torch")
    dense = lambda: F.scaled_dot_product_attention(q, k, v)
    # The engine (and the kernel's ISA build) is set around the whole call, backward included.
    best, *lower = _kernel_isas()
    engines = {"sparse_attn": ("kernel", best)}
    engines |= {f"sparse_attn_{isa}": ("kernel", isa) for isa in lower}
    engines["previous"] = ("aten", None)
    ours = lambda wrap, pattern: {n: _engine(*e[:1], wrap(sparse(pattern)), e[1]) for n, e in engines.items()}
    with_grad = lambda fn: _fwd_bwd(fn, (q, k, v))
    fwd = ours(_fwd, window_pat) | {"sdpa": _fwd(dense)}
    if flex:
        bar.set_postfix_str(f"compiling FlexAttention ({name})")
        flex_run = _flex_forward(q.detach(), k.detach(), v.detach(), window)
        if flex_run is not None:
            fwd["flex_compiled"] = flex_run
        bar.update(1)
    per = {}
    bar.set_postfix_str(f"{name} forward")
    per["forward"] = _interleaved(fwd, repeats, bar)
    bar.set_postfix_str(f"{name} forward + backward")
    per["forward_backward"] = _interleaved(
        ours(with_grad, window_pat) | {"sdpa": with_grad(dense)}, repeats, bar
    )
    bar.set_postfix_str(f"{name} bigbird forward")
    per["bigbird_forward"] = _interleaved(ours(_fwd, big) | {"sdpa": _fwd(dense)}, repeats, bar)
    per["fraction_of_ideal"] = {case: _fractions(per[case], density[case]) for case in CASES}
    return per


def _modifier_sets(q, k) -> dict:
    """Checked `ScoreMods` for each entry of MODIFIERS (None for "none")."""
    from sparse_attn.score_mods import check_score_mods

    heads, seq = q.shape[1], q.shape[2]
    gen = torch.Generator().manual_seed(1)
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)  # ALiBi's geometric slopes
    rel_bias = torch.randn(heads, 2 * seq - 1, generator=gen)
    args = {
        "none": (None, None, None),
        "softcap": (50.0, None, None),
        "alibi": (None, slopes, None),
        "rel_bias": (None, None, rel_bias),
        "all": (50.0, slopes, rel_bias),
    }
    return {name: check_score_mods(*args[name], q, k) for name in MODIFIERS}


def _run_modifiers(seq: int, heads: int, dim: int, window: int, repeats: int, bar) -> dict:
    """Forward with each modifier set, forward + backward without and with all, by the C++ kernel (fp32)."""
    import sparse_attn as sa
    from sparse_attn import backends
    from sparse_attn.backends import cpu_kernel

    q, k, v = (t.detach() for t in _inputs(seq, heads, dim, torch.float32))
    layout = sa.sliding_window(window).layout(seq, block_size=backends.get("torch").default_block_size)
    scale = dim**-0.5
    mods = _modifier_sets(q, k)
    do = torch.ones_like(q)

    def forward(m):
        return lambda: cpu_kernel.forward(q, k, v, layout, scale, None, m)

    def forward_backward(m):
        def run():
            out, lse = cpu_kernel.forward(q, k, v, layout, scale, None, m)
            cpu_kernel.backward(do, None, q, k, v, out, lse, layout, scale, None, m)

        return run

    bar.set_postfix_str("float32 modifiers forward")
    per = {"forward": _interleaved({n: forward(m) for n, m in mods.items()}, repeats, bar)}
    bar.set_postfix_str("float32 modifiers forward + backward")
    both = {n: forward_backward(mods[n]) for n in ("none", "all")}
    per["forward_backward"] = _interleaved(both, repeats, bar)
    per["ratio_to_none"] = {
        case: {
            name: {m: t[m] / per[case]["none"][m] for m in ("wall_s", "cpu_s")}
            for name, t in per[case].items()
        }
        for case in ("forward", "forward_backward")
    }
    return per


def run(
    quick: bool,
    repeats: int,
    threads: int,
    dtypes: list[str],
    flex: bool,
    memory: bool,
    modifiers: bool = True,
) -> dict:
    from tqdm import tqdm

    import sparse_attn as sa
    from sparse_attn import backends
    from sparse_attn.backends import cpu_kernel

    torch.set_num_threads(threads)
    for isa in _kernel_isas():
        cpu_kernel.load(strict=True, isa=isa)  # built before anything is timed
    seq, heads, dim, window = (1024, 2, 64, 128) if quick else (8192, 8, 64, 256)
    window_pat = sa.sliding_window(window)
    big = sa.bigbird(64, 32, 2) if quick else sa.bigbird(window=256, global_tokens=64, num_random_blocks=3)
    block = backends.get("torch").default_block_size
    density = {
        "forward": window_pat.layout(seq, block_size=block).density(),
        "bigbird_forward": big.layout(seq, block_size=block).density(),
    }
    density["forward_backward"] = density["forward"]
    results = {
        "config": {"B": 1, "H": heads, "S": seq, "D": dim, "threads": threads, "window": window},
        "density": density,
        "load_before": _load(),
        "isa": _isa_report(),
    }
    rounds = len(dtypes) * (3 * repeats + (1 if flex else 0)) + (2 * repeats if modifiers else 0)
    bar = tqdm(total=rounds, desc="cpu attention", unit="round")
    for dtype_name in dtypes:
        q, k, v = _inputs(seq, heads, dim, getattr(torch, dtype_name))
        results[dtype_name] = _run_dtype(q, k, v, window_pat, big, window, density, repeats, flex, bar)
    if modifiers:
        results["modifiers"] = _run_modifiers(seq, heads, dim, window, repeats, bar)
    bar.close()
    results["load_after"] = _load()
    if memory:
        mem_seq = 8192 if quick else 65536
        results["memory_fwd_bwd"] = {"S": mem_seq, **_memory(mem_seq, threads)}
    return results


def _table(results: dict, dtypes: list[str]) -> str:
    full = results["config"]["S"] == 8192
    isa = results["isa"]
    lines = [
        f"load average before/after: {results['load_before']} / {results['load_after']}",
        f"CPU: {results.get('hardware', _cpu_name())}; flags {' '.join(isa['cpu_flags'])}; torch dispatch "
        f"{isa['torch_capability']}; kernel builds {', '.join(isa['kernel_isas'])} (sparse_attn = the first)",
    ]
    for dt, c in isa["auto_choice"].items():
        lines.append(
            f"auto engine for {dt}: {c['engine']} (kernel {c['kernel_s'] * 1e3:.1f} ms, "
            f"ATen {c['aten_s'] * 1e3:.1f} ms on its calibration forward)"
        )
    if dtypes:
        lines.append(
            f"{'dtype':<9}{'case':<18}{'impl':<20}{'wall ms':>9}{'cpu ms':>9}{'of ideal (wall/cpu)':>22}  target"
        )
    for dtype in dtypes:
        for case in CASES:
            timings, fractions = results[dtype][case], results[dtype]["fraction_of_ideal"][case]
            for impl, t in timings.items():
                frac = fractions.get(impl)
                shown = f"{frac['wall_s']:>10.0%} / {frac['cpu_s']:<6.0%}" if frac else f"{'':>19}"
                target = TARGETS.get((dtype, case)) if impl == "sparse_attn" else None
                verdict = ""
                if target is not None and not full:
                    verdict = f">= {target:.0%} (full run only)"
                elif target is not None:
                    said = lambda f, target=target: "meets" if f >= target else "MISSES"
                    verdict = f">= {target:.0%}: wall {said(frac['wall_s'])}, cpu {said(frac['cpu_s'])}"
                lines.append(
                    f"{dtype:<9}{case:<18}{impl:<20}{t['wall_s'] * 1e3:>9.1f}{t['cpu_s'] * 1e3:>9.1f}"
                    f"{shown:>22}  {verdict}"
                )
    mods = results.get("modifiers")
    if mods:
        lines.append(f"float32 score modifiers, C++ kernel, same inputs ({'full run' if full else 'quick'}):")
        lines.append(
            f"{'case':<18}{'modifiers':<12}{'wall ms':>9}{'cpu ms':>9}{'x none (wall/cpu)':>20}  target"
        )
        for case in ("forward", "forward_backward"):
            for name, t in mods[case].items():
                r = mods["ratio_to_none"][case][name]
                target = MODIFIER_TARGETS.get(name) if case == "forward" else None
                verdict = ""
                if target is not None and not full:
                    verdict = f"<= {target}x (full run only)"
                elif target is not None:
                    said = lambda x, target=target: "meets" if x <= target else "MISSES"
                    verdict = f"<= {target}x: wall {said(r['wall_s'])}, cpu {said(r['cpu_s'])}"
                lines.append(
                    f"{case:<18}{name:<12}{t['wall_s'] * 1e3:>9.1f}{t['cpu_s'] * 1e3:>9.1f}"
                    f"{r['wall_s']:>11.2f}x / {r['cpu_s']:.2f}x  {verdict}"
                )
    mem = results.get("memory_fwd_bwd")
    if mem:
        if "error" in mem:
            lines.append(f"memory fwd+bwd S={mem['S']}: error {mem['error']}")
        else:
            verdict = "meets" if mem["peak_gb"] <= MEMORY_LIMIT_GB else "MISSES"
            lines.append(
                f"memory fwd+bwd S={mem['S']}: peak RSS {mem['peak_gb']:.2f} GB   "
                f"target <= {MEMORY_LIMIT_GB} GB: {verdict}"
            )
    return "\n".join(lines)


def _plot(results: dict, dtypes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = ("sparse_attn", *(f"sparse_attn_{isa}" for isa in results["isa"]["kernel_isas"][1:]))
    impls += ("previous", "flex_compiled")
    mods = results.get("modifiers")
    panels = len(dtypes) + (1 if mods else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    if mods:
        _plot_modifiers(axes[0][-1], mods)
    for ax, dtype in zip(axes[0], dtypes, strict=False):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            fr = results[dtype]["fraction_of_ideal"]
            xs = [x + (i - (len(impls) - 1) / 2) * width for x in range(len(CASES))]
            cpu = [100 * fr[c][impl]["cpu_s"] if impl in fr[c] else float("nan") for c in CASES]
            wall = [100 * fr[c][impl]["wall_s"] if impl in fr[c] else float("nan") for c in CASES]
            bars = ax.bar(xs, cpu, width, label=impl)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
            ax.plot(xs, wall, "k.", label="wall-clock" if i == 0 else None)
        for x, case in enumerate(CASES):
            target = TARGETS.get((dtype, case))
            if target:
                ax.hlines(100 * target, x - 0.45, x + 0.45, colors="k", linestyles="dashed", linewidth=1)
        ax.set_xticks(range(len(CASES)), ["forward\n(window)", "fwd + bwd\n(window)", "forward\n(bigbird)"])
        ax.set_ylabel("% of ideal (dense SDPA x density)\nbars: CPU time; dots: wall-clock")
        ax.set_title(dtype, fontsize=9)
        ax.legend(fontsize=7)
    cfg = results["config"]
    fig.suptitle(
        f"B=1 H={cfg['H']} S={cfg['S']} D={cfg['D']}, {cfg['threads']} threads, load {results['load_before']}"
        f"\n{results['hardware']} (dashed: targets)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_modifiers(ax, mods: dict) -> None:
    """Forward (and forward + backward) time with each modifier over the time without one."""
    names = list(mods["forward"])
    ratios = mods["ratio_to_none"]
    bars = ax.bar(range(len(names)), [ratios["forward"][n]["cpu_s"] for n in names], 0.6, label="forward")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.plot(range(len(names)), [ratios["forward"][n]["wall_s"] for n in names], "k.", label="wall-clock")
    xs = [names.index(n) for n in ratios["forward_backward"]]
    ax.plot(xs, [r["cpu_s"] for r in ratios["forward_backward"].values()], "rx", label="fwd + bwd")
    for x, name in enumerate(names):
        if name in MODIFIER_TARGETS:
            ax.hlines(MODIFIER_TARGETS[name], x - 0.4, x + 0.4, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("time / time without modifier\nbars: CPU time; dots: wall-clock")
    ax.set_title("float32 score modifiers (C++ kernel, window)", fontsize=9)
    top = max(r["cpu_s"] for case in ratios.values() for r in case.values())
    ax.set_ylim(0, max(1.9, 1.25 * top))
    ax.legend(fontsize=7, loc="upper left", ncol=3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (no FlexAttention)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per case (default 7, quick 2)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (float32, bfloat16)")
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    parser.add_argument("--no-memory", action="store_true", help="skip the S=65,536 memory subprocess")
    parser.add_argument("--no-modifiers", action="store_true", help="skip the score-modifier overhead case")
    parser.add_argument(
        "--modifiers-only",
        action="store_true",
        help="only the score-modifier case (saved as cpu_attention_modifiers-*.json/.png)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.modifiers_only and args.no_modifiers:
        parser.error("--modifiers-only and --no-modifiers exclude each other")
    repeats = args.repeats or (2 if args.quick else 7)
    dtypes = [] if args.modifiers_only else [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            parser.error(f"unsupported dtype {d!r}")
    results = run(
        args.quick,
        repeats,
        args.threads,
        dtypes,
        flex=not (args.quick or args.no_flex),
        memory=not (args.no_memory or args.modifiers_only),
        modifiers=not args.no_modifiers,
    )
    results["hardware"] = f"{_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results["command"] = "python bench/cpu_attention.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(_table(results, dtypes))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cpu_attention_modifiers" if args.modifiers_only else "cpu_attention"
    name += "-quick-cpu" if args.quick else "-cpu"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    _plot(results, dtypes, args.out / f"{name}.png")
    print(f"saved {args.out / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
