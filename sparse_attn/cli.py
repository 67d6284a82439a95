"""The ``sparse-attn`` command (also ``python -m sparse_attn``).

Subcommands:
- ``demo``: the README's main job (see `sparse_attn.demo`).
- ``show SPEC --seq N -o out.png``: draw a pattern written in the spec language of `sparse_attn.spec`.
- ``bench {cpu,layout,kernels,interp} [ARGS...]``: run a benchmark script from the repository's ``bench/``
  folder, passing ARGS on (``--quick`` and so on).
- ``kernel-report [ARGS...]``: the Triton kernels' compile report (`sparse_attn.kernel_report`).

Exit codes: 0 success, 1 a failed check, 2 bad usage (a bad spec, a missing bench folder).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from . import backends

BENCH_SCRIPTS = {
    "cpu": "cpu_attention.py",
    "layout": "layout_build.py",
    "kernels": "gpu_kernels.py",
    "interp": "interp_proportionality.py",
    "documents": "documents.py",
    "topk": "topk_attention.py",
    "neighborhood": "neighborhood.py",
    "decode": "decode.py",
}
#: Set this to a folder holding the bench scripts to run them from outside a repository checkout.
BENCH_DIR_ENV = "SPARSE_ATTN_BENCH_DIR"


class UsageError(Exception):
    """Bad usage that the command reports on stderr with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-attn", description="Exact block-sparse attention: demo, pattern pictures, benchmarks."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="Longformer pattern: sparse vs dense attention, and a picture")
    demo.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    demo.add_argument("--window", type=int, default=256, help="keys each side (default 256)")
    demo.add_argument("--global-tokens", type=int, default=4, help="leading global tokens (default 4)")
    demo.add_argument("--heads", type=int, default=8)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    demo.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    demo.add_argument("--backend", choices=backends.names(), default=backends.AUTO)
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    demo.add_argument("-o", "--output", default="out/demo_pattern.png", help="where to save the picture")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    show = sub.add_parser(
        "show",
        help="draw a pattern spec, e.g. 'window:128+global:4' or 'dilated:64:2&causal'",
        description=_spec_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("spec", help="pattern spec (quote it: & and | are shell operators)")
    show.add_argument(
        "--seq", type=int, default=None, help="query length (default: the documents' total for doc:...)"
    )
    show.add_argument("--kv-seq", type=int, default=None, help="key length (default: --seq)")
    show.add_argument("--block-size", default="128", help="block size: N or BQxBK (default 128)")
    show.add_argument("--heads", default=None, help="heads to draw for per-head patterns, e.g. 0,2")
    show.add_argument("--max-pixels", type=int, default=512, help="image resolution per axis (default 512)")
    show.add_argument("-o", "--output", default="out/pattern.png", help="PNG path (default out/pattern.png)")
    show.add_argument(
        "--view",
        choices=["matrix", "grid", "both"],
        default=None,
        help="N-D patterns (na:..., sta:...): the query-key matrix, each query's neighbourhood on the grid "
        "(saved as OUTPUT with -grid before the suffix when both), or both (the default for them)",
    )
    show.add_argument(
        "--queries",
        default=None,
        help="grid cells to draw, e.g. '0,0,0;8,24,40' (default: corner, edge, centre)",
    )
    show.add_argument(
        "--tile-major", default=None, help="draw tile_major(pattern, T,H,W): tile-major token order"
    )

    bench = sub.add_parser("bench", help="run a benchmark script from the repository's bench/ folder")
    bench.add_argument("name", choices=sorted(BENCH_SCRIPTS), help="which benchmark (required)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (e.g. --quick)")

    report = sub.add_parser("kernel-report", help="compile report of the Triton kernels (no GPU needed)")
    report.add_argument("args", nargs=argparse.REMAINDER, help="passed to sparse_attn.kernel_report")
    return parser


def _spec_help() -> str:
    from . import spec

    return "Pattern spec language.\n\n" + spec.__doc__.split("\n", 2)[2]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sparse-attn`` and ``python -m sparse_attn``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Pass-through commands hand everything after their name to the script untouched (even --help).
    if argv[:1] == ["kernel-report"]:
        argv = ["kernel-report", "--", *argv[1:]]
    elif argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCH_SCRIPTS:
        argv = ["bench", argv[1], "--", *argv[2:]]
    if argv == ["bench"]:  # argparse would name the optional script arguments as required too
        build_parser().error(
            f"bench: the following argument is required: name ({', '.join(sorted(BENCH_SCRIPTS))})"
        )
    args = build_parser().parse_args(argv)
    if args.command in ("bench", "kernel-report") and args.args[:1] == ["--"]:
        args.args = args.args[1:]
    try:
        return {"demo": _demo, "show": _show, "bench": _bench, "kernel-report": _kernel_report}[args.command](
            args
        )
    except UsageError as e:
        print(f"sparse-attn {args.command}: error: {e}", file=sys.stderr)
        return 2


def _use_agg() -> None:
    """The CLI only writes files: no display backend needed, whatever the environment has."""
    import matplotlib

    matplotlib.use("Agg")


def _demo(args) -> int:
    from .demo import run_demo

    _use_agg()
    for name in ("seq", "heads", "head_dim", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        result = run_demo(
            args.seq,
            args.window,
            args.global_tokens,
            heads=args.heads,
            head_dim=args.head_dim,
            batch=args.batch,
            dtype=args.dtype,
            device=args.device,
            backend=args.backend,
            repeats=args.repeats,
            output=args.output,
            progress=not args.no_progress,
        )
    except (TypeError, ValueError, RuntimeError) as e:
        # Bad options, or a backend that cannot run here (e.g. triton without CUDA): a message, not a trace.
        raise UsageError(str(e)) from e
    return 0 if result["ok"] else 1


def _parse_block_size(text: str):
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise UsageError(f"--block-size must be N or BQxBK with positive ints, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _parse_heads(text):
    if text is None:
        return None
    try:
        return [int(h) for h in text.split(",")]
    except ValueError:
        raise UsageError(f"--heads must be head indices like 0 or 0,2,3, got {text!r}") from None


def _documents_length(pattern) -> int:
    """The sequence length a spec's documents cover (a spec without documents needs --seq)."""
    from .patterns.documents import Documents

    todo = [pattern]
    while todo:
        p = todo.pop()
        if isinstance(p, Documents):
            return p.ids.shape[-1]
        todo += [getattr(p, a) for a in ("left", "right", "docs") if hasattr(p, a)]
        todo += list(getattr(p, "patterns", []))
    raise UsageError("--seq is required (the spec has no doc:... documents to take the length from)")


def _show(args) -> int:
    from .spec import SpecError, parse_spec

    _use_agg()
    import matplotlib.pyplot as plt

    from .viz import plot_pattern

    try:
        pattern = parse_spec(args.spec)
    except SpecError as e:
        raise UsageError(str(e)) from e
    block_size = _parse_block_size(args.block_size)
    for flag, value in (("--seq", args.seq), ("--kv-seq", args.kv_seq), ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    from tqdm.auto import tqdm

    # Large BigBird-style patterns take seconds to build; the bar shows only on a terminal.
    steps = tqdm(total=3, desc="show: building the layout", disable=None, leave=False)
    try:
        pattern, grid_length = _grid_pattern(pattern, args.tile_major)
        view = args.view or ("both" if grid_length is not None else "matrix")
        if view != "matrix" and grid_length is None:
            raise UsageError(f"--view {view} draws N-D patterns (na:..., sta:...); {args.spec!r} has no grid")
        if args.seq is None:
            args.seq = grid_length if grid_length is not None else _documents_length(pattern)
        layout = pattern.layout(args.seq, args.kv_seq, block_size=block_size)
        steps.update()
        steps.set_description("show: drawing")
        figures = []
        path = Path(args.output)
        title = (
            args.spec if args.tile_major is None else f"{args.spec} in tile-major order ({args.tile_major})"
        )
        if view in ("matrix", "both"):
            # The pattern, not the layout, so per-head panels can name each head's own pattern.
            fig = plot_pattern(
                pattern,
                args.seq,
                args.kv_seq,
                block_size=block_size,
                heads=_parse_heads(args.heads),
                max_pixels=args.max_pixels,
                title=title,
            )
            figures.append((path, fig))
        if view in ("grid", "both"):
            from .viz import plot_neighborhood

            grid_path = path.with_name(f"{path.stem}-grid{path.suffix}") if view == "both" else path
            fig = plot_neighborhood(pattern, _parse_queries(args.queries), block_size=block_size, title=title)
            figures.append((grid_path, fig))
        steps.update()
    except (TypeError, ValueError) as e:
        steps.close()
        raise UsageError(str(e)) from e
    steps.set_description("show: saving")
    path.parent.mkdir(parents=True, exist_ok=True)
    for where, fig in figures:
        fig.savefig(where, dpi=130)
        plt.close(fig)
    steps.update()
    steps.close()
    print(repr(layout).split("\n", 1)[0])
    for where, _ in figures:
        print(f"saved {where}")
    return 0


def _grid_pattern(pattern, tile_major_text):
    """The pattern to draw (in tile-major order if asked) and its grid's sequence length (None: no grid)."""
    from .patterns.grid import grid_leaves, tile_major

    leaves = list(grid_leaves(pattern))
    if tile_major_text is not None:
        try:
            tile = [int(t) for t in tile_major_text.split(",")]
        except ValueError:
            raise UsageError(f"--tile-major must be tile sizes like 2,8,8, got {tile_major_text!r}") from None
        pattern = tile_major(pattern, tile if len(tile) > 1 else tile[0])
    if not leaves:
        return pattern, None
    return pattern, leaves[0].prefix + leaves[0].cells + leaves[0].suffix


def _parse_queries(text):
    if text is None:
        return None
    try:
        return [tuple(int(c) for c in cell.split(",")) for cell in text.split(";")]
    except ValueError:
        raise UsageError(f"--queries must be grid cells like '0,0;4,7', got {text!r}") from None


def _bench_candidates() -> list[Path]:
    candidates = [Path(os.environ[BENCH_DIR_ENV])] if os.environ.get(BENCH_DIR_ENV) else []
    return candidates + [Path.cwd() / "bench", Path(__file__).resolve().parent.parent / "bench"]


def find_bench_script(filename: str) -> Path:
    """The benchmark script `filename` in $SPARSE_ATTN_BENCH_DIR, ./bench or the checkout's bench/ (first found)."""
    candidates = _bench_candidates()
    for folder in candidates:
        if (folder / filename).is_file():
            return folder / filename
    looked = ", ".join(str(c) for c in candidates)
    if not any(folder.is_dir() for folder in candidates):
        raise UsageError(
            f"the bench/ folder was not found (looked in {looked}). The benchmarks ship with the repository, "
            f"not the installed package: run this from a checkout of sparse-attn, or set {BENCH_DIR_ENV}."
        )
    raise UsageError(f"benchmark script {filename} is missing (looked in {looked})")


def _bench(args) -> int:
    return run_script(find_bench_script(BENCH_SCRIPTS[args.name]), args.args)


def run_script(script: Path, argv: list[str]) -> int:
    """Run ``script``'s ``main(argv)`` (or the script as __main__ when it has none); return its exit code."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    # The script sees itself as argv[0] (argparse's prog) and can import its sibling helpers.
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))
    try:
        namespace = runpy.run_path(str(script), run_name="sparse_attn_bench")
        entry = namespace.get("main")
        if callable(entry):
            code = entry(argv)
        else:
            runpy.run_path(str(script), run_name="__main__")
            code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return _exit_code(code)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _kernel_report(args) -> int:
    try:
        from . import kernel_report
    except ImportError as e:
        raise UsageError(f"sparse_attn.kernel_report is not available: {e}") from e
    try:
        return _exit_code(kernel_report.main(args.args))
    except SystemExit as e:
        return _exit_code(e.code)
