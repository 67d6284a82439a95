"""GPU readiness without a GPU: every shipped config compiles for sm_80 and sm_90a, spill-free, on tensor
cores, in a representative set of the launcher's flag variants.

Runs `python -m sparse_attn kernel-report` logic (compiling in worker processes without the interpreter).
To stay within CI's time it compiles fp16 only and 6 of the 32 base flag variants (`SUITE_VARIANTS`); the
CLI compiles all 32 and adds bf16, whose code differs only in the operand type and has given the same
register counts in every config checked. The score-modifier variants are compiled on a representative
subset (all three modifiers on every config they run with, each alone on the pinned config, all on the base
variant with the most mask work); the CLI's default report adds the rest of its subset.
"""

import pytest

pytest.importorskip("triton")

from sparse_attn.triton_kernels.launch import configs_for  # noqa: E402

from sparse_attn import kernel_report  # noqa: E402

#: Base variants the suite compiles: with and without a key mask, on sequences that are and are not multiples
#: of the layout block (both axes alike; the flags that change the tile's masks and loads, where spills were
#: found), with shared layouts, plus per-head and per-batch layouts (scalar index work only) on the most
#: masked. The CLI compiles all 32 (`sparse-attn kernel-report`; its fp16 set, 964 records, compiled clean in
#: full on 2026-12-03).
SUITE_VARIANTS = [
    dict(EVEN_M=even, EVEN_N=even, HAS_KEY_MASK=km, PER_HEAD_LAYOUT=False, PER_BATCH_LAYOUT=False)
    for even in (False, True)
    for km in (False, True)
] + [
    dict(EVEN_M=False, EVEN_N=False, HAS_KEY_MASK=km, PER_HEAD_LAYOUT=True, PER_BATCH_LAYOUT=True)
    for km in (False, True)
]


def base_suite_jobs():
    """Every shipped config of every kernel, both targets, head dims 64 and 128, fp16, in `SUITE_VARIANTS`."""
    for job in kernel_report.jobs(dtypes=("fp16",), modifiers="none"):
        kernel, flags = job[0], job[5]
        if kernel_report.KERNELS[kernel] is None or flags in SUITE_VARIANTS:
            yield job


def test_every_shipped_config_compiles_clean_for_both_targets():
    todo = list(base_suite_jobs())
    records = kernel_report.run_jobs(todo, progress=False)
    for record in records:
        assert tuple(record) == kernel_report.RECORD_KEYS
        assert kernel_report.problems(record) == [], record
        assert record["registers"] > 0 and record["shared_bytes"] > 0, record
    # Every (kernel, config, head dim, suite variant) compiled for both targets.
    seen = {(r["kernel"], r["config"], r["head_dim"], r["target"], r["variant"]) for r in records}
    assert len(seen) == len(todo)
    for kernel, family in kernel_report.KERNELS.items():
        if kernel == "_bsattn_rel_bias_reduce":
            continue  # only with modifiers
        names = {kernel_report.variant_name(flags) for flags in kernel_report.variants(kernel)}
        assert len(names) == (32 if family else 1)
        suite = {kernel_report.variant_name(f) for f in SUITE_VARIANTS} if family else names
        assert suite <= names
        for head_dim in (64, 128):
            configs = [str(c) for c in configs_for(family, head_dim)] if family else ["BLOCK_M64-w4"]
            for config in configs:
                for target in ("sm_80", "sm_90a"):
                    for name in suite:
                        assert (kernel, config, head_dim, target, name) in seen


def modifier_subset_jobs():
    """All three modifiers on every config each kernel runs them with, and each modifier alone on the pinned
    (first) config, on the base variant with the most mask work, fp16, both targets; the reduction kernel."""
    heavy = kernel_report.MOD_BASE_VARIANTS[0]
    for job in kernel_report.jobs(dtypes=("fp16",), modifiers="subset"):
        kernel, _, _, head_dim, config, flags = job
        if kernel == "_bsattn_rel_bias_reduce":
            if head_dim == 64:
                yield job
            continue
        mods = tuple(name for name in kernel_report.MOD_FLAGS if flags.get(name))
        if not mods or any(flags[name] != value for name, value in heavy.items()):
            continue
        family = kernel_report.config_family(kernel, flags)
        if len(mods) == 3 or config == configs_for(family, head_dim)[0]:
            yield job


def test_modifier_variants_compile_clean_for_both_targets():
    todo = list(modifier_subset_jobs())
    records = kernel_report.run_jobs(todo, progress=False)
    assert all(kernel_report.problems(r) == [] for r in records), [
        r for r in records if kernel_report.problems(r)
    ]
    seen = {(r["kernel"], r["head_dim"], r["target"], r["config"], r["variant"]) for r in records}
    assert len(seen) == len(todo)
    # Each modifier alone and all three, in each main kernel, both targets and head dims; dQ with a rel_bias
    # on its own square tiles; the reduction in both of its variants.
    for kernel in ("_bsattn_fwd_kernel", "_bsattn_bwd_dkdv_kernel", "_bsattn_bwd_dq_kernel"):
        for mods in kernel_report.MOD_SUBSET:
            label = ",".join(f"{name}={int(name in mods)}" for name in kernel_report.MOD_FLAGS)
            for head_dim in (64, 128):
                for target in ("sm_80", "sm_90a"):
                    assert any(
                        k == kernel and d == head_dim and t == target and v.endswith(label)
                        for k, d, t, _, v in seen
                    ), (kernel, mods, head_dim, target)
    assert {r["config"] for r in records if "HAS_REL_BIAS=1" in r["variant"] and "dq" in r["kernel"]} == {
        "M32xN32-w4-s2",
        "M32xN32-w8-s2",
    }
    assert sum(r["kernel"] == "_bsattn_rel_bias_reduce" for r in records) == 4


def test_spill_store_bytes_reads_every_stl_width():
    sass = "STL [R1], R2 ;\n STL.64 [R1+0x8], R4 ;\n STL.128 [R1+0x10], R8 ;\n LDL R2, [R1] ;"
    assert kernel_report._spill_store_bytes(sass) == 4 + 8 + 16
