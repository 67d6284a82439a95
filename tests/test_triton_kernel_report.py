"""GPU readiness without a GPU: every shipped config, in every flag variant the launcher can produce, compiles
for sm_80 and sm_90a, spill-free, on tensor cores.

Runs `python -m sparse_attn kernel-report` logic (compiling in worker processes without the interpreter). It
compiles fp16 only to stay fast; the CLI adds bf16, whose code differs only in the operand type and has
given the same register counts in every config checked. The score-modifier variants are compiled on a
representative subset (all three modifiers on every config they run with, each alone on the pinned config,
all on the base variant with the most mask work); the CLI's default report adds the rest of its subset.
"""

import json

import pytest

pytest.importorskip("triton")

from sparse_attn.triton_kernels.launch import configs_for  # noqa: E402

from sparse_attn import kernel_report  # noqa: E402


def test_every_shipped_config_compiles_clean_for_both_targets(tmp_path, capsys):
    path = tmp_path / "report.json"
    status = kernel_report.main(["--json", str(path), "--dtypes", "fp16", "--modifiers", "none"])
    records = json.loads(path.read_text())
    printed = capsys.readouterr().out
    assert status == 0, printed
    for record in records:
        assert tuple(record) == kernel_report.RECORD_KEYS
        assert record["spill_bytes"] == 0 and record["stack_bytes"] == 0, record
        assert record["registers"] > 0 and record["shared_bytes"] > 0, record
        if record["kernel"] != "_bsattn_bwd_preprocess":
            assert record["tensor_core_instructions"] > 0, record
    # Every (kernel, config, head dim, flag variant) compiled for both targets: 32 variants per main kernel.
    seen = {(r["kernel"], r["config"], r["head_dim"], r["target"], r["variant"]) for r in records}
    for kernel, family in kernel_report.KERNELS.items():
        if kernel == "_bsattn_rel_bias_reduce":
            continue  # only with modifiers
        names = {kernel_report.variant_name(flags) for flags in kernel_report.variants(kernel)}
        assert len(names) == (32 if family else 1)
        for head_dim in (64, 128):
            configs = [str(c) for c in configs_for(family, head_dim)] if family else ["BLOCK_M64-w4"]
            for config in configs:
                for target in ("sm_80", "sm_90a"):
                    for name in names:
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
