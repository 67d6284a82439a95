"""The backend registry: one place that knows every backend, what it supports, and what "auto" picks.

A backend is a module offering

- ``forward(q, k, v, layout, scale, key_mask, mods=None) -> (out, lse)``: out like q, lse ``[B, Hq, Sq]`` in
  ``spec.lse_dtype(q.dtype)`` (natural log, -inf for rows with no visible key); `mods` is None or the
  call's `sparse_attn.score_mods.ScoreMods` (softcap, ALiBi, rel_bias), already checked;
- ``backward(do, dlse, q, k, v, out, lse, layout, scale, key_mask, mods=None) -> (dq, dk, dv, d_rel_bias)``,
  where `dlse` (the gradient flowing into lse, or None) enters as ``delta = rowsum(dO * O) - dlse``, and
  d_rel_bias (the per-diagonal sums of dS, like ``mods.rel_bias``) is None without a rel_bias;

and a `BackendSpec` registered here, which says what it takes. The module is imported on first use, so
``import sparse_attn`` imports no optional dependency. `sparse_attn.api`, `sparse_attn._ops`,
`sparse_attn.modules`, the CLI and the demo ask this registry; nothing else names a backend.

Adding a backend is one new module plus one `register(...)` line at the bottom of this file (or in the
new module's package, before first use).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Accepted by every function that takes a backend name: resolved per call by `resolve`.
AUTO = "auto"
#: A `BackendSpec.devices` entry meaning "any device" (the backend computes on CPU copies if it must).
ANY_DEVICE = "*"


@dataclass(frozen=True)
class BackendSpec:
    """What one backend supports. The backend module is imported by `module`, on first use."""

    name: str
    module_name: str  # importable module path offering forward() and backward()
    devices: tuple[str, ...]  # device types "auto" picks it for, in registry order; ANY_DEVICE for all
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, int] | None  # inclusive (lo, hi); None: any head dim
    default_block_size: int  # the block size a Pattern is built with for this backend
    block_rule: str  # what layout block sizes it takes, for people (the backend checks it exactly)
    label: str  # how messages name it, e.g. "the Triton backend"
    #: ``why_not(device)``: None if the backend can run on `device`, else the reason (RuntimeError).
    why_not: Callable[[torch.device], str | None] = lambda device: None

    @property
    def module(self):
        """The backend module (imported on first use)."""
        return importlib.import_module(self.module_name)

    def lse_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """float32, or float64 for float64 inputs (the PyTorch backend's gradcheck precision)."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    def check_device(self, device: torch.device) -> None:
        """Raise RuntimeError if this backend cannot run on `device` (before any work is done)."""
        reason = self.why_not(device)
        if reason is not None:
            raise RuntimeError(reason)


_REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> BackendSpec:
    """Add a backend (later registrations with the same name replace earlier ones)."""
    if spec.name == AUTO:
        raise ValueError(f"{AUTO!r} is reserved for choosing a backend per call")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> tuple[str, ...]:
    """Every accepted backend name: "auto" first, then the registered backends in registry order."""
    return (AUTO, *_REGISTRY)


def get(name: str) -> BackendSpec:
    """The registered backend `name` (not "auto"; see `resolve`)."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def check_name(name) -> str:
    """`name` if it is "auto" or a registered backend, else a ValueError listing them."""
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"backend must be one of {names()}, got {name!r}")
    return name


def resolve(name: str, device=None) -> BackendSpec:
    """The backend that runs on `device` (a torch.device, a string, or None when unknown).

    "auto" is the first registered backend listing the device's type, else the first listing ANY_DEVICE
    (the Triton kernels on CUDA tensors, the PyTorch implementation elsewhere). A named backend is checked
    to be able to run there (`BackendSpec.check_device`)."""
    check_name(name)
    device = None if device is None else torch.device(device)
    if name != AUTO:
        spec = _REGISTRY[name]
        if device is not None:
            spec.check_device(device)
        return spec
    device_type = None if device is None else device.type
    for spec in _REGISTRY.values():
        if device_type in spec.devices:
            return spec
    return next(spec for spec in _REGISTRY.values() if ANY_DEVICE in spec.devices)


def _triton_why_not(device: torch.device) -> str | None:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
        "to run the kernels on the CPU through Triton's interpreter"
    )


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

register(
    BackendSpec(
        name="triton",
        module_name="sparse_attn.backends.triton_backend",
        devices=("cuda",),
        dtypes=_FLOATS,
        head_dims=(16, 256),
        default_block_size=64,
        block_rule="a multiple of a kernel tile (32 or 64 rows/keys) in both directions",
        label="the Triton backend",
        why_not=_triton_why_not,
    )
)
register(
    BackendSpec(
        name="torch",
        module_name="sparse_attn.backends.torch_backend",
        devices=(ANY_DEVICE,),
        dtypes=(*_FLOATS, torch.float64),
        head_dims=None,
        default_block_size=64,
        block_rule="any",
        label="the PyTorch backend",
    )
)
