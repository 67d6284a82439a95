"""The sparse-attn command: demo, show (and its spec language), bench and kernel-report dispatch."""

import shutil
import subprocess
import sys
import types

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import sparse_attn as sa  # noqa: E402
from sparse_attn import cli  # noqa: E402
from sparse_attn.spec import SpecError, parse_spec  # noqa: E402


def test_demo_small_runs_checks_and_saves_its_picture(tmp_path, capsys):
    out = tmp_path / "demo.png"
    argv = ["demo", "--seq", "300", "--window", "16", "--global-tokens", "2", "--heads", "2"]
    rc = cli.main([*argv, "--head-dim", "24", "--repeats", "1", "-o", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "density:" in text and "check: OK" in text and str(out) in text
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 400 and image.shape[1] > 400


def test_demo_result_is_checked_against_float64():
    from sparse_attn.demo import run_demo

    lines = []
    r = run_demo(200, 8, 3, heads=2, head_dim=16, repeats=1, output=None, progress=False, echo=lines.append)
    assert r["ok"] and r["sparse_max_error"] < 1e-5
    mask = sa.longformer(8, 3).mask(200)
    assert r["visible_fraction"] == pytest.approx(float(mask.float().mean()))
    assert r["density"] == pytest.approx(
        sa.longformer(8, 3).layout(200, block_size=r["block_size"]).density()
    )
    assert any("sparse_attention" in line for line in lines)


def test_show_writes_a_png(tmp_path, capsys):
    out = tmp_path / "sub" / "p.png"
    rc = cli.main(["show", "window:16+global:2", "--seq", "200", "--block-size", "32x64", "-o", str(out)])
    assert rc == 0
    assert "block_size=(32, 64)" in capsys.readouterr().out
    assert matplotlib.image.imread(out).ndim == 3


def test_show_per_head_spec_draws_chosen_heads(tmp_path):
    out = tmp_path / "heads.png"
    spec = "per_head(window:8, dilated:4:2&causal, global:3)"
    assert (
        cli.main(["show", spec, "--seq", "64", "--block-size", "16", "--heads", "0,2", "-o", str(out)]) == 0
    )
    assert out.exists()


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("window:3+global:2", sa.sliding_window(3) | sa.global_tokens(2)),
        ("window:3 | global:0,17", sa.sliding_window(3) | sa.global_tokens([0, 17])),
        ("dilated:4:2&causal", sa.dilated(4, dilation=2) & sa.causal()),
        ("dilated:4:3:right=1", sa.dilated(4, 1, dilation=3)),
        (
            "(window:2|random:1:8:seed=3)&causal",
            (sa.sliding_window(2) | sa.random_blocks(1, 8, seed=3)) & sa.causal(),
        ),
        ("causal+window:1&global:1", sa.causal() | (sa.sliding_window(1) & sa.global_tokens(1))),
        ("longformer:4:2", sa.longformer(4, 2)),
        ("bigbird:4:2:1:block_size=8", sa.bigbird(4, 2, 1, block_size=8)),
        ("window:5:0", sa.sliding_window(5, 0)),
    ],
)
def test_spec_means_the_same_pattern(spec, expected):
    got = parse_spec(spec)
    torch.testing.assert_close(got.mask(40, 50), expected.mask(40, 50), rtol=0, atol=0)


def test_spec_per_head():
    got = parse_spec("per_head(window:2, causal)")
    assert got.num_heads == 2
    expected = torch.stack([sa.sliding_window(2).mask(20), sa.causal().mask(20)])
    assert torch.equal(got.mask(20, heads=2), expected)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty spec"),
        ("window", "window needs left"),
        ("foo:3", "unknown pattern 'foo'"),
        ("window:3:4:5", "at most 2 arguments"),
        ("window:-1", "left must be >= 0"),
        ("(window:3", "expected ')'"),
        ("window:3 &", "found the end"),
        ("window:3 global:2", "unexpected 'global'"),
        ("dilated:3:0", "dilation must be >= 1"),
        ("window:x=3", "no argument 'x'"),
        ("window:3 ^ causal", "cannot read '^ causal' at position 9"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message, capsys):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^")):
        parse_spec(spec)
    assert cli.main(["show", spec, "--seq", "64", "-o", "/nonexistent/never-written.png"]) == 2
    err = capsys.readouterr().err
    assert "sparse-attn show: error: bad pattern spec" in err and message in err


def test_show_bad_options_exit_2(capsys):
    assert cli.main(["show", "causal", "--seq", "64", "--block-size", "0"]) == 2
    assert cli.main(["show", "causal", "--seq", "64", "--heads", "a"]) == 2
    assert cli.main(["show", "global:0,99", "--seq", "64"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli.main(["show", "causal"]) == 2  # --seq is required without doc:... documents
    assert "--seq is required" in capsys.readouterr().err


def _fake_bench(folder, name, body):
    folder.mkdir(exist_ok=True)
    (folder / cli.BENCH_SCRIPTS[name]).write_text(body)


def test_bench_passes_arguments_and_returns_the_exit_code(tmp_path, monkeypatch):
    record = tmp_path / "argv.txt"
    body = f"import sys\ndef main(argv=None):\n    open({str(record)!r}, 'w').write(repr((argv, sys.argv[1:])))\n    return 3\n"
    _fake_bench(tmp_path / "bench", "cpu", body)
    monkeypatch.setenv(cli.BENCH_DIR_ENV, str(tmp_path / "bench"))
    assert cli.main(["bench", "cpu", "--quick", "--lengths", "1024,2048"]) == 3
    args = ["--quick", "--lengths", "1024,2048"]
    assert eval(record.read_text()) == (args, args)


def test_bench_script_without_main_runs_as_main(tmp_path, monkeypatch):
    record = tmp_path / "ran.txt"
    body = f"import sys\nif __name__ == '__main__':\n    open({str(record)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
    _fake_bench(tmp_path / "bench", "interp", body)
    monkeypatch.setenv(cli.BENCH_DIR_ENV, str(tmp_path / "bench"))
    assert cli.main(["bench", "interp", "--quick"]) == 0
    assert record.read_text() == "--quick"


def test_bench_missing_folder_or_script_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_bench_candidates", lambda: [tmp_path / "nope"])
    assert cli.main(["bench", "layout"]) == 2
    assert "bench/ folder was not found" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_bench_candidates", lambda: [tmp_path])
    assert cli.main(["bench", "kernels"]) == 2
    assert "gpu_kernels.py is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "nonsense"])


def test_bench_kernels_dispatches_to_the_real_script(capsys):
    # The repository's GPU benchmark: on a machine without CUDA it says so and exits 0.
    if torch.cuda.is_available():
        pytest.skip("this checks the no-CUDA path")
    assert cli.main(["bench", "kernels", "--quick"]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


def test_kernel_report_is_called_with_the_remaining_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("sparse_attn.kernel_report")
    fake.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sparse_attn.kernel_report", fake)
    monkeypatch.setattr(sa, "kernel_report", fake, raising=False)
    assert cli.main(["kernel-report", "--arch", "80", "--json"]) == 0
    assert seen == [["--arch", "80", "--json"]]


def test_console_script_and_python_m(tmp_path):
    # The installed console script draws; `python -m sparse_attn` reports a bad spec with exit code 2.
    exe = shutil.which("sparse-attn") or pytest.fail("the sparse-attn console script is not installed")
    out = tmp_path / "c.png"
    done = subprocess.run(
        [exe, "show", "dilated:8:2&causal", "--seq", "128", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert out.exists()
    bad = subprocess.run(
        [sys.executable, "-m", "sparse_attn", "show", "window:", "--seq", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "bad pattern spec" in bad.stderr
