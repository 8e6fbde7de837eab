"""``Blip2.from_hf`` and ``Donut.from_hf`` pass the LM adapter's options (``lora``, ``attn_implementation``,
``quantization``) to the LM they build: with ``lora`` only the adapters train in the LM, the export to transformers
merges them (reloading gives the same logits) and the recorded builder arguments rebuild the model."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    DonutImageProcessor,
    DonutProcessor,
    DonutSwinConfig,
    MBartConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from mmlm.batch import Batch
from mmlm.lora import LoRA
from mmlm.models import Blip2, Donut
from mmlm.piece_tokenizer import train_piece_tokenizer
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

OPT = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
       "vocab_size": 100, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "pad_token_id": 0,
       "bos_token_id": 1, "eos_token_id": 2}
LORA = LoRA(rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture
def blip2_dir(shapes_data, tmp_path):
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                        "encoder_hidden_size": 32, "cross_attention_frequency": 1},
        text_config=OPT, num_query_tokens=2, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path / "blip2")
    tokenizer.save_pretrained(tmp_path / "blip2")
    return tmp_path / "blip2"


def perturb_lora_b(module: torch.nn.Module) -> None:
    """As after training: the LoRA update is not zero."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)


def test_blip2_from_hf_with_lora_trains_adapters_only_and_exports(blip2_dir, shapes_batch, tmp_path):
    model = Blip2.from_hf(str(blip2_dir), lora=LORA, attn_implementation="eager").eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lm = {n for n in trainable if n.startswith("language_model.")}
    assert lm and all(".lora_A." in n or ".lora_B." in n for n in lm)
    assert sum(p.numel() for n, p in model.named_parameters() if n in lm) == 2 * 4 * (4 * 64)  # q, k, v, out
    assert not any(n.startswith("encoder.") for n in trainable)
    assert any(n.startswith("qformer.") for n in trainable) and any(n.startswith("language_projection.")
                                                                    for n in trainable)
    assert model.language_model.model.config._attn_implementation == "eager"

    perturb_lora_b(model)
    batch = shapes_batch(kind="vqa", size=4, image_size=32, model=model)
    with torch.no_grad():
        adapted = model(batch).logits
        model.to_hf(tmp_path / "hf")  # merges a copy: the model keeps its adapters
        assert model.language_model.lora is not None
        torch.testing.assert_close(model(batch).logits, adapted)
        exported = Blip2.from_hf(str(tmp_path / "hf")).eval()
        torch.testing.assert_close(exported(batch).logits, adapted, atol=1e-5, rtol=1e-5)

    recorded = {k: v for k, v in model.hparams.items() if k != "_class_path"}
    assert recorded["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None}
    rebuilt = Blip2.from_hf(**recorded)  # as load_from_checkpoint does, from the recorded (plain) arguments
    assert {n for n, p in rebuilt.named_parameters() if p.requires_grad} == trainable


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_quantization_reaches_the_lm_adapter(blip2_dir):
    with pytest.raises(ValueError, match="quantization='4bit' needs a CUDA GPU"):
        Blip2.from_hf(str(blip2_dir), quantization="4bit", lora=LORA)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes needs a CUDA GPU")
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_blip2_lm_holds_the_checkpoint_weights(blip2_dir, quantization):
    plain = Blip2.from_hf(str(blip2_dir)).eval()
    model = Blip2.from_hf(str(blip2_dir), quantization=quantization, lora=LORA).eval()
    lm = model.language_model
    assert lm.source == str(blip2_dir) and lm.quantization == quantization
    assert all(".lora_" in n for n, p in lm.named_parameters() if p.requires_grad)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        expected = plain.language_model.model(input_ids=ids).logits
        got = lm.model(input_ids=ids.cuda()).logits.float().cpu()
    assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.95


# ------------------------------------------------------------------------------------------------------- Donut

TEXTS = ["Total 12.50 Cash 20.00", "Latte 3.50 Bagel 2.25", "what is the total ?", "Thank you"] * 8


@pytest.fixture
def donut_dir(tmp_path):
    tokenizer = train_piece_tokenizer(TEXTS, vocab_size=80)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<s_cord-v2>"]})
    decoder = MBartConfig(vocab_size=len(tokenizer) + 3, d_model=32, decoder_layers=2, decoder_attention_heads=2,
                          decoder_ffn_dim=64, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                          scale_embedding=True, add_final_layer_norm=True, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2)
    swin = DonutSwinConfig(image_size=[64, 48], patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                           window_size=4)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(swin, decoder)
    config.pad_token_id, config.decoder_start_token_id, config.eos_token_id = 1, 0, 2
    torch.manual_seed(0)
    VisionEncoderDecoderModel(config).save_pretrained(tmp_path / "donut")
    DonutProcessor(image_processor=DonutImageProcessor(size={"height": 64, "width": 48}),
                   tokenizer=tokenizer).save_pretrained(tmp_path / "donut")
    return tmp_path / "donut"


def donut_batch(tokenizer) -> Batch:
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<s_cord-v2>")] + tokenizer("Total 3.50").input_ids[:6]] * 2)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, 0] = -100
    torch.manual_seed(1)
    return Batch(pixels=torch.randn(2, 3, 64, 48), input_ids=ids, attention_mask=mask, labels=labels,
                 prompt_ids=ids[:, :1], prompt_mask=mask[:, :1], tasks=["document"] * 2)


def test_donut_from_hf_with_lora_trains_decoder_adapters_only_and_exports(donut_dir, tmp_path):
    model = Donut.from_hf(str(donut_dir), lora=LORA, attn_implementation="eager").eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {n for n in trainable if n.startswith("decoder.")}
    assert decoder and all(".lora_A." in n or ".lora_B." in n for n in decoder)
    assert any(n.startswith("encoder.") for n in trainable)  # Donut trains its encoder
    assert model.decoder.model.config._attn_implementation == "eager"

    perturb_lora_b(model)
    batch = donut_batch(model.tokenizer)
    with torch.no_grad():
        adapted = model(batch).logits
        model.to_hf(tmp_path / "hf")
        exported = Donut.from_hf(str(tmp_path / "hf")).eval()
        torch.testing.assert_close(exported(batch).logits, adapted, atol=1e-5, rtol=1e-5)
    recorded = {k: v for k, v in model.hparams.items() if k != "_class_path"}
    rebuilt = Donut.from_hf(**recorded)
    assert {n for n, p in rebuilt.named_parameters() if p.requires_grad} == trainable


# --------------------------------------------------------------------------------------- BLIP-2 ViT finetuning


def test_blip2_train_encoder_finetunes_the_vit(blip2_dir, shapes_batch):
    frozen = Blip2.from_hf(str(blip2_dir))
    assert not any(p.requires_grad for p in frozen.encoder.parameters())  # BLIP-2's default: a frozen ViT
    model = Blip2.from_hf(str(blip2_dir), train_encoder=True).train()
    assert model.hparams["train_encoder"] is True
    assert model.encoder.training and not model.encoder.frozen
    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.encoder.named_parameters() if "post_layernorm" not in n}
    batch = shapes_batch(kind="vqa", size=2, image_size=32, model=model)
    model.training_loss(batch).backward()
    assert all(p.grad is not None for n, p in model.encoder.named_parameters() if n in trainable)
