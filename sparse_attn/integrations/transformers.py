"""Hugging Face transformers integration: ``model.set_attn_implementation("sparse_attn")``.

`register()` adds two functions to transformers (>= 5):
- a mask function (`transformers.masking_utils.AttentionMaskInterface`): where `sdpa` would build a
  ``[B, 1, Sq, Skv]`` mask, it returns a small `SparseMaskInfo`: the 2-D padding mask sliced to the layer's
  key states, plus the kind of mask the model asked for (causal, causal sliding window, bidirectional);
- an attention function (`transformers.AttentionInterface`) that turns that into a pattern and a key mask
  and calls `sparse_attention`.

So Llama-, Mistral- and Qwen2-style models keep their own semantics (causal, ``config.sliding_window``,
left or right padding, GQA, prefill and KV-cache decoding) without an S x S mask; so do GPT-OSS-style
attention sinks (``s_aux``), bidirectional encoder and cross-attention (Bart-style), Gemma 2's attention
logit soft-capping (passed as ``softcap``), Llama 4's chunked attention (``attention_chunk_size``:
`chunked` ``& causal()``, chunks counted from each element's first real token as transformers does) and
T5's relative position bias (`RelativePositionBias`: `register()` wraps T5's ``compute_bias`` so that, under
sparse_attn only, the bias stays O(S) and reaches the kernels as ``rel_bias``; its gradient flows into
``relative_attention_bias.weight``).

Caches: dynamic caches (the default) and static ones (``generate(..., cache_implementation="static")``,
which ``torch.compile``d generation uses): their key states run past the last query into a preallocated,
unwritten tail. Prefill then attends to the written keys only (one host synchronisation to read the cache
length); one-query decode steps fold the query's row of the model's mask, and the unwritten tail, into the
key mask, computed on the device: no synchronisation and one compiled graph for every step. Such a step runs
through `sparse_attn.paged` with the model's own pattern (`_paged_static_decode`: the cache seen as pages with
an identity block table, so only the pages the pattern needs are read), or, with attention sinks or shifted
chunks, over a `dense()` layout of the whole cache. A mask the integration cannot express exactly (custom mask
overlays, a `set_pattern` pattern in static-cache decoding) or an additive bias other than T5's (ALiBi, a
dense ``position_bias``) raises a clear error instead of being dropped.

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

import importlib
import inspect
from dataclasses import dataclass

import torch

from ..api import sparse_attention
from ..merge import merge_attention
from ..patterns import Pattern, causal, chunked, documents, sliding_window
from ..patterns.window import dense
from ..varlen import sparse_attention_varlen

DEFAULT_NAME = "sparse_attn"
_PATTERN_ATTR = "sparse_attn_pattern"
#: Attention-function kwargs that change the logits (ALiBi, sinks other than GPT-OSS's ``s_aux``): ignoring them
#: would be silently wrong, so they raise. (T5's ``position_bias`` is handled: see `RelativePositionBias`.)
_UNSUPPORTED_BIASES = ("alibi", "sinks")
#: T5-family attention classes whose ``compute_bias`` `register()` wraps: (module, class name).
_T5_ATTENTIONS = (
    ("transformers.models.t5.modeling_t5", "T5Attention"),
    ("transformers.models.mt5.modeling_mt5", "MT5Attention"),
)
#: Names `register()` registered (the T5 hook answers only for these attention implementations).
_REGISTERED: set[str] = set()


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
    #: Llama 4's chunked attention (always causal): the chunk size, or None.
    chunk: int | None = None
    #: int ``[B]``: where each element's chunks start, in key-state coordinates (transformers counts chunks
    #: from the first real token, so left padding shifts them); None when they start at key 0 for all.
    chunk_start: torch.Tensor | None = None
    #: A static cache in prefill: only the first `kv_used` key states are written (the attention function
    #: slices them; `key_mask` already covers just those); None when every key state is.
    kv_used: int | None = None
    #: A static cache in one-query decoding: the query's position among the key states (an int or a 0-d
    #: tensor, read without a host synchronisation). The model's mask for that one row (and the unwritten
    #: tail) is then folded into `key_mask` and the pattern is `dense()`: one fixed layout for every step.
    decode_position: torch.Tensor | int | None = None

    def __post_init__(self):
        # Patterns composed with the packing, one per base pattern: every layer reuses their layouts.
        self._composed = {}

    def contiguous(self) -> SparseMaskInfo:
        """generate() calls ``.contiguous()`` on prepared masks; this one has nothing to reorder."""
        return self

    #: With a static cache, generate() prepares the mask before the forward pass, and the model's mask
    #: creation then tells a prepared mask (passed through) from a 2-D padding mask by its ``ndim``.
    ndim = 4

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
        """The model's own pattern: causal, a window, chunked, or everything (`dense()` for a static-cache decode
        step, whose row of the mask is in `key_mask`)."""
        if self.decode_position is not None:
            return _shared_pattern(("dense",), dense)
        return self.own_pattern()

    def own_pattern(self) -> Pattern:
        """The model's own pattern, also for a static-cache decode step (which `_paged_static_decode` runs
        through the paged path with it)."""
        if self.chunk is not None:
            if self.chunk_start is None:
                return _shared_pattern(("chunked", self.chunk), lambda: chunked(self.chunk) & causal())
            # Chunks shifted per batch element (left padding, an evicting cache): the chunk index of every key.
            j = torch.arange(self.kv_length, device=self.chunk_start.device)
            ids = torch.div(j[None, :] - self.chunk_start[:, None], self.chunk, rounding_mode="floor")
            return documents(ids) & causal()
        if self.causal:
            return _shared_pattern(
                ("causal", self.window),
                lambda: causal() if self.window is None else sliding_window(self.window - 1, 0),
            )
        return _shared_pattern(
            ("bidirectional", self.window),
            lambda: dense() if self.window is None else sliding_window(self.window, self.window),
        )


#: The model patterns made so far, by kind: every call (and every layer) reuses one pattern object, and so
#: its cached layouts; and a compiled forward pass finds it here instead of building it in the graph.
_SHARED_PATTERNS: dict[tuple, Pattern] = {}


def _shared_pattern(key: tuple, make) -> Pattern:
    pattern = _SHARED_PATTERNS.get(key)
    if pattern is None:
        pattern = _SHARED_PATTERNS[key] = _outside_the_graph(make)
    return pattern


def _call(make):
    return make()


#: ``make()`` run eagerly while torch.compile traces: patterns made in the graph would reach the layout
#: builder half made. (A graph break, the first time a kind of pattern is met only: the plain ones are made
#: below, and generate()'s eager prefill makes the windowed ones first.)
_outside_the_graph = torch.compiler.disable(_call)
for _key, _make in ((("dense",), dense), (("causal", None), causal), (("bidirectional", None), dense)):
    _SHARED_PATTERNS[_key] = _make()


def register(name: str = DEFAULT_NAME) -> str:
    """Register the attention and mask functions under `name` (idempotent); returns `name`.

    Then ``model.set_attn_implementation(name)`` or ``from_pretrained(..., attn_implementation=name)``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, sparse_attention_forward)
    AttentionMaskInterface.register(name, sparse_mask)
    _REGISTERED.add(name)
    _wrap_t5_compute_bias()
    return name


class RelativePositionBias:
    """T5's bucketed relative-position bias, kept as what it is, a function of ``j - i``, in O(S).

    `register()` wraps ``T5Attention.compute_bias`` (and MT5's): under a sparse_attn implementation it returns
    this object instead of the dense ``[1, H, Sq, Skv]`` tensor; T5 hands it from its first layer to the
    others unchanged, and the attention function turns it into ``rel_bias [H, Sq + Skv - 1]`` by gathering
    the bucket embedding once per diagonal, so gradients flow into ``relative_attention_bias.weight``. Other
    attention implementations get T5's own tensor.
    """

    def __init__(self, module: torch.nn.Module, past_seen_tokens):
        self.module = module
        #: T5's query offset (an int, or a 0-d tensor with a static cache).
        self.past_seen_tokens = past_seen_tokens

    def rel_bias(self, q_length: int, kv_length: int) -> torch.Tensor:
        """``[H, q_length + kv_length - 1]``: entry ``k`` is T5's bias at ``j - i = k - (q_length - 1)``, i.e. at
        memory position minus context position ``j - (i + past_seen_tokens)``, as T5 computes it."""
        m = self.module
        weight = m.relative_attention_bias.weight
        diagonal = torch.arange(q_length + kv_length - 1, device=weight.device) - (q_length - 1)
        bucket = m._relative_position_bucket(
            diagonal - self.past_seen_tokens,
            bidirectional=not m.is_decoder,
            num_buckets=m.relative_attention_num_buckets,
            max_distance=m.relative_attention_max_distance,
        )
        return m.relative_attention_bias(bucket).t().contiguous()


#: The T5-family attention classes found by `register()`.
_T5_CLASSES: tuple[type, ...] = ()


def _wrap_t5_compute_bias() -> None:
    """Make T5's ``compute_bias`` return a `RelativePositionBias` under sparse_attn (idempotent)."""
    global _T5_CLASSES
    classes = []
    for module_name, class_name in _T5_ATTENTIONS:
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue
    _T5_CLASSES = tuple(classes)
    for cls in _T5_CLASSES:
        original = cls.compute_bias
        if getattr(original, "_sparse_attn_original", None) is not None:
            continue

        def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0, _original=original):
            if self.config._attn_implementation in _REGISTERED:
                return RelativePositionBias(self, past_seen_tokens)
            return _original(self, query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)

        compute_bias._sparse_attn_original = original
        compute_bias.__doc__ = original.__doc__
        cls.compute_bias = compute_bias


def _is_t5_cross_attention(module) -> bool:
    """T5's cross-attention layers: their ``position_bias`` is T5's ``torch.zeros`` (no relative bias)."""
    return (
        isinstance(module, _T5_CLASSES)
        and module.is_decoder
        and not module.is_causal
        and not module.has_relative_attention_bias
    )


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
        if info.chunk_start is not None:
            # Chunks shifted per batch element: a pattern of this call's data.
            return self.pattern & info.base_pattern()
        key = (info.causal, info.window, info.chunk)
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
    """transformers mask function: the padding mask and the mask's kind, never an S x S mask.

    Key states must end at the last query (dynamic caches) for causal, windowed and chunked masks, with one
    exception, static caches, whose key states run past the last query into a preallocated, unwritten tail:
    in prefill (several queries) the attention function uses only the written keys (`kv_used`, one host
    synchronisation to read the cache length); in one-query decoding the query's row of the mask (and the
    tail) goes into the key mask, computed on the device (no synchronisation, one layout for every step:
    what ``torch.compile``d generation needs)."""
    if isinstance(attention_mask, SparseMaskInfo):
        return attention_mask  # prepared by generate() for this very step
    mask_function, packed = _unpack_packed_sequences(mask_function)
    is_causal, window, chunk = _mask_kind(mask_function)
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
    info = SparseMaskInfo(key_mask, q_length, kv_length, is_causal, window, packed)
    if chunk is not None:
        info.chunk, left_padding = chunk
        # transformers counts chunks from each element's first real token, at absolute position left_padding.
        start = left_padding.to(torch.long) - kv_offset
        info.chunk_start = start if q_length == 1 and _is_tensor(q_offset) else _nonzero_or_none(start)
    # Bottom-right alignment matters only for causal, windowed and chunked masks; a plain bidirectional one
    # (encoders, cross-attention to encoder states, where q_length != kv_length) sees every real key.
    if not (is_causal or window is not None):
        return info
    if q_length == 1 and (_is_tensor(q_offset) or q_offset + 1 != kv_offset + kv_length):
        return _static_decode(info, q_offset - kv_offset, batch_size)
    q_offset = int(q_offset)  # a static cache's length: one host synchronisation per prefill
    written = q_offset + q_length - kv_offset
    if written == kv_length:
        return info
    if packed is not None or not 0 < q_length <= written < kv_length:
        raise ValueError(
            "sparse_attn needs the key states to end at the last query (dynamic caches) or to run past it into "
            "the unwritten tail of a static cache; got "
            f"q_offset={q_offset}, q_length={q_length}, kv_offset={kv_offset}, kv_length={kv_length}"
            + (" with packed sequences" if packed is not None else "")
            + ". Use cache_implementation='dynamic'."
        )
    info.kv_used = written
    if key_mask is not None:
        info.key_mask = key_mask[:, :written]
    return info


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _nonzero_or_none(start: torch.Tensor) -> torch.Tensor | None:
    """`start` unless it is all zeros (then the shared `chunked` layout applies): one host synchronisation."""
    return start if bool(start.any()) else None


def _static_decode(info: SparseMaskInfo, position, batch_size: int) -> SparseMaskInfo:
    """One query at `position` among the key states (a static cache's tail after it is unwritten): its row of
    the model's mask, and the written keys, become the key mask; the pattern is `dense()`."""
    if info.packed is not None:
        raise ValueError("packed sequences (position ids that restart) with a static cache are not supported")
    # A 0-d tensor (StaticLayer's length) or an int (a sliding-window layer that is not full yet).
    position = torch.as_tensor(position)
    j = torch.arange(info.kv_length, device=position.device)
    d = position - j
    row = d >= 0  # causal, and the unwritten tail (every key after the one query)
    if info.window is not None:
        row = row & (d < info.window) if info.causal else (d.abs() <= info.window) & row
    row = row[None, :].expand(batch_size, -1)
    if info.chunk is not None:
        start = 0 if info.chunk_start is None else info.chunk_start[:, None].to(j.device)
        same = torch.div(j[None, :] - start, info.chunk, rounding_mode="floor") == torch.div(
            position - start, info.chunk, rounding_mode="floor"
        )
        row = row & same
    info.key_mask = row if info.key_mask is None else info.key_mask.to(row.device) & row
    info.decode_position = position
    return info


def _unpack_packed_sequences(mask_function):
    """(the model's mask function, packed sequence indices ``[B, S]``) of transformers' packed-sequence
    mask ``and_masks(remap_positions_for_packed_sequence(f, position_ids), packed_sequence_mask_function(
    indices))``; ``(mask_function, None)`` for any other mask. Within one packed sequence positions are
    consecutive, so ``f`` on the remapped positions is ``f`` on the packed ones."""
    from transformers import masking_utils as mu

    # The plain masks first: identity checks, which torch.compile traces (closure inspection it does not).
    if mask_function is None or mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function):
        return mask_function, None
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


def _mask_kind(mask_function) -> tuple[bool, int | None, tuple[int, torch.Tensor] | None]:
    """(causal, window, chunk) of transformers' standard mask functions, chunk being Llama 4's
    ``(chunk_size, left_padding [B])`` or None; anything else raises."""
    from transformers import masking_utils as mu

    if mask_function is None or mask_function is mu.causal_mask_function:
        return True, None, None
    if mask_function is mu.bidirectional_mask_function:
        return False, None, None
    parts = _closure(mask_function).get("mask_functions")
    if getattr(mask_function, "__qualname__", "").startswith("and_masks.") and parts and len(parts) == 2:
        overlay, base = parts
        closure = _closure(overlay)
        window = closure.get("sliding_window")
        name = getattr(overlay, "__qualname__", "")
        if (
            isinstance(window, int)
            and base is mu.causal_mask_function
            and name.startswith("sliding_window_overlay.")
        ):
            return True, window, None
        if (
            isinstance(window, int)
            and base is mu.bidirectional_mask_function
            and name.startswith("sliding_window_bidirectional_overlay.")
        ):
            return False, window, None
        size, left_padding = closure.get("chunk_size"), closure.get("left_padding")
        if (
            isinstance(size, int)
            and isinstance(left_padding, torch.Tensor)
            and base is mu.causal_mask_function
            and name.startswith("chunked_overlay.")
        ):
            return True, None, (size, left_padding)
    raise ValueError(
        f"sparse_attn cannot express this model's mask function "
        f"{getattr(mask_function, '__qualname__', mask_function)} "
        "exactly (custom or/and mask overlays are not supported); "
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
    if info.kv_used is not None:
        # A static cache in prefill: its unwritten tail is no key.
        key, value = key[:, :, : info.kv_used], value[:, :, : info.kv_used]
    setting = getattr(module, _PATTERN_ATTR, None)
    if setting is not None and info.decode_position is not None:
        raise ValueError(
            "a pattern set by set_pattern cannot be applied to one-query decoding against a static cache (its "
            "row is folded into the key mask only for the model's own causal / window / chunked masks); use "
            "cache_implementation='dynamic'"
        )
    pattern = info.pattern(None if setting is None else setting.pattern_for(info))
    key_mask = None if info.key_mask is None else info.key_mask.to(query.device)
    mods = dict(
        softcap=kwargs.get("softcap"), rel_bias=_rel_bias(module, query, key, kwargs.get("position_bias"))
    )
    sinks = kwargs.get("s_aux")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if info.packed is None and (cu_q is not None or cu_k is not None):
        if mods["rel_bias"] is not None:
            raise ValueError(
                "a relative position bias with cu_seq_lens_q/k (packed sequences) is not supported"
            )
        out = _varlen_forward(
            query, key, value, pattern, scaling, key_mask, sinks, cu_q, cu_k, mods["softcap"]
        )
        return out, None
    if _paged_decode_applies(info, query, key, value, sinks, mods):
        out = _paged_static_decode(info, query, key, value, scaling, key_mask, mods)
    elif sinks is None:
        out = sparse_attention(query, key, value, pattern, scale=scaling, key_mask=key_mask, **mods)
    else:
        out = _with_sinks(query, key, value, pattern, scaling, key_mask, sinks, mods)
    return out.transpose(1, 2).contiguous(), None


#: Page size of a static cache seen as a paged one (a divisor of its length: the gcd with this).
_STATIC_PAGE = 64


def _paged_decode_applies(info: SparseMaskInfo, query, key, value, sinks, mods) -> bool:
    """A one-query step against a static cache with the model's own causal / window / chunked pattern (no
    attention sinks, no shifted chunks, plain contiguous key states, no gradient wanted: the paged path is
    forward only): `_paged_static_decode` runs it."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, mods.get("rel_bias"))
    )
    return (
        info.decode_position is not None
        and not wants_grad
        and sinks is None
        and info.chunk_start is None
        and info.packed is None
        and key.shape == value.shape
        and key.is_contiguous()
        and value.is_contiguous()
    )


def _paged_static_decode(info: SparseMaskInfo, query, key, value, scaling, key_mask, mods):
    """A static cache is a paged cache with an identity block table: the key states ``[B, Hkv, L, D]`` are
    viewed (no copy) as pages of ``P = gcd(L, 64)`` positions, page ``b * Hkv * L / P + p`` holding positions
    ``p * P ...`` of element b (heads ``L * D`` apart), and the step runs `sparse_attn.paged` with the model's
    own pattern at ``cache_seqlens = position + 1``: only the pages the pattern needs are read (a window's, not
    the whole cache, nor the unwritten tail), with the lengths kept on the device, so one graph serves every
    step. `key_mask` (padding and the step's row) hides positions within those pages."""
    import math

    from ..paged.api import paged_attention

    batch, kv_heads, length, dim = key.shape
    page = math.gcd(length, _STATIC_PAGE)
    pages = length // page
    num_pages = ((batch - 1) * kv_heads + 1) * pages  # every page's heads stay inside the storage
    shape, strides = (num_pages, page, kv_heads, dim), (page * dim, dim, length * dim, 1)
    k_cache = key.as_strided(shape, strides)  # (at key's own storage offset)
    v_cache = value.as_strided(shape, strides)
    device = query.device
    table = torch.arange(batch, device=device)[:, None] * (kv_heads * pages) + torch.arange(
        pages, device=device
    )
    position = torch.as_tensor(info.decode_position, device=device)
    seqlens = (position + 1).to(torch.int32).expand(batch)
    return paged_attention(
        query, k_cache, v_cache, table.to(torch.int32), seqlens, info.own_pattern(), scale=scaling,
        key_mask=key_mask, check_pages=False, **mods,
    )  # fmt: skip


def _rel_bias(module, query, key, position_bias) -> torch.Tensor | None:
    """T5's ``position_bias`` as ``rel_bias [H, Sq + Skv - 1]`` (see `RelativePositionBias`), None for T5's
    cross-attention (whose bias is zeros) or no bias; any other additive bias raises."""
    if position_bias is None:
        return None
    if isinstance(position_bias, RelativePositionBias):
        return position_bias.rel_bias(query.shape[2], key.shape[2])
    if _is_t5_cross_attention(module):
        return None
    raise ValueError(
        "sparse_attn does not support 'position_bias' given as a dense tensor (only T5's relative bias, "
        "through sparse_attn.integrations.transformers.register(), and 0/-inf masks are exact); use "
        "attn_implementation='sdpa' or 'eager' for this model"
    )


def _varlen_forward(query, key, value, pattern, scaling, key_mask, sinks, cu_q, cu_k, softcap):
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
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    out = sparse_attention_varlen(q, k, v, cu_q, cu_k, pattern, scale=scaling, softcap=softcap)
    return out[None].contiguous()


def _with_sinks(query, key, value, pattern, scaling, key_mask, sinks, mods):
    """Attention with a learned sink logit per head (GPT-OSS's ``s_aux``), exactly.

    The sink joins every row's softmax as one extra logit whose value is dropped, so each output is scaled
    by ``exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink)``; a row with no visible key stays 0.
    """
    heads = query.shape[1]
    if sinks.dim() != 1 or sinks.shape[0] != heads:
        raise ValueError(f"s_aux (attention sinks) must be [num_heads={heads}], got {tuple(sinks.shape)}")
    out, lse = sparse_attention(
        query, key, value, pattern, scale=scaling, key_mask=key_mask, return_lse=True, **mods
    )
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
