"""One BLIP-2 stage-2 training step: mmlm's ``Blip2`` vs ``transformers.Blip2ForConditionalGeneration``.

A small random HF model (configs/tiny/blip2_stage2.yaml's ViT and Q-Former sizes, a 4-layer 128-wide OPT)
is saved and loaded with ``Blip2.from_hf`` (the production converter), so both sides hold the same weights.
Frozen on both sides: the ViT and the LM (``requires_grad=False`` and eval mode, as mmlm keeps them);
trained: query tokens, Q-Former, language projection, with the same plain AdamW. Same batch: mmlm's VQA
batch, and for transformers the same ids with ``M`` image tokens put in front by mmlm's own
``datamodules.pipeline.prefix_sentences`` (so both read ``[soft prompt; prompt; answer]``). A step = forward, backward,
optimizer step, zero grad.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from common import Scale, alternate, autocast, batches, device, row, step_times
from transformers import Blip2Config, Blip2ForConditionalGeneration

from datamodules.pipeline.prefix_sentences import to_sentences
from mmlm.batch import SentenceBatch
from mmlm.models import Blip2
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

M = 8
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
          "image_size": 64, "patch_size": 8}
QFORMER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
           "encoder_hidden_size": 64, "cross_attention_frequency": 1}
OPT = {"model_type": "opt", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "ffn_dim": 512,
       "vocab_size": 128, "word_embed_proj_dim": 128, "max_position_embeddings": 128, "pad_token_id": 0,
       "bos_token_id": 1, "eos_token_id": 2}


def build_pair(data: Path, out: Path) -> tuple[Blip2, Blip2ForConditionalGeneration]:
    """A random HF BLIP-2 saved under ``out`` (with the shapes tokenizer + ``<image>``) and ``Blip2.from_hf`` of it."""
    tokenizer = load_tokenizer(data / "tokenizer", [IMAGE_TOKEN])
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=M,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ours = Blip2.from_hf(str(out))
    for part in (hf.vision_model, hf.language_model):
        part.requires_grad_(False)
    return ours.to(device()), hf.to(device())


def set_train(ours: Blip2, hf: Blip2ForConditionalGeneration) -> None:
    """Training mode for the trained parts only (mmlm keeps frozen parts in eval; do the same for HF)."""
    ours.train()
    hf.train()
    hf.vision_model.eval()
    hf.language_model.eval()


def hf_inputs(batch: SentenceBatch, prompt: bool = False) -> dict[str, torch.Tensor]:
    """transformers' inputs for the sentence ``batch``: the same tokens, ``M`` image tokens in the soft-prompt slots."""
    if prompt:
        return {"pixel_values": batch.images, "input_ids": batch.prompt_ids, "attention_mask": batch.prompt_mask}
    return {"pixel_values": batch.images, "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "labels": batch.labels}


def sentences(ours: Blip2, batch: Any) -> SentenceBatch:
    """``batch`` as the datamodule gives it to ``ours`` (sentences behind the image span), on :func:`common.device`."""
    return to_device(to_sentences(batch, ours.image_marker, ours.tokenizer))


def to_device(batch: Any) -> Any:
    """The batch's tensors on :func:`common.device`."""
    return batch.to(device())


def train_steps(loss_fn: Any, params: list[torch.nn.Parameter]):
    """Endless training steps of ``loss_fn()`` with AdamW over ``params`` (one ``next`` = one step)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    while True:
        with autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield float(loss.detach())


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters with ``requires_grad``."""
    return [p for p in module.parameters() if p.requires_grad]


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """One row: seconds per stage-2 step, mmlm / transformers."""
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_pair(data, Path(tmp))
        batch = sentences(ours, batches(data, 1, scale.batch_size, 64, tokenizer=tmp)[0])
    inputs = hf_inputs(batch)
    assert {id(p) for p in trainable(ours)} == {id(p) for p in trainable(ours.qformer) + trainable(ours.language_projection)}
    ours.eval(), hf.eval()
    with torch.no_grad():  # same weights, same tokens: the two losses must agree before any timing
        delta = abs(float(ours.training_loss(batch)) - float(hf(**inputs).loss))
    if delta > 1e-3:
        raise RuntimeError(f"mmlm and transformers losses differ by {delta:.2e}: not the same computation")
    set_train(ours, hf)
    mine = train_steps(lambda: ours.training_loss(batch), trainable(ours))
    theirs = train_steps(lambda: hf(**inputs).loss, trainable(hf))
    seconds = alternate({"mmlm": lambda: step_times(mine, scale.warmup, scale.steps),
                         "reference": lambda: step_times(theirs, scale.warmup, scale.steps)}, scale.repeats)
    return [row(f"BLIP-2 stage-2 train step (batch {scale.batch_size})", seconds["mmlm"] * 1e3,
                seconds["reference"] * 1e3, "ms/step", seconds["mmlm"] / seconds["reference"], "<= 1.0")]
