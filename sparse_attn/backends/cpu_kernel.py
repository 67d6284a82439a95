"""The C++ block-sparse attention kernel for the CPU: built on first use, the engine of the "torch" backend.

`sparse_attn/csrc/block_sparse_attn.cpp` walks the `BlockLayout` itself (forward, dQ, dK/dV; see its
header). This module builds it with `torch.utils.cpp_extension.load` the first time it is needed (about a
minute, once per machine and torch version; cached under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), prepares its inputs and runs it.

Engines of the "torch" backend (``SPARSE_ATTN_CPU_ENGINE`` or `set_engine`):
- ``"auto"`` (default): this kernel; if it cannot be built (no compiler, no ninja), the ATen-composition
  engine of `torch_backend` runs instead, after one warning;
- ``"kernel"``: this kernel, and an error if it cannot be built;
- ``"aten"``: the ATen-composition engine (the previous backend), for comparison.

Inputs: the kernel computes in float32 (float64 for float64 inputs, for gradcheck). fp16/bf16 inputs are
converted once per call, O(S x D), and the results converted back; fp32 inputs are read in place (any
strides with a contiguous last dimension). Keys hidden by `key_mask` are zeroed in copies of K and V (a
masked key may hold NaN) while the kernel masks their scores.

Score modifiers (`sparse_attn.score_mods.ScoreMods`: softcap, ALiBi slopes, rel_bias) go to the kernel in
its accumulation type; the backward also gets rel_bias reversed along its last dimension (so that a key's
row of queries reads it forwards) and returns rel_bias' gradient, converted back to rel_bias' dtype. Without modifiers the kernel
runs its modifier-free instantiation.
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

_lock = threading.Lock()
_module = None
_build_error: str | None = None
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


def active() -> bool:
    """Whether the "torch" backend runs this kernel now (building it on first use)."""
    name = get_engine()
    if name == "aten":
        return False
    if name == "kernel":
        load(strict=True)
        return True
    return load() is not None


def _flags() -> tuple[list[str], str]:
    """Compiler flags and a tag for the build: AVX2 + FMA where torch itself dispatches to AVX2 or AVX-512
    (ATen's vector types then use them), plain C++ elsewhere."""
    flags = ["-O3"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return flags + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"], "avx2"
    return flags, "generic"


def _build():
    from torch.utils import cpp_extension

    flags, tag = _flags()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + torch.__version__.encode())
    name = f"sparse_attn_cpu_{tag}_{digest.hexdigest()[:12]}"
    # A plain library registering torch.ops.sparse_attn_cpu.* (no pybind11 module: it builds faster).
    cpp_extension.load(
        name=name, sources=[str(SOURCE)], extra_cflags=flags, is_python_module=False, verbose=False
    )
    return torch.ops.sparse_attn_cpu


def load(strict: bool = False):
    """The compiled extension, built on first use; None (after one warning) if it cannot be built.

    With `strict`, raise `KernelUnavailable` instead of returning None."""
    global _module, _build_error
    if _module is None and _build_error is None:
        with _lock:
            if _module is None and _build_error is None:
                try:
                    _module = _build()
                except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
                    _build_error = f"{type(exc).__name__}: {exc}"
                    first = _build_error.splitlines()[0]
                    warnings.warn(
                        "sparse_attn: could not build the C++ CPU attention kernel "
                        f"({first[:200]}{'...' if len(first) > 200 else ''}); the 'torch' backend uses its "
                        "slower ATen-composition engine instead. Building needs a C++ compiler and ninja; "
                        "`sparse_attn.backends.cpu_kernel.build_error()` has the full message; set "
                        f"{ENGINE_ENV}=aten to silence this.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    if _module is None and strict:
        raise KernelUnavailable(f"the C++ CPU attention kernel is unavailable: {_build_error}")
    return _module


def build_error() -> str | None:
    """Why the kernel could not be built (the compiler's whole message), or None."""
    return _build_error


# -- inputs in the kernel's layouts ---------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """`t` in `acc` with a contiguous last dimension (no copy when it already is)."""
    t = t.to(acc)
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiles_t(layout: BlockLayout) -> torch.Tensor:
    """The partial tiles transposed, bit-packed ``[n_tiles, bk, ceil(bq / 32)]`` (cached per layout)."""
    return layout.cached("tiles_t", lambda: pack_tiles(layout.tile_masks().cpu().transpose(1, 2)))


def _masked_keys(key_mask, k, v, layout: BlockLayout):
    """``(key_mask, blocks holding a masked key [B, nkb], k, v)`` with hidden keys zeroed in k and v;
    Nones and k, v unchanged when nothing is masked."""
    if key_mask is None or bool(key_mask.all()):
        return None, None, k, v
    hide = ~key_mask[:, None, :, None]
    pad = -layout.kv_len % layout.block_k
    blocks = F.pad(~key_mask, (0, pad)).view(key_mask.shape[0], -1, layout.block_k).any(-1)
    return key_mask.contiguous(), blocks.contiguous(), k.masked_fill(hide, 0), v.masked_fill(hide, 0)


def _shared_layout(layout: BlockLayout):
    """The layout's tensors and its five geometry ints; the kernel walks batch-shared layouts only."""
    if layout.batch is not None:
        raise ValueError(
            "the C++ CPU kernel takes batch-shared layouts; per-batch ones run on the ATen engine"
        )
    tensors, ints = layout.flatten()
    return tensors, ints[:5]


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
    tensors, ints = _shared_layout(layout)
    out, lse = module.forward(
        _rows(q, acc),
        _rows(k, acc),
        _rows(v, acc),
        tensors,
        ints,
        _tiles_t(layout),
        mask,
        blocks,
        scale,
        *_mods(mods, acc),
    )
    return out.to(q.dtype), lse.to(backend_spec("torch").lse_dtype(q.dtype))


def backward(do, dlse, q, k, v, out, lse, layout: BlockLayout, scale: float, key_mask, mods=None):
    """``(dq, dk, dv, d_rel_bias)`` like `torch_backend.backward`, by the C++ kernel; ``delta = rowsum(dO O)
    - dlse``. `d_rel_bias` (rel_bias' gradient, in its dtype) is None unless `mods` has a rel_bias."""
    module = load(strict=True)
    acc = _acc(q.dtype)
    mask, blocks, k, v = _masked_keys(key_mask, k, v, layout)
    qf, kf, vf, dof = (_rows(t, acc) for t in (q, k, v, do))
    delta = torch.linalg.vecdot(dof, out.to(acc))
    if dlse is not None:
        delta = delta - dlse.to(acc)
    # Rows that see no key: +inf makes P = exp(s - lse) exactly 0 there.
    lse = lse.to(acc).masked_fill(lse == float("-inf"), float("inf")).contiguous()
    tensors, ints = _shared_layout(layout)
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
    )
    dq, dk, dv = grads[:3]
    d_rel_bias = grads[3].to(mods.rel_bias.dtype) if rel_bias is not None else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_rel_bias
