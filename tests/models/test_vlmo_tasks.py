"""VLMO fine-tuning tasks: answer vocabulary and VQA-score targets, VQA classification, NLVR2-style pairs."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.pairs import PairsDataModule
from datamodules.synthetic.pairs import write_pairs
from mmlm.metrics.vqa import vqa_accuracy
from mmlm.models.vlmo_stage3 import VLMOStage3
from mmlm.models.vlmo_tasks import VLMONLVR2, VLMOVQA, build_answer_vocab, load_answers, vqa_soft_targets

MOME = {"img_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "num_heads": 2, "vl_start": 1, "max_text_len": 24}


def test_answer_vocabulary_is_normalised_and_ranked():
    answers = [["Two", "2", "two", "3"], ["yes", "Yes.", "no"], ["a red", "red"]]
    assert build_answer_vocab(answers) == ["2", "yes", "red", "3", "no"]
    assert build_answer_vocab(answers, min_count=2) == ["2", "yes", "red"]
    assert build_answer_vocab(answers, max_size=1) == ["2"]


def test_soft_targets_are_the_official_vqa_scores():
    index = {"red": 0, "blue": 1, "green": 2}
    refs = [["red"] * 8 + ["blue"] * 2, ["blue"] * 3 + ["purple"] * 7]
    targets = vqa_soft_targets(refs, index)
    assert targets[0, 0] == 1.0 and targets[0, 1] == pytest.approx(vqa_accuracy("blue", refs[0]))
    assert 0.5 < targets[0, 1] < 0.7 and targets[0, 2] == 0.0
    assert targets[1, 1] == pytest.approx(0.9) and targets[1].sum() == pytest.approx(0.9)  # purple: not in vocab


def test_answers_load_from_a_json_list(tmp_path):
    (tmp_path / "answers.json").write_text(json.dumps(["yes", "no"]))
    assert load_answers(str(tmp_path / "answers.json")) == ["yes", "no"]
    (tmp_path / "bad.json").write_text(json.dumps({"yes": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        load_answers(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="vqa-answers"):
        load_answers(str(tmp_path / "none.json"))


@pytest.fixture
def vqa_batch(shapes_batch):
    return shapes_batch(kind="vqa", size=12)


def make_vqa(shapes_data, answers, **kwargs) -> VLMOVQA:
    torch.manual_seed(0)
    model = VLMOVQA(tokenizer=str(shapes_data / "tokenizer"), transformer=dict(MOME), answers=answers, **kwargs)
    model.configure_model()
    return model


def test_vqa_classifier_learns_a_fixed_batch_and_answers_from_its_vocabulary(shapes_data, vqa_batch):
    answers = build_answer_vocab(vqa_batch.references)
    model = make_vqa(shapes_data, answers)
    assert model.vqa_head[-1].out_features == len(answers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model.training_loss(vqa_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    predictions = model.generate_text(vqa_batch)
    assert set(predictions) <= set(answers)
    accuracy = sum(vqa_accuracy(p, refs) for p, refs in zip(predictions, vqa_batch.references)) / len(predictions)
    assert accuracy > 0.8


def test_vqa_starts_from_a_stage3_checkpoint_dropping_pretraining_heads(shapes_data, tmp_path):
    torch.manual_seed(0)
    stage3 = VLMOStage3(tokenizer=str(shapes_data / "tokenizer"), transformer=dict(MOME), embed_dim=16)
    torch.save({"state_dict": stage3.state_dict()}, tmp_path / "s3.ckpt")
    model = make_vqa(shapes_data, ["yes", "no"], init_from=str(tmp_path / "s3.ckpt"))
    assert torch.equal(model.transformer.word_embed.weight, stage3.transformer.word_embed.weight)
    assert torch.equal(model.pooler.dense.weight, stage3.pooler.dense.weight)  # the pooler carries over from ITM


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    write_pairs(out, train=0, val=16, seed=0)
    return out


def test_nlvr2_fuses_each_image_with_the_statement(pairs_dir):
    torch.manual_seed(0)
    model = VLMONLVR2(tokenizer=str(pairs_dir / "tokenizer"), transformer=dict(MOME))
    dm = PairsDataModule(val_urls=str(pairs_dir / "val" / "pairs-*.tar"), tokenizer=str(pairs_dir / "tokenizer"),
                         image_size=32, batch_size=16)
    batch = next(iter(dm.val_dataloader()))
    logits = model.logits(batch)
    assert logits.shape == (16, 2)
    swapped = type(batch)(batch.pixels_right, batch.pixels_left, batch.input_ids, batch.attention_mask, batch.targets)
    assert not torch.allclose(model.logits(swapped), logits)  # left and right are not interchangeable
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):  # a plateau near log 2 for ~40 steps, then the 16 pairs are memorised
        loss = model.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
