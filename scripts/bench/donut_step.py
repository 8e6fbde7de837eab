"""One Donut training step: mmlm's ``Donut`` vs a plain ``transformers.VisionEncoderDecoderModel`` loop.

A random HF Donut (DonutSwin + MBart decoder, sizes per scale below) is saved and loaded with ``Donut.from_hf``
(the production converter), so both sides hold the same weights. Same batch: mmlm's shapes VQA batch (prompt +
answer + eos, right-padded, ``labels`` without the prompt), which has Donut's token layout (task prompt + target);
transformers reads the same ``decoder_input_ids``/``decoder_attention_mask`` and the loop computes the next-token
cross-entropy on the same labels. Everything trains, with the same plain AdamW; a step = forward, backward,
optimizer step, zero grad; bf16 autocast on CUDA (:func:`common.autocast`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from blip2_step import to_device, train_steps
from common import Scale, alternate, batches, device, row, step_times
from transformers import DonutSwinConfig, MBartConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

from mmlm.models import Donut
from mmlm.tokenizers import load_tokenizer

# (image side, DonutSwin config, MBart decoder config) per scale; the decoder width equals the encoder's.
SMALL = (32, {"patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4},
         {"d_model": 32, "decoder_layers": 2, "decoder_attention_heads": 2, "decoder_ffn_dim": 64})
MEDIUM = (128, {"patch_size": 4, "embed_dim": 32, "depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_size": 8},
          {"d_model": 128, "decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 512})
LARGE = (384, {"patch_size": 4, "embed_dim": 64, "depths": [2, 2, 6, 2], "num_heads": [2, 4, 8, 16],
               "window_size": 12}, {"d_model": 512, "decoder_layers": 4, "decoder_attention_heads": 8,
                                    "decoder_ffn_dim": 2048})


def sizes(scale: Scale) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Toy: tiny; quick/full: medium on CPU, a DonutSwin-B-like stack at 384 px on CUDA."""
    if scale.name == "toy":
        return SMALL
    return LARGE if torch.cuda.is_available() else MEDIUM


def build_pair(data: Path, out: Path, scale: Scale) -> tuple[Donut, VisionEncoderDecoderModel, int]:
    """A random HF Donut saved under ``out`` (with the shapes tokenizer) and ``Donut.from_hf`` of it; the image side."""
    side, swin, decoder = sizes(scale)
    tokenizer = load_tokenizer(data / "tokenizer")
    dec = MBartConfig(vocab_size=len(tokenizer), max_position_embeddings=128, is_decoder=True,
                      add_cross_attention=True, scale_embedding=True, add_final_layer_norm=True,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, **decoder)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(DonutSwinConfig(image_size=[side, side], **swin),
                                                                     dec)
    config.pad_token_id, config.decoder_start_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    torch.manual_seed(0)
    hf = VisionEncoderDecoderModel(config)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Donut.from_hf(str(out)).to(device()), hf.to(device()), side


def reference_loss(hf: VisionEncoderDecoderModel, batch: Any) -> torch.Tensor:
    """The plain loop's loss: teacher-forced logits, next-token cross-entropy on ``labels`` (``-100`` ignored)."""
    logits = hf(pixel_values=batch.pixels, decoder_input_ids=batch.input_ids,
                decoder_attention_mask=batch.attention_mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(), ignore_index=-100)


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """One row: seconds per Donut training step, mmlm / transformers."""
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, side = build_pair(data, Path(tmp), scale)
        batch = to_device(batches(data, 1, scale.batch_size, side, tokenizer=tmp)[0])
    ours.eval(), hf.eval()
    with torch.no_grad():  # same weights, same tokens: the two losses must agree before any timing
        delta = abs(float(ours.training_loss(batch)) - float(reference_loss(hf, batch)))
    if delta > 1e-3:
        raise RuntimeError(f"mmlm and transformers losses differ by {delta:.2e}: not the same computation")
    ours.train(), hf.train()
    mine = train_steps(lambda: ours.training_loss(batch), list(ours.parameters()))
    theirs = train_steps(lambda: reference_loss(hf, batch), list(hf.parameters()))
    seconds = alternate({"mmlm": lambda: step_times(mine, scale.warmup, scale.steps),
                         "reference": lambda: step_times(theirs, scale.warmup, scale.steps)}, scale.repeats)
    return [row(f"Donut train step ({side}px, batch {scale.batch_size})", seconds["mmlm"] * 1e3,
                seconds["reference"] * 1e3, "ms/step", seconds["mmlm"] / seconds["reference"], "<= 1.0")]
