"""BLIP-2 stage 2: parity with transformers' ``Blip2ForConditionalGeneration`` (OPT- and T5-class LMs) through
the production converter, strict import errors, export round trip, per-part freezing and a short fit."""

from __future__ import annotations

import shutil

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

from datamodules.pipeline.prefix_sentences import to_sentences
from mmlm.batch import Batch, SentenceBatch
from mmlm.encoders import HFVisionEncoder
from mmlm.fusion import targets_only
from mmlm.language import GenerationConfig, HFCausalLM
from mmlm.models import Blip2
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

M = 4  # query tokens
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "encoder_hidden_size": 32, "cross_attention_frequency": 1}
OPT = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
       "vocab_size": 100, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "pad_token_id": 0,
       "bos_token_id": 1, "eos_token_id": 2}
T5 = {"model_type": "t5", "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 100,
      "pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0}
LMS = {"opt": OPT, "t5": T5}


@pytest.fixture(params=sorted(LMS))
def hf_checkpoint(request, shapes_data, tmp_path):
    """A random tiny ``Blip2ForConditionalGeneration`` saved with the shapes tokenizer (+ ``<image>``)."""
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=LMS[request.param],
                         num_query_tokens=M, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # the 0.02 init gives near-flat logits: greedy parity would test little
        for param in hf.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.3)
    directory = tmp_path / request.param
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, hf.eval(), tokenizer


def text_batch(model: Blip2, pixels: torch.Tensor | None = None) -> tuple[SentenceBatch, torch.Tensor]:
    """Two examples with equal-length prompts and targets (no padding), as the datamodule gives them to ``model``
    (sentences that start with the image span) + the HF input ids of the prompts."""
    torch.manual_seed(1)
    tokenizer = model.tokenizer
    prompts = tokenizer(["what colour is the circle ?", "how many squares are there ?"],
                        add_special_tokens=False).input_ids
    targets = tokenizer(["red </s>", "two </s>"], add_special_tokens=False).input_ids
    prompt_ids = torch.tensor(prompts)
    input_ids = torch.tensor([p + t for p, t in zip(prompts, targets)])
    labels = input_ids.clone()
    labels[:, :prompt_ids.shape[1]] = -100
    batch = Batch(pixels=torch.randn(2, 3, 32, 32) if pixels is None else pixels, input_ids=input_ids,
                  attention_mask=torch.ones_like(input_ids), labels=labels, prompt_ids=prompt_ids,
                  prompt_mask=torch.ones_like(prompt_ids))
    hf_prompt = torch.cat([torch.full((2, M), model.image_token_id), prompt_ids], dim=1)
    sentences = to_sentences(batch, model.image_marker, tokenizer)
    assert torch.equal(sentences.prompt_ids, hf_prompt)  # the layout transformers' BLIP-2 reads
    return sentences, hf_prompt


def hf_logits(hf, batch: SentenceBatch, hf_prompt: torch.Tensor) -> torch.Tensor:
    """transformers' logits for the layout our model uses (image placeholders first)."""
    if hf.config.use_decoder_only_language_model:
        return hf(pixel_values=batch.images, input_ids=batch.input_ids).logits
    return hf(pixel_values=batch.images, input_ids=hf_prompt, labels=targets_only(batch.labels)).logits


@torch.no_grad()
def test_logits_and_greedy_generation_match_transformers(hf_checkpoint):
    directory, hf, tokenizer = hf_checkpoint
    model = Blip2.from_hf(str(directory)).eval()
    assert model.seq2seq == (not hf.config.use_decoder_only_language_model)
    batch, hf_prompt = text_batch(model)
    ours = model(batch).logits
    expected = hf_logits(hf, batch, hf_prompt)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    print(f"max |Δlogits| {directory.name}: {(ours - expected).abs().max().item():.2e}")
    other_images, _ = text_batch(model, batch.images + 1.0)
    assert (model(other_images).logits - ours).abs().max() > 1e-2  # the soft prompt is really used

    settings = GenerationConfig(max_new_tokens=6, min_new_tokens=6)
    embeds = model.embed(batch.prompt_ids, batch.prompt_spans, batch)
    generated = model.language_model.generate(embeds, batch.prompt_mask, settings)
    theirs = hf.generate(pixel_values=batch.images, input_ids=hf_prompt, max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, num_beams=1)
    theirs = theirs[:, hf_prompt.shape[1]:] if hf.config.use_decoder_only_language_model else theirs[:, 1:]
    assert generated.shape == (2, 6)
    assert torch.equal(generated, theirs)
    assert len(set(generated.flatten().tolist())) > 2  # not a degenerate repeat of one token
    assert len(model.generate_text(batch)) == 2


@torch.no_grad()
def test_to_hf_round_trip_gives_identical_logits(hf_checkpoint, tmp_path):
    directory, hf, _ = hf_checkpoint
    model = Blip2.from_hf(str(directory)).eval()
    model.to_hf(tmp_path / "export")
    reloaded, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.image_token_index == model.image_token_id
    batch, hf_prompt = text_batch(model)
    torch.testing.assert_close(hf_logits(reloaded.eval(), batch, hf_prompt), hf_logits(hf, batch, hf_prompt),
                               rtol=0, atol=0)
    processor = Blip2Processor.from_pretrained(tmp_path / "export")
    assert processor.num_query_tokens == M
    assert processor.image_processor.size["height"] == 32
    again = Blip2.from_hf(str(tmp_path / "export")).eval()
    torch.testing.assert_close(again(batch).logits, model(batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("change", "message"), [
    ("vision_model.encoder.layers.0.extra", r"vision_model\.\*: missing keys \[\], unexpected keys \['encoder\.layers\.0\.extra'\]"),
    ("text_head.weight", r"unexpected keys \['text_head\.weight'\]"),
    ("-language_projection.bias", r"language_projection\.\*: missing keys \['bias'\]"),
])
def test_from_hf_names_stray_and_missing_keys(hf_checkpoint, tmp_path, change, message):
    directory, _, _ = hf_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    state = load_file(broken / "model.safetensors")
    if change.startswith("-"):
        del state[change[1:]]
    else:
        state[change] = torch.zeros(1)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(RuntimeError, match=message):
        Blip2.from_hf(str(broken))


def test_only_qformer_and_projection_train(hf_checkpoint):
    directory, _, _ = hf_checkpoint
    model = Blip2.from_hf(str(directory)).train()
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"qformer", "language_projection"}
    assert not model.encoder.training and not model.language_model.training
    batch, _ = text_batch(model)
    model.training_loss(batch).backward()
    assert model.qformer.query_tokens.grad is not None and torch.isfinite(model.qformer.query_tokens.grad).all()


def test_qformer_stays_fp32_with_a_half_precision_lm(hf_checkpoint):
    directory, _, _ = hf_checkpoint
    model = Blip2.from_hf(str(directory), vision_dtype="bfloat16", lm_dtype="bfloat16")
    assert model.qformer.query_tokens.dtype == torch.float32 and model.language_projection.weight.dtype == torch.float32
    assert model.encoder.dtype == torch.bfloat16 and model.language_model.dtype == torch.bfloat16
    batch, _ = text_batch(model)
    assert model.encode_images(batch.images).dtype == torch.bfloat16
    assert torch.isfinite(model.training_loss(batch))


class RecordLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_fit_overfits_one_batch(shapes_data, shapes_batch, tmp_path, tiny_gpt2):
    """One batch of 8 VQA examples, repeated, through a pl.Trainer: only the Q-Former side learns."""
    torch.manual_seed(0)
    encoder = HFVisionEncoder(model_type="blip_2_vision_model", config=VISION)
    model = Blip2(encoder, HFCausalLM(config=tiny_gpt2), tokenizer=str(shapes_data / "tokenizer"),
                  num_query_tokens=M, qformer={"hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                               "intermediate_size": 64, "dropout": 0.0},
                  lr=3e-3, warmup_steps=0, min_lr_ratio=1.0)
    batch = shapes_batch(size=8, model=model)
    loader = DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    record = RecordLoss()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         max_steps=60, callbacks=[record])
    trainer.fit(model, train_dataloaders=loader)
    assert len(record.losses) == 60 and all(torch.isfinite(torch.tensor(record.losses)))
    assert sum(record.losses[-5:]) / 5 < 0.5 * record.losses[0], [round(x, 2) for x in record.losses]
    assert not any(p.requires_grad for p in [*model.encoder.parameters(), *model.language_model.parameters()])
