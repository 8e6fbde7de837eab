"""Instruction-aware queries (BLIP-2's VQA finetuning, InstructBLIP): the prompt, in the Q-Former's tokenizer, joins the
queries. Parity with transformers' ``InstructBlipForConditionalGeneration`` and ``InstructBlipProcessor`` through the
datamodule's collation, InstructBLIP export round trip, the stage-1 text side, and the checks on bad combinations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_blip2 import OPT, QFORMER, VISION  # the tiny BLIP-2 sizes of the parity tests
from transformers import (
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

from datamodules.pipeline.collate import Collator, Example
from datamodules.pipeline.prefix_sentences import to_sentences
from mmlm.batch import SentenceBatch
from mmlm.encoders import HFVisionEncoder
from mmlm.language import GenerationConfig, HFCausalLM
from mmlm.models import Blip2
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

M = 4
PROMPTS = ["what colour is the circle ?", "how many squares are there in the picture ?"]
TARGETS = ["red", "two"]


@pytest.fixture
def instruct_checkpoint(shapes_data, tmp_path):
    """A random tiny OPT InstructBLIP saved with its processor (tokenizer + ``qformer_tokenizer/``)."""
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    qformer_tokenizer = load_tokenizer(shapes_data / "tokenizer")
    config = InstructBlipConfig(vision_config=VISION, qformer_config={**QFORMER, "vocab_size": len(qformer_tokenizer)},
                                text_config=OPT, num_query_tokens=M,
                                image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    hf = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():  # far from the 0.02 init, so that the instruction visibly moves the queries
        for param in hf.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.3)
    directory = tmp_path / "instructblip"
    hf.save_pretrained(directory)
    processor = InstructBlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                                      qformer_tokenizer, num_query_tokens=M)
    processor.save_pretrained(directory)
    return directory, hf.eval(), processor


def collated(model: Blip2, pixels: torch.Tensor, prompts: list[str] = PROMPTS) -> SentenceBatch:
    """VQA examples through the datamodule's collation for ``model`` (its data spec's tokenizers)."""
    spec = model.data_spec()
    examples = [Example(image=image, prompt=p, target=t, references=[t], id=i, task="vqa", key=str(i))
                for i, (image, p, t) in enumerate(zip(pixels, prompts, TARGETS))]
    batch = Collator(spec.tokenizer, 32, instruction_tokenizer=spec.instruction_tokenizer)(examples)
    return to_sentences(batch, model.image_marker, spec.tokenizer)


@torch.no_grad()
def test_logits_generation_and_inputs_match_instructblip(instruct_checkpoint):
    directory, hf, processor = instruct_checkpoint
    model = Blip2.from_hf(str(directory)).eval()
    assert model.qformer.with_text and model.data_spec().instruction_tokenizer is not None
    images = list(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    inputs = processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
    pixels = inputs["pixel_values"]
    batch = collated(model, pixels)
    # the Q-Former reads what InstructBlipProcessor gives transformers' model (prompts of unequal length: padding)
    assert torch.equal(batch.instruction_ids, inputs["qformer_input_ids"])
    assert torch.equal(batch.instruction_mask, inputs["qformer_attention_mask"])
    assert batch.instruction_mask.sum(1).tolist()[0] != batch.instruction_mask.sum(1).tolist()[1]

    ours = model(batch).logits
    theirs = hf(pixel_values=batch.images, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                qformer_input_ids=batch.instruction_ids, qformer_attention_mask=batch.instruction_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    print(f"max |Δlogits| InstructBLIP: {(ours[real] - theirs[real]).abs().max().item():.2e}")

    swapped = collated(model, pixels, prompts=[PROMPTS[1], PROMPTS[0]])
    queries = model.encode_images(batch.images, None, batch.instruction_ids, batch.instruction_mask)
    other = model.encode_images(swapped.images, None, swapped.instruction_ids, swapped.instruction_mask)
    assert (queries - other).abs().max() > 1e-2  # the instruction really changes the soft prompt

    settings = GenerationConfig(max_new_tokens=5, min_new_tokens=5)
    embeds = model.embed(batch.prompt_ids, batch.prompt_spans, batch)
    generated = model.language_model.generate(embeds, batch.prompt_mask, settings)
    expected = hf.generate(pixel_values=batch.images, input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                           qformer_input_ids=batch.instruction_ids, qformer_attention_mask=batch.instruction_mask,
                           max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=1)
    assert torch.equal(generated, expected[:, batch.prompt_ids.shape[1]:])
    assert len(set(generated.flatten().tolist())) > 2


@torch.no_grad()
def test_export_writes_instructblip_and_reloads(instruct_checkpoint, tmp_path):
    directory, hf, _ = instruct_checkpoint
    model = Blip2.from_hf(str(directory)).eval()
    model.to_hf(tmp_path / "export")
    reloaded, info = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "export",
                                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = collated(model, torch.rand(2, 3, 32, 32))
    arguments = dict(pixel_values=batch.images, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     qformer_input_ids=batch.instruction_ids, qformer_attention_mask=batch.instruction_mask)
    torch.testing.assert_close(reloaded.eval()(**arguments).logits, hf(**arguments).logits, rtol=0, atol=0)
    processor = InstructBlipProcessor.from_pretrained(tmp_path / "export")
    assert processor.qformer_tokenizer.get_vocab() == model.qformer_tokenizer.get_vocab()
    again = Blip2.from_hf(str(tmp_path / "export")).eval()
    torch.testing.assert_close(again(batch).logits, model(batch).logits, rtol=0, atol=0)


def test_blip2_checkpoint_takes_its_text_side_from_bert(shapes_data, tmp_path):
    """A queries-only BLIP-2 checkpoint + ``qformer_text_from`` (a BERT of the Q-Former's sizes): the word table and
    text FFNs are BERT's, everything else the checkpoint's; without ``qformer_text_from`` one clear error."""
    from transformers import BertConfig, BertModel, Blip2Config, Blip2ForConditionalGeneration

    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    blip2 = Blip2ForConditionalGeneration(Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT,
                                                      num_query_tokens=M, image_token_index=len(tokenizer) - 1))
    blip2.save_pretrained(tmp_path / "blip2")
    tokenizer.save_pretrained(tmp_path / "blip2")
    bert = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=40))
    bert.save_pretrained(tmp_path / "bert")
    load_tokenizer(shapes_data / "tokenizer").save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="qformer_text_from=<a BERT checkpoint"):
        Blip2.from_hf(str(tmp_path / "blip2"), qformer_text_input=True)
    model = Blip2.from_hf(str(tmp_path / "blip2"), qformer_text_input=True, qformer_text_from=str(tmp_path / "bert"))
    assert model.qformer.with_text and len(model.qformer_tokenizer) == len(load_tokenizer(shapes_data / "tokenizer"))
    torch.testing.assert_close(model.qformer.embeddings.word.weight, bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(model.qformer.layers[1].text_ffn.fc1.weight,
                               bert.encoder.layer[1].intermediate.dense.weight)
    torch.testing.assert_close(model.qformer.layers[1].query_ffn.fc1.weight,
                               blip2.qformer.encoder.layer[1].intermediate_query.dense.weight)
    batch = collated(model, torch.rand(2, 3, 32, 32))
    assert batch.instruction_ids is not None and torch.isfinite(model.training_loss(batch))


def test_bad_combinations_are_named(instruct_checkpoint, shapes_data):
    directory, _, _ = instruct_checkpoint
    with pytest.raises(ValueError, match="InstructBLIP checkpoint.*qformer_text_input=false"):
        Blip2.from_hf(str(directory), qformer_text_input=False)
    encoder = HFVisionEncoder(model_type="blip_2_vision_model", config=VISION)
    lm = HFCausalLM(config={**OPT})
    with pytest.raises(ValueError, match="qformer_text_input=true needs qformer_tokenizer"):
        Blip2(encoder, lm, tokenizer=str(shapes_data / "tokenizer"), num_query_tokens=M, qformer_text_input=True)
    with pytest.raises(ValueError, match="has 52 ids but the Q-Former's word table has 10 rows"):
        Blip2(encoder, lm, tokenizer=str(shapes_data / "tokenizer"), num_query_tokens=M, qformer_text_input=True,
              qformer_tokenizer=str(shapes_data / "tokenizer"), qformer={"hidden_size": 32, "num_heads": 2,
                                                                         "vocab_size": 10})
    model = Blip2.from_hf(str(directory)).eval()
    batch = collated(model, torch.rand(2, 3, 32, 32))
    batch.instruction_ids = batch.instruction_mask = None  # a datamodule that did not read the model's spec
    with pytest.raises(ValueError, match="instruction_ids do not fit qformer_text_input=True"):
        model(batch)


def test_stage1_text_side_is_kept_for_instruction_aware_stage2(shapes_data):
    from mmlm.models.blip2_stage1 import load_stage1_qformer, qformer_state_for_stage2

    qformer = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
               "vocab_size": len(load_tokenizer(shapes_data / "tokenizer")) + 1}
    encoder = HFVisionEncoder(model_type="blip_2_vision_model", config=VISION)
    stage2 = Blip2(encoder, HFCausalLM(config={**OPT}), tokenizer=str(shapes_data / "tokenizer"),
                   num_query_tokens=M, qformer=qformer, qformer_text_input=True,
                   qformer_tokenizer=str(shapes_data / "tokenizer"))
    state = {f"qformer.{k}": torch.randn_like(v) for k, v in stage2.qformer.state_dict().items()}
    assert not any("text_ffn" in k for k in qformer_state_for_stage2(state))  # queries-only by default
    load_stage1_qformer(stage2, state)
    torch.testing.assert_close(stage2.qformer.embeddings.word.weight, state["qformer.embeddings.word.weight"])
    assert torch.isfinite(stage2.training_loss(collated(stage2, torch.rand(2, 3, 32, 32))))
