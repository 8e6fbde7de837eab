"""NLVR2-style pairs: synthetic statements are true exactly when labelled so, shards round-trip into PairBatch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds

from datamodules.pairs import PairsDataModule, pair_label
from datamodules.pipeline.skips import SkipSample
from datamodules.synthetic.pairs import statement_with_label, write_pairs
from datamodules.synthetic.shapes import Shape, captions_for
from mmlm.batch import PairBatch
from mmlm.tokenizers import load_tokenizer

LEFT = (Shape("red", "circle", 10, 10, 9), Shape("blue", "square", 40, 40, 9))
RIGHT = (Shape("green", "triangle", 20, 20, 9),)


def test_statements_hold_exactly_when_labelled_true():
    rng = np.random.default_rng(0)
    true = {statement_with_label(rng, LEFT, RIGHT, True) for _ in range(200)}
    false = {statement_with_label(rng, LEFT, RIGHT, False) for _ in range(200)}
    assert "the left image has more shapes than the right image." in true
    assert "the left image has fewer shapes than the right image." in false
    assert "both images have the same number of shapes." in false
    assert "the right image contains a triangle." in true and "the right image contains a circle." in false
    assert "the left image contains a red shape." in true and "the left image contains a green shape." in false
    assert not any(s.startswith("both images contain a") for s in true)  # no colour is shared
    assert not true & false


def test_write_pairs_is_balanced_deterministic_and_its_tokenizer_covers_the_shapes_text(tmp_path):
    summary = write_pairs(tmp_path / "a", train=40, val=8, seed=3, shard_size=16)
    write_pairs(tmp_path / "b", train=40, val=8, seed=3, shard_size=16)
    assert summary["splits"]["train"]["shards"] == 3 and summary["splits"]["val"]["shards"] == 8
    assert 12 <= summary["splits"]["train"]["true"] <= 28
    assert (tmp_path / "a/train/pairs-00000.tar").read_bytes() == (tmp_path / "b/train/pairs-00000.tar").read_bytes()
    tokenizer = load_tokenizer(tmp_path / "a" / "tokenizer")
    texts = [json.loads(s["json"])["statement"] for s in wds.WebDataset(str(tmp_path / "a/train/pairs-00000.tar"),
                                                                        shardshuffle=False)]
    texts += captions_for(LEFT) + ["Question: what colour is the circle? Answer: violet"]
    unk = tokenizer.unk_token_id
    assert all(unk not in tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)


def test_pairs_datamodule_batches(tmp_path):
    write_pairs(tmp_path, train=0, val=8, seed=0)
    dm = PairsDataModule(val_urls=str(tmp_path / "val" / "pairs-*.tar"), tokenizer=str(tmp_path / "tokenizer"),
                         image_size=32, batch_size=8)
    (batch,) = list(dm.val_dataloader())
    assert isinstance(batch, PairBatch) and len(batch) == 8
    assert batch.pixels_left.shape == batch.pixels_right.shape == (8, 3, 32, 32)
    assert not (batch.pixels_left - batch.pixels_right).abs().lt(1e-6).all()
    assert set(batch.targets.tolist()) <= {0, 1} and batch.ids[0] == "val-000000000"
    assert batch.input_ids.shape[0] == 8 and (batch.attention_mask.sum(1) > 3).all()


@pytest.mark.parametrize("label, expected", [(True, 1), (False, 0), ("True", 1), ("false", 0)])
def test_labels_accept_nlvr2_strings(label, expected):
    assert pair_label({"label": label}) == expected


@pytest.mark.parametrize("label", [1, "maybe", None])
def test_other_labels_are_skipped(label):
    with pytest.raises(SkipSample, match="bad_label"):
        pair_label({"label": label})


def test_data_tools_write_pairs_and_the_answer_vocabulary(shapes_data, tmp_path, capsys, monkeypatch):
    from mmlm.app.cli import main

    monkeypatch.setattr("sys.argv", ["mmlm"])
    assert main(["data", "synth-pairs", "--out", str(tmp_path / "p"), "--train", "4", "--val", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["pairs"] == 4
    assert (tmp_path / "p" / "tokenizer").is_dir()
    out = tmp_path / "answers.json"
    assert main(["data", "vqa-answers", str(shapes_data / "train" / "vqa-*.tar"), "--out", str(out),
                 "--min-count", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    answers = json.loads(out.read_text())
    assert summary["answers"] == len(answers) and {"yes", "no", "1", "2", "red"} <= set(answers)
    assert "one" not in answers  # number words are normalised to digits
