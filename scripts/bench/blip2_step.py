"""One BLIP-2 stage-2 training step: mmlm's ``Blip2`` vs ``transformers.Blip2ForConditionalGeneration``.

A small random HF model (configs/tiny/blip2_stage2.yaml's ViT and Q-Former sizes, a 4-layer 128-wide OPT)
is saved and loaded with ``Blip2.from_hf`` (the production converter), so both sides hold the same weights.
Frozen on both sides: the ViT and the LM (``requires_grad=False`` and eval mode, as mmlm keeps them);
trained: query tokens, Q-Former, language projection, with the same plain AdamW. Same batch: mmlm's VQA
batch, and for transformers the same ids with ``M`` image tokens put in front by mmlm's own
``datamodules.pipeline.prefix_sentences`` (so both read ``[soft prompt; prompt; answer]``). A step = forward, backward,
optimizer step, zero grad.

Second and third rows, packed batches: captions whose lengths follow COCO's (a log-normal around a median of 10 words,
a long tail to 48; :func:`coco_like_batch`, random words of the vocabulary after the prompt "a picture of"), and VQA
sentences (:func:`vqa_like_batch`: questions of VQAv2-like lengths, median 6 words, and answers of 1–3 words, the
loss on the answer only), one per row right-padded for transformers, packed first-fit into rows of twice the padded
batch's width for mmlm (``datamodules.pipeline.prefix_sentences.pack_sentences``, what ``ImageTextDataModule(pack_tokens=…)`` does). Real
(non-padding) tokens per second of the whole step; both sides' losses agree first (the packed loss equals the
padded one).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import Scale, alternate, autocast, batches, device, row, step_times
from transformers import Blip2Config, Blip2ForConditionalGeneration

from datamodules.pipeline.prefix_sentences import pack_sentences, to_sentences
from mmlm.batch import SentenceBatch
from mmlm.models import Blip2
from mmlm.sentences import IGNORE_INDEX, Span
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


def sentence_batch(ours: Blip2, images: torch.Tensor, rows: list[tuple[list[int], list[int]]]) -> SentenceBatch:
    """Right-padded sentences ``<image>×M prompt target`` of ``rows`` = ``(prompt ids, target ids)``, the loss on
    the target ids only, over ``images`` (cycled)."""
    tok, placeholder, size = ours.tokenizer, ours.placeholder_ids["image"], len(rows)
    width = max(M + len(prompt) + len(target) for prompt, target in rows)
    ids = torch.full((size, width), tok.pad_token_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for b, (prompt, target) in enumerate(rows):
        start, end = M + len(prompt), M + len(prompt) + len(target)
        ids[b, :end], mask[b, :end] = torch.tensor([placeholder] * M + prompt + target), 1
        labels[b, start:end] = ids[b, start:end]
    positions = (mask.cumsum(1) - 1).clamp(min=0) * mask
    return SentenceBatch(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions, segment_ids=mask,
                         spans=[[Span("image", b, 0, M)] for b in range(size)],
                         images=images[torch.arange(size) % len(images)], num_samples=size)


def log_normal_lengths(size: int, median: float, sigma: float, low: int, high: int,
                       g: torch.Generator) -> list[int]:
    """``size`` word counts, log-normal around ``median`` (``sigma`` in log space), clipped to ``[low, high]``."""
    lengths = (torch.randn(size, generator=g) * sigma + torch.log(torch.tensor(median))).exp().round()
    return [int(n) for n in lengths.clamp(low, high)]


def random_words(tokenizer: Any, count: int, g: torch.Generator) -> list[int]:
    """``count`` random token ids of ``tokenizer``'s vocabulary (past the special ids 0–2, before the last id)."""
    return torch.randint(3, len(tokenizer) - 1, (count,), generator=g).tolist()


def coco_like_batch(ours: Blip2, images: torch.Tensor, size: int, seed: int = 0) -> SentenceBatch:
    """``size`` caption sentences ``<image>×M [bos] a picture of <caption> eos`` with COCO-like caption lengths
    (log-normal, median 10 words, clipped to 5–48) of random words."""
    tok, g = ours.tokenizer, torch.Generator().manual_seed(seed)
    prompt = [tok.bos_token_id] + tok("a picture of", add_special_tokens=False)["input_ids"]
    return sentence_batch(ours, images, [(prompt, random_words(tok, n, g) + [tok.eos_token_id])
                                         for n in log_normal_lengths(size, 10.0, 0.35, 5, 48, g)])


def vqa_like_batch(ours: Blip2, images: torch.Tensor, size: int, seed: int = 0) -> SentenceBatch:
    """``size`` VQA sentences ``<image>×M [bos] Question: <question> Answer: <answer> eos``: questions of VQAv2-like
    lengths (log-normal, median 6 words, clipped to 3–22), answers of 1–3 words (1 most often, as in VQAv2), the
    loss on the answer and eos only."""
    tok, g = ours.tokenizer, torch.Generator().manual_seed(seed)
    question, answer = (tok(text, add_special_tokens=False)["input_ids"] for text in ("Question:", "Answer:"))
    answers = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), size, replacement=True, generator=g) + 1
    return sentence_batch(ours, images, [([tok.bos_token_id] + question + random_words(tok, n, g) + answer,
                                          random_words(tok, int(a), g) + [tok.eos_token_id])
                                         for n, a in zip(log_normal_lengths(size, 6.0, 0.35, 3, 22, g), answers)])


def packed_inputs(ours: Blip2, hf: Blip2ForConditionalGeneration, images: torch.Tensor, scale: Scale,
                  make: Callable[..., SentenceBatch] = coco_like_batch) -> tuple[SentenceBatch, SentenceBatch]:
    """Rows of ``make`` (:func:`coco_like_batch`, :func:`vqa_like_batch`) padded (transformers) and packed (mmlm)
    into rows of twice the padded width; the two losses must agree (call before either side trains)."""
    padded = make(ours, images.cpu(), max(scale.batch_size, 8))
    packed = pack_sentences(padded, 2 * padded.input_ids.shape[1], ours.tokenizer.pad_token_id)
    padded, packed = to_device(padded), to_device(packed)
    ours.eval(), hf.eval()
    with torch.no_grad():
        delta = abs(float(ours.training_loss(packed)) - float(hf(**hf_inputs(padded)).loss))
    if delta > 1e-3:
        raise RuntimeError(f"mmlm packed and transformers padded losses differ by {delta:.2e}")
    return padded, packed


def packed_row(ours: Blip2, hf: Blip2ForConditionalGeneration, padded: SentenceBatch, packed: SentenceBatch,
               scale: Scale, what: str) -> dict[str, Any]:
    """Real tokens/s of mmlm's step on the packed rows vs transformers' on the same sentences padded."""
    set_train(ours, hf)
    inputs = hf_inputs(padded)
    mine = train_steps(lambda: ours.training_loss(packed), trainable(ours))
    theirs = train_steps(lambda: hf(**inputs).loss, trainable(hf))
    seconds = alternate({"mmlm": lambda: step_times(mine, scale.warmup, scale.steps),
                         "reference": lambda: step_times(theirs, scale.warmup, scale.steps)}, scale.repeats)
    real = int(padded.attention_mask.sum())
    padding = 1 - real / padded.attention_mask.numel()
    return row(f"BLIP-2 stage-2 step on {what}, packed ({len(packed)} rows) vs transformers padded "
               f"({len(padded)} rows, {padding:.0%} padding)", real / seconds["mmlm"], real / seconds["reference"],
               "real tokens/s", seconds["reference"] / seconds["mmlm"], ">= 1.3")


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """Three rows: seconds per stage-2 step, mmlm / transformers, on the same batch; real tokens/s on COCO-like
    caption lengths and on VQA-like question and answer lengths, packed vs padded."""
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
    packs = [] if scale.name == "toy" else [
        (what, packed_inputs(ours, hf, batch.images, scale, make))
        for what, make in (("COCO-like captions", coco_like_batch), ("VQA-like questions", vqa_like_batch))]
    set_train(ours, hf)
    mine = train_steps(lambda: ours.training_loss(batch), trainable(ours))
    theirs = train_steps(lambda: hf(**inputs).loss, trainable(hf))
    seconds = alternate({"mmlm": lambda: step_times(mine, scale.warmup, scale.steps),
                         "reference": lambda: step_times(theirs, scale.warmup, scale.steps)}, scale.repeats)
    first = row(f"BLIP-2 stage-2 train step (batch {scale.batch_size})", seconds["mmlm"] * 1e3,
                seconds["reference"] * 1e3, "ms/step", seconds["mmlm"] / seconds["reference"], "<= 1.0")
    return [first] + [packed_row(ours, hf, *pair, scale, what) for what, pair in packs]
