"""Frozen and the shared ``MultimodalModule`` on tiny parts: freezing, loss, generation, evaluation files,
optimiser groups and schedule, and the text-LM stage's export."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import mmlm.fewshot as fewshot
from datamodules import ImageTextDataModule, Source
from mmlm.connectors import MLP
from mmlm.fusion import splice
from mmlm.language import GenerationConfig, HFCausalLM
from mmlm.losses import causal_lm_loss
from mmlm.models import CausalLMPretraining
from mmlm.models.base import param_groups, warmup_cosine
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer


def tiny_trainer(tmp_path, **kwargs) -> pl.Trainer:
    """A CPU trainer without logger, checkpoints, progress bar or model summary."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=str(tmp_path))
    return pl.Trainer(**{**defaults, **kwargs})


# --------------------------------------------------------------------------------------- freezing


def test_lm_is_frozen_even_when_built_trainable(make_frozen, shapes_batch):
    model = make_frozen(lm_freeze=False)
    model.train()
    lm = model.language_model
    assert lm.frozen
    assert not any(p.requires_grad for p in lm.parameters())
    assert not lm.training and not any(m.training for m in lm.modules())
    assert model.encoder.training and model.connector.training
    trainable = list(model.encoder.parameters()) + list(model.connector.parameters())
    assert all(p.requires_grad for p in trainable)

    model.training_loss(shapes_batch(model=model)).backward()
    for name, param in [*model.encoder.named_parameters(), *model.connector.named_parameters()]:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert all(p.grad is None for p in lm.parameters())


def test_training_loss_falls_when_overfitting_one_batch(make_frozen, shapes_batch):
    """Four VQA examples through the frozen random LM: the answers (and eos) are learnable from the image."""
    model = make_frozen(connector=MLP).train()
    batch = shapes_batch(size=4, model=model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(40):
        loss = model.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------------------- loss


def test_loss_counts_target_tokens_only(frozen, shapes_batch):
    """Prefix slots and prompt tokens are context, not targets: the loss is CE over target + eos only."""
    batch, text = shapes_batch(size=4, model=frozen), shapes_batch(size=4)
    frozen.eval()
    with torch.no_grad():
        prefix = frozen.encode_images(batch.images)
        embeds = splice(frozen.language_model.embed(batch.input_ids), batch.input_ids,
                        frozen.placeholder_ids["image"], prefix)
        logits = frozen.language_model(embeds, batch.attention_mask).logits
        loss = frozen.training_loss(batch)
    k, labels = prefix.shape[1], batch.labels
    assert [s.start for row in batch.spans for s in row] == [0] * len(batch)  # the image span starts each sentence
    assert (labels[:, :k] == -100).all()
    assert torch.equal(labels[:, k:], text.labels)  # right padding: the text follows the prefix
    targets = text.labels != -100
    assert targets.sum() == 2 * len(batch)  # one-word answers + eos
    torch.testing.assert_close(loss, causal_lm_loss(logits, labels))

    # Whatever the LM would predict at prefix and prompt positions does not matter:
    noisy = logits.clone()
    not_target = torch.ones_like(labels, dtype=torch.bool)
    not_target[:, :-1] = labels[:, 1:] == -100  # position t predicts labels[t + 1]
    noisy[not_target] += 10 * torch.randn_like(noisy[not_target])
    torch.testing.assert_close(causal_lm_loss(noisy, labels), loss)

    # …whereas the prompt tokens as labels would change it:
    changed = copy.copy(batch)
    text_positions = (batch.attention_mask == 1) & (torch.arange(labels.shape[1]) >= k)
    changed.labels = batch.input_ids.masked_fill(~text_positions, -100)
    with torch.no_grad():
        assert not torch.isclose(frozen.training_loss(changed), loss)


def test_sentences_equal_the_text_batch_behind_one_image_span(frozen, shapes_batch):
    """The datamodule's sentence = ``<image>×k`` + the text batch's tokens (training: right-padded; prompts:
    left-padded, padding first), with the span at the image's place."""
    batch, text = shapes_batch(size=4, model=frozen), shapes_batch(size=4)
    k, slot = frozen.image_marker.count, frozen.placeholder_ids["image"]
    for i in range(4):
        real = text.attention_mask[i].bool()
        assert batch.input_ids[i][batch.attention_mask[i].bool()].tolist() == [slot] * k + text.input_ids[i][real].tolist()
        prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        assert prompt == [slot] * k + text.prompt_ids[i][text.prompt_mask[i].bool()].tolist()
        (span,) = batch.prompt_spans[i]
        assert span.item == i and span.start == batch.prompt_ids.shape[1] - len(prompt) and span.length == k
    assert torch.equal(batch.images, text.pixels)


# ----------------------------------------------------------------------------------- generation


def test_generate_text_returns_one_string_per_example(make_frozen, shapes_batch):
    model = make_frozen(generation=GenerationConfig(max_new_tokens=3)).eval()
    for kind in ("vqa", "caption"):
        texts = model.generate_text(shapes_batch(kind=kind, size=3, model=model))
        assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
        assert not any(IMAGE_TOKEN in t for t in texts)


def test_few_shot_prompt_holds_two_images_per_query(make_frozen, shapes_batch):
    model = make_frozen(generation=GenerationConfig(max_new_tokens=3)).eval()
    batch = shapes_batch(kind="caption", size=3, model=model, eval_shots=1)  # one sample per image
    k, slot = model.image_marker.count, model.placeholder_ids["image"]
    assert (batch.prompt_ids == slot).sum(1).tolist() == [2 * k] * 3
    assert [[s.item for s in row] for row in batch.prompt_spans] == [[1, 0], [2, 1], [0, 2]]
    texts = model.generate_text(batch)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_few_shot_examples_use_the_training_token_layout(make_frozen, shapes_batch):
    """Support = ``<image>×k`` + the training sequence (bos, prompt, target, eos); query = ``<image>×k`` + the
    zero-shot prompt (bos, prompt), exactly as the LM saw them behind each image during training; the support's
    targets are recorded in ``prompt_labels``."""
    model = make_frozen(generation=GenerationConfig(max_new_tokens=2)).eval()
    batch, text = shapes_batch(kind="caption", size=2, model=model, eval_shots=1), shapes_batch(kind="caption", size=2)
    k, slot = model.image_marker.count, model.placeholder_ids["image"]
    row = batch.prompt_ids[0][batch.prompt_mask[0].bool()].tolist()
    support = text.input_ids[1][text.attention_mask[1].bool()].tolist()
    query = text.prompt_ids[0][text.prompt_mask[0].bool()].tolist()
    assert row == [slot] * k + support + [slot] * k + query
    labels = batch.prompt_labels[0][batch.prompt_mask[0].bool()].tolist()
    assert labels == [-100] * k + text.labels[1][text.attention_mask[1].bool()].tolist() + [-100] * (k + len(query))


def test_few_shot_with_too_few_other_images_warns_and_still_answers(make_frozen, shapes_batch):
    model = make_frozen(generation=GenerationConfig(max_new_tokens=2)).eval()
    with pytest.warns(UserWarning, match="support examples of other images"):
        batch = shapes_batch(size=2, model=model, eval_shots=2)
    assert len(model.generate_text(batch)) == 2


def test_few_shot_support_never_shows_the_query_image():
    pixels = torch.stack([torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.ones(3, 2, 2) * 2])
    assert fewshot.support_examples(pixels, 0, shots=2) == [2, 3]  # 1 shows the same image as 0
    assert fewshot.support_examples(pixels, 2, shots=3) == [3, 0, 1]
    assert fewshot.support_examples(pixels[:2], 0, shots=1) == []


# ---------------------------------------------------------------------------------- evaluation


def test_validate_writes_predictions_in_the_official_formats(make_frozen, shapes_data, tmp_path):
    generation = GenerationConfig(max_new_tokens=3)
    model = make_frozen(generation=generation)
    dm = ImageTextDataModule(val=[Source(str(shapes_data / "val" / "vqa-*.tar"), kind="vqa"),
                                  Source(str(shapes_data / "val" / "captions-*.tar"), kind="caption")],
                             batch_size=4)  # tokenizer and image size come from the model
    metrics = tiny_trainer(tmp_path, limit_val_batches=1).validate(model, datamodule=dm)
    assert 0.0 <= metrics[0]["val/vqa_acc"] <= 1.0
    assert metrics[0]["val/cider"] >= 0.0

    out = tmp_path / "predictions"
    vqa = json.loads((out / "val-vqa-step0.json").read_text())
    captions = json.loads((out / "val-caption-step0.json").read_text())
    assert len(vqa) == 4 and all(set(row) == {"question_id", "answer"} for row in vqa)
    assert len(captions) == 4 and all(set(row) == {"image_id", "caption"} for row in captions)
    assert vqa[0]["question_id"].startswith("val-") and captions[0]["image_id"].startswith("val-")
    for kind in ("vqa", "caption"):
        settings = json.loads((out / f"val-{kind}-step0.generation.json").read_text())
        assert settings["generation"] == asdict(generation) and settings["count"] == 4
    assert json.loads((out / "val-caption-step0.generation.json").read_text())["tokenizer"] in ("ptb", "python")
    accuracy = json.loads((out / "val-vqa-step0.accuracy.json").read_text())  # the official VQAEval.accuracy dict
    assert set(accuracy) == {"overall", "perQuestionType", "perAnswerType"}
    assert abs(accuracy["overall"] - 100 * metrics[0]["val/vqa_acc"]) <= 0.006  # rounded to 2 digits as VQAEval


def test_predict_returns_and_writes_generated_text(make_frozen, shapes_data, tmp_path):
    model = make_frozen(generation=GenerationConfig(max_new_tokens=2))
    dm = ImageTextDataModule(predict=[Source(str(shapes_data / "val" / "vqa-*.tar"), kind="vqa")], batch_size=4)
    outputs = tiny_trainer(tmp_path, limit_predict_batches=2).predict(model, datamodule=dm)
    rows = [row for batch in outputs for row in batch]
    assert len(rows) == 8 and all(row["task"] == "vqa" for row in rows)
    written = json.loads((tmp_path / "predictions" / "predict-vqa-step0.json").read_text())
    assert [w["answer"] for w in written] == [r["prediction"] for r in rows]
    assert [w["question_id"] for w in written] == [r["id"] for r in rows]


def test_skipped_samples_are_logged_during_a_long_epoch(make_frozen, shapes_data, tmp_path):
    import webdataset as wds

    bad = tmp_path / "bad-00000.tar"
    with wds.TarWriter(str(bad)) as writer:
        for i in range(3):
            writer.write({"__key__": f"{i:09d}", "jpg": b"not a jpeg", "txt": b"a red circle"})
        writer.write({"__key__": "000000009", "json": b"{broken"})
    dm = ImageTextDataModule(train=[Source(str(shapes_data / "train" / "captions-*.tar")), Source(str(bad))],
                             batch_size=4, epoch_samples=10_000, resampled=True, shuffle_buffer=4)
    from mmlm.app.reliability import DataReport  # logs the running counts (mmlm fit adds it by default)

    trainer = tiny_trainer(tmp_path, max_steps=4, log_every_n_steps=2, limit_val_batches=0, callbacks=[DataReport()])
    trainer.fit(make_frozen(), datamodule=dm)  # the epoch (10,000 samples) never ends: counts must not wait for it
    logged = {k: v for k, v in trainer.logged_metrics.items() if k.startswith("data/skipped_")}
    assert logged and set(logged) <= {"data/skipped_bad_image", "data/skipped_bad_json"}
    assert float(logged.get("data/skipped_bad_image", 0)) > 0


# ---------------------------------------------------------------------------------- optimisation


def test_param_groups_exempt_norms_biases_and_embeddings():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.linear = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.scale = nn.Parameter(torch.ones(4))
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.tied = nn.Linear(4, 10, bias=False)
            self.tied.weight = self.embed.weight

    toy = Toy()
    decay, no_decay = param_groups(toy, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == ids([toy.linear.weight, toy.conv.weight])
    assert ids(no_decay["params"]) == ids([toy.embed.weight, toy.linear.bias, toy.norm.weight, toy.norm.bias,
                                           toy.bn.weight, toy.bn.bias, toy.scale])
    assert len(no_decay["params"]) == 7  # the tied weight is listed once


def test_param_groups_exempt_vit_position_embeddings_and_cls_token():
    from mmlm.encoders import TimmEncoder

    vit = TimmEncoder("vit_tiny_patch16_224", img_size=32,
                      model_kwargs={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2})
    decay, _ = param_groups(vit, 0.05)
    decayed = {name for name, p in vit.named_parameters() if any(p is q for q in decay["params"])}
    assert not decayed & {"model.pos_embed", "model.cls_token"}, sorted(decayed)


def test_frozen_param_groups_leave_out_the_lm(frozen):
    groups = param_groups(frozen, 0.05)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in frozen.parameters() if p.requires_grad}
    assert not grouped & {id(p) for p in frozen.language_model.parameters()}
    optim = frozen.configure_optimizers()["optimizer"]
    assert isinstance(optim, torch.optim.AdamW) and optim.defaults["betas"] == (0.9, 0.98)


def test_warmup_cosine_values():
    factor = warmup_cosine(warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 3: 0.1 + 0.45 * (1 + math.sqrt(0.5)), 4: 0.55,
                5: 0.1 + 0.45 * (1 - math.sqrt(0.5)), 6: 0.1, 9: 0.1}
    for step, value in expected.items():
        assert factor(step) == pytest.approx(value, abs=1e-12), step
    assert warmup_cosine(0, 4, 0.0)(0) == 1.0


class RecordLR(pl.Callback):
    """The learning rate each optimizer step runs with."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def text_lm(shapes_data, tiny_gpt2, **kwargs) -> CausalLMPretraining:
    torch.manual_seed(0)
    return CausalLMPretraining(HFCausalLM(config=tiny_gpt2), tokenizer=str(shapes_data / "tokenizer"), **kwargs)


def caption_data(shapes_data, **kwargs) -> ImageTextDataModule:
    """The 64 training captions, 16 per batch."""
    source = Source(str(shapes_data / "train" / "captions-*.tar"), kind="caption")
    return ImageTextDataModule(train=[source], image_size=32, batch_size=16, shuffle_buffer=0, **kwargs)


def test_lr_follows_warmup_cosine_through_a_trainer(shapes_data, tmp_path, tiny_gpt2):
    module = text_lm(shapes_data, tiny_gpt2, lr=0.01, warmup_steps=2, min_lr_ratio=0.1)
    record = RecordLR()
    data = caption_data(shapes_data, epoch_samples=64, resampled=True)
    tiny_trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[record]).fit(module, datamodule=data)
    expected = [0.005, 0.01, 0.01, 0.01 * (0.1 + 0.45 * (1 + math.sqrt(0.5))), 0.0055,
                0.01 * (0.1 + 0.45 * (1 - math.sqrt(0.5)))]
    assert record.lrs == pytest.approx(expected, abs=1e-12)


def test_schedule_without_a_known_length_is_refused(shapes_data, tmp_path, tiny_gpt2):
    module = text_lm(shapes_data, tiny_gpt2, lr=0.01, warmup_steps=1)
    record = RecordLR()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[record])
    with pytest.raises(ValueError, match="max_steps"):  # one pass over 4 batches, length unknown up front
        trainer.fit(module, datamodule=caption_data(shapes_data))


# ------------------------------------------------------------------------------ text-LM export


def test_text_lm_stage_exports_a_reloadable_lm(shapes_data, tmp_path, tiny_gpt2):
    export = tmp_path / "export"
    module = text_lm(shapes_data, tiny_gpt2, export_dir=str(export), lr=1e-2, warmup_steps=0)
    before = copy.deepcopy(module.language_model.state_dict())
    dm = ImageTextDataModule(train=[Source(str(shapes_data / "train" / "vqa-*.tar"), kind="vqa")],
                             image_size=32, batch_size=8, epoch_samples=16, resampled=True, shuffle_buffer=16)
    tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule=dm)

    reloaded = HFCausalLM(name_or_path=str(export)).eval()
    trained = module.language_model.eval()
    ids = torch.randint(3, 53, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = trained(trained.embed(ids), mask).logits
        got = reloaded(reloaded.embed(ids), mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items()), "no training happened"
    tokenizer = load_tokenizer(str(export), [IMAGE_TOKEN])
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == module.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert len(tokenizer) == len(module.tokenizer)
