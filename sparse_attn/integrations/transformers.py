"""Hugging Face transformers integration: ``model.set_attn_implementation("sparse_attn")``.

`register()` adds two functions to transformers (>= 5):
- a mask function (`transformers.masking_utils.AttentionMaskInterface`): where `sdpa` would build a
  ``[B, 1, Sq, Skv]`` mask, it returns a small `SparseMaskInfo`: the 2-D padding mask sliced to the layer's
  key states, plus the kind of mask the model asked for (causal, causal sliding window, bidirectional);
- an attention function (`transformers.AttentionInterface`) that turns that into a pattern and a key mask
  and calls `sparse_attention`.

So Llama-, Mistral- and Qwen2-style models keep their own semantics (causal, ``config.sliding_window``,
left or right padding, GQA, prefill and KV-cache decoding with the default `DynamicCache`) without an
S x S mask; so do GPT-OSS-style attention sinks (``s_aux``) and bidirectional encoder and cross-attention
(Bart-style). A mask the integration cannot express exactly (custom mask overlays, chunked attention,
static caches) or an additive bias (T5's ``position_bias``, ALiBi) raises a clear error instead of being
dropped.

Padding-free (packed) batches, as `DataCollatorWithFlattening` makes them, keep their documents apart
exactly, as ``flash_attention_2`` does: ``position_ids`` that restart at 0 (transformers then asks for a
packed-sequence mask; we use `documents` of its sequence indices, composed with the model's pattern or the
one `set_pattern` set), or the ``cu_seq_lens_q``/``cu_seq_lens_k`` keyword arguments alone (batch of one;
run through `sparse_attention_varlen`, so the pattern must be a band: causal or a sliding window). A
pattern set by `set_pattern` is intersected with the documents: its bands (causal, windows) apply within
every document, while position-based parts (``global_tokens``) count positions of the packed sequence.

Window convention: transformers' ``sliding_window=W`` lets query position q see key k iff
``0 <= q - k < W``, which is ours ``causal() & sliding_window(W - 1, 0)``.

`set_pattern(model, pattern)` replaces the model's own pattern (not the padding) by any `Pattern`, e.g.
``causal() & (sliding_window(255, 0) | global_tokens(4))`` for Longformer-style global tokens. Queries are
aligned bottom-right as everywhere in sparse-attn: with a cache, position 0 is the first cached key.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..api import sparse_attention
from ..merge import merge_attention
from ..patterns import Pattern, causal, documents, sliding_window
from ..patterns.window import dense
from ..varlen import sparse_attention_varlen

DEFAULT_NAME = "sparse_attn"
_PATTERN_ATTR = "sparse_attn_pattern"
#: Attention-function kwargs that change the logits (T5's relative position bias, ALiBi, sinks other than
#: GPT-OSS's ``s_aux``): ignoring them would be silently wrong, so they raise.
_UNSUPPORTED_BIASES = ("position_bias", "alibi", "sinks")


@dataclass
class SparseMaskInfo:
    """What the mask function hands the attention function in place of an S x S mask."""

    #: bool ``[B, kv_length]``, True for a real key, aligned with the layer's key states; None: no padding.
    key_mask: torch.Tensor | None
    q_length: int
    kv_length: int
    #: Whether queries see only keys at or before their position.
    causal: bool
    #: transformers' sliding window W (``q - k < W``), or None.
    window: int | None
    #: Packed sequences: int ``[B, S]`` sequence index of every position (transformers' packed sequence
    #: mask, from position ids that restart), or None.
    packed: torch.Tensor | None = None

    def __post_init__(self):
        # Patterns composed with the packing, one per base pattern: every layer reuses their layouts.
        self._composed = {}

    def contiguous(self) -> SparseMaskInfo:
        """generate() calls ``.contiguous()`` on prepared masks; this one has nothing to reorder."""
        return self

    def pattern(self, base: Pattern | None = None) -> Pattern:
        """Our pattern for this mask (padding aside): `base` (default: the model's own), within each
        packed sequence if there are any."""
        if base is None:
            if "own" not in self._composed:
                self._composed["own"] = self.base_pattern()
            base = self._composed["own"]
        if self.packed is None:
            return base
        if id(base) not in self._composed:
            self._composed[id(base)] = (base, documents(self.packed) & base)
        return self._composed[id(base)][1]

    def base_pattern(self) -> Pattern:
        """The model's own pattern: causal, a window, or everything."""
        if self.causal:
            return causal() if self.window is None else sliding_window(self.window - 1, 0)
        return dense() if self.window is None else sliding_window(self.window, self.window)


def register(name: str = DEFAULT_NAME) -> str:
    """Register the attention and mask functions under `name` (idempotent); returns `name`.

    Then ``model.set_attn_implementation(name)`` or ``from_pretrained(..., attn_implementation=name)``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, sparse_attention_forward)
    AttentionMaskInterface.register(name, sparse_mask)
    return name


def set_pattern(model: torch.nn.Module, pattern: Pattern | None, *, keep_model_pattern: bool = False) -> None:
    """Use `pattern` instead of the model's own (causal / sliding window) in every attention layer.

    Padding from the attention mask still applies. `None` restores the model's own pattern. With
    `keep_model_pattern`, each layer attends with ``pattern & <its own pattern>`` instead: e.g.
    ``set_pattern(model, topk_blocks(16), keep_model_pattern=True)`` selects, per query block, 16 key
    blocks among those the layer's causal mask (and its sliding window, layer by layer) keeps.

    Positions are those of the layer's key states (bottom-right aligned), counted from the first key the
    cache holds: with left padding, ``global_tokens(4)`` names the first four *slots*, which may be padding
    (pass the real positions instead), and a sliding-window cache layer that has evicted its first keys
    counts from the oldest key it still holds. Keep the model's own pattern in the pattern you set (e.g.
    ``causal() & ...``) unless you mean to drop it.
    """
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparse_attn Pattern or None, got {type(pattern).__name__}")
    setting = None if pattern is None else _Setting(pattern, bool(keep_model_pattern))
    for module in model.modules():
        setattr(module, _PATTERN_ATTR, setting)


class _Setting:
    """What `set_pattern` set: the pattern, and whether the layer's own pattern is ANDed to it."""

    def __init__(self, pattern: Pattern, keep_model_pattern: bool):
        self.pattern, self.keep_model_pattern = pattern, keep_model_pattern
        # One combined pattern per kind of layer mask, kept: patterns cache their layouts (and selection
        # tables) on themselves, so a new combination per call would rebuild them every call.
        self._combined: dict = {}

    def pattern_for(self, info: SparseMaskInfo) -> Pattern:
        if not self.keep_model_pattern:
            return self.pattern
        key = (info.causal, info.window)
        if key not in self._combined:
            self._combined[key] = self.pattern & info.base_pattern()
        return self._combined[key]


def sparse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> SparseMaskInfo:
    """transformers mask function: the padding mask and the mask's kind, never an S x S mask."""
    mask_function, packed = _unpack_packed_sequences(mask_function)
    is_causal, window = _mask_kind(mask_function)
    q_offset = int(q_offset)
    # Bottom-right alignment matters only for causal and windowed masks; a plain bidirectional one (encoders,
    # cross-attention to encoder states, where q_length != kv_length) sees every real key whatever the offsets.
    aligned = q_offset + q_length == kv_offset + kv_length
    if not aligned and (is_causal or window is not None):
        raise ValueError(
            "sparse_attn needs the key states to end at the last query (dynamic caches, the default); got "
            f"q_offset={q_offset}, q_length={q_length}, kv_offset={kv_offset}, kv_length={kv_length} "
            "(a static cache?). Use cache_implementation='dynamic'."
        )
    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"expected a 2-D padding mask [B, S], got shape {tuple(attention_mask.shape)}")
        padding = attention_mask.bool()
        missing = kv_offset + kv_length - padding.shape[-1]
        if missing > 0:
            # As transformers does: keys past the given mask count as padding.
            padding = torch.nn.functional.pad(padding, (0, missing))
        key_mask = padding[:, kv_offset : kv_offset + kv_length]
    if packed is not None and tuple(packed.shape[-1:]) != (kv_length,):
        raise ValueError(f"packed sequence indices {tuple(packed.shape)} do not cover kv_length={kv_length}")
    return SparseMaskInfo(key_mask, q_length, kv_length, is_causal, window, packed)


def _unpack_packed_sequences(mask_function):
    """(the model's mask function, packed sequence indices ``[B, S]``) of transformers' packed-sequence
    mask ``and_masks(remap_positions_for_packed_sequence(f, position_ids), packed_sequence_mask_function(
    indices))``; ``(mask_function, None)`` for any other mask. Within one packed sequence positions are
    consecutive, so ``f`` on the remapped positions is ``f`` on the packed ones."""
    parts = _closure(mask_function).get("mask_functions")
    if not (
        getattr(mask_function, "__qualname__", "").startswith("and_masks.") and parts and len(parts) == 2
    ):
        return mask_function, None
    remapped, packed = parts
    if not (
        getattr(remapped, "__qualname__", "").startswith("remap_positions_for_packed_sequence.")
        and getattr(packed, "__qualname__", "").startswith("packed_sequence_mask_function.")
    ):
        return mask_function, None
    indices = _closure(packed).get("packed_sequence_mask")
    inner = _closure(remapped).get("mask_function")
    if not isinstance(indices, torch.Tensor) or inner is None:
        return mask_function, None
    return inner, indices


def _mask_kind(mask_function) -> tuple[bool, int | None]:
    """(causal, window) of transformers' standard mask functions; anything else raises."""
    from transformers import masking_utils as mu

    if mask_function is None or mask_function is mu.causal_mask_function:
        return True, None
    if mask_function is mu.bidirectional_mask_function:
        return False, None
    parts = _closure(mask_function).get("mask_functions")
    if getattr(mask_function, "__qualname__", "").startswith("and_masks.") and parts and len(parts) == 2:
        overlay, base = parts
        window = _closure(overlay).get("sliding_window")
        name = getattr(overlay, "__qualname__", "")
        if (
            isinstance(window, int)
            and base is mu.causal_mask_function
            and name.startswith("sliding_window_overlay.")
        ):
            return True, window
        if (
            isinstance(window, int)
            and base is mu.bidirectional_mask_function
            and name.startswith("sliding_window_bidirectional_overlay.")
        ):
            return False, window
    raise ValueError(
        f"sparse_attn cannot express this model's mask function "
        f"{getattr(mask_function, '__qualname__', mask_function)} "
        "exactly (custom or/and mask overlays and chunked attention are not supported); "
        "use attn_implementation='sdpa' for this model"
    )


def _closure(fn) -> dict:
    """The free variables a Python function closes over ({} for anything else, e.g. a partial)."""
    try:
        return inspect.getclosurevars(fn).nonlocals
    except TypeError:
        return {}


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **kwargs,
):
    """transformers attention function: ``[B, H, S, D]`` q/k/v in, ``([B, Sq, H, D], None)`` out."""
    if dropout and module.training:
        raise ValueError(
            f"sparse_attn cannot apply attention dropout ({dropout}) in training; set the model config's "
            "attention_dropout to 0.0"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("sparse_attn does not support attention logit softcapping")
    for bias in _UNSUPPORTED_BIASES:
        if kwargs.get(bias) is not None:
            raise ValueError(
                f"sparse_attn does not support {bias!r}, which this model passes to change its attention "
                "logits (only 0/-inf masks are exact); use attn_implementation='sdpa' or 'eager' for it"
            )
    if kwargs.get("output_attentions"):
        raise ValueError(
            "sparse_attn never forms attention weights; use attn_implementation='eager' to output them"
        )
    info = _mask_info(module, query, key, attention_mask, is_causal, sliding_window)
    if info.kv_length != key.shape[2] or info.q_length != query.shape[2]:
        raise ValueError(
            f"mask was built for q_length={info.q_length}, kv_length={info.kv_length}, but the layer has "
            f"{query.shape[2]} queries and {key.shape[2]} keys"
        )
    setting = getattr(module, _PATTERN_ATTR, None)
    pattern = info.pattern(None if setting is None else setting.pattern_for(info))
    key_mask = None if info.key_mask is None else info.key_mask.to(query.device)
    sinks = kwargs.get("s_aux")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if info.packed is None and (cu_q is not None or cu_k is not None):
        return _varlen_forward(query, key, value, pattern, scaling, key_mask, sinks, cu_q, cu_k), None
    if sinks is None:
        out = sparse_attention(query, key, value, pattern, scale=scaling, key_mask=key_mask)
    else:
        out = _with_sinks(query, key, value, pattern, scaling, key_mask, sinks)
    return out.transpose(1, 2).contiguous(), None


def _varlen_forward(query, key, value, pattern, scaling, key_mask, sinks, cu_q, cu_k):
    """Packed sequences given as ``cu_seq_lens_q/k`` (batch of one): `sparse_attention_varlen`."""
    cu_q = cu_k if cu_q is None else cu_q
    cu_k = cu_q if cu_k is None else cu_k
    if query.shape[0] != 1:
        raise ValueError(
            f"cu_seq_lens_q/k describe a packed batch of one sequence, got batch size {query.shape[0]}"
        )
    if key_mask is not None and not bool(key_mask.all()):
        raise ValueError(
            "cu_seq_lens_q/k and a padding mask together are not supported: a packed batch has no padding"
        )
    if sinks is not None:
        raise ValueError("attention sinks (s_aux) with cu_seq_lens_q/k are not supported")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = sparse_attention_varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), pattern, scale=scaling)
    return out[None].contiguous()


def _with_sinks(query, key, value, pattern, scaling, key_mask, sinks):
    """Attention with a learned sink logit per head (GPT-OSS's ``s_aux``), exactly.

    The sink joins every row's softmax as one extra logit whose value is dropped, so each output is scaled
    by ``exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink)``; a row with no visible key stays 0.
    """
    heads = query.shape[1]
    if sinks.dim() != 1 or sinks.shape[0] != heads:
        raise ValueError(f"s_aux (attention sinks) must be [num_heads={heads}], got {tuple(sinks.shape)}")
    out, lse = sparse_attention(query, key, value, pattern, scale=scaling, key_mask=key_mask, return_lse=True)
    # The sink is one more segment, of one key whose value is 0: merged through the logsumexps.
    sink_lse = sinks.to(lse.device, lse.dtype)[None, :, None].expand_as(lse)  # [B, H, Sq]
    return merge_attention([out, torch.zeros_like(out)], [lse, sink_lse])[0]


def _mask_info(module, query, key, attention_mask, is_causal, sliding_window) -> SparseMaskInfo:
    if isinstance(attention_mask, SparseMaskInfo):
        return attention_mask
    if attention_mask is not None:
        raise TypeError(
            f"sparse_attn got a {type(attention_mask).__name__} attention mask (e.g. a prepared 4-D mask); "
            "it takes the model's 2-D padding mask: pass attention_mask as [batch, seq_len]"
        )
    # No mask at all (a layer called directly): follow the module's own flags.
    causal_flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return SparseMaskInfo(None, query.shape[2], key.shape[2], bool(causal_flag), sliding_window)
