"""Each VLMO stage and task trains exactly what its loss reaches (the contract DDP without ``find_unused_parameters``
relies on): after one ``training_loss`` backward on a tiny batch every parameter with ``requires_grad`` has a
gradient; the others are frozen, left out of the optimizer and still in the state dict (checkpoints keep every key).
"""

from __future__ import annotations

import pytest
import torch

from mmlm.batch import PairBatch
from mmlm.models.base import param_groups
from mmlm.models.vlmo import VLMOStage1, VLMOStage2
from mmlm.models.vlmo_stage3 import VLMOStage3
from mmlm.models.vlmo_tasks import VLMONLVR2, VLMOVQA, build_answer_vocab

MOME = {"img_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "num_heads": 2, "max_text_len": 24}
#: case → (class, arguments, batch kind)
CASES = {
    "stage1": (VLMOStage1, {}, "caption"),
    "stage2": (VLMOStage2, {"mlm_prob": 0.3}, "caption"),
    "stage3": (VLMOStage3, {"embed_dim": 16}, "caption"),
    "stage3_itc_only": (VLMOStage3, {"embed_dim": 16, "itm_weight": 0.0, "mlm_weight": 0.0}, "caption"),
    "stage3_no_itm": (VLMOStage3, {"embed_dim": 16, "itm_weight": 0.0}, "caption"),
    "stage3_no_mlm": (VLMOStage3, {"embed_dim": 16, "mlm_weight": 0.0}, "caption"),
    # retrieval fine-tuning (unilm's compute_irtr): expert ITC only
    "retrieval": (VLMOStage3, {"embed_dim": 16, "itm_weight": 0.0, "mlm_weight": 0.0, "itc_vl": False}, "caption"),
    "vqa": (VLMOVQA, {}, "vqa"),
    "nlvr2": (VLMONLVR2, {}, "pairs"),
}


@pytest.fixture(scope="module")
def batches(shapes_data):
    """A caption, a VQA and a pairs batch of 8 examples at 32 px (the pairs: each image with a shuffled other)."""
    from datamodules import ImageTextDataModule, Source

    def load(kind: str):
        prefix = "vqa" if kind == "vqa" else "captions"
        dm = ImageTextDataModule(val=[Source(str(shapes_data / "val" / f"{prefix}-*.tar"), kind=kind)],
                                 tokenizer=str(shapes_data / "tokenizer"), image_size=32, batch_size=8)
        dm.setup("validate")
        return next(iter(dm.val_dataloader()))

    captions = load("caption")
    pairs = PairBatch(captions.pixels, captions.pixels.roll(1, 0), captions.input_ids, captions.attention_mask,
                      torch.arange(len(captions)) % 2)
    return {"caption": captions, "vqa": load("vqa"), "pairs": pairs}


def build(shapes_data, batches, case: str, vl_start: int):
    cls, kwargs, kind = CASES[case]
    if cls is VLMOVQA:
        kwargs = {**kwargs, "answers": build_answer_vocab(batches["vqa"].references)}
    torch.manual_seed(0)
    if cls is VLMOStage3 and vl_start == MOME["depth"]:
        kwargs = {**kwargs, "itc_vl": False}  # the VL-FFN contrastive term needs a VL-FFN
    model = cls(tokenizer=str(shapes_data / "tokenizer"), transformer={**MOME, "vl_start": vl_start}, **kwargs)
    model.configure_model()
    return model, batches[kind]


@pytest.mark.parametrize("vl_start", [0, 1, 2], ids=["all_vl", "top_vl", "no_vl"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_trainable_parameter_gets_a_gradient(shapes_data, batches, case, vl_start):
    model, batch = build(shapes_data, batches, case, vl_start)
    torch.manual_seed(0)
    model.training_loss(batch).backward()
    named = dict(model.named_parameters())
    no_grad = [n for n, p in named.items() if p.requires_grad and p.grad is None]
    assert no_grad == [], f"{case}: trainable but unused by the loss: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in named.values() if p.grad is not None)
    trainable = {id(p) for p in named.values() if p.requires_grad}
    in_optimizer = [id(p) for group in param_groups(model, 0.01) for p in group["params"]]
    assert sorted(in_optimizer) == sorted(trainable)
    assert set(model.unused_parameters) <= set(model.state_dict())
    assert not any(named[n].requires_grad for n in model.unused_parameters)


def part(name: str) -> str:
    """``transformer.blocks.1.experts.v.mlp.fc1.weight`` → ``transformer.blocks.1.experts.v``;
    ``itm_head.0.bias`` → ``itm_head.0``; ``transformer.cls_token`` stays."""
    if ".experts." in name:
        return ".".join(name.split(".")[:5])
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def unused(shapes_data, batches, case: str, vl_start: int = 1) -> set[str]:
    """The parts (:func:`part`) whose parameters a case leaves idle (2 blocks, VL-FFN in block 1)."""
    model, _ = build(shapes_data, batches, case, vl_start)
    return {part(n) for n in model.unused_parameters}


def test_what_each_stage_leaves_idle(shapes_data, batches):
    """Stage 1 (image only, masked patches): the text side and VL-FFNs; stage 2 (text only): the image side and
    VL-FFNs (also frozen by its ``FROZEN`` with attention); stage 3: only the mask token, unless ITC alone runs;
    fusion-only tasks: the V/L-FFNs of the blocks that route every token to the VL-FFN (block 1 of 2 here)."""
    blocks = {f"transformer.blocks.{i}.experts.{e}" for i in (0, 1) for e in ("v", "l")}
    assert unused(shapes_data, batches, "stage1") == {
        "transformer.word_embed", "transformer.text_pos_embed", "transformer.blocks.1.experts.vl",
        *(b for b in blocks if b.endswith(".l"))}
    assert unused(shapes_data, batches, "stage2") == {
        "transformer.patch_embed.proj", "transformer.cls_token", "transformer.pos_embed", "transformer.mask_token",
        "transformer.blocks.1.experts.vl", *(b for b in blocks if b.endswith(".v"))}
    assert unused(shapes_data, batches, "stage3") == {"transformer.mask_token"}
    # ITC alone still reaches the VL-FFNs through its VL-FFN term (itc_vl); without it they idle too
    assert unused(shapes_data, batches, "stage3_itc_only") == {
        "transformer.mask_token", "itm_head", "pooler.dense", "mlm_head.dense", "mlm_head.norm", "mlm_head"}
    assert unused(shapes_data, batches, "retrieval") == {
        "transformer.mask_token", "transformer.blocks.1.experts.vl", "itm_head", "pooler.dense", "mlm_head.dense",
        "mlm_head.norm", "mlm_head"}
    for task in ("vqa", "nlvr2"):
        assert unused(shapes_data, batches, task) == {
            "transformer.mask_token", "transformer.blocks.1.experts.v", "transformer.blocks.1.experts.l"}


def test_user_freezing_is_kept_apart_from_the_idle_parameters(shapes_data, batches):
    """``frozen`` lists only what the config froze; idle parameters stay frozen even with ``frozen: []``."""
    model, batch = build(shapes_data, batches, "stage2", 1)
    assert model.frozen_parameters and "transformer.mask_token" in model.unused_parameters
    torch.manual_seed(0)
    everything = VLMOStage2(tokenizer=str(shapes_data / "tokenizer"), transformer={**MOME, "vl_start": 1}, frozen=[])
    everything.configure_model()
    assert everything.frozen_parameters == []
    assert not everything.transformer.patch_embed.proj.weight.requires_grad
    assert everything.transformer.blocks[0].attn.qkv.weight.requires_grad  # text-only passes use attention
    everything.training_loss(batch).backward()
    assert all(p.grad is not None for p in everything.parameters() if p.requires_grad)
