"""GPU readiness without a GPU: compile every kernel in every shipped config and read its resources.

``python -m sparse_attn kernel-report [--json PATH]`` compiles the block-sparse kernels for sm_80 and sm_90a
(``triton.compile(ASTSource(...), target=GPUTarget(...))``; no GPU needed), fp16 and bf16, head dims 64 and
128, every shipped config, in every variant the launcher can produce: the 32 combinations of the
EVEN_M/EVEN_N/HAS_KEY_MASK/PER_HEAD_LAYOUT/PER_BATCH_LAYOUT flags (ptxas allocates registers for each variant on its own,
so a config clean in one variant can spill in another), plus the score-modifier variants (HAS_SOFTCAP,
HAS_ALIBI, HAS_REL_BIAS; ``--modifiers``: by default each alone and all three on the base variants with the
most and the least mask work, ``all`` for every modifier set on every base variant) with the configs
`launch.family_for` gives them, and the rel_bias gradient's reduction kernel. From the cubin, Triton's bundled ``cuobjdump`` gives registers, stack and shared memory
(``--dump-resource-usage``) and the SASS (``--dump-sass``), where we count tensor-core instructions (HMMA on
sm_80; HGMMA, or HMMA for tiles under 64 rows, on sm_90a) and the bytes stored by local-memory spill stores
(STL).

Compilation runs in worker processes with ``TRITON_INTERPRET`` removed from their environment: under the
interpreter, ``@triton.jit`` gives interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager

TARGETS = {"sm_80": 80, "sm_90a": 90}
DTYPES = ("fp16", "bf16")
HEAD_DIMS = (64, 128)
#: The layout block the report compiles for (the Triton backend's default).
LAYOUT_BLOCK = 64
KERNELS = {
    # kernel name -> config family in launch.SHIPPED_CONFIGS (None: the preprocess, one fixed config)
    "_bsattn_fwd_kernel": "fwd",
    "_bsattn_bwd_dkdv_kernel": "dkdv",
    "_bsattn_bwd_dq_kernel": "dq",
    "_bsattn_bwd_preprocess": None,
    "_bsattn_rel_bias_reduce": None,
}
#: The constexpr flags the launcher sets per call; the three main kernels are compiled for every combination.
VARIANT_FLAGS = ("EVEN_M", "EVEN_N", "HAS_KEY_MASK", "PER_HEAD_LAYOUT", "PER_BATCH_LAYOUT")
#: The score-modifier flags; each is off in the 32 base variants.
MOD_FLAGS = ("HAS_SOFTCAP", "HAS_ALIBI", "HAS_REL_BIAS")
#: Modifier sets the default ("subset") report compiles: each alone and all together ...
MOD_SUBSET = (("HAS_SOFTCAP",), ("HAS_ALIBI",), ("HAS_REL_BIAS",), MOD_FLAGS)
#: ... on these base variants: the one with the most mask work (ragged ends, key mask, per-batch and per-head
#: layout) and the one with the least (all even, no key mask, one shared layout).
MOD_BASE_VARIANTS = (
    {
        "EVEN_M": False,
        "EVEN_N": False,
        "HAS_KEY_MASK": True,
        "PER_HEAD_LAYOUT": True,
        "PER_BATCH_LAYOUT": True,
    },
    {
        "EVEN_M": True,
        "EVEN_N": True,
        "HAS_KEY_MASK": False,
        "PER_HEAD_LAYOUT": False,
        "PER_BATCH_LAYOUT": False,
    },
)
MODIFIER_CHOICES = ("none", "subset", "all")
PREPROCESS_FLAGS = {"HAS_DLSE": True}
#: The rel_bias reduction kernel: its two variants (a layout per head or shared by the heads).
REDUCE_VARIANTS = ({"PER_HEAD_LAYOUT": False}, {"PER_HEAD_LAYOUT": True})
RECORD_KEYS = (
    "kernel",
    "target",
    "dtype",
    "head_dim",
    "config",
    "variant",
    "registers",
    "spill_bytes",
    "stack_bytes",
    "shared_bytes",
    "tensor_core_instructions",
)
_INT_SCALARS = (
    "num_q_heads", "num_kv_heads", "group", "q_len", "kv_len", "num_q_blocks", "num_k_blocks", "layout_heads",
    "num_full_entries", "part_groups", "num_chunks", "chunk_shift", "batch_groups", "rb_zero",
)  # fmt: skip
_DATA_POINTERS = ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")
_FP32_POINTERS = ("Lse", "Delta", "DLse", "Slopes", "RelBias", "DRelPart", "Part", "DRelBias")
_FP32_SCALARS = ("qk_scale", "scale", "softcap2")


def variants(kernel: str, modifiers: str = "none") -> list[dict]:
    """The flag combinations `kernel` is compiled with: the 32 base variants (modifiers off), then with
    `modifiers` "subset" each modifier alone and all three on `MOD_BASE_VARIANTS`, with "all" every non-empty
    modifier set on every base variant (``7 x 32``)."""
    if kernel == "_bsattn_bwd_preprocess":
        return [PREPROCESS_FLAGS]
    if kernel == "_bsattn_rel_bias_reduce":
        return list(REDUCE_VARIANTS) if modifiers != "none" else []
    base = [
        dict(zip(VARIANT_FLAGS, bits, strict=True))
        for bits in itertools.product((False, True), repeat=len(VARIANT_FLAGS))
    ]
    if modifiers == "none":
        return base
    if modifiers == "subset":
        mod_sets, mod_bases = MOD_SUBSET, MOD_BASE_VARIANTS
    elif modifiers == "all":
        mod_sets = [c for n in range(1, 4) for c in itertools.combinations(MOD_FLAGS, n)]
        mod_bases = base
    else:
        raise ValueError(f"modifiers must be one of {MODIFIER_CHOICES}, got {modifiers!r}")
    with_mods = [
        {**flags, **{name: name in mods for name in MOD_FLAGS}} for mods in mod_sets for flags in mod_bases
    ]
    return base + with_mods


def variant_name(flags: dict) -> str:
    """``EVEN_M=1,EVEN_N=0,HAS_KEY_MASK=1,PER_HEAD_LAYOUT=0``-style label of a variant (modifier flags are
    named only in the variants that have them)."""
    return ",".join(f"{name}={int(value)}" for name, value in flags.items())


def config_family(kernel: str, flags: dict) -> str | None:
    """The `launch.SHIPPED_CONFIGS` family a variant runs with (`launch.family_for`: modifier variants of
    some kernels have their own tiles)."""
    from sparse_attn.triton_kernels.launch import family_for

    family = KERNELS[kernel]
    return family and family_for(family, *(flags.get(name, False) for name in MOD_FLAGS))


def jobs(head_dims=HEAD_DIMS, dtypes=DTYPES, targets=tuple(TARGETS), modifiers="none") -> list[tuple]:
    """Every (kernel, target, dtype, head_dim, config, flags) the report compiles; config None = a kernel
    with one fixed config (the preprocess, the rel_bias reduction)."""
    from sparse_attn.triton_kernels.launch import configs_for

    out = []
    for kernel in KERNELS:
        for head_dim in head_dims:
            for flags in variants(kernel, modifiers):
                family = config_family(kernel, flags)
                for config in configs_for(family, head_dim) if family else [None]:
                    out += [(kernel, t, d, head_dim, config, flags) for t in targets for d in dtypes]
    return out


def _signature(fn, dtype: str, head_dim: int, config, flags: dict):
    """ASTSource signature, constexprs and divisibility attrs: contiguous last dims, 16-aligned pointers."""
    from sparse_attn.triton_kernels.launch import PREPROCESS_BLOCK_M, REL_BIAS_DIAGS

    pad = max(16, 1 << (head_dim - 1).bit_length())
    constexprs = {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": pad,
        "LAYOUT_BQ": LAYOUT_BLOCK,
        "LAYOUT_BK": LAYOUT_BLOCK,
        "WORDS": -(-LAYOUT_BLOCK // 32),
        "DOT_PRECISION": "tf32",
        "DIAGS": REL_BIAS_DIAGS,
        **dict.fromkeys(MOD_FLAGS, False),
        **flags,
    }
    if config is None:
        constexprs["BLOCK_M"] = PREPROCESS_BLOCK_M
    else:
        constexprs.update(BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or (name.startswith("stride_") and name.endswith("d")):
            # A unit last-dim stride is specialised to a constant at launch, as Triton does for 1.
            constexprs.setdefault(name, 1)
            signature[name] = "constexpr"
            continue
        if name in _DATA_POINTERS:
            signature[name] = f"*{dtype}"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name == "KeyMask":
            signature[name] = "*u8"
        elif name[0].isupper():
            signature[name] = "*i32"
        elif name in _FP32_SCALARS:
            signature[name] = "fp32"
        elif name.startswith("stride_") or name in _INT_SCALARS:
            signature[name] = "i32"
        else:
            raise ValueError(f"no signature rule for parameter {name!r} of {fn.__name__}")
        # The ALiBi slopes' batch stride (Hq or 0) and rel_bias' padded row: not assumed divisible by 16.
        if signature[name].startswith("*") or (
            name.startswith("stride_") and name not in ("stride_slb", "stride_rbh")
        ):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, {k: v for k, v in constexprs.items() if k in fn.arg_names}, attrs


def _cuobjdump(*args: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def _spill_store_bytes(sass: str) -> int:
    """Bytes written by local-memory stores (STL, STL.64, STL.128): register spills."""
    total = 0
    for width in re.findall(r"\bSTL(?:\.(\d+))?\b", sass):
        total += int(width) // 8 if width else 4
    return total


def fixed_config_name(kernel: str) -> str:
    """The config label of a kernel with one fixed config."""
    from sparse_attn.triton_kernels.launch import REDUCE_NUM_WARPS, REL_BIAS_DIAGS

    if kernel == "_bsattn_rel_bias_reduce":
        return f"DIAGS{REL_BIAS_DIAGS}-w{REDUCE_NUM_WARPS}"
    return "BLOCK_M64-w4"


def compile_one(kernel: str, target: str, dtype: str, head_dim: int, config, flags: dict) -> dict:
    """Compile one kernel variant for one target; return its record."""

    from sparse_attn.triton_kernels import bsattn
    from sparse_attn.triton_kernels.launch import REDUCE_NUM_WARPS

    fn = getattr(bsattn, kernel)
    signature, constexprs, attrs = _signature(fn, dtype, head_dim, config, flags)
    if config:
        options = config.options()
    else:
        options = {"num_warps": REDUCE_NUM_WARPS if kernel == "_bsattn_rel_bias_reduce" else 4}
    return {
        "kernel": kernel,
        "target": target,
        "dtype": dtype,
        "head_dim": head_dim,
        "config": str(config) if config else fixed_config_name(kernel),
        "variant": variant_name(flags),
        **_compile_and_inspect(fn, signature, constexprs, attrs, target, options),
    }


def _compile_and_inspect(fn, signature, constexprs, attrs, target: str, options: dict) -> dict:
    """Compile `fn` for `target` and read its cubin: registers, spills, stack, shared memory, tensor cores."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", TARGETS[target], 32),
        options=options,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _cuobjdump("--dump-resource-usage", path)
        sass = _cuobjdump("--dump-sass", path)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "registers": int(fields["REG"]),
        "spill_bytes": _spill_store_bytes(sass) + int(fields.get("LOCAL", 0)),
        "stack_bytes": int(fields["STACK"]),
        # Dynamic shared memory Triton requests, plus any static shared in the cubin.
        "shared_bytes": int(compiled.metadata.shared) + int(fields["SHARED"]),
        # HGMMA (wgmma) on sm_90a; HMMA (mma.sync) on sm_80, and on sm_90a for tiles too small for wgmma.
        "tensor_core_instructions": len(re.findall(r"\bH(?:G)?MMA\b", sass)),
    }


@contextmanager
def _without_interpreter():
    """Spawned workers inherit os.environ: drop TRITON_INTERPRET while they start."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def run_report(
    head_dims=HEAD_DIMS,
    dtypes=DTYPES,
    targets=tuple(TARGETS),
    workers=None,
    progress=True,
    modifiers="subset",
) -> list[dict]:
    """Compile every job in spawned worker processes; records sorted like `jobs()`."""
    return run_jobs(jobs(head_dims, dtypes, targets, modifiers), workers, progress)


def run_jobs(todo: list[tuple], workers=None, progress=True) -> list[dict]:
    """Compile `todo` (entries of `jobs()`) in spawned worker processes; records in the same order."""
    import multiprocessing

    from tqdm import tqdm

    workers = workers or min(len(todo), os.cpu_count() or 1)
    records = [None] * len(todo)
    with _without_interpreter():
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        with pool:
            futures = {pool.submit(compile_one, *job): i for i, job in enumerate(todo)}
            for future in tqdm(
                as_completed(futures), total=len(todo), desc="kernel-report", disable=not progress
            ):
                records[futures[future]] = future.result()
    return records


def format_table(records: list[dict]) -> str:
    """One line per record, aligned."""
    header = (
        "kernel",
        "target",
        "dtype",
        "D",
        "config",
        "variant",
        "regs",
        "spill",
        "stack",
        "shared",
        "tensor-core",
    )
    rows = [header] + [
        (r["kernel"], r["target"], r["dtype"], str(r["head_dim"]), r["config"], r["variant"], str(r["registers"]),
         str(r["spill_bytes"]), str(r["stack_bytes"]), str(r["shared_bytes"]), str(r["tensor_core_instructions"]))
        for r in records
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


# -- the paged decode kernel (triton_kernels/decode.py) ---------------------------------------------------
#: (dtype, head dim, query rows G * Sq, softcap, per-head pages and bias) compiled by `decode_report`.
DECODE_SHAPES = (
    ("fp16", 64, 16, False, False),
    ("fp16", 128, 16, False, False),
    ("bf16", 128, 16, True, True),
    ("bf16", 128, 32, False, False),
    ("bf16", 128, 64, False, False),
    ("fp16", 256, 16, False, False),
    ("bf16", 256, 64, True, False),
)
_DECODE_UNIT_STRIDES = (
    "stride_qd",
    "stride_kd",
    "stride_vd",
    "stride_pp",
    "stride_bk",
    "stride_od",
    "stride_lr",
)
#: Strides that are multiples of 16 elements for head dims and page sizes that are (the rest are not assumed).
_DECODE_ALIGNED = tuple(
    f"stride_{t}{d}" for t, ds in (("q", "bhs"), ("k", "prh"), ("v", "prh"), ("o", "bhsr")) for d in ds
)


def compile_decode(target: str, dtype: str, head_dim: int, rows: int, softcap: bool, per_head: bool) -> dict:
    """Compile the decode kernel with the launcher's tile choice (page size 64, group 4); return its record."""
    from sparse_attn.triton_kernels import decode

    fn = decode._decode_fwd_kernel
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    block_m = max(16, 1 << (rows - 1).bit_length())
    block_n, num_warps = decode.tile_config(block_m, block_d, 64)
    constexprs = dict(GROUP=4, PAGE_SIZE=64, BIAS_PER_HEAD=per_head, PAGES_PER_HEAD=per_head, HAS_SOFTCAP=softcap,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HEAD_DIM=head_dim)  # fmt: skip
    constexprs.update(dict.fromkeys(_DECODE_UNIT_STRIDES, 1))
    pointers = {
        "Q": dtype,
        "K": dtype,
        "V": dtype,
        "Pages": "i32",
        "Bias": "fp32",
        "Out": "fp32",
        "Lse": "fp32",
    }
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in ("scale2", "softcap2") else "i32"
            if name in _DECODE_ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps, "num_stages": 2}
    return {
        "kernel": "_decode_fwd_kernel",
        "target": target,
        "dtype": dtype,
        "head_dim": head_dim,
        "config": f"BLOCK_M={block_m} BLOCK_N={block_n} warps={num_warps} stages=2",
        "variant": f"rows={rows}" + (" SOFTCAP" if softcap else "") + (" PER_HEAD" if per_head else ""),
        **_compile_and_inspect(fn, signature, constexprs, attrs, target, options),
    }


def decode_report() -> list[dict]:
    """Every `DECODE_SHAPES` entry for sm_80 and sm_90a, compiled in this process (interpreter off)."""
    with _without_interpreter():
        return [compile_decode(t, *shape) for t in TARGETS for shape in DECODE_SHAPES]


def main(argv=None) -> int:
    """CLI: print the table, optionally write JSON; exit 1 if any config spills or lacks tensor cores."""
    parser = argparse.ArgumentParser(
        prog="python -m sparse_attn kernel-report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument(
        "--modifiers",
        choices=MODIFIER_CHOICES,
        default="subset",
        help="score-modifier variants: none; subset (default: each modifier alone and all three, on the base "
        "variants with the most and the least mask work); all (every modifier set on every base variant)",
    )
    parser.add_argument("--decode", action="store_true", help="the paged decode kernel only (decode.py)")
    args = parser.parse_args(argv)
    if args.decode:
        records = decode_report()
    else:
        records = run_report(
            head_dims=tuple(args.head_dims),
            dtypes=tuple(args.dtypes),
            workers=args.workers,
            modifiers=args.modifiers,
        )
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {args.json}")
    bad = [r for r in records if problems(r)]
    for r in bad:
        print(
            f"NOT CLEAN: {r['kernel']} {r['target']} {r['dtype']} D={r['head_dim']} {r['config']} "
            f"{r['variant']}: {problems(r)}"
        )
    return 1 if bad else 0


def problems(record: dict) -> list[str]:
    """What is wrong with one record: spills, stack use, or no tensor-core instructions (not preprocess)."""
    found = []
    if record["spill_bytes"]:
        found.append(f"{record['spill_bytes']} spill bytes")
    if record["stack_bytes"]:
        found.append(f"{record['stack_bytes']} stack bytes")
    if KERNELS.get(record["kernel"], "decode") is not None and not record["tensor_core_instructions"]:
        found.append("no tensor-core instructions")
    return found


if __name__ == "__main__":
    sys.exit(main())
