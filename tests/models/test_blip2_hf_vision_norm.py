"""BLIP-2 import/export: transformers' ``vision_model.post_layernorm`` (LAVIS's ``ln_vision``) becomes the Q-Former's
trainable ``vision_norm``, the encoder returns the tokens before it, and export writes it back."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

from mmlm.models import Blip2
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "encoder_hidden_size": 32, "cross_attention_frequency": 1}
OPT = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
       "vocab_size": 100, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "pad_token_id": 0,
       "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture
def checkpoint(shapes_data, tmp_path):
    """A random tiny OPT BLIP-2 whose post_layernorm is far from the identity."""
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=4,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", hf


@torch.no_grad()
def test_post_layernorm_becomes_the_trainable_vision_norm_and_queries_match(checkpoint):
    directory, hf = checkpoint
    model = Blip2.from_hf(str(directory)).eval()
    norm, post = model.qformer.vision_norm, hf.vision_model.post_layernorm
    assert norm is not None and norm.eps == post.eps == 1e-6
    assert torch.equal(norm.weight, post.weight) and torch.equal(norm.bias, post.bias)
    assert all(p.requires_grad for p in norm.parameters())
    assert model.encoder.layer == VISION["num_hidden_layers"]
    pixels = torch.randn(2, 3, 32, 32)
    image = hf.vision_model(pixel_values=pixels).last_hidden_state
    expected = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
    torch.testing.assert_close(model.qformer(model.encoder(pixels)).query, expected, rtol=1e-5, atol=1e-5)


def test_vision_norm_trains_and_is_exported_as_post_layernorm(checkpoint, tmp_path):
    directory, _ = checkpoint
    model = Blip2.from_hf(str(directory))
    with torch.no_grad():
        model.qformer.vision_norm.weight.add_(0.5)  # as if trained
    model.to_hf(tmp_path / "export")
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert torch.equal(reloaded.vision_model.post_layernorm.weight, model.qformer.vision_norm.weight)
    again = Blip2.from_hf(str(tmp_path / "export"))
    assert torch.equal(again.qformer.vision_norm.weight, model.qformer.vision_norm.weight)


def test_export_refuses_a_second_norm_after_post_layernorm(checkpoint, tmp_path):
    directory, _ = checkpoint
    model = Blip2.from_hf(str(directory))
    model.encoder.layer = -1  # last_hidden_state is already normalised: vision_norm would be a second norm
    with pytest.raises(TypeError, match="layer 2 .before post_layernorm"):
        model.to_hf(tmp_path / "export")
