"""sparse_attn.viz: pictures drawn from the layout agree with the token truth, at 64 and 64k tokens."""

import subprocess
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import sparse_attn as sa  # noqa: E402
from sparse_attn import viz  # noqa: E402
from sparse_attn.layout import BlockLayout  # noqa: E402
from sparse_attn.patterns import Pattern  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _block_classes_from_mask(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Token-resolution class map (0 empty, 1 partial, 2 full) computed from the mask alone."""
    q_len, kv_len = mask.shape
    out = torch.zeros(q_len, kv_len, dtype=torch.int64)
    for r in range(0, q_len, bq):
        for c in range(0, kv_len, bk):
            tile = mask[r : r + bq, c : c + bk]
            out[r : r + bq, c : c + bk] = 2 if bool(tile.all()) else int(bool(tile.any()))
    return out


CASES = [
    (sa.longformer(5, 3), 64, 64, 16),
    (sa.bigbird(8, 2, 2, block_size=8), 97, 161, (16, 32)),
    (sa.dilated(7, dilation=3) & sa.causal(), 200, 200, 64),
    (sa.sliding_window(4, 0) | sa.global_tokens([0, 50]), 37, 90, (8, 16)),
]


@pytest.mark.parametrize("pattern, q_len, kv_len, block", CASES)
def test_one_token_per_pixel_is_the_exact_mask_and_classes(pattern, q_len, kv_len, block):
    layout = pattern.layout(q_len, kv_len, block_size=block)
    img = viz.render_layout(layout)
    mask = pattern.mask(q_len, kv_len)
    assert img.tokens_per_pixel == (1, 1)
    np.testing.assert_array_equal(img.visible, mask.numpy().astype(np.float32))
    bq, bk = (block, block) if isinstance(block, int) else block
    classes = _block_classes_from_mask(mask, bq, bk).numpy()
    np.testing.assert_array_equal(img.full == 1, classes == 2)
    np.testing.assert_array_equal(img.partial == 1, classes == 1)
    assert img.visible_pairs == int(mask.sum())
    assert img.computed_pairs / (q_len * kv_len) == pytest.approx(layout.density())
    assert viz.visible_fraction(layout) == pytest.approx(float(mask.float().mean()))


def _pool(x: torch.Tensor, p: int) -> torch.Tensor:
    """Mean over p x p token windows (the last ones may be short), as a pixel would cover them."""
    rows, cols = -(-x.shape[0] // p), -(-x.shape[1] // p)
    padded = torch.zeros(rows * p, cols * p, dtype=torch.float64)
    ones = torch.zeros_like(padded)
    padded[: x.shape[0], : x.shape[1]] = x
    ones[: x.shape[0], : x.shape[1]] = 1
    s = padded.view(rows, p, cols, p).sum((1, 3))
    return s / ones.view(rows, p, cols, p).sum((1, 3))


def test_downsampled_pixels_are_exact_fractions():
    pattern = sa.longformer(100, [0, 5, 1234]) | sa.random_blocks(2, 48, seed=3)
    seq = 3001
    layout = pattern.layout(seq, block_size=64)
    img = viz.render_layout(layout, max_pixels=100)
    p = img.tokens_per_pixel[0]
    assert p == 31 and img.full.shape == (97, 97)
    mask = pattern.mask(seq)
    classes = _block_classes_from_mask(mask, 64, 64)
    np.testing.assert_allclose(img.visible, _pool(mask.double(), p).numpy(), atol=1e-6)
    np.testing.assert_allclose(img.full, _pool((classes == 2).double(), p).numpy(), atol=1e-6)
    np.testing.assert_allclose(img.partial, _pool((classes == 1).double(), p).numpy(), atol=1e-6)


def test_64k_tokens_without_an_s_by_s_mask(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("viz must not build a token mask")

    monkeypatch.setattr(Pattern, "mask", forbidden)
    monkeypatch.setattr(BlockLayout, "to_dense", forbidden)
    seq = 65536
    fig = viz.plot_pattern(sa.longformer(256, 4), seq)
    layout = sa.longformer(256, 4).layout(seq)
    img = viz.render_layout(layout, max_pixels=512)
    assert img.full.shape == (512, 512) and img.tokens_per_pixel == (128, 128)
    # Pixel (r, c) is exactly block (r, c) here: diagonal blocks are full, far ones empty.
    classes = layout.to_block_mask()[0].numpy()
    np.testing.assert_array_equal(img.full == 1, classes == 2)
    np.testing.assert_array_equal(img.partial == 1, classes == 1)
    # The 4 global query rows (keys) are 4 of the 128 in the first pixel row (column).
    assert np.allclose(img.partial_visible[0, 10:], 4 / 128)
    assert np.allclose(img.partial_visible[10:, 0], 4 / 128)
    # |window| + |global rows or columns| - |both|: rows i < 4 see i + 257 window keys, as do columns.
    window, globals_ = 513 * seq - 256 * 257, 8 * seq - 16
    both = 2 * sum(i + 257 for i in range(4)) - 16
    assert img.visible_pairs == window + globals_ - both
    title = fig.axes[0].get_title()
    assert "65536x65536" in title and f"{layout.density():.4f}" in title


def test_64k_bigbird_plot_peak_memory_is_small(tmp_path):
    # Built here, drawn in a fresh process, so the peak resident size there measures the drawing alone
    # (S x S bools would be 4 GiB).
    tensors, ints = sa.bigbird(192, 64, 3).layout(65536).flatten()
    torch.save((tensors, ints), tmp_path / "layout.pt")
    code = textwrap.dedent(
        f"""
        import matplotlib, torch
        matplotlib.use("Agg")
        from sparse_attn import viz
        from sparse_attn.layout import BlockLayout

        def status_mb(key):
            line = next(line for line in open("/proc/self/status") if line.startswith(key))
            return int(line.split()[1]) // 1024

        layout = BlockLayout.unflatten(*torch.load({str(tmp_path / "layout.pt")!r}))
        # Reset the peak (VmHWM) to the resident size, so the peak afterwards is the drawing's.
        open("/proc/self/clear_refs", "w").write("5")
        before = status_mb("VmRSS")
        fig = viz.plot_pattern(layout)
        fig.savefig({str(tmp_path / "bigbird.png")!r})
        print(status_mb("VmHWM") - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    added_mb = int(out.stdout.split()[-1])
    assert added_mb < 300, f"drawing a 64k-token layout added {added_mb} MB"
    assert (tmp_path / "bigbird.png").stat().st_size > 10_000


def _pixel(fig, ax, x, y):
    """RGB (0..1) of the rendered figure at data coordinates (x = key, y = query row)."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    px, py = ax.transData.transform((x, y))
    return rgba[int(round(rgba.shape[0] - py)), int(round(px)), :3] / 255.0


def test_png_colours_at_known_blocks():
    # 3x3 blocks of 32: diagonal blocks full (block_sparse), a window of 2 makes the blocks beside them
    # partial, and the corners stay empty.
    pattern = sa.block_sparse(torch.eye(3, dtype=torch.bool), 32) | sa.sliding_window(2)
    fig = viz.plot_pattern(pattern, 96, block_size=32)
    ax = fig.axes[0]
    colours = {k: np.array(v) for k, v in viz.COLOURS.items()}
    classes = pattern.layout(96, block_size=32).to_block_mask()[0]
    assert classes.tolist() == [[2, 1, 0], [1, 2, 1], [0, 1, 2]]
    expected = {  # (key x, query row y): colour
        (16, 16): "full",  # centre of block (0, 0)
        (48, 48): "full",  # centre of block (1, 1)
        (80, 16): "empty",  # block (0, 2)
        (16, 80): "empty",  # block (2, 0)
        (32.5, 31.5): "partial_visible",  # key 32, row 31: inside the window, in block (0, 1)
        (60, 10): "partial_masked",  # block (0, 1), far from the window
        (80, 48): "partial_masked",  # block (1, 2)
    }
    for (x, y), kind in expected.items():
        got = _pixel(fig, ax, x, y)
        assert np.abs(got - colours[kind]).max() < 0.03, (x, y, kind, got)


def test_plot_heads_grid_draws_each_heads_own_pattern():
    pattern = sa.per_head(
        [sa.sliding_window(4), sa.dilated(4, dilation=2) & sa.causal(), sa.global_tokens(3)]
    )
    fig = viz.plot_pattern(pattern, 48, block_size=16)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 3
    assert "3 of 3 heads" in fig._suptitle.get_text()
    layout = pattern.layout(48, block_size=16)
    masks = pattern.mask(48, heads=3)
    for h, ax in enumerate(image_axes):
        assert ax.get_title().startswith(f"head {h}: {pattern.patterns[h]!r}")
        img = viz.render_layout(layout, h)
        np.testing.assert_array_equal(img.visible, masks[h].numpy().astype(np.float32))
        np.testing.assert_allclose(ax.images[0].get_array(), viz.to_rgb(img))
    fig_two = viz.plot_heads(pattern, 48, block_size=16, heads=[0, 2], ncols=1)
    assert [ax.get_title().split(":")[0] for ax in fig_two.axes if ax.images] == ["head 0", "head 2"]


def test_plot_density_lines_are_the_densities():
    patterns = {"window": sa.sliding_window(16), "bigbird": sa.bigbird(16, 4, 1, block_size=16)}
    lengths = [64, 128, 256, 512]
    fig = viz.plot_density(patterns, lengths, block_size=32)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 4
    for n, pattern in enumerate(patterns.values()):
        computed, visible = lines[2 * n].get_ydata(), lines[2 * n + 1].get_ydata()
        for s, c, v in zip(lengths, computed, visible, strict=True):
            assert c == pytest.approx(pattern.layout(s, block_size=32).density())
            assert v == pytest.approx(float(pattern.mask(s).float().mean()))
            assert v <= c
    assert fig.axes[0].get_xscale() == "log"


def test_bad_input_is_named():
    layout = sa.causal().layout(64, block_size=16)
    with pytest.raises(ValueError, match="head must be in"):
        viz.render_layout(layout, 1)
    with pytest.raises(ValueError, match="max_pixels"):
        viz.render_layout(layout, max_pixels=0)
    with pytest.raises(TypeError, match="q_len is required"):
        viz.plot_pattern(sa.causal())
    with pytest.raises(ValueError, match="built for q_len=64"):
        viz.plot_pattern(layout, 65)
    with pytest.raises(TypeError, match="Pattern or a BlockLayout"):
        viz.plot_pattern("causal", 64)
    per_head = sa.per_head([sa.causal(), sa.sliding_window(2)])
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="ax draws one head"):
        viz.plot_pattern(per_head, 32, ax=ax)
    with pytest.raises(ValueError, match="head indices"):
        viz.plot_pattern(per_head, 32, heads=[5])
    with pytest.raises(TypeError, match="non-empty dict"):
        viz.plot_density([sa.causal()], [64])


@pytest.mark.parametrize("dpi", [100, 130])
def test_figure_shows_every_global_row_and_column(dpi):
    """4 global tokens among 4,096 (8 x 8 tokens a rendered pixel, then drawn smaller still): the figure's
    pixels on a global row or column must show visible pairs, not read as masked or be covered."""
    pattern = sa.sliding_window(128) | sa.global_tokens(4)
    fig = viz.plot_pattern(pattern, 4096, block_size=128)
    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    ax = fig.axes[0]
    height = rgb.shape[0]

    def shows_visible(rows, cols):
        """Whether any screen pixel over token rows [rows) x cols [cols) is drawn as a visible pair."""
        (x0, y0), (x1, y1) = ax.transData.transform([(cols[0], rows[0]), (cols[1], rows[1])])
        ys = range(int(height - y0), int(height - y1) + 1)
        xs = range(int(x0), int(x1) + 1)
        pixels = rgb[ys.start : ys.stop, xs.start : xs.stop].reshape(-1, 3)
        # Dark orange (a visible pair in a partial block): red far above blue. Light orange (masked pairs),
        # grey lines and blends of them with either do not pass.
        return bool((pixels[:, 0] - pixels[:, 2] > 0.5).any())

    far = range(600, 4096, 500)  # away from the window: partial blocks whose only visible pairs are global
    assert all(shows_visible((0, 4), (j, j + 1)) for j in far)  # global rows
    assert all(shows_visible((i, i + 1), (0, 4)) for i in far)  # global columns
    assert not any(shows_visible((40, 90), (j, j + 1)) for j in far)  # masked rows of the same blocks
