"""The C++ CPU kernel's ISA builds, low-precision inputs, per-batch layouts and NaN scores (issues 22, 24).

Each ISA build this CPU runs (``SPARSE_ATTN_CPU_ISA`` forces a lower one) is checked against the float64
reference, forward and backward, fp32 and bf16. The "generic" build (plain C++, for CPUs without AVX2)
is left out on x86 CPUs that have AVX2: one more extension build (~40-60 s on a cold cache) for a path
such CPUs never take.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_matrix import Case, check_case, make_inputs

import sparse_attn as sa
from sparse_attn.backends import cpu_kernel
from sparse_attn.layout import BlockLayout
from sparse_attn.reference import attention_reference

VECTOR_ISAS = [isa for isa in cpu_kernel.supported_isas() if isa != "generic"] or ["generic"]
IDS = torch.tensor([[0] * 40 + [1] * 70 + [2] * 51, [5] * 100 + [6] * 61])
ISA_CASES = {
    # GQA, left padding, a BigBird layout (full, partial and empty blocks).
    "bigbird-gqa-key-mask": Case(
        sa.bigbird(window=32, global_tokens=8, num_random_blocks=2, block_size=32),
        b=2,
        hq=4,
        hkv=2,
        key_mask="left",
    ),
    # A per-batch layout: documents [B, S] with a causal band.
    "documents-per-batch": Case(sa.documents(IDS) & sa.causal(), b=2, d=48),
}


@pytest.fixture
def kernel_isa(monkeypatch):
    """Run the "torch" backend on the C++ kernel built for one ISA: ``kernel_isa("avx2")``."""

    def use(isa):
        monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "kernel")
        monkeypatch.setenv(cpu_kernel.ISA_ENV, isa)
        assert cpu_kernel.get_isa() == isa

    return use


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(ISA_CASES))
@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_each_isa_build_matches_reference(isa, case, dtype, kernel_isa):
    kernel_isa(isa)
    spec = ISA_CASES[case]
    check_case(Case(**{**spec.__dict__, "dtype": dtype}), "torch")


def test_isa_builds_are_separate_extensions(kernel_isa):
    """Every build has its own flags, cache name and op namespace, so several load side by side."""
    flags = {isa: cpu_kernel._flags(isa) for isa in cpu_kernel.ISAS}
    assert len({" ".join(f) for f in flags.values()}) == len(cpu_kernel.ISAS)
    for isa in VECTOR_ISAS:
        kernel_isa(isa)
        assert cpu_kernel.load(strict=True) is getattr(torch.ops, f"sparse_attn_cpu_{isa}")


def test_default_isa_is_the_best_this_cpu_runs(monkeypatch):
    monkeypatch.delenv(cpu_kernel.ISA_ENV, raising=False)
    assert cpu_kernel.get_isa() == cpu_kernel.supported_isas()[-1]
    for capability, best in (("AVX512", "avx512"), ("AVX2", "avx2"), ("DEFAULT", "generic")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert cpu_kernel.get_isa() == best


def test_isa_variable_is_checked(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ISA_ENV, "avx9")
    with pytest.raises(ValueError, match="SPARSE_ATTN_CPU_ISA must be one of"):
        cpu_kernel.get_isa()
    # A build the CPU cannot run (here: AVX-512 code on an AVX2 CPU) is refused, not crashed into.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv(cpu_kernel.ISA_ENV, "avx512")
    with pytest.raises(ValueError, match=r"\('generic', 'avx2'\)"):
        cpu_kernel.get_isa()


@pytest.mark.parametrize("kind", ["documents-window", "topk-causal"])
def test_per_batch_layouts_run_on_the_kernel(kind, monkeypatch):
    """Per-batch layouts (documents [B, S], top-k) go to the C++ kernel, forward and backward, exactly."""
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "kernel")
    calls = []
    for name in ("forward", "backward"):
        real = getattr(cpu_kernel, name)

        def spy(*args, _real=real, _name=name, **kw):
            layout = next(a for a in args if isinstance(a, BlockLayout))
            calls.append((_name, layout.batch))
            return _real(*args, **kw)

        monkeypatch.setattr(cpu_kernel, name, spy)
    case = Case(sa.documents(IDS) & sa.sliding_window(24, 0), b=2, d=32)
    if kind == "topk-causal":
        qkv, _ = make_inputs(case)
        pattern = sa.topk_blocks(2) & sa.causal()
        q, k, v = (t.float().requires_grad_(True) for t in qkv)
        sa.sparse_attention(q, k, v, pattern, backend="torch").sum().backward()
        assert calls == [("forward", 2), ("backward", 2)]
        calls.clear()
        # The selected per-batch layout against the reference.
        case.pattern = sa.select_layout(pattern, qkv[0].float(), qkv[1].float(), block_size=64)
    check_case(case, "torch")
    assert calls == [("forward", 2), ("backward", 2)]


def _nan_inputs():
    qkv, _ = make_inputs(Case(sa.causal(), b=1, hq=2, sq=97, d=32))
    q, k, v = (t.float() for t in qkv)
    return q, k, v


def _nan_rows_match_reference(pattern, q, k, v, **mods):
    out, lse = sa.sparse_attention(q, k, v, pattern, backend="torch", return_lse=True, **mods)
    ref_mods = {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in mods.items()}
    ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(), pattern, **ref_mods)
    assert ref_out.isnan().any()
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(lse.isnan(), ref_lse.isnan())
    finite = ~ref_out.isnan()
    assert (out.double() - ref_out)[finite].abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_query_gives_nan_row_not_an_empty_one(dtype, monkeypatch):
    """Issue 24, item 2: a NaN query's row is NaN (as SDPA and the reference), not output 0 / lse -inf;
    a NaN query whose row sees no key stays empty, and other rows are untouched."""
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "kernel")
    q, k, v = _nan_inputs()
    q[0, 0, 40, 3] = float("nan")  # a row with visible keys in full and partial blocks
    q[0, 1, 5] = float("nan")
    layout_pattern = sa.causal() & sa.sliding_window(20)
    if dtype == torch.float32:
        _nan_rows_match_reference(layout_pattern, q, k, v)
    out, lse = sa.sparse_attention(*(t.to(dtype) for t in (q, k, v)), layout_pattern, return_lse=True)
    assert out[0, 0, 40].isnan().all() and lse[0, 0, 40].isnan()
    assert out[0, 1, 5].isnan().all() and lse[0, 1, 5].isnan()
    assert out.isnan().sum() == 2 * q.shape[-1]
    # A NaN query in a row that sees no key (a block-sparse layout with an empty query block).
    empty_row = sa.block_sparse(torch.tensor([[True, False], [False, False]]), 64)
    out, lse = sa.sparse_attention(q, k, v, empty_row, return_lse=True)
    assert not out[:, :, 64:].isnan().any() and (out[:, :, 64:] == 0).all()


def test_nan_alibi_slopes_and_rel_bias_give_nan_rows(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "kernel")
    q, k, v = _nan_inputs()
    pattern = sa.sliding_window(16)
    slopes = torch.tensor([0.1, float("nan")])
    _nan_rows_match_reference(pattern, q, k, v, alibi_slopes=slopes)
    rel_bias = torch.randn(2, 97 + 97 - 1)
    rel_bias[0, 96 + 3] = float("nan")  # the diagonal j - qpos = 3 of head 0
    _nan_rows_match_reference(pattern, q, k, v, rel_bias=rel_bias)


def test_auto_measures_both_engines_and_keeps_the_faster(monkeypatch):
    monkeypatch.delenv(cpu_kernel.ENGINE_ENV, raising=False)
    choice = cpu_kernel.auto_choice(torch.float32)
    assert choice["kernel_s"] > 0 and choice["aten_s"] > 0 and choice["isa"] == cpu_kernel.get_isa()
    faster = "kernel" if choice["kernel_s"] <= choice["aten_s"] else "aten"
    assert choice["engine"] == faster
    assert cpu_kernel.auto_choice(torch.float64) is choice  # one measurement per dtype class
    assert cpu_kernel.active(torch.float32) == (faster == "kernel")


@pytest.mark.parametrize("faster", ["kernel", "aten"])
def test_auto_runs_the_engine_it_measured_faster(faster, monkeypatch):
    """Where the ATen engine measured faster (e.g. a CPU whose build of the kernel is slow), "auto" runs it."""
    monkeypatch.delenv(cpu_kernel.ENGINE_ENV, raising=False)
    key = (cpu_kernel.get_isa(), str(torch.bfloat16))
    monkeypatch.setitem(cpu_kernel._choices, key, {"engine": faster, "kernel_s": 1.0, "aten_s": 1.0})
    calls = []
    real = cpu_kernel.forward
    monkeypatch.setattr(cpu_kernel, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    case = Case(sa.sliding_window(30), dtype=torch.bfloat16, sq=97)
    check_case(case, "torch")
    assert bool(calls) == (faster == "kernel")
