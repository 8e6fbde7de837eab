"""The synthetic tabletop: valid scenes, renderings that match the state, correct answers and plans, shards."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import webdataset as wds

from datamodules.synthetic import tabletop as tt
from mmlm.metrics.plans import parse_plan
from mmlm.metrics.vqa import vqa_accuracy
from mmlm.tokenizers import load_tokenizer


def scenes(n: int = 300):
    return [tt.sample_scene(tt.sample_rng(0, "train", i)) for i in range(n)]


def supported(scene) -> bool:
    """Every block stands on the table or on exactly one block; colours distinct; ≤ 3 high."""
    cells = {(b.column, b.level) for b in scene}
    return (len(cells) == len(scene) == len({b.colour for b in scene})
            and all(b.level == 0 or (b.column, b.level - 1) in cells for b in scene)
            and all(b.level < tt.MAX_HEIGHT for b in scene))


def test_scenes_are_physical_and_often_stacked():
    drawn = scenes()
    assert all(supported(s) and 3 <= len(s) <= 4 for s in drawn)
    assert sum(any(b.level > 0 for b in s) for s in drawn) > 0.7 * len(drawn)


def test_rendering_shows_each_block_at_its_state():
    scene = scenes(1)[0]
    pixels = np.asarray(tt.draw_scene(scene))
    pitch = tt.IMAGE_SIZE // tt.COLUMNS
    for b in scene:
        x, y = b.column * pitch + pitch // 2, tt.TABLE_TOP - 1 - b.level * tt.BLOCK - tt.BLOCK // 2
        assert tuple(pixels[y, x]) == tt.COLOURS[b.colour]
    assert tuple(pixels[tt.TABLE_TOP - 1 - 3 * tt.BLOCK - 2, 2]) == tt.BACKGROUND


def test_state_vectors_encode_colour_column_and_level():
    block = tt.Block("blue", 3, 1)
    vec = tt.object_vector(block)
    assert len(vec) == tt.OBJECT_DIM and vec[:2] == [1.0, 0.5] and vec[2 + list(tt.COLOURS).index("blue")] == 1.0
    state = tt.state_vector((block,))
    assert len(state) == tt.STATE_DIM and sum(state) == 2.5
    assert state[3 * list(tt.COLOURS).index("blue"):][:3] == [1.0, 1.0, 0.5]


def execute(scene, steps: list[str]):
    """An independent simulator: apply ``pick X block`` / ``place on …`` steps, asserting each is legal."""
    cells = {(b.column, b.level): b.colour for b in scene}
    where = {c: cell for cell, c in cells.items()}
    held = None
    for step in steps:
        words = step.split()
        if words[0] == "pick":
            column, level = where[words[1]]
            assert held is None and (column, level + 1) not in cells, f"{step}: not clear"
            held = cells.pop((column, level))
            continue
        assert held is not None, f"{step}: nothing held"
        if words[-1] == "table":
            column = next(c for c in range(tt.COLUMNS) if (c, 0) not in cells)
            cell = (column, 0)
        else:
            column, level = where[words[2]]
            assert (column, level + 1) not in cells, f"{step}: target not clear"
            cell = (column, level + 1)
        cells[cell], where[held], held = held, cell, None
    return where


def test_plans_are_legal_and_reach_the_goal():
    lengths = set()
    for i, scene in enumerate(scenes(200)):
        a, b = tt._goal(scene, tt.sample_rng(1, "train", i))
        steps, final = tt.plan(scene, a, b)
        where = execute(scene, steps)
        assert where[a] == (where[b][0], where[b][1] + 1)
        assert {x.colour: (x.column, x.level) for x in final} == where
        assert parse_plan(tt.format_plan(steps)) == steps
        lengths.add(len(steps))
    assert lengths == {2, 4, 6}


def test_questions_match_the_scene():
    scene = (tt.Block("red", 0, 0), tt.Block("blue", 0, 1), tt.Block("yellow", 2, 0))
    rng = np.random.default_rng(0)
    answers = {}
    for _ in range(60):
        for make in tt.QUESTION_MAKERS.values():
            question, answer = make(scene, rng)
            answers[question] = answer
    assert answers["what colour is the block on the red block?"] == "blue"
    assert answers["what colour is the block on the blue block?"] == tt.NOTHING
    assert answers["what colour is the block under the blue block?"] == "red"
    assert answers["what colour is the block under the red block?"] == "table"
    assert answers["is the blue block on the red block?"] == "yes"
    assert answers["is the red block on the blue block?"] == "no"
    assert answers["how many blocks are on the table?"] == "2"
    assert answers["what colour is the block left of the yellow block?"] == "red"
    assert answers["what colour is the block left of the red block?"] == tt.NOTHING


def test_moved_samples_differ_by_one_legal_move():
    rng = np.random.default_rng(0)
    for scene in scenes(100):
        after, colour = tt.random_move(scene, rng)
        assert supported(after)
        changed = [b.colour for b in scene if tt.find(after, b.colour) != b]
        assert changed == [colour]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("tabletop")
    return out, tt.write_tabletop(out, train=60, val=16, seed=0, shard_size=25, progress=False)


def test_write_tabletop_layout_and_determinism(written, tmp_path):
    out, summary = written
    assert summary["splits"]["train"]["samples"] == 60 and summary["splits"]["train"]["shards"] == 3
    assert summary["splits"]["val"]["shards"] == 8
    again = tt.write_tabletop(tmp_path, train=60, val=16, seed=0, shard_size=25, progress=False)
    for split in ("train", "val"):
        assert {k: v for k, v in again["splits"][split].items() if k != "urls"} == \
            {k: v for k, v in summary["splits"][split].items() if k != "urls"}
    for name in ("train/tabletop-00000.tar", "val/tabletop-00007.tar"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes()


def test_shard_samples_hold_sentences_and_ground_truth(written):
    out, summary = written
    tokenizer = load_tokenizer(out / "tokenizer")
    samples = list(wds.WebDataset(str(out / "train" / "tabletop-{00000..00002}.tar"), shardshuffle=False))
    assert len(samples) == 60
    kinds = set()
    for sample in samples:
        meta = json.loads(sample["json"])
        kinds.add(meta["question_type"])
        assert ("img2.png" in sample) == (meta["question_type"] == "moved") and "img1.png" in sample
        assert len(meta["state"]) == tt.STATE_DIM and len(meta["objects"]) == len(meta["blocks"])
        assert all(len(o) == tt.OBJECT_DIM for o in meta["objects"])
        assert re.search(r"<img1>|<state>|<obj>", meta["prompt"])
        if meta["task"] == "vqa":  # ten agreeing answers: the official VQAv2 scorer gives the right answer 1.0
            assert meta["answers"] == [meta["target"]] * 10 and vqa_accuracy(meta["target"], meta["answers"]) == 1.0
        else:
            assert meta["answers"] == [meta["target"]]
        text = re.sub(r"<\w+>", " ", meta["prompt"] + " " + meta["target"])
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert {"moved", "clear", "direct"} <= kinds


def test_mmlm_data_synth_tabletop_prints_its_summary(tmp_path, capsys):
    from mmlm.app.cli import main

    out = tmp_path / "tabletop"
    assert main(["data", "synth-tabletop", "--out", str(out), "--train", "6", "--val", "2", "--shard-size", "3"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["splits"]["train"]["samples"] == 6 and summary["splits"]["train"]["shards"] == 2
    assert (out / "tokenizer").is_dir() and (out / "summary.json").is_file()
