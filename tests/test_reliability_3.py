"""Reliability, round three (issue 24): the newer paths under bad input and unusual use. Each test here
failed before its fix; the last ones run a few seeded cases of the fuzzer (`bench/fuzz.py`)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sparse_attn as sa
from sparse_attn.backends import cpu_kernel
from sparse_attn.checks import MAX_SIZE
from sparse_attn.distributed import communication_plan, shard_sequence
from sparse_attn.reference import attention_reference

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import fuzz  # noqa: E402  (bench/fuzz.py; its context-parallel workers import it by this name too)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _grads(q, k, v, pattern, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sa.sparse_attention(*leaves, pattern, backend="torch", **kwargs)
    return [out.detach(), *torch.autograd.grad((out * out).sum(), leaves)]


# -- 1. evaluate, then train --------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [sa.causal, lambda: sa.topk_blocks(1) & sa.causal()], ids=["causal", "topk"])
def test_evaluating_first_then_training_with_the_same_pattern(make):
    """Layouts (and top-k tables) cached by a call under inference mode must serve a later training call."""
    q, k, v = (randn(1, 2, 150, 16, seed=s) for s in range(3))
    pattern = make()
    with torch.inference_mode():
        evaluated = sa.sparse_attention(q, k, v, pattern, backend="torch")
    trained = _grads(q, k, v, pattern)
    assert torch.equal(trained[0], evaluated)
    fresh = _grads(q, k, v, make())
    for got, want in zip(trained, fresh, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_module_and_user_layouts_built_under_inference_mode_train():
    q, k, v = (randn(1, 2, 100, 16, seed=s) for s in range(3))
    module = sa.SparseAttention(sa.sliding_window(20) | sa.global_tokens(2), backend="torch")
    with torch.inference_mode():
        module(q, k, v)
        layout = sa.select_layout(sa.topk_blocks(1) & sa.causal(), q, k)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    module(*leaves).sum().backward()
    want = attention_reference(*(t.detach() for t in leaves), layout)[0]
    got = sa.sparse_attention(*leaves, layout, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got.sum().backward()


# -- 3. softcap beyond float32 -----------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["kernel", "aten"])
def test_softcaps_float32_cannot_hold_are_refused(engine, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_engine", engine)
    q, k, v = (randn(1, 2, 64, 16, seed=s) * 4 for s in range(3))
    for cap in (1e39, 1e-46, 2.0**64 * 2):
        with pytest.raises(ValueError, match=r"softcap must lie in \[2\*\*-64, 2\*\*64\]"):
            sa.sparse_attention(q.float(), k.float(), v.float(), sa.causal(), softcap=cap, backend="torch")
    # The bounds themselves are exact in float32; float64 inputs take any finite cap.
    for cap, dtype in ((2.0**64, torch.float32), (2.0**-64, torch.float32), (1e39, torch.float64)):
        args = [t.to(dtype) for t in (q, k, v)]
        got = sa.sparse_attention(*args, sa.causal(), softcap=cap, backend="torch")
        want = attention_reference(q, k, v, sa.causal(), softcap=cap)[0]
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# -- 4. document ids of every integer dtype ------------------------------------------------------------------
def test_document_ids_are_ordered_without_overflow():
    # int8 -100 -> 100 and uint16 0 -> 60000 go up (their difference overflows the dtype).
    for ids in (
        torch.tensor([-100] * 5 + [0] * 3 + [100] * 4, dtype=torch.int8),
        torch.tensor([0] * 6 + [60000] * 6, dtype=torch.uint16),
    ):
        want = sa.documents(ids.long()).mask(12)
        assert torch.equal(sa.documents(ids).layout(12, block_size=4).to_dense()[0], want)
    # uint8 200 -> 0 goes down: refused (its difference wrapped to a step up).
    with pytest.raises(ValueError, match="non-decreasing"):
        sa.documents(torch.tensor([200, 0, 200], dtype=torch.uint8)).layout(3)


# -- 5. ids and cu_seqlens without data ----------------------------------------------------------------------
def test_meta_ids_and_cu_seqlens_are_named():
    with pytest.raises(ValueError, match="document ids must hold data"):
        sa.documents(torch.zeros(64, dtype=torch.long, device="meta"))
    q, k, v = (randn(64, 2, 16, seed=s) for s in range(3))
    cu = torch.tensor([0, 30, 64], dtype=torch.int32)
    for name, args in (("cu_seqlens_q", (cu.to("meta"), cu)), ("cu_seqlens_k", (cu, cu.to("meta")))):
        with pytest.raises(ValueError, match=f"{name} must hold data"):
            sa.sparse_attention_varlen(q, k, v, *args, sa.causal())


# -- 6. integer arguments --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sa.causal().layout(2**63), "q_len must be <="),
        (lambda: sa.causal().layout(64, heads=2**40), "heads must be <="),
        (lambda: sa.random_blocks(2, 2**70), "block_size must be <="),
        (lambda: sa.block_sparse(torch.ones(1, 1, dtype=torch.bool), 2**70), r"block_size must be <="),
        (lambda: sa.global_tokens([2**63]), r"positions must be < 2\*\*63"),
        (lambda: communication_plan(sa.causal(), 128, 2, heads=2**63, head_dim=16), "heads must be <="),
        (lambda: communication_plan(sa.causal(), 128, 2, heads=1, head_dim=16, batch=2**70), "batch must be"),
        (lambda: shard_sequence(torch.zeros(1, 1, 8, 1), 0, 2**63), "world_size must be <="),
        (lambda: sa.SparseMultiheadAttention(2**63, 1, pattern=sa.causal()), "embed_dim must be <="),
    ],
)
def test_sizes_are_range_checked_where_given(make, message):
    with pytest.raises(ValueError, match=message):
        make()
    assert MAX_SIZE == 2**31 - 1


def test_extents_beyond_every_sequence_mean_all():
    """topk_blocks(2**70) once overflowed inside selection; every "up to" extent is clamped where used."""
    q, k, v = (randn(2, 2, 100, 16, seed=s) for s in range(3))
    torch.testing.assert_close(
        sa.sparse_attention(q, k, v, sa.topk_blocks(2**70) & sa.causal(), backend="torch"),
        attention_reference(q, k, v, sa.causal())[0],
        rtol=1e-10,
        atol=1e-10,
    )
    want = attention_reference(q, k, v)[0]
    for p in (sa.topk_blocks(2**70), sa.global_tokens(2**70), sa.chunked(2**70), sa.sliding_window(2**70)):
        torch.testing.assert_close(
            sa.sparse_attention(q, k, v, p, backend="torch"), want, rtol=1e-10, atol=1e-10
        )


# -- 9. the PyTorch backend's modules import each other without a cycle ---------------------------------------
def test_torch_backend_modules_form_no_import_cycle():
    """Every import between them counts, TYPE_CHECKING ones too (views and planning once imported each other)."""
    folder = ROOT / "sparse_attn" / "backends" / "torch_backend"
    names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    edges = {}
    for name in names:
        tree = ast.parse((folder / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        edges[name] = found & names
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(edges[n]):
            assert state.get(m) != "open", f"import cycle: {' -> '.join([*path, n, m])}"
            if m not in state:
                visit(m, [*path, n])
        state[n] = "done"

    for n in sorted(names):
        if n not in state:
            visit(n, [])


# -- 7, 8. context parallelism: per-batch layouts, shards that disagree -----------------------------------------
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
@pytest.mark.timeout(240)
def test_context_parallel_per_batch_documents_and_unequal_shards():
    """One spawn of 2 gloo processes: documents with [B, S] ids (padded shards of 100 positions, and zigzag)
    are exact; shards of 64 and 32 positions give every rank the same ValueError, before any exchange."""
    ids = torch.tensor([[0] * 70 + [1] * 90 + [2] * 40, [5] * 120 + [9] * 80])
    zig_ids = torch.tensor([[0] * 100 + [1] * 156, [0] * 30 + [4] * 226])

    def case(seed, pattern, shard, order="contiguous", dtype=torch.float64, unequal=False):
        return dict(seed=seed, world=2, order=order, shard=shard, batch=2, hq=2, hkv=1, dim=16, dtype=dtype,
                    pattern=pattern, unequal=unequal)  # fmt: skip

    cases = [
        case(1, sa.documents(ids) & sa.causal(), 100),
        case(2, sa.documents(zig_ids) | sa.global_tokens(3), 128, order="zigzag", dtype=torch.float32),
        case(3, sa.causal(), 64, unequal=True),
    ]
    problems = fuzz.run_cp_cases(2, cases, timeout=200)
    assert problems == [[], [], []], problems


# -- the fuzzer, a few seeded cases --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, seed",
    # Documents in 3 threads (fp16, BSHD strides, softcap); top-k among per-head documents after an
    # inference-mode call, NaN in padded keys; top-k per head in bf16 with every modifier; a varlen batch.
    [("attention", 12), ("attention", 31), ("attention", 38), ("varlen", 15)],
)
def test_fuzz_cases(kind, seed):
    describe, problems = fuzz.run_one(kind, seed)
    assert not problems, f"{describe}: {problems}"
