"""bench/gpu_kernels.py cannot run without a GPU; its pure parts are checked here on the CPU."""

import importlib.util
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import sparse_attn as sa  # noqa: E402
from sparse_attn.reference import attention_reference  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_kernels.py"


@pytest.fixture(scope="module")
def gk():
    spec = importlib.util.spec_from_file_location("bench_gpu_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs: its dataclass looks its own module up by name.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_flop_counting(gk):
    pairs, b, h, d = 1000.0, 2, 3, 64
    assert gk.attention_flops(pairs, b, h, d, "fwd") == 4 * pairs * b * h * d
    assert gk.attention_flops(pairs, b, h, d, "bwd") == 2.5 * 4 * pairs * b * h * d
    assert gk.attention_flops(pairs, b, h, d, "fwd_bwd") == 3.5 * 4 * pairs * b * h * d
    with pytest.raises(ValueError, match="pass must be one of"):
        gk.attention_flops(pairs, b, h, d, "both")
    assert gk.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert gk.tflops(1.0, None) is None
    # 10 ms dense, 2 ms sparse at density 0.1: 5x of an ideal 10x.
    assert gk.fraction_of_ideal(10.0, 2.0, 0.1) == pytest.approx(0.5)
    assert gk.fraction_of_ideal(None, 2.0, 0.1) is None


def test_device_tag(gk):
    assert gk.device_tag("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert gk.device_tag("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"


@pytest.mark.parametrize("density", [0.03, 0.1, 0.3, 0.9])
def test_window_for_density_hits_the_target(gk, density):
    seq = 1024
    w = gk.window_for_density(density, seq)
    got = float(sa.sliding_window(w).mask(seq).float().mean())
    # One more key each side changes the density by about 2 / seq.
    assert abs(got - density) <= 2 / seq


def test_random_cells_are_balanced(gk):
    cells = gk.random_cells(0.25, 4096, seed=1)
    n = 4096 // gk.CELL
    assert cells.shape == (n, n) and bool(cells.diagonal().all())
    assert set(cells.sum(1).tolist()) == {round(0.25 * n)}
    assert torch.equal(cells, gk.random_cells(0.25, 4096, seed=1))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", ["window", "longformer", "causal", "blocks"])
def test_flex_block_mask_is_the_layout_and_flex_matches_the_reference(gk, case, monkeypatch):
    seq, block = 384, 64
    monkeypatch.setattr(gk, "GLOBAL_TOKENS", 5)
    monkeypatch.setattr(gk, "CELL", 64)
    c = gk.Case(case, 0.2)
    pattern = c.pattern(seq)
    layout = pattern.layout(seq, block_size=block)
    bm = gk.flex_block_mask(layout, c.mask_mod(seq, "cpu"))
    classes = layout.to_block_mask()
    assert torch.equal(bm.to_dense()[0].bool(), classes > 0)
    part_n, part_idx, full_n, full_idx = gk.layout_to_flex_tensors(layout)
    assert torch.equal(full_n[0], (classes == 2).sum(-1).to(torch.int32))
    assert torch.equal(part_n[0], (classes == 1).sum(-1).to(torch.int32))
    # FlexAttention (eager, CPU) with this BlockMask and mask_mod computes the pattern's attention.
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (torch.randn(1, 2, seq, 32, dtype=torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=bm)
    ref, _ = attention_reference(q, k, v, pattern)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_xformers_biases_match_the_pattern(gk):
    pytest.importorskip("xformers")
    seq = 200
    for family in ("window", "causal"):
        c = gk.Case(family, 0.2)
        bias = c.xformers_bias(seq).materialize((seq, seq), dtype=torch.float32)
        assert torch.equal(torch.isfinite(bias), c.pattern(seq).mask(seq)), family
    assert gk.Case("blocks", 0.2).xformers_bias(seq) is None
    pattern = gk.Case("longformer", 0.2).pattern(seq)
    assert torch.equal(gk.mask_rows(pattern, seq, 50, 30), pattern.mask(seq)[50:80])


def test_without_cuda_it_says_so_and_exits_0(gk, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gk.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "CUDA is not available" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_arguments(gk):
    args = gk.parse_args(["--quick"])
    assert args.lengths == gk.QUICK_LENGTHS and args.dtypes == ("fp16",) and args.head_dims == (128,)
    full = gk.parse_args([])
    assert full.lengths[0] == 1024 and full.lengths[-1] == 65536 and set(full.dtypes) == {"fp16", "bf16"}
    assert set(full.head_dims) == {64, 128}
    narrowed = gk.parse_args(["--quick", "--dtypes", "bf16", "--lengths", "2048"])
    assert narrowed.dtypes == ("bf16",) and narrowed.lengths == (2048,) and narrowed.head_dims == (128,)
    with pytest.raises(SystemExit):
        gk.parse_args(["--dtypes", "fp8"])


def _rows(gk):
    """Synthetic results: dense 8 ms, sparse 2 ms at density 0.1 (4x of an ideal 10x)."""
    rows = []
    for seq in (1024, 4096):
        for method, ms in (("dense_flash", 8.0), ("sparse_attn", 2.0), ("flex", 3.0)):
            rows.append(
                {
                    "case": "window@0.1",
                    "family": "window",
                    "density": 0.1,
                    "seq": seq,
                    "head_dim": 128,
                    "dtype": "fp16",
                    "pass": "fwd",
                    "method": method,
                    "median_ms": ms * seq / 1024,
                    "p20_ms": ms * seq / 1024 * 0.9,
                    "p80_ms": ms * seq / 1024 * 1.1,
                    "tflops": 1.0,
                    "note": None,
                }
            )
    return rows


def test_table_and_plot_from_results(gk, tmp_path):
    rows = gk.add_derived(_rows(gk))
    sparse = [r for r in rows if r["method"] == "sparse_attn"]
    assert all(r["speedup_vs_dense"] == pytest.approx(4.0) for r in sparse)
    assert all(r["fraction_of_ideal"] == pytest.approx(0.4) for r in sparse)
    table = gk.format_table(rows)
    assert "window@0.1" in table and "40%" in table and "4.00" in table
    gk.plot(rows, tmp_path / "g.png", "test")
    assert matplotlib.image.imread(tmp_path / "g.png").shape[0] > 300
    json.dumps(rows)  # the rows are what main saves
