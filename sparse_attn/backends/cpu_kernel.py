"""The C++ block-sparse attention kernel for the CPU: built on first use, the engine of the "torch" backend.

`sparse_attn/csrc/block_sparse_attn.cpp` walks the `BlockLayout` itself (forward, dQ, dK/dV; see its
header), batch-shared and per-batch layouts alike (documents, varlen, top-k). This module builds it with
`torch.utils.cpp_extension.load` the first time it is needed (about a minute, once per machine, ISA and
torch version; cached under ``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), prepares
its inputs and runs it.

ISA builds (``SPARSE_ATTN_CPU_ISA``): the source is compiled once per instruction set, ``avx512``,
``avx2`` or ``generic`` (different flags, different cached names, different op namespaces), and the build
for the best one this CPU runs is loaded (``torch.backends.cpu.get_cpu_capability()``, which honours
``ATEN_CPU_CAPABILITY``); the variable forces a lower one (e.g. ``avx2`` on an AVX-512 CPU). The ISA sets
the width of the element-wise passes (ATen's ``Vectorized``); the GEMMs are the BLAS's (fp32) and torch's
``cpublas::brgemm`` (bf16/fp16), which pick their own code path for the CPU at run time.

Engines of the "torch" backend (``SPARSE_ATTN_CPU_ENGINE`` or `set_engine`):
- ``"auto"`` (default): this kernel where it builds and measured no slower than the ATen engine on this
  CPU for the dtype (`auto_choice`: both engines timed once per process on a small window forward); if it
  cannot be built (no compiler, no ninja), the ATen-composition engine of `torch_backend` runs instead, after
  one warning;
- ``"kernel"``: this kernel, and an error if it cannot be built;
- ``"aten"``: the ATen-composition engine (the previous backend), for comparison.

Inputs: fp32, fp64 (gradcheck), bf16 and fp16, read in place (any strides with a contiguous last
dimension). bf16/fp16 stay in low precision in the GEMMs, with fp32 accumulation, softmax and lse, as SDPA
does: the probabilities and dS are rounded to the input dtype before their GEMMs; torch's brgemm takes no
transposed operand, so K^T (and Q^T, V^T, dO^T in the backward) are copied once per call, O(S x D). Keys
hidden by `key_mask` are zeroed in copies of K and V (a masked key may hold NaN) while the kernel masks
their scores.

Score modifiers (`sparse_attn.score_mods.ScoreMods`: softcap, ALiBi slopes, rel_bias) go to the kernel in
its accumulation type; the backward also gets rel_bias reversed along its last dimension (so that a key's
row of queries reads it forwards) and returns rel_bias' gradient, converted back to rel_bias' dtype. Without
modifiers the kernel runs its modifier-free instantiation. A row whose scores are NaN (a NaN query, NaN
slopes or bias) gives NaN, as the reference and SDPA do.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..layout import BlockLayout, pack_tiles
from . import get as backend_spec

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "block_sparse_attn.cpp"
ENGINE_ENV = "SPARSE_ATTN_CPU_ENGINE"
ENGINES = ("auto", "kernel", "aten")
ISA_ENV = "SPARSE_ATTN_CPU_ISA"
#: The kernel's builds, lowest first: the flags each is compiled with. ATen's vector types
#: (`at::vec::Vectorized`, the element-wise passes: scale, mask, exp, softmax) follow CPU_CAPABILITY, as in
#: torch's own per-ISA kernels. The GEMMs are MKL's (through the BLAS torch links), which picks its own code
#: path for the CPU at run time (AVX2, AVX-512, AVX512-BF16, AMX for bf16/fp16).
ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": [
        *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
        *("-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"),
    ],
}
ISAS = tuple(ISA_FLAGS)

_lock = threading.Lock()
_modules: dict[str, object] = {}  # ISA -> torch.ops namespace of its build
_build_errors: dict[str, str] = {}  # ISA -> why its build failed
_engine: str | None = None  # set_engine's choice; None: the environment's


class KernelUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded here."""


def set_engine(name: str | None) -> None:
    """Choose the engine of the "torch" backend (see the module docstring); None restores the default."""
    if name is not None and name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} or None, got {name!r}")
    global _engine
    _engine = name


def get_engine() -> str:
    """The engine asked for: `set_engine`'s, else ``$SPARSE_ATTN_CPU_ENGINE``, else "auto"."""
    name = _engine or os.environ.get(ENGINE_ENV, "").strip() or "auto"
    if name not in ENGINES:
        raise ValueError(f"{ENGINE_ENV} must be one of {ENGINES}, got {name!r}")
    return name


def active(dtype: torch.dtype | None = None) -> bool:
    """Whether the "torch" backend runs this kernel now for inputs of `dtype` (building it on first use).

    "auto" runs it where it builds and, for `dtype`, where `auto_choice` measured it no slower than the ATen
    engine on this CPU (without a dtype: where it builds)."""
    name = get_engine()
    if name == "aten":
        return False
    if name == "kernel":
        load(strict=True)
        return True
    if load() is None:
        return False
    return dtype is None or auto_choice(dtype)["engine"] == "kernel"


# "auto"'s measurement: one small forward per engine, once per process, ISA and dtype class.
CALIBRATION = {"heads": 4, "seq": 2048, "dim": 64, "window": 128, "repeats": 3}
_choices: dict[tuple[str, str], dict] = {}
_choice_lock = threading.Lock()


def _dtype_class(dtype: torch.dtype) -> torch.dtype:
    """The dtype measured for `dtype`: fp32 stands for fp32 and fp64, bf16 and fp16 for themselves."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def auto_choice(dtype: torch.dtype) -> dict:
    """What "auto" runs for inputs of `dtype`: ``{"engine": "kernel" or "aten", "kernel_s": .., "aten_s": ..,
    "isa": .., "dtype": ..}``.

    Measured, not assumed: the first call per process, ISA build and dtype class times both engines on one
    ``sliding_window(128)`` forward (B=1, H=4, S=2048, D=64; a few tens of ms), interleaved, medians of
    `CALIBRATION["repeats"]`, and keeps the faster (the kernel on a tie). Both engines are exact; the choice
    only decides speed. ``SPARSE_ATTN_CPU_ENGINE=kernel`` or ``aten`` skips the measurement."""
    key = (get_isa(), str(_dtype_class(dtype)))
    if key not in _choices:
        load(strict=True)
        with _choice_lock:
            if key not in _choices:
                _choices[key] = _measure_engines(_dtype_class(dtype))
    return _choices[key]


def _measure_engines(dtype: torch.dtype) -> dict:
    import statistics
    import time

    from ..patterns import sliding_window
    from .torch_backend.attention import aten_forward

    c = CALIBRATION
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, c["heads"], c["seq"], c["dim"], generator=gen).to(dtype) for _ in range(3))
    layout = sliding_window(c["window"]).layout(c["seq"], block_size=64)
    scale = c["dim"] ** -0.5
    runs = {
        "kernel": lambda: forward(q, k, v, layout, scale, None),
        "aten": lambda: aten_forward(q, k, v, layout, scale, None),
    }
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up: first-touch scratch, thread pools
        for _ in range(c["repeats"]):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    kernel_s, aten_s = (statistics.median(times[name]) for name in ("kernel", "aten"))
    engine = "kernel" if kernel_s <= aten_s else "aten"
    return {"engine": engine, "kernel_s": kernel_s, "aten_s": aten_s, "isa": get_isa(), "dtype": str(dtype)}


def supported_isas() -> tuple[str, ...]:
    """The builds this CPU can run, lowest first: what torch dispatches its own kernels to
    (`torch.backends.cpu.get_cpu_capability()`, which honours ``ATEN_CPU_CAPABILITY``) and every lower one."""
    best = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "generic")
    return ISAS[: ISAS.index(best) + 1]


def get_isa() -> str:
    """The build the kernel runs: ``$SPARSE_ATTN_CPU_ISA`` (a lower one, e.g. ``avx2`` on an AVX-512 CPU), else
    the best this CPU supports."""
    supported = supported_isas()
    name = os.environ.get(ISA_ENV, "").strip().lower()
    if not name:
        return supported[-1]
    if name not in supported:
        raise ValueError(f"{ISA_ENV} must be one of {supported} on this CPU, got {name!r}")
    return name


def _flags(isa: str) -> list[str]:
    # -fopenmp: `at::parallel_for` is inline in ATen's headers, so without it the kernel's tasks run on one
    # thread. The library then needs libgomp.so.1, which resolves to the one torch has already loaded.
    return ["-O3", "-fopenmp", *ISA_FLAGS[isa], f"-DSPARSE_ATTN_NAMESPACE={_namespace(isa)}"]


def _namespace(isa: str) -> str:
    return f"sparse_attn_cpu_{isa}"


def _build(isa: str):
    from torch.utils import cpp_extension

    flags = _flags(isa)
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + torch.__version__.encode())
    name = f"sparse_attn_cpu_{isa}_{digest.hexdigest()[:12]}"
    # A plain library registering torch.ops.sparse_attn_cpu_<isa>.* (no pybind11 module: it builds faster).
    cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, _namespace(isa))


def load(strict: bool = False, isa: str | None = None):
    """The compiled extension for `isa` (default `get_isa()`), built on first use; None (after one warning)
    if it cannot be built.

    With `strict`, raise `KernelUnavailable` instead of returning None."""
    isa = get_isa() if isa is None else isa
    if isa not in _modules and isa not in _build_errors:
        with _lock:
            if isa not in _modules and isa not in _build_errors:
                try:
                    _modules[isa] = _build(isa)
                except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
                    _build_errors[isa] = f"{type(exc).__name__}: {exc}"
                    first = _build_errors[isa].splitlines()[0]
                    warnings.warn(
                        f"sparse_attn: could not build the C++ CPU attention kernel ({isa}) "
                        f"({first[:200]}{'...' if len(first) > 200 else ''}); the 'torch' backend uses its "
                        "slower ATen-composition engine instead. Building needs a C++ compiler and ninja; "
                        "`sparse_attn.backends.cpu_kernel.build_error()` has the full message; set "
                        f"{ENGINE_ENV}=aten to silence this.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    module = _modules.get(isa)
    if module is None and strict:
        raise KernelUnavailable(f"the C++ CPU attention kernel is unavailable: {_build_errors[isa]}")
    return module


def build_error(isa: str | None = None) -> str | None:
    """Why the kernel (for `isa`, default `get_isa()`) could not be built (the compiler's whole message), or
    None."""
    return _build_errors.get(get_isa() if isa is None else isa)


# -- inputs in the kernel's layouts ---------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype` with a contiguous last dimension (no copy when it already is)."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiles_t(layout: BlockLayout) -> torch.Tensor:
    """The partial tiles transposed, bit-packed ``[n_tiles, bk, ceil(bq / 32)]`` (cached per layout)."""
    return layout.cached("tiles_t", lambda: pack_tiles(layout.tile_masks().cpu().transpose(1, 2)))


def _transposed(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """bf16/fp16: ``[B, H, D, S]`` contiguous copies, the B^T operands of the kernel's GEMMs (torch's brgemm
    takes no transposed operand); O(S x D) each, once per call. fp32/fp64 read the operands in place: []."""
    if tensors[0].dtype not in (torch.bfloat16, torch.float16):
        return []
    # clone, not contiguous(): a [.., D, 1] view counts as contiguous but keeps its strides.
    return [t.transpose(-1, -2).clone(memory_format=torch.contiguous_format) for t in tensors]


def _masked_keys(key_mask, k, v, layout: BlockLayout):
    """``(key_mask, blocks holding a masked key [B, nkb], k, v)`` with hidden keys zeroed in k and v;
    Nones and k, v unchanged when nothing is masked."""
    if key_mask is None or bool(key_mask.all()):
        return None, None, k, v
    hide = ~key_mask[:, None, :, None]
    pad = -layout.kv_len % layout.block_k
    blocks = F.pad(~key_mask, (0, pad)).view(key_mask.shape[0], -1, layout.block_k).any(-1)
    return key_mask.contiguous(), blocks.contiguous(), k.masked_fill(hide, 0), v.masked_fill(hide, 0)


def _layout_args(layout: BlockLayout):
    """The layout's tensors (contiguous int32 on the CPU) and its six ints (`BlockLayout.flatten`); shared or
    per-batch layouts alike."""

    def prepare():
        tensors, ints = layout.flatten()
        return [t.to("cpu", torch.int32).contiguous() for t in tensors], ints

    return layout.cached("cpu_kernel_args", prepare)


def _mods(mods, acc: torch.dtype) -> tuple:
    """The kernel's modifier arguments ``(softcap or 0, alibi_slopes, rel_bias)``, tensors in `acc`."""
    if mods is None:
        return 0.0, None, None
    slopes = None if mods.alibi_slopes is None else mods.alibi_slopes.to(acc).contiguous()
    rel_bias = None if mods.rel_bias is None else mods.rel_bias.to(acc).contiguous()
    return float(mods.softcap or 0.0), slopes, rel_bias


def forward(q, k, v, layout: BlockLayout, scale: float, key_mask, mods=None):
    """``(out, lse)`` like `torch_backend.forward`, by the C++ kernel; `mods` a `ScoreMods` or None."""
    module = load(strict=True)
    acc = _acc(q.dtype)
    mask, blocks, k, v = _masked_keys(key_mask, k, v, layout)
    tensors, ints = _layout_args(layout)
    q, k, v = (_rows(t, q.dtype) for t in (q, k, v))
    out, lse = module.forward(
        q,
        k,
        v,
        tensors,
        ints,
        _tiles_t(layout),
        mask,
        blocks,
        scale,
        *_mods(mods, acc),
        _transposed(k),
    )
    return out, lse.to(backend_spec("torch").lse_dtype(q.dtype))


def backward(do, dlse, q, k, v, out, lse, layout: BlockLayout, scale: float, key_mask, mods=None):
    """``(dq, dk, dv, d_rel_bias)`` like `torch_backend.backward`, by the C++ kernel; ``delta = rowsum(dO O)
    - dlse``. `d_rel_bias` (rel_bias' gradient, in its dtype) is None unless `mods` has a rel_bias."""
    module = load(strict=True)
    acc = _acc(q.dtype)
    mask, blocks, k, v = _masked_keys(key_mask, k, v, layout)
    qf, kf, vf, dof = (_rows(t, q.dtype) for t in (q, k, v, do))
    delta = torch.linalg.vecdot(dof.to(acc), out.to(acc))
    if dlse is not None:
        delta = delta - dlse.to(acc)
    # Rows that see no key: +inf makes P = exp(s - lse) exactly 0 there.
    lse = lse.to(acc).masked_fill(lse == float("-inf"), float("inf")).contiguous()
    tensors, ints = _layout_args(layout)
    softcap, slopes, rel_bias = _mods(mods, acc)
    # Along a key row the diagonals j - i + Sq - 1 decrease with i: the kernel reads them reversed.
    rel_bias_rev = None if rel_bias is None else rel_bias.flip(-1).contiguous()
    grads = module.backward(
        qf,
        kf,
        vf,
        dof,
        lse,
        delta.contiguous(),
        tensors,
        ints,
        _tiles_t(layout),
        mask,
        blocks,
        scale,
        softcap,
        slopes,
        rel_bias,
        rel_bias_rev,
        _transposed(qf, kf, vf, dof),
    )
    dq, dk, dv = grads[:3]
    d_rel_bias = grads[3].to(mods.rel_bias.dtype) if rel_bias is not None else None
    return dq, dk, dv, d_rel_bias
