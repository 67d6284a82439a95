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
chunks, over a `dense()` layout of the whole cache. Continuous batching (``generate_batch``): `register()` lets transformers keep a sparse_attn model
(`_let_continuous_batching_keep_sparse_attn`); transformers then passes no mask, as to flash attention, only the
packed requests' ``cu_seq_lens_q/k`` over keys gathered from its paged cache, and the step runs through
`sparse_attention_varlen` with the layer's causal or sliding-window pattern; any other layer raises
(`_check_continuous_batching`). A mask the integration cannot express exactly (custom mask
overlays, a `set_pattern` pattern in static-cache decoding) or an additive bias other than T5's (ALiBi, a
dense ``position_bias``) raises a clear error instead of being dropped.

Fail closed: transformers passes a mask *function*. The ones the integration recognises (`_recognise`: the
standard causal / sliding-window / chunked / bidirectional masks and the packed-sequence mask around them,
read from their closures, every read checked: module, name, closed-over variables and their types) become
patterns; any other (a model's own overlay, a structure a new release makes) is evaluated exactly at every
query-key pair and used as a token mask, up to `MAX_EVALUATED_PAIRS`, above which it is refused with an
error naming the model type and the mask function. Nothing is ever approximated.

Padding-free (packed) batches, as `DataCollatorWithFlattening` makes them, keep their documents apart
exactly, as ``flash_attention_2`` does: ``position_ids`` that restart at 0 (transformers then asks for a
packed-sequence mask, without a cache; with one, the attention function reads the ``position_ids`` the
model passes it, through transformers' `find_packed_sequence_indices`; either way we use `documents` of the
sequence indices, composed with the model's pattern or the one `set_pattern` set), or the ``cu_seq_lens_q``/``cu_seq_lens_k`` keyword arguments alone (batch of one;
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
from ..patterns.token_mask import TokenMask
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
    #: A mask function the integration does not recognise, evaluated exactly: bool ``[B, q_length, kv_length]``
    #: over every key state (see `_evaluated_mask`); the model's pattern is then this token mask.
    evaluated: torch.Tensor | None = None

    def __post_init__(self):
        # Patterns composed with the packing, one per base pattern: every layer reuses their layouts.
        self._composed = {}
        #: The position ids `_packing_from_position_ids` has looked at (every layer gets the same tensor).
        self.positions_checked = None

    def contiguous(self) -> SparseMaskInfo:
        """generate() calls ``.contiguous()`` on prepared masks; this one has nothing to reorder."""
        return self

    #: With a static cache, generate() prepares the mask before the forward pass, and the model's mask
    #: creation then tells a prepared mask (passed through) from a 2-D padding mask by its ``ndim``.
    ndim = 4

    def pattern(self, base: Pattern | None = None, element: int | None = None) -> Pattern:
        """Our pattern for this mask (padding aside): `base` (default: the model's own), within each
        packed sequence if there are any; with `element`, batch element `element`'s alone (only an evaluated
        mask whose elements differ needs that)."""
        if element is not None:
            if base is None:
                base = self.base_pattern() if self.evaluated is None else TokenMask(self.evaluated[element])
            return base if self.packed is None else documents(self.packed[element]) & base
        if base is None:
            if "own" not in self._composed:
                self._composed["own"] = self.base_pattern()
            base = self._composed["own"]
        if self.packed is None:
            return base
        if id(base) not in self._composed:
            self._composed[id(base)] = (base, documents(self.packed) & base)
        return self._composed[id(base)][1]

    def elements_differ(self) -> bool:
        """Whether an evaluated mask differs between batch elements (then each runs with its own pattern)."""
        if "differ" not in self._composed:
            e = self.evaluated
            self._composed["differ"] = e is not None and e.shape[0] > 1 and not bool((e == e[:1]).all())
        return self._composed["differ"]

    def base_pattern(self) -> Pattern:
        """The model's own pattern: causal, a window, chunked, or everything (`dense()` for a static-cache decode
        step, whose row of the mask is in `key_mask`)."""
        if self.evaluated is not None:
            return TokenMask(self.evaluated[0])
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
    _let_continuous_batching_keep_sparse_attn()
    return name


def _let_continuous_batching_keep_sparse_attn() -> None:
    """Continuous batching (``generate_batch``, `ContinuousBatchingManager`) switches a model to an
    implementation it knows ("sdpa", "paged|eager", flash) and refuses any other; under a registered sparse_attn
    name it now keeps the model as it is: it then hands our attention function its packed batch and its 4-D
    mask, which `_continuous_batching_forward` checks and runs exactly (idempotent; nothing is wrapped when the
    class or method is not there)."""
    try:
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
    except ImportError:
        return
    original = getattr(ContinuousBatchingManager, "switch_to_cb_friendly_attn", None)
    if original is None or getattr(original, "_sparse_attn_original", None) is not None:
        return

    def switch_to_cb_friendly_attn(self, model, *args, _original=original, **kwargs):
        if getattr(model.config, "_attn_implementation", None) in _REGISTERED:
            return None
        return _original(self, model, *args, **kwargs)

    switch_to_cb_friendly_attn._sparse_attn_original = original
    switch_to_cb_friendly_attn.__doc__ = original.__doc__
    ContinuousBatchingManager.switch_to_cb_friendly_attn = switch_to_cb_friendly_attn


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
        if getattr(original, "_sparse_attn_original", None) is not None or not _t5_internals_as_read(cls):
            continue

        def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0, _original=original):
            if self.config._attn_implementation in _REGISTERED:
                return RelativePositionBias(self, past_seen_tokens)
            return _original(self, query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)

        compute_bias._sparse_attn_original = original
        compute_bias.__doc__ = original.__doc__
        cls.compute_bias = compute_bias


#: What `RelativePositionBias` and the ``compute_bias`` wrapper read of T5's attention class.
_T5_COMPUTE_BIAS_PARAMETERS = ["self", "query_length", "key_length", "device", "past_seen_tokens"]


def _t5_internals_as_read(cls) -> bool:
    """Whether T5's attention class still has the ``compute_bias`` signature and the bucketing method that
    `RelativePositionBias` reads. If not, ``compute_bias`` stays unwrapped: its dense bias then reaches the
    attention function, which refuses it (`_rel_bias`), instead of a bias computed from changed internals."""
    try:
        parameters = list(inspect.signature(cls.compute_bias).parameters)
    except (TypeError, ValueError):
        return False
    return parameters == _T5_COMPUTE_BIAS_PARAMETERS and callable(
        getattr(cls, "_relative_position_bucket", None)
    )


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

    def pattern_for(self, info: SparseMaskInfo, element: int | None = None) -> Pattern:
        if info.evaluated is not None:
            if not self.keep_model_pattern:
                raise ValueError(
                    "set_pattern(..., keep_model_pattern=False) replaces the model's own pattern, but this "
                    "model's mask function is one sparse_attn does not recognise (it was evaluated), so what to "
                    "keep of it (packing, overlays) is unknown; use keep_model_pattern=True"
                )
            return self.pattern & TokenMask(info.evaluated[element or 0])
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
    """transformers mask function: the padding mask and the mask's kind, never an S x S mask for the masks it
    recognises (`_recognise`); any other mask function is evaluated exactly, or refused when that is too large.

    Key states must end at the last query (dynamic caches) for causal, windowed and chunked masks, with one
    exception, static caches, whose key states run past the last query into a preallocated, unwritten tail:
    in prefill (several queries) the attention function uses only the written keys (`kv_used`, one host
    synchronisation to read the cache length); in one-query decoding the query's row of the mask (and the
    tail) goes into the key mask, computed on the device (no synchronisation, one layout for every step:
    what ``torch.compile``d generation needs)."""
    if isinstance(attention_mask, SparseMaskInfo):
        return attention_mask  # prepared by generate() for this very step
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
    kind, evaluated = _mask_kind_or_evaluate(
        mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, kwargs
    )
    if kind is None:
        # Not a mask we recognise: its exact values, over every key state (so nothing to align, no tail).
        info = SparseMaskInfo(key_mask, q_length, kv_length, causal=False, window=None)
        info.evaluated = evaluated
        return info
    is_causal, window, chunk, packed = kind.causal, kind.window, kind.chunk, kind.packed
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


#: The closure factories of ``transformers.masking_utils`` whose functions we read, by the qualified name of the
#: function they return, with the names it must close over. Anything else (another name, module or closure,
#: as a new transformers release may make) is not read: it is evaluated exactly or refused (`_evaluated_mask`).
_FACTORIES = {
    "and_masks.<locals>.and_mask": ("mask_functions",),
    "sliding_window_overlay.<locals>.inner_mask": ("sliding_window",),
    "sliding_window_bidirectional_overlay.<locals>.inner_mask": ("sliding_window",),
    "chunked_overlay.<locals>.inner_mask": ("chunk_size", "left_padding"),
    "remap_positions_for_packed_sequence.<locals>.inner_mask": ("mask_function", "position_ids"),
    "packed_sequence_mask_function.<locals>.inner_mask": ("packed_sequence_mask",),
}
_MASKING_MODULE = "transformers.masking_utils"


@dataclass(frozen=True)
class _MaskKind:
    """What a recognised mask function means: the model's own pattern, and packed sequence indices if any."""

    causal: bool
    window: int | None = None
    #: Llama 4's ``(chunk_size, left_padding [B])``.
    chunk: tuple[int, torch.Tensor] | None = None
    #: int ``[B, S]``: the packed sequence of every position (transformers' packed-sequence mask).
    packed: torch.Tensor | None = None


def _recognise(mask_function) -> _MaskKind | None:
    """The meaning of transformers' standard mask functions, read from their structure, or None.

    Recognised: the causal and bidirectional functions (identity, which torch.compile traces), their sliding
    window and chunked versions (``and_masks(<overlay>, <base>)``), and any of the shift-invariant ones (not
    chunked) within transformers' packed-sequence mask: ``and_masks(remap_positions_for_packed_sequence(f,
    position_ids), packed_sequence_mask_function(indices))`` (5.24 and later; 5.23 has the two parts the
    other way round) or ``and_masks(f, packed_sequence_mask_function(indices))`` (before). Within one packed
    sequence positions are consecutive, so a causal or windowed ``f`` means the same on the remapped positions
    as on the packed ones; chunks would not (they count from the remapped positions), so chunked packed masks
    are left to evaluation.
    Every closure read is checked (module, name, the variables it closes over, their types): a function
    that differs in any of them is not recognised."""
    from transformers import masking_utils as mu

    if mask_function is None or mask_function is mu.causal_mask_function:
        return _MaskKind(causal=True)
    if mask_function is mu.bidirectional_mask_function:
        return _MaskKind(causal=False)
    parts = _closure_of(mask_function, "and_masks.<locals>.and_mask", mask_functions=tuple)
    if parts is None or len(parts["mask_functions"]) != 2:
        return None
    first, second = parts["mask_functions"]
    # The packed-sequence part comes last (5.24 and later) or first (5.23).
    for other, packed in ((first, second), (second, first)):
        indices = _closure_of(
            packed, "packed_sequence_mask_function.<locals>.inner_mask", packed_sequence_mask=torch.Tensor
        )
        if indices is not None:
            return _within_packed(other, indices["packed_sequence_mask"])
    return _overlay_kind(first, second, mu)


def _within_packed(mask_function, indices: torch.Tensor) -> _MaskKind | None:
    """``mask_function`` (remapped to per-sequence positions or not) within each packed sequence."""
    remap = _closure_of(
        mask_function,
        "remap_positions_for_packed_sequence.<locals>.inner_mask",
        mask_function=object,
        position_ids=torch.Tensor,
    )
    inner = _recognise(mask_function if remap is None else remap["mask_function"])
    if inner is None or inner.chunk is not None or inner.packed is not None or indices.dim() != 2:
        return None
    return _MaskKind(inner.causal, inner.window, packed=indices)


def _overlay_kind(overlay, base, mu) -> _MaskKind | None:
    """``and_masks(overlay, base)``: a causal or bidirectional sliding window, or Llama 4's chunks."""
    if base is mu.causal_mask_function:
        window = _closure_of(overlay, "sliding_window_overlay.<locals>.inner_mask", sliding_window=int)
        if window is not None:
            return _MaskKind(causal=True, window=window["sliding_window"])
        chunk = _closure_of(
            overlay, "chunked_overlay.<locals>.inner_mask", chunk_size=int, left_padding=torch.Tensor
        )
        if chunk is not None:
            return _MaskKind(causal=True, chunk=(chunk["chunk_size"], chunk["left_padding"]))
    if base is mu.bidirectional_mask_function:
        window = _closure_of(
            overlay, "sliding_window_bidirectional_overlay.<locals>.inner_mask", sliding_window=int
        )
        if window is not None:
            return _MaskKind(causal=False, window=window["sliding_window"])
    return None


def _closure_of(fn, qualname: str, **types) -> dict | None:
    """The variables `fn` closes over, if `fn` is exactly the function transformers' factory `qualname` returns:
    defined in masking_utils under that name, closing over exactly the variables `_FACTORIES` lists, each of
    the type given (bools are no ints here); None otherwise."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if (
        getattr(fn, "__module__", None) != _MASKING_MODULE
        or getattr(fn, "__qualname__", None) != qualname
        or code is None
        or cells is None
        or sorted(code.co_freevars) != sorted(_FACTORIES[qualname])
    ):
        return None
    try:
        values = {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells, strict=True)}
    except ValueError:  # an empty cell
        return None
    for name, kind in types.items():
        value = values[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return None
    return values


#: At most this many (batch x query x key) pairs of a mask function the integration does not recognise are
#: evaluated (a bool each, 16 MiB); above it, such a mask is refused.
MAX_EVALUATED_PAIRS = 1 << 24


def _evaluated_mask(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, use_vmap, config):
    """bool ``[B, q_length, kv_length]``: `mask_function` evaluated at every pair of the layer's query and key
    states, as transformers' own sdpa mask evaluates it (index tensors that broadcast, or ``torch.vmap`` over
    the four indices when transformers asks for it). Exact for any mask function, and O(S^2): above
    `MAX_EVALUATED_PAIRS` it raises instead, naming the model and the mask function."""
    pairs = batch_size * q_length * kv_length
    name = getattr(mask_function, "__qualname__", repr(mask_function))
    if pairs > MAX_EVALUATED_PAIRS:
        model = getattr(config, "model_type", None) or "this model"
        raise ValueError(
            f"sparse_attn does not recognise the mask function {name} that {model} passes (not one of "
            "transformers' causal / sliding-window / chunked / packed-sequence masks as this version of "
            "sparse_attn knows them), and evaluating it exactly would take "
            f"{batch_size} x {q_length} x {kv_length} = {pairs:,} mask entries (at most "
            f"{MAX_EVALUATED_PAIRS:,}); use attn_implementation='sdpa' for this model, or shorter inputs"
        )
    device = q_offset.device if isinstance(q_offset, torch.Tensor) else None
    b = torch.arange(batch_size, device=device)
    h = torch.zeros(1, dtype=torch.long, device=device)
    q = torch.arange(q_length, device=device) + q_offset
    kv = torch.arange(kv_length, device=device) + kv_offset
    if use_vmap:
        fn = mask_function
        for dims in (
            (None, None, None, 0),
            (None, None, 0, None),
            (None, 0, None, None),
            (0, None, None, None),
        ):
            fn = torch.vmap(fn, in_dims=dims, out_dims=0)
        mask = fn(b, h, q, kv)
    else:
        mask = mask_function(
            b[:, None, None, None], h[None, :, None, None], q[None, None, :, None], kv[None, None, None, :]
        )
    mask = torch.as_tensor(mask).to(torch.bool).expand(batch_size, 1, q_length, kv_length)
    return mask[:, 0].contiguous()


def _mask_kind_or_evaluate(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, kwargs):
    """(the recognised kind, None), or (None, the evaluated mask ``[B, Sq, Skv]``) for any other function."""
    kind = _recognise(mask_function)
    if kind is not None:
        return kind, None
    evaluated = _evaluate_outside_the_graph(
        mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
        bool(kwargs.get("use_vmap", False)), kwargs.get("config"),
    )  # fmt: skip
    return None, evaluated


#: Evaluated eagerly under torch.compile (a graph break, for unrecognised masks only).
_evaluate_outside_the_graph = torch.compiler.disable(_evaluated_mask)


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
    if _from_continuous_batching(kwargs):
        _check_continuous_batching(module, attention_mask, is_causal, sliding_window, kwargs)
        key, value = _update_paged_cache(module, key, value, kwargs)
        attention_mask = None  # the layer's causal / window pattern, per packed request (checked above)
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
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        _packing_from_position_ids(info, kwargs.get("position_ids"), query.shape[0])
    key_mask = None if info.key_mask is None else info.key_mask.to(query.device)
    mods = dict(
        softcap=kwargs.get("softcap"), rel_bias=_rel_bias(module, query, key, kwargs.get("position_bias"))
    )
    sinks = kwargs.get("s_aux")
    if info.evaluated is not None:
        if cu_q is not None or cu_k is not None:
            raise ValueError(
                "cu_seq_lens_q/k (packed sequences) with a mask function sparse_attn does not recognise are not "
                "supported; pass position_ids that restart at 0 instead"
            )
        if info.elements_differ():
            return _per_element(query, key, value, info, setting, scaling, key_mask, sinks, mods), None
    pattern = info.pattern(None if setting is None else setting.pattern_for(info))
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
    else:
        out = _attend(query, key, value, pattern, scaling, key_mask, sinks, mods)
    return out.transpose(1, 2).contiguous(), None


def _from_continuous_batching(kwargs) -> bool:
    """A forward pass of transformers' continuous batching: the paged cache's read/write indices are there, and
    the packed batch's ``cu_seq_lens_q/k``; it passes no mask to an implementation other than sdpa/eager (its
    mask functions return None for a paged cache), as to flash attention."""
    return "read_index" in kwargs and "write_index" in kwargs and kwargs.get("cu_seq_lens_q") is not None


def _plain_causal_info(info, window) -> bool:
    """Whether `info` is our mask function's answer for a recognised causal mask of `window`, no padding, no
    chunks: what transformers < 5.25 asks for in continuous batching (its pattern is then the one the packed
    step applies). Its packing (`packed`, from position ids that restart) is not read: the requests are those of
    ``cu_seq_lens_q/k``, by which the paged cache gathered the keys."""
    return (
        isinstance(info, SparseMaskInfo)
        and info.causal
        and info.window == window
        and info.evaluated is None
        and info.chunk is None
        and info.key_mask is None
        and info.decode_position is None
        and info.kv_used is None
    )


#: The layer types whose pattern a continuous-batching step carries (``sliding_window`` and causality).
_BATCHING_LAYER_TYPES = ("full_attention", "sliding_attention")


def _update_paged_cache(module, key, value, kwargs):
    """transformers < 5.25 hands the attention function its paged cache (``cache``) un-updated, as its sdpa does:
    write the step's keys and gather every request's, oldest first (`PagedAttentionCache.update`, which also
    picks this layer type's ``cu_seq_lens_k``). From 5.25 the model has done that before the call."""
    cache = kwargs.pop("cache", None)
    if cache is not None:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache

        if not isinstance(cache, PagedAttentionCache):
            raise TypeError(
                f"continuous batching: expected a PagedAttentionCache, got {type(cache).__name__}"
            )
        key, value = cache.update(
            key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs
        )
    if not isinstance(kwargs.get("cu_seq_lens_k"), torch.Tensor):
        raise ValueError(
            "continuous batching: cu_seq_lens_k is not this layer's tensor (a paged cache transformers did not "
            f"update?), got {type(kwargs.get('cu_seq_lens_k')).__name__}"
        )
    return key, value


def _check_continuous_batching(module, attention_mask, is_causal, sliding_window, kwargs) -> str:
    """Fail closed in continuous batching, where no mask function runs: the requests are packed (``cu_seq_lens``)
    and each one's keys are gathered from the paged cache oldest first, so the packed varlen path with the
    layer's own causal or sliding-window pattern is exact; only that. A layer whose pattern is anything else
    (chunked, bidirectional, another layer type, a window other than the config's) or whose logits change
    (sinks, biases) raises."""
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(
            "continuous batching (generate_batch): the attention layer has no config to read its pattern"
        )
    if attention_mask is not None and not _plain_causal_info(attention_mask, sliding_window):
        raise ValueError(
            "continuous batching (generate_batch): sparse_attn expects no mask, or (transformers < 5.25, which "
            "still runs the mask function) the recognised causal mask of the layer's window without padding; got "
            f"{attention_mask!r}"
        )
    if getattr(module, _PATTERN_ATTR, None) is not None:
        raise ValueError("continuous batching (generate_batch) with sparse_attn does not support set_pattern")
    if not getattr(module, "is_causal", True) or is_causal is False:
        raise ValueError("continuous batching (generate_batch) with sparse_attn supports causal layers only")
    for name in ("s_aux", "position_bias", "attention_chunk_size"):
        if kwargs.get(name) is not None or (name == "attention_chunk_size" and getattr(config, name, None)):
            raise ValueError(
                f"continuous batching (generate_batch) with sparse_attn does not support {name!r}"
            )
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is None:
        layer_type = "full_attention" if window is None else "sliding_attention"
    else:
        layer_type = layer_types[getattr(module, "layer_idx", 0)]
    expected = window if layer_type == "sliding_attention" else None
    if layer_type not in _BATCHING_LAYER_TYPES or sliding_window != expected:
        raise ValueError(
            f"continuous batching (generate_batch): layer type {layer_type!r} with sliding_window={sliding_window} "
            f"(config.sliding_window={window}) is not a pattern sparse_attn can apply exactly here; only causal "
            "full and sliding-window layers are supported"
        )
    return layer_type


def _attend(query, key, value, pattern, scaling, key_mask, sinks, mods) -> torch.Tensor:
    if sinks is None:
        return sparse_attention(query, key, value, pattern, scale=scaling, key_mask=key_mask, **mods)
    return _with_sinks(query, key, value, pattern, scaling, key_mask, sinks, mods)


def _per_element(query, key, value, info, setting, scaling, key_mask, sinks, mods) -> torch.Tensor:
    """An evaluated mask that differs between batch elements: each element with its own token mask."""
    outs = []
    for b in range(query.shape[0]):
        own = None if setting is None else setting.pattern_for(info, element=b)
        pattern = info.pattern(own, element=b)
        element_mask = None if key_mask is None else key_mask[b : b + 1]
        one = slice(b, b + 1)
        outs.append(_attend(query[one], key[one], value[one], pattern, scaling, element_mask, sinks, mods))
    return torch.cat(outs).transpose(1, 2).contiguous()


def _packing_from_position_ids(info: SparseMaskInfo, position_ids, batch_size: int) -> None:
    """Packed sequences the mask does not show, read from the ``position_ids`` the model passes (public):
    transformers adds its packed-sequence mask only without a cache and without a padding mask, so a padding-free
    batch run with a cache (``use_cache`` defaults to True) reaches us as a plain causal mask. Position ids that
    restart (`find_packed_sequence_indices`, transformers' own test) then keep the sequences apart here, as
    ``flash_attention_2`` does. Looked at once per mask (every layer gets the same tensor): one host
    synchronisation per forward pass (none under torch.compile, which always gets the indices)."""
    if (
        info.packed is not None
        or info.key_mask is not None
        or position_ids is None
        or info.q_length == 1
        or info.positions_checked is position_ids
    ):
        return
    info.positions_checked = position_ids
    if (
        position_ids.dim() != 2
        or position_ids.shape[-1] != info.q_length
        or position_ids.shape[0] not in (1, batch_size)
    ):
        return  # not one position per query (e.g. multimodal RoPE's [3, B, S]): the mask is the model's word
    from transformers.masking_utils import find_packed_sequence_indices

    tracing = torch.compiler.is_compiling()
    if tracing and info.kv_length != info.q_length:
        return  # keys from a cache: no packing to find (see below), and no host synchronisation to check it
    indices = find_packed_sequence_indices(position_ids.expand(batch_size, -1))
    if indices is None:
        return
    if info.kv_length != info.q_length or info.decode_position is not None or info.kv_used is not None:
        raise ValueError(
            "position_ids restart (a padding-free packed batch) while the keys include earlier cached tokens: "
            "the sequences cannot be told apart; run packed batches without a cache (use_cache=False) or from "
            "an empty one"
        )
    info.packed = indices


#: Page size of a static cache seen as a paged one (a divisor of its length: the gcd with this).
_STATIC_PAGE = 64


def _paged_decode_applies(info: SparseMaskInfo, query, key, value, sinks, mods) -> bool:
    """A one-query step against a static cache with the model's own causal / window / chunked pattern (a
    recognised mask, no attention sinks, no shifted chunks, plain contiguous key states, no gradient wanted:
    the paged path is forward only): `_paged_static_decode` runs it."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, mods.get("rel_bias"))
    )
    return (
        info.decode_position is not None
        and info.evaluated is None
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
