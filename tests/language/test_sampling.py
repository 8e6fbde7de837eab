"""Sampling in generation: ``GenerationConfig`` checks, the shared temperature/top-k/top-p filter against
transformers' logits warpers, the HF adapters against transformers' own sampled ``generate`` and the Sub-LN
decoder's sampling (kept set, reproducibility). CPU, tiny random models, seconds."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mmlm.language import CrossAttentionLM, GenerationConfig, HFCausalLM, HFSeq2SeqLM, SubLNDecoder
from mmlm.language.base import filter_logits, next_tokens
from mmlm.language.hf_seq2seq import real_tokens_first

V, D = 50, 32
IDS = {"vocab_size": V, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
GPT2 = {"model_type": "gpt2", "n_embd": D, "n_layer": 2, "n_head": 2, "n_positions": 64, "initializer_range": 0.3,
        **IDS}
T5 = {"model_type": "t5", "vocab_size": V, "d_model": D, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2,
      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "initializer_factor": 3.0}
MBART = {"model_type": "mbart", "d_model": D, "decoder_layers": 2, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
         "max_position_embeddings": 64, "scale_embedding": True, "add_final_layer_norm": True, "init_std": 0.3,
         "forced_eos_token_id": None, **IDS}
SETTINGS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.8), (0.5, 10, 0.9), (2.0, 3, 0.5)]


def reference_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' warpers in the order its ``generate`` builds them for sampling."""
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(warpers)(None, logits.clone())


# ------------------------------------------------------------------------------------- settings


def test_defaults_decode_greedily():
    config = GenerationConfig()
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (False, 1.0, 0, 1.0)
    logits = torch.randn(4, V)
    assert torch.equal(next_tokens(logits, config), logits.argmax(-1))


@pytest.mark.parametrize("kwargs,field", [
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "temperature": -1.0}, "temperature"),
    ({"do_sample": True, "top_p": 0.0}, "top_p"),
    ({"do_sample": True, "top_p": 1.2}, "top_p"),
    ({"do_sample": True, "top_k": -1}, "top_k"),
    ({"do_sample": True, "num_beams": 4}, "num_beams"),
    ({"temperature": 0.7}, "do_sample"),  # would be ignored by greedy search
    ({"top_p": 0.9, "top_k": 5}, "do_sample"),
])
def test_inconsistent_settings_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**kwargs)


# ----------------------------------------------------------------------------- the shared filter


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filter_equals_transformers_warpers(temperature, top_k, top_p):
    logits = 3 * torch.randn(16, V, generator=torch.Generator().manual_seed(top_k))
    ours = filter_logits(logits, temperature, top_k, top_p)
    reference = reference_filter(logits, temperature, top_k, top_p)
    assert torch.equal(ours.isinf(), reference.isinf())
    assert torch.allclose(ours[ours.isfinite()], reference[reference.isfinite()])
    if top_k or top_p < 1.0:
        assert ours.isinf().any()  # the settings above really remove tokens


def test_nucleus_keeps_the_most_likely_token_even_when_it_alone_exceeds_top_p():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    assert filter_logits(logits, top_p=0.1).isfinite().tolist() == [[True, False, False, False]]


def test_draws_follow_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    config = GenerationConfig(do_sample=True, temperature=2.0, top_k=4)
    draws = next_tokens(logits.expand(20000, -1), config)
    frequency = torch.bincount(draws, minlength=6).float() / len(draws)
    expected = torch.zeros(6)
    expected[:4] = (logits[:4] / 2.0).softmax(-1)  # temperature applied, the two least likely removed
    assert torch.allclose(frequency, expected, atol=0.015)


# --------------------------------------------------------------------------------- HF adapters


def embeds_and_mask(batch: int = 3, length: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt embeddings ``[B, T, D]``, the first row left-padded by two."""
    embeds = torch.randn(batch, length, D, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    return embeds, mask


def build_hf(kind: str) -> HFCausalLM | HFSeq2SeqLM | CrossAttentionLM:
    torch.manual_seed(0)
    cls, config = {"gpt2": (HFCausalLM, GPT2), "t5": (HFSeq2SeqLM, T5), "mbart": (CrossAttentionLM, MBART)}[kind]
    return cls(config=config).eval()


def adapter_generate(lm, embeds: torch.Tensor, mask: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """The adapter's ``generate`` (cross-attention: the prompt attends to fixed encoder states)."""
    if isinstance(lm, CrossAttentionLM):
        return lm.generate(embeds, mask, config, encoder_states=encoder_states(embeds))
    return lm.generate(embeds, mask, config)


def encoder_states(embeds: torch.Tensor) -> torch.Tensor:
    return torch.randn(len(embeds), 4, D, generator=torch.Generator().manual_seed(2))


def transformers_generate(lm, embeds: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """transformers' own ``generate`` on the adapter's model, new tokens only."""
    from transformers import DynamicCache, EncoderDecoderCache

    if isinstance(lm, HFSeq2SeqLM):
        embeds, mask = real_tokens_first(embeds, mask)
        return lm.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)[:, 1:]
    if isinstance(lm, CrossAttentionLM):
        kwargs |= {"encoder_hidden_states": encoder_states(embeds),
                   "cache": EncoderDecoderCache(DynamicCache(), DynamicCache())}
    return lm.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("kind", ["gpt2", "t5", "mbart"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.5, 0, 0.9), (0.8, 5, 1.0)])
def test_hf_sampling_equals_transformers_generate(kind, temperature, top_k, top_p):
    lm, (embeds, mask) = build_hf(kind), embeds_and_mask()
    torch.manual_seed(7)
    reference = transformers_generate(lm, embeds, mask, do_sample=True, temperature=temperature, top_k=top_k,
                                      top_p=top_p, max_new_tokens=6, pad_token_id=0)
    # The model's own sampling defaults must not leak into ours (transformers' top_k defaults to 50).
    lm.model.generation_config.update(top_k=2, temperature=0.1, top_p=0.2)
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(7)
    ours = adapter_generate(lm, embeds, mask, config)
    assert torch.equal(ours, reference)
    greedy = adapter_generate(lm, embeds, mask, GenerationConfig(max_new_tokens=6))
    assert not torch.equal(ours, greedy)  # it did sample


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_hf_greedy_is_unchanged(kind):
    lm, (embeds, mask) = build_hf(kind), embeds_and_mask()
    kwargs = lm.generation_kwargs(GenerationConfig(max_new_tokens=6))
    assert kwargs["do_sample"] is False and not {"temperature", "top_k", "top_p"} & set(kwargs)
    reference = transformers_generate(lm, embeds, mask, do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(adapter_generate(lm, embeds, mask, GenerationConfig(max_new_tokens=6)), reference)


# ----------------------------------------------------------------------------------------- Sub-LN


def build_subln(**kwargs) -> SubLNDecoder:
    torch.manual_seed(0)
    return SubLNDecoder(vocab_size=V, width=D, depth=2, num_heads=2, ffn_mult=2, max_positions=64, **kwargs).eval()


def with_fixed_distribution(lm: SubLNDecoder, logits: torch.Tensor) -> SubLNDecoder:
    """Make every position of ``lm`` predict ``logits [V]`` (the stack still runs, its output is replaced)."""
    lm._logits = lambda hidden: logits.to(hidden.dtype).expand(*hidden.shape[:2], -1)
    return lm


def constructed_logits() -> torch.Tensor:
    """Probabilities 0.4, 0.25, 0.15, 0.1 on ids 10..13, the rest (eos included) sharing 0.1."""
    probs = torch.full((V,), 0.1 / (V - 4))
    probs[10:14] = torch.tensor([0.4, 0.25, 0.15, 0.1])
    return probs.log()


@pytest.mark.parametrize("settings,kept", [
    ({"top_k": 4}, {10, 11, 12, 13}),
    ({"top_p": 0.7}, {10, 11, 12}),  # mass before id 12 is 0.65 < 0.7; before id 13 it is 0.8
    ({"top_k": 2, "top_p": 0.99, "temperature": 3.0}, {10, 11}),
])
def test_subln_sampling_never_leaves_the_kept_set(settings, kept):
    lm = with_fixed_distribution(build_subln(), constructed_logits())
    ids = torch.randint(3, V, (64, 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = lm.generate(lm.embed(ids), torch.ones_like(ids), GenerationConfig(max_new_tokens=5, do_sample=True,
                                                                           **settings))
    assert out.shape == (64, 5)
    assert set(out.unique().tolist()) == kept  # only kept ids, and every one of them is drawn


def test_subln_sampling_is_reproducible_under_a_seed():
    lm = build_subln()
    ids = torch.randint(3, V, (8, 4), generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.95)

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return lm.generate(lm.embed(ids), torch.ones_like(ids), config)

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_subln_sampling_with_top_k_1_is_greedy():
    lm = build_subln()
    ids = torch.randint(3, V, (4, 5), generator=torch.Generator().manual_seed(3))
    embeds, mask = lm.embed(ids), torch.ones_like(ids)
    mask[0, :2] = 0
    greedy = lm.generate(embeds, mask, GenerationConfig(max_new_tokens=6, repetition_penalty=1.3))
    sampled = lm.generate(embeds, mask, GenerationConfig(max_new_tokens=6, repetition_penalty=1.3, do_sample=True,
                                                         top_k=1, temperature=0.5))
    assert torch.equal(sampled, greedy)
