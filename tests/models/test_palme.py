"""PaLM-E: span counts from the connectors, count-checked splicing, spans that steer the LM, frozen or
finetuned LM, a learnable toy task, and evaluation with VQA and plan metrics through Lightning."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import pytorch_lightning as pl
import torch

from datamodules.embodied import EmbodiedDataModule
from datamodules.synthetic.tabletop import OBJECT_DIM, STATE_DIM, write_tabletop
from mmlm.connectors import LinearPrefix
from mmlm.connectors.state import StateTokens
from mmlm.encoders import TimmEncoder
from mmlm.language import HFCausalLM
from mmlm.models.palme import PaLME

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 160, "vocab_size": 64,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.3}
RESNET = {"channels": [8, 16, 16, 16], "stem_width": 8, "output_stride": 16}


@pytest.fixture(scope="module")
def tabletop(tmp_path_factory):
    out = tmp_path_factory.mktemp("tabletop")
    write_tabletop(out, train=32, val=16, seed=0, shard_size=16, progress=False)
    return out


def make_palme(data, freeze_lm: bool = True, **kwargs) -> PaLME:
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet10t", img_size=32, model_kwargs=RESNET)  # 2 x 2 = 4 image tokens
    return PaLME(encoder, HFCausalLM(config=GPT2, freeze=freeze_lm), str(data / "tokenizer"), STATE_DIM, OBJECT_DIM,
                 **kwargs)


def make_data(data, model: PaLME, **kwargs) -> EmbodiedDataModule:
    dm = EmbodiedDataModule(train_urls=str(data / "train" / "tabletop-*.tar"),
                            val_urls=str(data / "val" / "tabletop-*.tar"), tokenizer=str(data / "tokenizer"),
                            markers=model.markers, image_size=32, state_dim=STATE_DIM, object_dim=OBJECT_DIM,
                            batch_size=16, num_workers=0, **kwargs)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def model_and_batch(tabletop):
    model = make_palme(tabletop).eval()
    return model, next(iter(make_data(tabletop, model).val_dataloader()))


def test_span_lengths_come_from_the_connectors(tabletop):
    model = make_palme(tabletop, image_connector=lambda i, o: LinearPrefix(i, o, num_tokens=3),
                       state_connector=lambda i, o: StateTokens(i, o, num_tokens=5))
    counts = {m.modality: m.count for m in model.markers}
    assert counts == {"image": 3, "state": 5, "object": 1}
    assert [m.text for m in model.markers] == ["<img{}>", "<state>", "<obj{}>"]
    default = make_palme(tabletop)
    assert {m.modality: m.count for m in default.markers}["image"] == default.encoder.num_tokens == 4
    assert len(set(default.placeholder_ids.values())) == 3


def test_missing_or_extra_items_fail_the_count_check(model_and_batch):
    model, batch = model_and_batch
    objects = batch.modalities["object"]
    with pytest.raises(ValueError, match="does not fit 'object'"):
        model.training_loss(replace(batch, modalities={**batch.modalities, "object": objects[:-1]}))
    spans = [list(row) for row in batch.spans]
    row = next(i for i, r in enumerate(spans) if any(s.modality == "state" for s in r))
    spans[row] = [s for s in spans[row] if s.modality != "state"]  # a span dropped, its placeholders left
    with pytest.raises(ValueError, match="placeholder"):
        model.training_loss(replace(batch, spans=spans))


def logits(model: PaLME, batch) -> torch.Tensor:
    embeds = model.sentence_embeddings(batch.input_ids, batch.spans, model.modality_embeddings(batch))
    return model.language_model(embeds, batch.attention_mask).logits


@pytest.mark.parametrize("modality", ["image", "state", "object"])
def test_each_modality_changes_the_output_after_its_spans_only(model_and_batch, modality):
    model, batch = model_and_batch
    inputs = batch.inputs()
    changed = inputs[modality] + 1.0
    other = replace(batch, images=changed) if modality == "image" else \
        replace(batch, modalities={**batch.modalities, modality: changed})
    with torch.no_grad():
        before, after = logits(model, batch), logits(model, other)
    for row, spans in enumerate(batch.spans):
        starts = [s.start for s in spans if s.modality == modality]
        if not starts:
            torch.testing.assert_close(before[row], after[row])
            continue
        first = min(starts)
        torch.testing.assert_close(before[row, :first], after[row, :first])  # causal: nothing before the span
        last = int(batch.attention_mask[row].sum()) - 1
        assert not torch.allclose(before[row, last], after[row, last])


def test_frozen_lm_gets_no_gradients_and_finetuned_lm_does(tabletop, model_and_batch):
    _, batch = model_and_batch
    for freeze in (True, False):
        model = make_palme(tabletop, freeze_lm=freeze).train()
        model.training_loss(batch).backward()
        lm_grads = [p.grad for p in model.language_model.parameters()]
        assert all(g is None for g in lm_grads) if freeze else any(g is not None for g in lm_grads)
        assert model.language_model.training is not freeze
        for part in (model.encoder, model.image_connector, model.state_connector, model.object_connector):
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters())


def test_training_fits_a_fixed_batch(tabletop, model_and_batch):
    _, batch = model_and_batch
    model = make_palme(tabletop, freeze_lm=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_validation_logs_vqa_and_plan_metrics_and_writes_predictions(tabletop, tmp_path):
    model = make_palme(tabletop, predictions_dir=str(tmp_path))
    model.generation = replace(model.generation, max_new_tokens=6)
    dm = make_data(tabletop, model)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         limit_val_batches=1, enable_model_summary=False)
    (metrics,) = trainer.validate(model, datamodule=dm)
    assert {"val/loss", "val/vqa_acc", "val/plan_exact", "val/plan_step_acc"} <= set(metrics)
    plans = json.loads((tmp_path / "predictions" / "val-plan-step0.json").read_text())
    answers = json.loads((tmp_path / "predictions" / "val-vqa-step0.json").read_text())
    assert len(plans) + len(answers) == 16 and plans and answers
    assert plans[0]["reference"].startswith("1. pick") and isinstance(plans[0]["plan"], str)
    assert set(answers[0]) == {"question_id", "answer"}


def test_vit_tokens_fill_image_spans_through_an_affine_projection(tabletop):
    """PaLM-E's image path: every ViT token (cls + patches) → one affine-projected embedding in the <imgK> span."""
    from mmlm.connectors import MLP

    torch.manual_seed(0)
    vit = TimmEncoder("vit_tiny_patch16_224", img_size=32, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    model = PaLME(vit, HFCausalLM(config=GPT2, freeze=True), str(tabletop / "tokenizer"), STATE_DIM, OBJECT_DIM,
                  image_connector=lambda i, o: MLP(i, o, num_layers=1))
    assert {m.modality: m.count for m in model.markers}["image"] == vit.num_tokens == 5
    batch = next(iter(make_data(tabletop, model).val_dataloader()))
    embeds = model.modality_embeddings(batch)
    assert embeds["image"].shape == (batch.images.shape[0], 5, GPT2["n_embd"])
    filled = model.sentence_embeddings(batch.input_ids, batch.spans, embeds)
    span = next(s for s in batch.spans[0] if s.modality == "image")
    torch.testing.assert_close(filled[0, span.start:span.start + 5], embeds["image"][span.item])
    assert torch.isfinite(model.training_loss(batch))


def test_packed_training_batches_give_the_padded_loss(tabletop):
    """``EmbodiedDataModule(pack=True)``: the same training sentences several to a row (images, states and objects
    keep their items), the loss equal to the padded batch's."""
    model = make_palme(tabletop).eval()
    padded = next(iter(make_data(tabletop, model, shuffle_buffer=0).train_dataloader()))
    packed = next(iter(make_data(tabletop, model, shuffle_buffer=0, pack=True).train_dataloader()))
    assert packed.packed and len(packed) < len(padded) and packed.num_samples == padded.num_samples
    torch.testing.assert_close(model.training_loss(packed), model.training_loss(padded), rtol=1e-5, atol=1e-5)
    assert not next(iter(make_data(tabletop, model, pack=True).val_dataloader())).packed
