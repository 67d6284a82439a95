"""transformers' continuous batching (``generate_batch``, its paged cache) under sparse_attn: the same greedy
tokens as sdpa, the model's pattern (causal, sliding window) per packed request, and a refusal of any mask
that is not that pattern."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

# Every supported transformers (pyproject's range) has continuous batching: a missing module fails here.
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.continuous_batching import utils as continuous_batching  # noqa: E402

from sparse_attn import causal  # noqa: E402
from sparse_attn.integrations import transformers as sa_hf  # noqa: E402

NAME = sa_hf.register()
VOCAB, WINDOW = 97, 5


def _model(kind):
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    if kind == "mistral":
        return transformers.MistralForCausalLM(
            transformers.MistralConfig(sliding_window=WINDOW, **common)
        ).eval()
    # Qwen2: a full layer, then a sliding one (two layer types, two groups of pages in the paged cache).
    config = transformers.Qwen2Config(
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **common
    )
    return transformers.Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_generate_batch_matches_sdpa(kind, monkeypatch):
    """Three requests of different lengths, a small batch budget (prefill split into chunks, run beside other
    requests' decode steps): each request's greedy tokens are those of plain sdpa generate()."""
    model = _model(kind)
    torch.manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,)).tolist() for n in (7, 13, 3)]
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    expected = [
        model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist() for p in prompts
    ]

    windows = []
    original = sa_hf._check_continuous_batching

    def spy(module, attention_mask, is_causal, sliding_window, kwargs):
        windows.append(sliding_window)
        return original(module, attention_mask, is_causal, sliding_window, kwargs)

    monkeypatch.setattr(sa_hf, "_check_continuous_batching", spy)
    model.set_attn_implementation(NAME)
    batching = transformers.ContinuousBatchingConfig(page_size=8, num_blocks=32, max_batch_tokens=12)
    out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching)
    got = [out[request].generated_tokens for request in sorted(out, key=lambda r: int(r.split("_")[-1]))]
    assert got == expected
    assert model.config._attn_implementation == NAME  # continuous batching kept it
    assert set(windows) == {"llama": {None}, "mistral": {WINDOW}, "qwen2": {None, WINDOW}}[kind]


def _layer(**config):
    """An attention layer as the attention function sees it: its config, index and causality."""
    module = torch.nn.Module()
    module.config = transformers.MistralConfig(num_hidden_layers=2, **config)
    module.layer_idx, module.is_causal = 1, True
    return module


def _packed_step(window):
    """A step of three requests (a prefill chunk after earlier ones, a decode step, a first chunk) as continuous
    batching hands it to the attention function, and transformers' own (sdpa) mask for it."""
    cu_q = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 21, 27], dtype=torch.int32)
    mask = torch.full((1, 1, 11, 27), torch.finfo(torch.float64).min, dtype=torch.float64)
    continuous_batching.build_attention_mask(mask, cu_q.tolist(), cu_k.tolist(), sliding_window=window or 1)
    torch.manual_seed(2)
    q = torch.randn(1, 4, 11, 8)
    k, v = (torch.randn(1, 2, 27, 8) for _ in range(2))
    kwargs = dict(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, read_index=[], write_index=[], is_causal=True)
    return q, k, v, mask, kwargs


@pytest.mark.parametrize("window", [None, 3])
def test_packed_step_matches_transformers_mask_in_float64(window):
    """Each request's queries sit at the end of its keys (bottom-right), its window counted there (key states
    with the strides of a gather from the cache, heads innermost)."""
    q, k, v, mask, kwargs = _packed_step(window)
    layer = _layer(sliding_window=window)
    k_strided, v_strided = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    with torch.inference_mode():
        out, _ = sa_hf.sparse_attention_forward(
            layer, q, k_strided, v_strided, None, scaling=0.3, sliding_window=window, **kwargs
        )
    k2, v2 = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    logits = q.double() @ k2.transpose(-1, -2) * 0.3 + mask
    want = (logits.softmax(-1) @ v2).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config, call, match",
    [
        (dict(sliding_window=None), dict(sliding_window=3), "sliding_window=3"),  # not the config's window
        (dict(sliding_window=4), dict(sliding_window=None), "sliding_window=None"),  # a window dropped
        (dict(layer_types=["full_attention", "chunked_attention"]), {}, "chunked_attention"),
        (dict(sliding_window=None), dict(s_aux=torch.zeros(4)), "s_aux"),
        (dict(sliding_window=None), dict(is_causal=False), "causal layers only"),
        (dict(sliding_window=None), dict(set_pattern=True), "set_pattern"),
        (dict(sliding_window=None), dict(attention_mask=torch.zeros(1, 1, 11, 27)), "expects no mask"),
    ],
)
def test_a_pattern_continuous_batching_cannot_carry_raises(config, call, match):
    """Fail closed: continuous batching runs no mask function, so a layer whose pattern is not the causal or
    configured sliding-window one (or whose logits change) is refused, never approximated."""
    q, k, v, _, kwargs = _packed_step(None)
    kwargs.update(call)
    mask = kwargs.pop("attention_mask", None)
    layer = _layer(**config)
    if kwargs.pop("set_pattern", None):
        sa_hf.set_pattern(layer, causal())
    with pytest.raises(ValueError, match=match):
        sa_hf.sparse_attention_forward(layer, q, k, v, mask, **kwargs)


def test_generate_batch_refuses_a_chunked_model():
    """End to end: a chunked-attention config (Llama 4's ``attention_chunk_size``), whose chunks continuous
    batching would not show us, fails its requests with our error instead of generating approximate tokens."""
    model = _model("llama")
    model.config.attention_chunk_size = 4
    model.set_attn_implementation(NAME)
    config = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    batching = transformers.ContinuousBatchingConfig(page_size=8, num_blocks=32, max_batch_tokens=12)
    out = model.generate_batch(
        [[1, 2, 3, 4, 5, 6]], generation_config=config, continuous_batching_config=batching
    )
    (result,) = out.values()
    assert result.generated_tokens == []
    assert "attention_chunk_size" in (result.error or "")
