"""diffusers integration: video and image diffusion transformers on sparse-attn, a pattern per layer.

Two routes into a diffusers (0.36 to 0.42) transformer, both reading what `set_pattern` stored on each
attention layer:

- **The attention dispatcher** (models whose processors call ``dispatch_attention_fn``: Wan, HunyuanVideo,
  Flux, LTX, ...): `register()` adds a ``"sparse_attn"`` member to diffusers' ``AttentionBackendName`` and
  its (private) backend registry, after checking that their structure is the one this module was written
  for; then ``model.set_attention_backend("sparse_attn")`` (or ``with attention_backend("sparse_attn"):``)
  switches the model. The dispatcher passes no layer identity, so `set_pattern` installs forward hooks on
  the attention layers that make their setting current while they run.
- **A processor swap** (any processor that ends in ``F.scaled_dot_product_attention``, e.g. CogVideoX's, and
  the dispatcher models under the default native backend):
  ``model.set_attn_processor(sparse_processors(model))`` wraps each layer's own processor; SDPA calls made
  inside it go to sparse-attn.

What a layer attends with (`set_pattern`): a `Pattern`, or a callable ``(layer_name, q_len, kv_len) ->
Pattern | None``, over the token ``grid`` (the dispatcher passes no frame/height/width, so the grid is a
setting per model or per layer, e.g. ``(frames, height, width)`` of the latent after patching). Joint
text + video sequences set ``text="first"`` (Flux, CogVideoX) or ``"last"`` (HunyuanVideo): the pattern
then covers the ``prod(grid)`` video tokens, and the text tokens are global (they see every key and every
query sees them), exactly, through `merge_attention`. Dense, exactly as the model's own attention
(diffusers' native backend, or the processor's own SDPA call): cross-attention (a layer with
``is_cross_attention``, different query and key lengths, or queries from the ``hidden_states`` and keys
from the ``encoder_hidden_states`` the layer was given), layers `set_pattern` left out or set to None, and
calls from layers no `set_pattern` configured (with a warning). Masks: a key-padding mask (HunyuanVideo's text mask,
bool or 0/-inf, broadcast over heads and queries) applies on layers with a pattern; any other mask there
raises, as do attention dropout, context parallelism and ``return_lse``.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from enum import Enum

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..api import sparse_attention
from ..checks import check_int
from ..merge import merge_attention
from ..patterns import Pattern, causal, dense

BACKEND_NAME = "sparse_attn"
#: diffusers' enum member name for the backend.
_MEMBER_NAME = "SPARSE_ATTN"
#: The diffusers releases this module was tested with (the range of the ``diffusers`` extra).
TESTED_RANGE = ">=0.36,<0.43"
#: Where `set_pattern` stores a layer's `LayerSetting`.
_SETTING_ATTR = "_sparse_attn_setting"
_HOOKED_ATTR = "_sparse_attn_hooked"
#: The `_Call` of the attention layer running now (set by the hooks `set_pattern` installs).
_CURRENT = contextvars.ContextVar("sparse_attn_diffusers_layer", default=None)
_TEXT_PLACES = (None, "first", "last")
#: Shared by every layer: its layouts are cached on it.
_DENSE = dense()
_WARNED = []


class LayerSetting:
    """What `set_pattern` set for one attention layer; resolves the pattern for each sequence length."""

    def __init__(self, name: str, pattern, grid, text, cross: bool):
        self.name, self.pattern, self.grid, self.text, self.cross = name, pattern, grid, text, cross
        # Sequence length -> (pattern over the video tokens or None, number of text tokens): one pattern
        # object per length, so its cached layouts are reused call after call.
        self._resolved: dict = {}

    def resolve(self, seq_len: int, is_causal: bool) -> tuple[Pattern | None, int]:
        key = (seq_len, is_causal)
        if key not in self._resolved:
            self._resolved[key] = self._resolve(seq_len, is_causal)
        return self._resolved[key]

    def _resolve(self, seq_len, is_causal):
        video = seq_len if self.grid is None else math.prod(self.grid)
        if self.text is None and video != seq_len:
            raise ValueError(
                f"attention layer {self.name!r} attends over {seq_len} tokens, but grid {self.grid} has "
                f"{video}; pass the latent token grid after patching (e.g. (frames // patch_t, height // "
                "patch_h, width // patch_w)), and text='first' or 'last' if the layer also sees text tokens"
            )
        if video > seq_len:
            raise ValueError(
                f"attention layer {self.name!r} attends over {seq_len} tokens, fewer than the {video} video "
                f"tokens of grid {self.grid}"
            )
        pattern = self.pattern
        if not isinstance(pattern, Pattern):
            pattern = pattern(self.name, seq_len, seq_len)
            if pattern is not None and not isinstance(pattern, Pattern):
                raise TypeError(
                    f"the pattern callable returned {type(pattern).__name__} for layer {self.name!r}; "
                    "expected a sparse_attn Pattern or None (dense)"
                )
        if pattern is not None and is_causal:
            if self.text is not None:
                raise ValueError(f"is_causal with text={self.text!r} is not supported (layer {self.name!r})")
            pattern = pattern & causal()
        return pattern, seq_len - video

    def __repr__(self):
        return f"LayerSetting({self.name!r}, pattern={self.pattern!r}, grid={self.grid}, text={self.text!r})"


# -- which layers, and what they attend with ---------------------------------------------------------------
def attention_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's attention layers (modules holding a diffusers attention processor), by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "processor") and callable(getattr(module, "set_processor", None))
    }


def set_pattern(
    model: torch.nn.Module,
    pattern: Pattern | Callable | None,
    *,
    grid: Sequence[int] | None = None,
    text: str | None = None,
    layers: Sequence[str] | None = None,
) -> list[str]:
    """Make attention `layers` of `model` (default: all) attend with `pattern`; returns their names.

    Args:
        pattern: a `Pattern`; a callable ``(layer_name, q_len, kv_len) -> Pattern | None`` (called once per
            layer and sequence length; None means dense; the layer name, e.g. ``"blocks.3.attn1"``, holds its
            block index); or None (dense: undo).
        grid: the token grid (e.g. ``(T, H, W)`` of the latent after patching, tokens in row-major order);
            checked against the tokens each layer sees. Required with `text`.
        text: None (the layer sees the grid's tokens only, or `pattern` covers the whole sequence when no
            grid is given), ``"first"`` (text tokens before the video tokens: Flux, CogVideoX) or ``"last"``
            (after them: HunyuanVideo). The text tokens, ``seq_len - prod(grid)``, are then global and
            `pattern` covers the video tokens only.
        layers: attention layer names, or prefixes of them (``"transformer_blocks"``); an unknown one is a
            ValueError. Layers not named keep their previous setting. Call again with other `layers` for a
            pattern or grid per layer.

    The other layers run dense; cross-attention layers always do.
    """
    if pattern is not None and not (isinstance(pattern, Pattern) or callable(pattern)):
        raise TypeError(
            f"pattern must be a sparse_attn Pattern, a callable (layer_name, q_len, kv_len) -> Pattern, or "
            f"None; got {type(pattern).__name__}"
        )
    if text not in _TEXT_PLACES:
        raise ValueError(f"text must be None, 'first' or 'last', got {text!r}")
    grid = _check_grid(grid)
    if text is not None and grid is None:
        raise ValueError("text='first'/'last' needs the video token grid: pass grid=(T, H, W)")
    found = attention_layers(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no diffusers attention layers (modules with a processor)"
        )
    chosen = _select(found, layers)
    for name, module in found.items():
        if not getattr(module, _HOOKED_ATTR, False):
            _hook(module)
            # Layers not chosen run dense, but are known: only unconfigured models trigger the warning.
            setattr(module, _SETTING_ATTR, LayerSetting(name, None, None, None, False))
        if name in chosen:
            cross = bool(getattr(module, "is_cross_attention", False))
            setattr(module, _SETTING_ATTR, LayerSetting(name, pattern, grid, text, cross))
    return list(chosen)


def _check_grid(grid) -> tuple[int, ...] | None:
    if grid is None:
        return None
    if isinstance(grid, int) or not isinstance(grid, Sequence) or len(grid) == 0:
        raise TypeError(f"grid must be a tuple of ints such as (T, H, W), got {grid!r}")
    return tuple(check_int(f"grid[{d}]", n, 1) for d, n in enumerate(grid))


def _select(found: dict, layers) -> list[str]:
    """The layer names `layers` names (exactly or as a dotted prefix), in model order."""
    if layers is None:
        return list(found)
    if isinstance(layers, str):
        layers = [layers]
    chosen = set()
    for wanted in layers:
        hits = [n for n in found if n == wanted or n.startswith(f"{wanted}.")]
        if not hits:
            some = ", ".join(list(found)[:6])
            raise ValueError(
                f"no attention layer is named {wanted!r} or lies under it; this model's attention layers are "
                f"{some}{', ...' if len(found) > 6 else ''} (see attention_layers(model))"
            )
        chosen.update(hits)
    return [n for n in found if n in chosen]


def _hook(module: torch.nn.Module) -> None:
    """While `module` runs, its setting (for this call) is the current one (the dispatcher's backend reads it)."""
    tokens = []

    def enter(mod, args, kwargs):
        tokens.append(_CURRENT.set(_Call(getattr(mod, _SETTING_ATTR, None), args, kwargs)))

    def leave(mod, args, output):
        _CURRENT.reset(tokens.pop())

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, always_call=True)
    setattr(module, _HOOKED_ATTR, True)


class _Call:
    """One call of an attention layer: its setting, and the token counts of the ``hidden_states`` and
    ``encoder_hidden_states`` it was given (None where unknown)."""

    def __init__(self, setting: LayerSetting | None, args, kwargs):
        self.setting = setting
        hidden = args[0] if args else kwargs.get("hidden_states")
        encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        # Sequences are [B, S, C] in video and image transformers; other shapes are left to the lengths.
        self.hidden = _tokens(hidden)
        self.encoder = _tokens(encoder)

    def is_cross(self, q_len: int, kv_len: int) -> bool:
        """Cross-attention: different lengths, a layer flagged ``is_cross_attention``, or queries from the
        ``hidden_states`` and keys from the ``encoder_hidden_states`` as given (joint layers concatenate them,
        so their queries outnumber the ``hidden_states``): LTX's ``attn2`` has no flag, and a prompt as long as
        the video would otherwise look like self-attention."""
        if q_len != kv_len or self.setting.cross:
            return True
        return self.encoder is not None and (q_len, kv_len) == (self.hidden, self.encoder)


def _tokens(x) -> int | None:
    return x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 3 else None


def _sparse_or_none(call, q, k, v, attn_mask, dropout_p, is_causal, scale):
    """Sparse attention for ``[B, H, S, D]`` q/k/v in a layer's `call` (a `_Call`, None outside any configured
    layer), or None where the layer runs dense."""
    setting = None if call is None else call.setting
    if setting is None:
        if not _WARNED:
            _WARNED.append(True)
            warnings.warn(
                "sparse_attn: an attention call from a layer that set_pattern() did not configure runs dense; "
                "call sparse_attn.integrations.diffusers.set_pattern(model, ...) on the model",
                stacklevel=3,
            )
        return None
    q_len, kv_len = q.shape[2], k.shape[2]
    if setting.pattern is None or call.is_cross(q_len, kv_len):
        return None
    pattern, n_text = setting.resolve(q_len, bool(is_causal))
    if pattern is None:
        return None
    if dropout_p:
        raise ValueError(f"sparse_attn cannot apply attention dropout ({dropout_p}) (layer {setting.name!r})")
    key_mask = _key_mask(attn_mask, q.shape[0], kv_len, setting.name)
    if n_text == 0:
        return sparse_attention(q, k, v, pattern, scale=scale, key_mask=key_mask)
    return _video_and_text(q, k, v, pattern, n_text, setting.text == "first", key_mask, scale)


def _video_and_text(q, k, v, pattern, n_text, text_first, key_mask, scale):
    """`pattern` among the video tokens, text tokens global: video queries attend to the video keys the
    pattern keeps and to every text key (two parts merged through their logsumexps), text queries to all."""
    seq = q.shape[2]
    video = slice(n_text, seq) if text_first else slice(0, seq - n_text)
    text = slice(0, n_text) if text_first else slice(seq - n_text, seq)

    def part(rows, cols, pat):
        mask = None if key_mask is None else key_mask[:, cols]
        kv = (k[:, :, cols], v[:, :, cols])
        return sparse_attention(q[:, :, rows], *kv, pat, scale=scale, key_mask=mask, return_lse=True)

    out_vv, lse_vv = part(video, video, pattern)
    out_vt, lse_vt = part(video, text, _DENSE)
    out_video = merge_attention([out_vv, out_vt], [lse_vv, lse_vt])[0]
    out_text = part(text, slice(0, seq), _DENSE)[0]
    return torch.cat([out_text, out_video] if text_first else [out_video, out_text], dim=2)


def _key_mask(attn_mask, batch: int, kv_len: int, layer: str) -> torch.Tensor | None:
    """bool ``[B, Skv]`` from an SDPA-style mask that only masks keys (``[b, 1, 1, Skv]``, bool or 0/-inf)."""
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m[None]
    if (
        m.dim() != 4
        or m.shape[1] != 1
        or m.shape[2] != 1
        or m.shape[3] != kv_len
        or m.shape[0] not in (1, batch)
    ):
        raise ValueError(
            f"on layers with a pattern sparse_attn takes only key-padding masks, broadcast over heads and "
            f"queries ([B, 1, 1, {kv_len}] or [B, {kv_len}]); layer {layer!r} got {tuple(attn_mask.shape)}"
        )
    if m.dtype != torch.bool:
        visible = m == 0
        # One host read: an additive mask other than 0 / -inf would change scores, not just hide keys.
        if not bool((visible | (m == float("-inf"))).all()):
            raise ValueError(
                f"layer {layer!r}: an additive attention mask with values other than 0 and -inf cannot be "
                "expressed by sparse_attn (only which keys are visible)"
            )
        m = visible
    return m[:, 0, 0, :].expand(batch, kv_len)


# -- route 1: diffusers' attention dispatcher ----------------------------------------------------------
def _sparse_attn_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config=None,
) -> torch.Tensor:
    """The registered backend: ``[B, S, H, D]`` q/k/v in and out, as diffusers' backends take them."""
    if _parallel_config is not None:
        raise ValueError("the sparse_attn diffusers backend does not support context parallelism")
    if return_lse:
        raise ValueError("the sparse_attn diffusers backend does not support return_lse=True")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = _sparse_or_none(
        _CURRENT.get(), q, k, v, _dispatch_mask(attn_mask, query, key), dropout_p, is_causal, scale
    )
    if out is None:
        native = _native_backend()
        return native(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    return out.transpose(1, 2)


def _dispatch_mask(attn_mask, query, key):
    """diffusers' native backend reads a 2-D mask as ``[B, Skv]`` (SDPA would read ``[Sq, Skv]``)."""
    if (
        attn_mask is not None
        and attn_mask.dim() == 2
        and tuple(attn_mask.shape) == (query.shape[0], key.shape[1])
    ):
        return attn_mask[:, None, None, :]
    return attn_mask


def _native_backend():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]


def register() -> str:
    """Add the ``"sparse_attn"`` backend to diffusers' attention dispatcher (idempotent); returns its name.

    diffusers has no public way to add a backend: this extends its private ``AttentionBackendName`` enum and
    ``_AttentionBackendRegistry`` after checking their structure, and raises a RuntimeError naming the
    processor route instead if that structure changed. Then ``model.set_attention_backend("sparse_attn")``.
    """
    enum, registry = _checked_dispatcher()
    member = _add_enum_member(enum, _MEMBER_NAME, BACKEND_NAME)
    if registry._backends.get(member) is not _sparse_attn_backend:
        registry.register(member, constraints=[])(_sparse_attn_backend)
    return BACKEND_NAME


def _checked_dispatcher():
    """diffusers' (AttentionBackendName, _AttentionBackendRegistry), checked to be what we extend."""
    try:
        import diffusers
        from diffusers.models import attention_dispatch as ad
    except ImportError as e:
        raise ImportError(
            "the diffusers integration needs diffusers: pip install 'sparse-attn[diffusers]'"
        ) from e
    enum = getattr(ad, "AttentionBackendName", None)
    registry = getattr(ad, "_AttentionBackendRegistry", None)
    problems = []
    if not (isinstance(enum, type) and issubclass(enum, str) and issubclass(enum, Enum)):
        problems.append("AttentionBackendName is not a str Enum")
    else:
        for attr, kind in (("_member_map_", dict), ("_value2member_map_", dict), ("_member_names_", list)):
            if not isinstance(enum.__dict__.get(attr), kind):
                problems.append(f"AttentionBackendName.{attr} is not a {kind.__name__}")
        if "NATIVE" not in getattr(enum, "__members__", {}):
            problems.append("AttentionBackendName has no NATIVE member")
    if registry is None:
        problems.append("_AttentionBackendRegistry is missing")
    else:
        for attr, kind in (("_backends", dict), ("_constraints", dict), ("_supported_arg_names", dict)):
            if not isinstance(getattr(registry, attr, None), kind):
                problems.append(f"_AttentionBackendRegistry.{attr} is not a {kind.__name__}")
        register = getattr(registry, "register", None)
        if not callable(register) or "constraints" not in inspect.signature(register).parameters:
            problems.append("_AttentionBackendRegistry.register(backend, constraints) is missing")
    dispatch = getattr(ad, "dispatch_attention_fn", None)
    wanted = {"query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"}
    if dispatch is None or not wanted <= set(inspect.signature(dispatch).parameters):
        problems.append(f"dispatch_attention_fn does not take {sorted(wanted)}")
    if not problems and enum.NATIVE not in registry._backends:
        problems.append("the native backend is not registered")
    if problems:
        raise RuntimeError(
            f"sparse_attn cannot extend the attention dispatcher of diffusers {diffusers.__version__} "
            f"(tested: diffusers{TESTED_RANGE}): {'; '.join(problems)}. Use the processor route instead: "
            "model.set_attn_processor(sparse_attn.integrations.diffusers.sparse_processors(model))"
        )
    return enum, registry


def _add_enum_member(enum: type, name: str, value: str):
    """Add member `name` = `value` to a str Enum class (idempotent), checked; the existing one if present."""
    existing = enum._value2member_map_.get(value)
    if existing is not None:
        return existing
    if name in enum._member_map_:
        raise RuntimeError(f"diffusers' AttentionBackendName already has a member {name} with another value")
    member = str.__new__(enum, value)
    member._name_, member._value_ = name, value
    member.__objclass__ = enum
    member._sort_order_ = len(enum._member_names_)
    enum._member_map_[name] = member
    enum._value2member_map_[value] = member
    enum._member_names_.append(name)
    type.__setattr__(enum, name, member)
    if not (
        enum(value) is member
        and enum[name] is member
        and member == value
        and member in enum.__members__.values()
    ):
        del enum._member_map_[name], enum._value2member_map_[value]
        enum._member_names_.remove(name)
        type.__delattr__(enum, name)
        raise RuntimeError(
            "sparse_attn could not add a member to diffusers' AttentionBackendName on this Python; use "
            "model.set_attn_processor(sparse_attn.integrations.diffusers.sparse_processors(model))"
        )
    return member


# -- route 2: a processor swap -------------------------------------------------------------------------
class SparseAttnProcessor:
    """Wraps an attention processor: its ``F.scaled_dot_product_attention`` calls go to sparse-attn under
    the setting `set_pattern` stored on the layer (dense where there is none). Keyword arguments reach the
    wrapped processor as before (diffusers filters them by the processor's signature, which this copies)."""

    def __init__(self, processor):
        if isinstance(processor, SparseAttnProcessor):
            processor = processor.processor
        if not callable(processor):
            raise TypeError(f"expected an attention processor, got {type(processor).__name__}")
        self.processor = processor
        # diffusers reads inspect.signature(processor.__call__) to decide which keyword arguments to pass.
        run = self._run

        def call(*args, **kwargs):
            return run(*args, **kwargs)

        call.__signature__ = inspect.signature(processor.__call__)
        self.__call__ = call

    def __call__(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    def _run(self, attn, *args, **kwargs):
        with _SDPAToSparse(_Call(getattr(attn, _SETTING_ATTR, None), args, kwargs)):
            return self.processor(attn, *args, **kwargs)

    def __getattr__(self, name):
        # Attributes diffusers reads from processors (e.g. _attention_backend) come from the wrapped one.
        if name == "processor":
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __repr__(self):
        return f"SparseAttnProcessor({self.processor!r})"


def sparse_processors(model: torch.nn.Module) -> dict:
    """Every attention processor of `model` wrapped in a `SparseAttnProcessor`, by diffusers' processor
    name: ``model.set_attn_processor(sparse_processors(model))`` is the switch."""
    return {name: SparseAttnProcessor(p) for name, p in model.attn_processors.items()}


class _SDPAToSparse(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to sparse-attn in a layer's `_Call`; all else as is."""

    def __init__(self, call):
        super().__init__()
        self.call = call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = self._sparse(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _sparse(
        self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        return _sparse_or_none(self.call, query, key, value, attn_mask, dropout_p, is_causal, scale)
