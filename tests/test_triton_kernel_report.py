"""GPU readiness without a GPU: every shipped config, in every flag variant the launcher can produce, compiles
for sm_80 and sm_90a, spill-free, on tensor cores.

Runs `python -m sparse_attn kernel-report` logic (compiling in worker processes without the interpreter). It
compiles fp16 only to stay fast; the CLI adds bf16, whose code differs only in the operand type and has
given the same register counts in every config checked.
"""

import json

import pytest

pytest.importorskip("triton")

from sparse_attn.triton_kernels.launch import configs_for  # noqa: E402

from sparse_attn import kernel_report  # noqa: E402


def test_every_shipped_config_compiles_clean_for_both_targets(tmp_path, capsys):
    path = tmp_path / "report.json"
    status = kernel_report.main(["--json", str(path), "--dtypes", "fp16"])
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
        names = {kernel_report.variant_name(flags) for flags in kernel_report.variants(kernel)}
        assert len(names) == (32 if family else 1)
        for head_dim in (64, 128):
            configs = [str(c) for c in configs_for(family, head_dim)] if family else ["BLOCK_M64-w4"]
            for config in configs:
                for target in ("sm_80", "sm_90a"):
                    for name in names:
                        assert (kernel, config, head_dim, target, name) in seen


def test_spill_store_bytes_reads_every_stl_width():
    sass = "STL [R1], R2 ;\n STL.64 [R1+0x8], R4 ;\n STL.128 [R1+0x10], R8 ;\n LDL R2, [R1] ;"
    assert kernel_report._spill_store_bytes(sass) == 4 + 8 + 16
