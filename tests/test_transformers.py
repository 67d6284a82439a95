"""Hugging Face integration: tiny random Llama / Mistral / Qwen2 give what their own sdpa path gives."""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from sparse_attn import causal, dilated, global_tokens, sliding_window  # noqa: E402
from sparse_attn.integrations import transformers as sa_hf  # noqa: E402

NAME = sa_hf.register()
VOCAB, PROMPT = 97, 21
WINDOW = 6  # smaller than the prompt, and far smaller than prompt + generated tokens

CALLS = []


def _spy(module, query, key, *args, **kwargs):
    CALLS.append((query.shape[2], key.shape[2]))
    return sa_hf.sparse_attention_forward(module, query, key, *args, **kwargs)


AttentionInterface.register("sparse_attn_spy", _spy)
AttentionMaskInterface.register("sparse_attn_spy", sa_hf.sparse_mask)


def _model(kind):
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=128,
        attention_dropout=0.0,
        attn_implementation="sdpa",
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=WINDOW, **common))
    else:  # qwen2: a full-attention layer and a sliding-window layer
        config = transformers.Qwen2Config(
            use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **common
        )
        assert config.layer_types == ["full_attention", "sliding_attention"]
        model = transformers.Qwen2ForCausalLM(config)
    return model.to(torch.float32)


def _batch(left_pad=5):
    ids = torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :left_pad] = 0
    return ids, mask


def _logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_logits_equal_sdpa_with_left_padding(kind):
    model = _model(kind).eval()
    ids, mask = _batch()
    real = mask.bool()  # padded query rows see no key: ours gives 0 there, sdpa something else
    ref = _logits(model, "sdpa", ids, mask)
    out = _logits(model, NAME, ids, mask)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    if kind != "llama":
        # The window is in force: plain causal attention gives other logits.
        sa_hf.set_pattern(model, causal())
        assert not torch.allclose(_logits(model, NAME, ids, mask)[real], ref[real], atol=1e-3)
        sa_hf.set_pattern(model, None)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_training_step_gradients_equal_sdpa(kind):
    model = _model(kind).train()
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_loss, ref), (loss, ours) = grads["sdpa"], grads[NAME]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind, cache", [("llama", "default"), ("mistral", "default"), ("mistral", "full")])
def test_greedy_generate_equals_sdpa(kind, cache):
    """Greedy decoding far past the window gives sdpa's tokens.

    Mistral's default cache keeps only the last window of keys (the mask slices the padding to it); a full
    `DynamicCache` keeps every key, so the window must come from the pattern in every decode step.
    """
    model = _model(kind).eval()
    ids, mask = _batch()
    new = 3 * WINDOW
    outputs = {}
    for impl in ("sdpa", "sparse_attn_spy"):
        model.set_attn_implementation(impl)
        CALLS.clear()
        extra = {"past_key_values": transformers.DynamicCache()} if cache == "full" else {}
        outputs[impl] = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra
        )
    assert outputs["sdpa"].shape == (2, PROMPT + new)
    assert torch.equal(outputs["sparse_attn_spy"], outputs["sdpa"])
    # Prefill, then one-query KV-cache decode steps, all through sparse-attn.
    assert CALLS[0] == (PROMPT, PROMPT)
    decode_kv = [kv for q, kv in CALLS if q == 1]
    assert len(decode_kv) == 2 * (new - 1)
    if kind == "mistral":
        assert max(decode_kv) == (PROMPT + new - 1 if cache == "full" else WINDOW)


def test_custom_pattern_with_global_tokens_equals_sdpa_with_that_mask():
    model = _model("llama").eval()
    ids, _ = _batch()
    pattern = causal() & (sliding_window(4, 0) | global_tokens(2))
    sa_hf.set_pattern(model, pattern)
    out = _logits(model, NAME, ids, None)
    sa_hf.set_pattern(model, None)
    dense_mask = pattern.mask(PROMPT, PROMPT)[None, None].expand(2, 1, PROMPT, PROMPT)
    ref = _logits(model, "sdpa", ids, dense_mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, _logits(model, NAME, ids, None), atol=1e-3)


def test_unsupported_masks_and_dropout_raise_clear_errors():
    model = _model("llama")
    model.set_attn_implementation(NAME)
    ids, mask = _batch()
    with pytest.raises(TypeError, match="2-D padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, PROMPT, PROMPT, dtype=torch.bool))
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model.train()(input_ids=ids, attention_mask=mask)


def test_import_sparse_attn_does_not_import_transformers():
    code = "import sys, sparse_attn; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "make_mask_function",
    [
        lambda mu: mu.causal_mask_function,
        lambda mu: mu.sliding_window_causal_mask_function(WINDOW),
        lambda mu: mu.bidirectional_mask_function,
        lambda mu: mu.sliding_window_bidirectional_mask_function(3),
    ],
)
@pytest.mark.parametrize("q_length, kv_length, kv_offset", [(13, 13, 0), (1, 13, 0), (4, 9, 6)])
def test_mask_info_equals_transformers_sdpa_mask(make_mask_function, q_length, kv_length, kv_offset):
    """Our pattern plus key mask equals the mask transformers' sdpa would materialise, token for token."""
    mu = transformers.masking_utils
    mask_function = make_mask_function(mu)
    q_offset = kv_offset + kv_length - q_length
    padding = torch.ones(2, kv_offset + kv_length, dtype=torch.bool)
    padding[1, :3] = False
    kwargs = dict(q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function, attention_mask=padding)
    expected = mu.sdpa_mask(2, q_length, kv_length, allow_is_causal_skip=False, **kwargs)[:, 0]
    info = sa_hf.sparse_mask(2, q_length, kv_length, **kwargs)
    ours = info.pattern().mask(q_length, kv_length)[None] & info.key_mask[:, None, :]
    assert torch.equal(ours, expected)


def test_gpt_oss_attention_sinks_equal_eager():
    """GPT-OSS passes learned sinks (``s_aux``): logits and gradients (sinks included) equal its eager run."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        max_position_embeddings=128,
        attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = transformers.GptOssForCausalLM(config).train()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    ref_grads = _check_training_step(model, mask.bool(), input_ids=ids, attention_mask=mask, labels=labels)
    assert ref_grads["model.layers.0.self_attn.sinks"].abs().sum() > 0


def test_bart_encoder_and_cross_attention_equal_sdpa():
    """Bidirectional encoder self-attention and cross-attention (q_length != kv_length), with padding."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = transformers.BartForConditionalGeneration(config).eval()
    ids, mask = _batch()
    outputs = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :7]).logits
        tokens = model.generate(
            ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=1
        )
        outputs[impl] = logits, tokens
    torch.testing.assert_close(outputs[NAME][0], outputs["sdpa"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[NAME][1], outputs["sdpa"][1])


def test_mask_alignment_is_required_only_where_it_matters():
    mu = transformers.masking_utils
    # Key states that end before the last query: no cache makes them; a causal or windowed mask would shift.
    for mask_function in (mu.causal_mask_function, mu.sliding_window_bidirectional_mask_function(3)):
        with pytest.raises(ValueError, match="cache_implementation='dynamic'"):
            sa_hf.sparse_mask(2, 4, 16, q_offset=14, kv_offset=0, mask_function=mask_function)
    # Cross-attention: every query sees every real key, whatever the lengths.
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[0, 7:] = False
    info = sa_hf.sparse_mask(2, 4, 9, mask_function=mu.bidirectional_mask_function, attention_mask=padding)
    assert not info.causal and info.window is None and torch.equal(info.key_mask, padding)


# -- padding-free (packed) batches -------------------------------------------------------------------------
PACKED_LENGTHS = [7, 1, 13, 9]  # a one-token document, and documents longer than Mistral's window


def _packed_documents():
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in PACKED_LENGTHS]
    positions = torch.cat([torch.arange(n) for n in PACKED_LENGTHS])[None]
    cu = torch.tensor([0, *PACKED_LENGTHS]).cumsum(0).to(torch.int32)
    return docs, torch.cat(docs)[None], positions, cu


def _logits_and_grads(model, runs):
    """Per-document logits, and the parameter gradients of a fixed random linear loss of all of them."""
    model.zero_grad()
    logits = torch.cat([run() for run in runs], 1)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "kind, packing",
    [
        ("llama", "position_ids"),
        ("mistral", "position_ids"),
        ("mistral", "cu_seq_lens"),
        ("llama", "position_ids with a cache"),
        ("mistral", "position_ids with a cache, compiled"),
    ],
)
def test_packed_batch_equals_each_document_alone(kind, packing):
    """A padding-free batch (as DataCollatorWithFlattening makes it) keeps its documents apart exactly:
    per document, the logits and the parameter gradients of running it alone (through sdpa). With a cache
    (use_cache defaults to True) transformers builds no packed-sequence mask: the position ids tell us; and
    under torch.compile (the aot_eager backend: dynamo and AOT autograd, without inductor's code generation)."""
    model = _model(kind).train()
    docs, ids, positions, cu = _packed_documents()
    model.set_attn_implementation("sdpa")
    want = _logits_and_grads(
        model, [lambda d=d: model(input_ids=d[None], use_cache=False).logits for d in docs]
    )
    model.set_attn_implementation(NAME)
    run = model
    if packing.startswith("position_ids"):
        kwargs = {"position_ids": positions, "use_cache": packing != "position_ids"}
        if packing.endswith("compiled"):
            torch._dynamo.reset()
            run = torch.compile(model, backend="aot_eager")
    else:  # the flash-attention kwargs alone (positions for the rotary embedding only)
        kwargs = {
            "position_ids": positions,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": 13,
            "max_length_k": 13,
        }
        model.set_attn_implementation("sparse_attn_spy")
        CALLS.clear()
    kwargs.setdefault("use_cache", False)
    try:
        got = _logits_and_grads(model, [lambda: run(input_ids=ids, **kwargs).logits])
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-5, msg=name)
    if packing == "position_ids with a cache":
        # Inference too: the case (eval, use_cache left at its default, True).
        with torch.no_grad():
            logits = model.eval()(input_ids=ids, position_ids=positions).logits
        torch.testing.assert_close(logits, want[0], rtol=1e-5, atol=1e-5)
    # Without the packing information the documents would mix: the check above can fail.
    model.set_attn_implementation(NAME)
    mixed = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits
    assert not torch.allclose(mixed.detach(), want[0], atol=1e-3)


def test_packed_batch_with_a_custom_pattern_keeps_documents_apart():
    model = _model("llama").eval()
    docs, ids, positions, _ = _packed_documents()
    # Bands (causal, windows, dilated windows) apply within every document; position-based parts (global
    # tokens) would count positions of the packed sequence.
    pattern = causal() & (sliding_window(1, 0) | dilated(4, 0, dilation=2))
    sa_hf.set_pattern(model, pattern)
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        # Each document alone, with the pattern's mask as a dense sdpa mask (positions restart per document).
        model.set_attn_implementation("sdpa")
        want = torch.cat(
            [
                model(
                    input_ids=d[None], attention_mask=pattern.mask(len(d))[None, None], use_cache=False
                ).logits
                for d in docs
            ],
            1,
        )
    sa_hf.set_pattern(model, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- score modifiers, chunked attention and static caches (issue 16) ---------------------------------------
CHUNK = 8  # Llama 4's attention_chunk_size: smaller than the prompt and than prompt + generated tokens


def _gemma2():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,  # a sliding-window layer and a full one
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=None,
        max_position_embeddings=128,
        attention_dropout=0.0,
    )
    assert config.layer_types == ["sliding_attention", "full_attention"]
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            # Scores of several units: the cap changes them (random init gives scores far below it).
            layer.self_attn.q_proj.weight.mul_(30.0)
    return model


def _llama4():
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        intermediate_size_mlp=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        attention_chunk_size=CHUNK,
        max_position_embeddings=128,
        attention_dropout=0.0,
    )
    assert set(config.layer_types) == {"chunked_attention"}
    return transformers.Llama4ForCausalLM(config)


def _t5():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,  # the first layer owns the relative bias, the second reuses it
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,  # logarithmic buckets within the sequence lengths used here
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(std=2.0)
    return model


def _loss_logits_grads(model, impl, **inputs):
    model.set_attn_implementation(impl)
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _check_training_step(model, real, **inputs):
    model.train()
    ref_logits, ref_grads = _loss_logits_grads(model, "eager", **inputs)
    logits, grads = _loss_logits_grads(model, NAME, **inputs)
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    return ref_grads


def _greedy(model, impl, ids, mask, new, **kwargs):
    model.eval().set_attn_implementation(impl)
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs
    )


@pytest.mark.parametrize("kind", ["gemma2", "llama4"])
def test_gemma2_softcap_and_llama4_chunks_equal_eager(kind):
    """Logits (left padding) and training gradients equal eager; greedy decoding past the window / chunk
    equals eager's tokens; the softcap / the chunks are in force (without them the logits differ)."""
    model = _gemma2() if kind == "gemma2" else _llama4()
    ids, mask = _batch()
    real = mask.bool()
    # Labels whose prediction comes from a padded position are ignored: eager gives padded queries (no
    # visible key) a softmax over masked scores, sparse_attn gives them 0.
    predicted_from_padding = torch.cat([~real[:, :1], ~real[:, :-1]], 1)
    labels = ids.masked_fill(predicted_from_padding, -100)
    _check_training_step(model, real, input_ids=ids, attention_mask=mask, labels=labels)
    model.eval()
    ref = _logits(model, "eager", ids, mask)
    if kind == "gemma2":
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert not torch.allclose(_logits(model, NAME, ids, mask)[real], ref[real], atol=1e-3)
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = model.config.attn_logit_softcapping
    else:
        sa_hf.set_pattern(model, causal())
        assert not torch.allclose(_logits(model, NAME, ids, mask)[real], ref[real], atol=1e-3)
        sa_hf.set_pattern(model, None)
        # Without padding the chunks start at 0 for every element: the shared chunked(8) & causal() layout.
        torch.testing.assert_close(_logits(model, NAME, ids, None), _logits(model, "eager", ids, None))
    new = 3 * CHUNK
    want = _greedy(model, "eager", ids, mask, new)
    CALLS.clear()
    assert torch.equal(_greedy(model, "sparse_attn_spy", ids, mask, new), want)
    assert len([q for q, _ in CALLS if q == 1]) == 2 * (new - 1)


@pytest.mark.parametrize("left_padding", [[0, 0], [0, 3]])
@pytest.mark.parametrize("q_length, kv_length, kv_offset", [(13, 13, 0), (1, 13, 0), (4, 9, 6), (1, 7, 10)])
def test_chunked_mask_info_equals_transformers_sdpa_mask(left_padding, q_length, kv_length, kv_offset):
    """Llama 4's chunked causal mask (chunks counted from each element's first real token), token for token,
    with a sliding cache's offset too."""
    mu = transformers.masking_utils
    mask_function = mu.chunked_causal_mask_function(4, torch.tensor(left_padding))
    q_offset = kv_offset + kv_length - q_length
    padding = torch.ones(2, kv_offset + kv_length, dtype=torch.bool)
    padding[1, : left_padding[1]] = False
    kwargs = dict(q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function, attention_mask=padding)
    expected = mu.sdpa_mask(2, q_length, kv_length, allow_is_causal_skip=False, **kwargs)[:, 0]
    info = sa_hf.sparse_mask(2, q_length, kv_length, **kwargs)
    pattern_mask = info.pattern().mask(q_length, kv_length)
    assert info.chunk == 4 and (info.chunk_start is None) == (left_padding == [0, 0] and kv_offset == 0)
    ours = (pattern_mask if pattern_mask.dim() == 3 else pattern_mask[None]) & info.key_mask[:, None, :]
    assert torch.equal(ours, expected)


def test_t5_relative_bias_equals_eager_in_training_and_generation():
    """Encoder self-attention (padding), decoder self-attention (causal, KV cache in generate) and
    cross-attention; gradients reach relative_attention_bias.weight; the bias is never a dense tensor."""
    model = _t5()
    ids, mask = _batch()
    labels = ids[:, :9].clone()
    grads = _check_training_step(model, slice(None), input_ids=ids, attention_mask=mask, labels=labels)
    for stack in ("encoder", "decoder"):
        name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert grads[name].abs().sum() > 0
    model.eval()
    attention = model.encoder.block[0].layer[0].SelfAttention
    model.set_attn_implementation(NAME)
    assert isinstance(attention.compute_bias(5, 5), sa_hf.RelativePositionBias)
    model.set_attn_implementation("eager")
    assert attention.compute_bias(5, 5).shape == (1, 4, 5, 5)
    new = 10
    want = _greedy(model, "eager", ids, mask, new)
    assert torch.equal(_greedy(model, NAME, ids, mask, new), want)
    # A static decoder cache: the bias of every decode step follows the cache's position.
    assert torch.equal(_greedy(model, NAME, ids, mask, new, cache_implementation="static"), want)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2", "llama4"])
def test_static_cache_generate_equals_dynamic(kind):
    """generate(cache_implementation="static"): key states run past the last query into the unwritten
    tail of a preallocated cache; prefill uses the written keys, decode steps one fixed-size layout."""
    model = {"gemma2": _gemma2, "llama4": _llama4}.get(kind, lambda: _model(kind))()
    ids, mask = _batch()
    new = 3 * WINDOW
    want = _greedy(model, "eager", ids, mask, new)
    CALLS.clear()
    assert torch.equal(_greedy(model, "sparse_attn_spy", ids, mask, new, cache_implementation="static"), want)
    # Full-attention layers run prefill and every decode step against the whole preallocated cache (its
    # tail unwritten); sliding-window layers hold the last WINDOW keys once full.
    full = PROMPT + new - 1
    decode_kv = {kv for q, kv in CALLS if q == 1}
    assert (
        decode_kv == {"llama": {full}, "mistral": {WINDOW}, "gemma2": {full, WINDOW}, "llama4": {CHUNK}}[kind]
    )
    assert ((PROMPT, full) in CALLS) == (kind in ("llama", "gemma2"))


@pytest.mark.parametrize("q_offset", [torch.tensor(9), 9])
@pytest.mark.parametrize("left_padding", [[0, 0], [0, 3]])
def test_static_cache_decode_key_mask_equals_transformers_sdpa_mask(q_offset, left_padding):
    """One query against a static cache (its position a tensor, as StaticLayer gives it, or an int, as a
    sliding-window layer that is not full gives it): the row of the mask folded into the key mask, for
    causal, windowed and chunked masks."""
    mu = transformers.masking_utils
    kv_length = 16
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, : left_padding[1]] = False
    for mask_function in (
        mu.causal_mask_function,
        mu.sliding_window_causal_mask_function(4),
        mu.chunked_causal_mask_function(4, torch.tensor(left_padding)),
    ):
        kwargs = dict(q_offset=q_offset, kv_offset=0, mask_function=mask_function, attention_mask=padding)
        expected = mu.sdpa_mask(2, 1, kv_length, allow_is_causal_skip=False, **kwargs)[:, 0]
        info = sa_hf.sparse_mask(2, 1, kv_length, **kwargs)
        assert repr(info.pattern()) == "dense()" and int(info.decode_position) == 9
        assert torch.equal(info.key_mask[:, None, :], expected)


@pytest.mark.parametrize("kind, graphs", [("llama", 1), ("mistral", 2), ("t5", 1)])
def test_compiled_static_cache_generate_equals_eager_without_recompiles(kind, graphs):
    """The way people compile generation: a static cache and generate's compiled decode step (inductor).
    Tokens equal eager's (dynamic cache); no graph break; one graph for every decode step (Mistral's
    sliding-window layer recompiles once when its cache fills, as transformers' own attention does)."""
    from torch._dynamo.utils import counters

    model = _t5() if kind == "t5" else _model(kind)
    ids, mask = _batch()
    new = 8 if kind != "mistral" else 2 * WINDOW
    want = _greedy(model, "eager", ids, mask, new)
    config = transformers.CompileConfig(fullgraph=False, mode="default")
    config._compile_all_devices = True  # generate compiles on CUDA only unless told
    torch._dynamo.reset()
    counters.clear()
    try:
        got = _greedy(model, NAME, ids, mask, new, cache_implementation="static", compile_config=config)
        assert torch.equal(got, want)
        assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    finally:
        torch._dynamo.reset()


def test_what_cannot_be_exact_still_raises():
    model = _model("llama")
    ids, mask = _batch()
    # A set_pattern pattern cannot be folded into a static-cache decode step's key mask.
    sa_hf.set_pattern(model, causal() & sliding_window(3, 0))
    try:
        with pytest.raises(ValueError, match="set_pattern"):
            _greedy(model, NAME, ids, mask, 3, cache_implementation="static")
    finally:
        sa_hf.set_pattern(model, None)
    # Dense additive biases other than T5's, and ALiBi given to the attention function.
    attention = model.model.layers[0].self_attn
    q = k = v = torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match="position_bias"):
        sa_hf.sparse_attention_forward(attention, q, k, v, None, position_bias=torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="'alibi'"):
        sa_hf.sparse_attention_forward(attention, q, k, v, None, alibi=torch.zeros(4))


# Architectures on transformers' attention interface, each as a tiny random model: logits with left padding and
# greedy generate() equal to eager, through our attention function (the spy counts its calls).
_SURVEY = {
    "qwen3": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "gemma3_text": dict(sliding_window=WINDOW, sliding_window_pattern=2),
    "phi3": dict(sliding_window=WINDOW),
    "cohere2": dict(sliding_window=WINDOW),
    "starcoder2": dict(sliding_window=WINDOW),
    "olmo2": {},
    "granite": {},
    "smollm3": {},
    "glm4": {},
    "exaone4": dict(sliding_window=WINDOW),
    "ministral": dict(sliding_window=WINDOW),
    "gpt_neox": dict(rotary_pct=1.0),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "bert": {},
    "modernbert": dict(global_attn_every_n_layers=2, local_attention=8),
}


@pytest.mark.parametrize("kind", _SURVEY)
def test_architecture_survey_equals_eager(kind):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        kind,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, attention_dropout=0.0, **_SURVEY[kind],
    )  # fmt: skip
    encoder = kind in ("bert", "modernbert")
    auto = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager").eval()
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)[0]
        model.set_attn_implementation("sparse_attn_spy")
        CALLS.clear()
        out = model(input_ids=ids, attention_mask=mask)[0]
    assert len(CALLS) == 2, "the model did not run our attention function in both layers"
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    if not encoder:
        model.set_attn_implementation("eager")
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        model.set_attn_implementation("sparse_attn_spy")
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        assert torch.equal(got, want)


# -- fail closed: masks the integration does not recognise (issue 23) --------------------------------------
def _every_other_key(batch_idx, head_idx, q_idx, kv_idx):
    """A mask no transformers release makes: causal keys at an even distance."""
    return (kv_idx <= q_idx) & ((q_idx - kv_idx) % 2 == 0)


def _shifted_per_element(batch_idx, head_idx, q_idx, kv_idx):
    """Another one, different for every batch element: causal, looking `batch_idx` keys less far back."""
    return (kv_idx <= q_idx) & (q_idx - kv_idx <= 6 - 3 * batch_idx)


def _unseen_mask_functions(mu):
    made = [_every_other_key, _shifted_per_element]
    # A structure transformers >= 5.25 makes (block_sequence_ids) that the integration does not read.
    if hasattr(mu, "blockwise_overlay"):
        blocks = torch.tensor([[-1, -1, 0, 0, 0, -1, 1, 1, 1, 1, -1, -1, 2, 2, 2, -1]] * 2)
        made.append(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(blocks)))
    return made


@pytest.mark.parametrize("q_length, kv_length, kv_offset", [(13, 13, 0), (1, 13, 0), (4, 9, 6)])
def test_unrecognised_mask_functions_are_evaluated_exactly(q_length, kv_length, kv_offset):
    mu = transformers.masking_utils
    q_offset = kv_offset + kv_length - q_length
    padding = torch.ones(2, kv_offset + kv_length, dtype=torch.bool)
    padding[1, :3] = False
    for mask_function in _unseen_mask_functions(mu):
        kwargs = dict(
            q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function, attention_mask=padding
        )
        expected = mu.sdpa_mask(2, q_length, kv_length, allow_is_causal_skip=False, **kwargs)[:, 0]
        info = sa_hf.sparse_mask(2, q_length, kv_length, **kwargs)
        assert info.evaluated is not None
        ours = torch.stack([info.pattern(element=b).mask(q_length, kv_length) for b in range(2)])
        assert torch.equal(ours & info.key_mask[:, None, :], expected)


def test_unrecognised_mask_function_is_refused_when_too_large(monkeypatch):
    mu = transformers.masking_utils
    monkeypatch.setattr(sa_hf, "MAX_EVALUATED_PAIRS", 2 * 13 * 13 - 1)
    with pytest.raises(ValueError, match=r"does not recognise the mask function _every_other_key that llama"):
        sa_hf.sparse_mask(2, 13, 13, mask_function=_every_other_key, config=transformers.LlamaConfig())
    # What the integration recognises is never evaluated: no limit applies.
    info = sa_hf.sparse_mask(2, 13, 13, mask_function=mu.sliding_window_causal_mask_function(4))
    assert info.evaluated is None and info.window == 4


def test_look_alike_closures_are_not_read():
    """A function named like transformers' sliding-window overlay, but not from transformers, is evaluated
    (as are transformers' own functions when the variables they close over change)."""
    mu = transformers.masking_utils

    def sliding_window_overlay(sliding_window):
        def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
            return kv_idx >= q_idx - sliding_window  # one key more than transformers' window

        return inner_mask

    look_alike = mu.and_masks(sliding_window_overlay(4), mu.causal_mask_function)
    info = sa_hf.sparse_mask(1, 13, 13, mask_function=look_alike)
    expected = mu.sdpa_mask(1, 13, 13, mask_function=look_alike, allow_is_causal_skip=False)[0, 0]
    assert info.evaluated is not None and torch.equal(info.pattern().mask(13, 13), expected)


MASK_OVERLAYS = {"every_other": _every_other_key, "per_element": _shifted_per_element}


def _with_overlay(mask_interface):
    """A mask interface whose model mask is ANDed with the overlay named by the model's config."""

    def make(*args, mask_function=None, **kwargs):
        overlay = MASK_OVERLAYS[kwargs["config"].test_overlay]
        mask_function = transformers.masking_utils.and_masks(mask_function, overlay)
        # (transformers decided beforehand that a plain causal mask may be left to sdpa's is_causal)
        kwargs["allow_is_causal_skip"] = False
        return mask_interface(*args, mask_function=mask_function, **kwargs)

    return make


AttentionInterface.register("sdpa_overlay", transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"])
AttentionMaskInterface.register("sdpa_overlay", _with_overlay(transformers.masking_utils.sdpa_mask))
AttentionInterface.register("sparse_attn_overlay", sa_hf.sparse_attention_forward)
AttentionMaskInterface.register("sparse_attn_overlay", _with_overlay(sa_hf.sparse_mask))


@pytest.mark.parametrize("overlay", MASK_OVERLAYS)
def test_model_with_an_unseen_mask_equals_sdpa_in_training(overlay):
    """End to end: a model whose mask function the integration has never seen gives sdpa's logits and
    gradients (evaluated exactly; per batch element when its elements differ)."""
    model = _model("llama").train()
    model.config.test_overlay = overlay
    ids, _ = _batch()
    grads = {}
    for impl in ("sdpa_overlay", "sparse_attn_overlay"):
        model.set_attn_implementation(impl)
        grads[impl] = _logits_and_grads(model, [lambda: model(input_ids=ids).logits])
    (want, want_grads), (got, got_grads) = grads["sdpa_overlay"], grads["sparse_attn_overlay"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("structure", ["5.24+", "5.23", "no remap"])
def test_packed_mask_info_equals_transformers_sdpa_mask(structure):
    """transformers' packed-sequence masks as its releases build them: read exactly (causal, windows) or
    evaluated (chunks, which the remapped positions restart per sequence), token for token."""
    mu = transformers.masking_utils
    positions = torch.tensor(
        [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    )
    indices = mu.find_packed_sequence_indices(positions)
    for base, read in (
        (mu.causal_mask_function, True),
        (mu.sliding_window_causal_mask_function(3), True),
        (mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)), False),
    ):
        remapped = (
            base if structure == "no remap" else mu.remap_positions_for_packed_sequence(base, positions)
        )
        parts = (remapped, mu.packed_sequence_mask_function(indices))
        mask_function = mu.and_masks(*(parts[::-1] if structure == "5.23" else parts))
        expected = mu.sdpa_mask(2, 13, 13, mask_function=mask_function, allow_is_causal_skip=False)[:, 0]
        info = sa_hf.sparse_mask(2, 13, 13, mask_function=mask_function)
        assert (info.evaluated is None) == read and (info.packed is not None) == read
        ours = torch.stack([info.pattern(element=b).mask(13, 13) for b in range(2)])
        assert torch.equal(ours, expected)


class ChangedT5Attention(torch.nn.Module):
    """A T5-style attention class whose compute_bias no longer has the signature the integration reads."""

    is_decoder, is_causal, has_relative_attention_bias = False, False, True

    def compute_bias(self, query_length, key_length, device=None, cache_position=None):
        return torch.zeros(1, 1, query_length, key_length)

    def _relative_position_bucket(self, *args, **kwargs):
        raise AssertionError("never called")


def test_t5_internals_that_changed_are_not_wrapped(monkeypatch):
    """The wrapper reads T5's compute_bias signature; a class where it differs keeps its own (dense) bias,
    which the attention function then refuses, instead of a bias computed from changed internals."""
    monkeypatch.setattr(sa_hf, "_T5_ATTENTIONS", ((__name__, "ChangedT5Attention"),))
    original = ChangedT5Attention.compute_bias
    try:
        sa_hf._wrap_t5_compute_bias()
        assert ChangedT5Attention.compute_bias is original
        q = k = v = torch.randn(1, 4, 5, 16)
        bias = original(None, 5, 5)
        with pytest.raises(ValueError, match="position_bias"):
            sa_hf.sparse_attention_forward(ChangedT5Attention(), q, k, v, None, position_bias=bias)
    finally:
        monkeypatch.undo()
        sa_hf._wrap_t5_compute_bias()  # the real T5 classes again (_T5_CLASSES is what register() found)
