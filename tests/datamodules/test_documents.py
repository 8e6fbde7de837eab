"""Donut data: generators, folder layout vs shards, converter, prompts in labels, skips, special tokens."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from datamodules.documents import DocumentDataModule, DocumentSource
from datamodules.formats.donut_folder import SPECIAL_TOKENS_FILE, read_ground_truths, read_metadata
from datamodules.pipeline.document_transforms import (
    DocumentTransform,
    align_long_axis,
    shortest_edge_size,
    thumbnail_size,
)
from datamodules.synthetic.documents import (
    MARGIN,
    MENU,
    document_rng,
    layout_words,
    line_height,
    load_font,
    paper_size,
    render_document,
    render_receipt,
    rotated_size,
    sample_style,
    write_documents,
)
from datamodules.tools.documents import convert_donut
from mmlm.data_spec import DataSpec
from mmlm.encoders.base import ImagePreprocess
from mmlm.json_tokens import tokens_to_json
from mmlm.losses import IGNORE_INDEX
from mmlm.metrics.documents import ted_accuracy

SIZE = (96, 128)  # (H, W)


@pytest.fixture(scope="module")
def receipts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("receipts")
    write_documents(out, kind="receipts", train=24, val=20, seed=3, shard_size=8)
    return out


def read_tar(path: Path) -> list[dict]:
    return list(wds.tarfile_samples([{"url": str(path)}]))


def module_batches(path: str, tokenizer: str, **kwargs) -> tuple[list, DocumentDataModule]:
    dm = DocumentDataModule(val_path=path, tokenizer=tokenizer, image_size=SIZE, batch_size=8, **kwargs)
    dm.setup("validate")
    return list(dm.val_dataloader()), dm


# --------------------------------------------------------------------------- generators


def test_generators_are_deterministic(tmp_path, receipts):
    again = tmp_path / "again"
    write_documents(again, kind="receipts", train=24, val=20, seed=3, shard_size=8)
    for name in ("shards/train/receipts-00000.tar", "shards/validation/receipts-00002.tar", "donut/train/metadata.jsonl",
                 "donut/validation/receipts_validation_000007.jpg", "shards/train/special_tokens.json"):
        assert (again / name).read_bytes() == (receipts / name).read_bytes(), name
    other = tmp_path / "other"
    write_documents(other, kind="receipts", train=24, val=0, seed=4, shard_size=8)
    assert (other / "donut/train/metadata.jsonl").read_bytes() != (receipts / "donut/train/metadata.jsonl").read_bytes()


def test_receipt_ground_truth_is_consistent_and_drawn():
    units = dict(MENU)
    for index in range(40):
        image, parse, lines = render_receipt(document_rng(0, "receipts", "train", index), 128, 96)
        cents = [round(float(item["price"]) * 100) for item in parse["menu"]]
        assert cents == [units[item["nm"]] * int(item["cnt"]) for item in parse["menu"]]
        subtotal, tax = (round(float(parse["sub_total"][k]) * 100) for k in ("subtotal_price", "tax_price"))
        assert subtotal == sum(cents) and tax == (subtotal + 5) // 10
        assert round(float(parse["total"]["total_price"]) * 100) == subtotal + tax
        drawn = [f"{line.text} {line.right}" for line in lines]
        assert drawn == [f"{i['cnt']} {i['nm']} {i['price']}" for i in parse["menu"]] + [
            f"SUBTOTAL {parse['sub_total']['subtotal_price']}", f"TAX {parse['sub_total']['tax_price']}",
            f"TOTAL {parse['total']['total_price']}"]
        assert image.size == (128, 96)


def test_document_text_is_what_was_drawn_and_fits():
    for index in range(40):
        image, parse, lines = render_document(document_rng(0, "docs", "train", index), 128, 96)
        assert parse == {"text_sequence": " ".join(line.text for line in lines)} and lines
        assert image.size == (128, 96)
    # every line of a page stays inside its paper, and the rotated paper inside the image
    rng = document_rng(0, "docs", "train", 5)
    style = sample_style(rng)
    font = load_font(style.font, style.size)
    paper = paper_size(rng, 128, 96)
    assert all(s <= m for s, m in zip(rotated_size(paper), (128, 96)))
    for line in layout_words(rng, font, paper, max_lines=10):
        box = ImageDraw.Draw(Image.new("RGB", paper)).textbbox((line.x, line.y), line.text, font=font)
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= paper[0] - MARGIN + 1 and box[3] <= paper[1]
        assert line.y + line_height(font) <= paper[1]


def test_document_pages_have_ink_where_text_is():
    image, parse, lines = render_document(document_rng(1, "docs", "train", 0), 128, 96)
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    assert gray.min() < 90 and gray.max() > 200  # dark text on light paper


# --------------------------------------------------------------------------- layouts, converter


def test_folder_layout_and_shards_give_identical_batches(receipts):
    tokenizer = str(receipts / "tokenizer")
    folder, dm = module_batches(str(receipts / "donut/validation"), tokenizer)
    shards, _ = module_batches(str(receipts / "shards/validation"), tokenizer)
    assert [len(b) for b in folder] == [8, 8, 4]
    for a, b in zip(folder, shards, strict=True):
        for name in ("pixels", "input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert (a.keys, a.ids, a.references, a.tasks) == (b.keys, b.ids, b.references, b.tasks)
    batch = folder[0]
    assert batch.pixels.shape == (8, 3, *SIZE) and batch.tasks == ["cord-v2"] * 8  # the task of the source (the default)
    assert batch.ids[0] == "receipts_validation_000000.jpg"
    for row, refs in zip(batch.input_ids, batch.references):  # the target decodes back to the ground truth
        text = dm.tokenizer.decode([t for t in row.tolist() if t not in (dm.tokenizer.pad_token_id, dm.tokenizer.eos_token_id)])
        assert ted_accuracy(tokens_to_json(text), json.loads(refs[0])) == 1.0


def test_prompt_positions_are_ignored_in_labels(receipts):
    batches, dm = module_batches(str(receipts / "donut/validation"), str(receipts / "tokenizer"))
    task_id = dm.tokenizer.convert_tokens_to_ids("<s_cord-v2>")
    batch = batches[0]
    assert (batch.input_ids[:, 0] == task_id).all() and (batch.labels[:, 0] == IGNORE_INDEX).all()
    real = batch.attention_mask.bool()
    assert torch.equal(batch.labels[:, 1:][real[:, 1:]], batch.input_ids[:, 1:][real[:, 1:]])
    assert (batch.labels[~real] == IGNORE_INDEX).all()
    assert (batch.prompt_ids[:, -1] == task_id).all() and batch.prompt_mask.sum(1).tolist() == [1] * 8


def write_folder(folder: Path, rows: list[tuple[str, object]], image: bytes | None = None) -> None:
    """A Donut folder of 64×48 PNGs (or ``image`` bytes); a row's ground truth may be any JSON value."""
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (250, 250, 250)).save(buffer, format="PNG")
    lines = []
    for name, gt in rows:
        (folder / name).write_bytes(image if image is not None else buffer.getvalue())
        lines.append(json.dumps({"file_name": name, "ground_truth": json.dumps(gt)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_docvqa_prompt_is_question_and_excluded_from_loss(tmp_path, receipts):
    qa = [{"question": "what is the total?", "answer": "10.45"}, {"question": "what is the total?", "answer": "$10.45"}]
    write_folder(tmp_path / "vqa", [("a.png", {"gt_parses": qa}), ("b.png", {"gt_parse": {"question": "date?", "answer": "today"}})])
    batches, dm = module_batches(str(tmp_path / "vqa"), str(receipts / "tokenizer"), task="docvqa", prompt_end="<s_answer>")
    batch, tok = batches[0], dm.tokenizer
    prompt = tok.decode(batch.prompt_ids[0][batch.prompt_mask[0].bool()]).replace("> ", ">")  # ▁-prefixed words
    assert prompt == "<s_docvqa><s_question>what is the total?</s_question><s_answer>"
    target = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert tok.decode(target).strip() == "10.45</s_answer></s>"
    n_prompt = int(batch.prompt_mask[0].sum())
    assert (batch.labels[0, :n_prompt] == IGNORE_INDEX).all() and batch.labels[0, n_prompt] != IGNORE_INDEX
    assert [json.loads(r) for r in batch.references[0]] == qa
    assert {"<s_question>", "</s_answer>", "<s_docvqa>"} <= set(dm.added_tokens)


def test_converter_round_trip(tmp_path, receipts):
    summary = convert_donut(receipts / "donut", tmp_path / "converted", shard_size=8, prefix="receipts-")
    assert summary["splits"]["validation"]["samples"] == 20 and summary["splits"]["train"]["skipped"] == {}
    for split in ("train", "validation"):
        for made, converted in zip(sorted((receipts / "shards" / split).glob("*.tar")),
                                   sorted((tmp_path / "converted" / split).glob("*.tar")), strict=True):
            mine, theirs = read_tar(made), read_tar(converted)
            assert [{k: v for k, v in s.items() if k != "__url__"} for s in mine] == \
                   [{k: v for k, v in s.items() if k != "__url__"} for s in theirs]
        assert (tmp_path / "converted" / split / SPECIAL_TOKENS_FILE).read_text() == \
               (receipts / "shards" / split / SPECIAL_TOKENS_FILE).read_text()


def test_corrupt_samples_are_skipped_and_counted(tmp_path, receipts):
    folder = tmp_path / "bad"
    shutil.copytree(receipts / "donut/validation", folder)
    (folder / "receipts_validation_000003.jpg").write_bytes(b"not an image")
    (folder / "receipts_validation_000005.jpg").unlink()
    with open(folder / "metadata.jsonl", "a") as f:
        f.write("{broken json\n")
        f.write(json.dumps({"file_name": "receipts_validation_000006.jpg", "ground_truth": "{\"nothing\": 1}"}) + "\n")
    batches, dm = module_batches(str(folder), str(receipts / "tokenizer"))
    assert sum(len(b) for b in batches) == 18
    assert dm.skipped == {"bad_image": 1, "missing_image": 1, "bad_json": 1, "bad_ground_truth": 1}
    summary = convert_donut(folder, tmp_path / "bad_shards", shard_size=8)
    assert summary["samples"] == 19 and summary["skipped"] == {"missing_image": 1, "bad_ground_truth": 2}
    shards, dm2 = module_batches(str(tmp_path / "bad_shards"), str(receipts / "tokenizer"))
    assert sum(len(b) for b in shards) == 18 and dm2.skipped == {"bad_image": 1}


# --------------------------------------------------------------------------- special tokens, transform


class FakeModule:
    """What the datamodule asks of a Donut-like LightningModule."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.image_preprocess, self.calls = tokenizer, ImagePreprocess(SIZE), []

    def add_tokens(self, tokens: list[str]) -> None:
        self.calls.append(tokens)
        self.tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)

    def data_spec(self) -> DataSpec:
        return DataSpec(tokenizer=self.tokenizer, image_preprocess=self.image_preprocess, add_tokens=self.add_tokens)


def test_setup_gives_sorted_special_tokens_to_the_module(receipts, tmp_path):
    from mmlm.tokenizers import load_tokenizer

    module = FakeModule(load_tokenizer(receipts / "tokenizer"))
    write_folder(tmp_path / "cls", [("a.png", {"gt_parse": {"class": "invoice"}}), ("b.png", {"gt_parse": {"class": "memo"}})])
    dm = DocumentDataModule(train=[DocumentSource(str(receipts / "shards/train"), task="cord-v2")],
                            val=[DocumentSource(str(tmp_path / "cls"), task="rvlcdip")],
                            categorical_fields=["class"], special_tokens=["<extra/>"], batch_size=2)
    dm.trainer = SimpleNamespace(lightning_module=module, global_rank=0, world_size=1, current_epoch=0)
    dm.setup("fit")
    dm.setup("validate")
    assert len(module.calls) == 1 and module.calls[0] == sorted(module.calls[0])
    assert {"<s_cord-v2>", "<s_rvlcdip>", "<sep/>", "<s_menu>", "</s_total_price>", "<invoice/>", "<memo/>",
            "<extra/>", "<s_class>"} <= set(module.calls[0])
    batch = next(iter(dm.val_dataloader()))
    assert module.tokenizer.convert_ids_to_tokens(batch.input_ids[0, :4].tolist()) == \
           ["<s_rvlcdip>", "<s_class>", "<invoice/>", "</s_class>"]
    train = next(iter(dm.train_dataloader()))
    assert train.pixels.shape == (2, 3, *SIZE)


def test_document_transform_fits_aligns_and_pads():
    # Donut's processor resizes the shorter edge to min(H, W), then thumbnails into (H, W) (sizes are (h, w) and
    # truncated; the old single fit_size(w, h) gave the same 96 × 48 and 32 × 128 here); alignment is on tensors.
    assert thumbnail_size(*shortest_edge_size(100, 50, min(SIZE)), SIZE) == (96, 48)
    assert thumbnail_size(*shortest_edge_size(100, 400, min(SIZE)), SIZE) == (32, 128)
    portrait = torch.zeros(3, 100, 50, dtype=torch.uint8)
    assert align_long_axis(portrait, SIZE).shape == (3, 50, 100) and align_long_axis(portrait, (128, 96)).shape == \
           (3, 100, 50)
    buffer = io.BytesIO()
    Image.new("RGB", (50, 100), (255, 255, 255)).save(buffer, format="PNG")
    plain = DocumentTransform(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    pixels = plain(buffer.getvalue())
    assert pixels.shape == (3, *SIZE)
    columns = (pixels[0] > 0.5).any(0).nonzero().flatten()
    assert columns.min() == 40 and columns.max() == 87  # 48 wide, centred in 128
    aligned = DocumentTransform(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), align_long_axis=True)(buffer.getvalue())
    assert (aligned[0] > 0.5).sum() > (pixels[0] > 0.5).sum()  # rotated: 100×50 fills more of a landscape input


def test_cli_tools_and_most_common_json_baseline(tmp_path):
    from mmlm.app.cli import main
    from mmlm.metrics.documents import most_common_json_baseline

    assert main(["data", "synth-docs", "--out", str(tmp_path / "docs"), "--train", "6", "--val", "3",
                 "--width", "96", "--height", "64", "--layout", "folder"]) == 0
    assert not (tmp_path / "docs/shards").exists() and len(read_metadata(tmp_path / "docs/donut/train")) == 6
    assert main(["data", "convert-donut", str(tmp_path / "docs/donut/validation"), "--out", str(tmp_path / "conv")]) == 0
    folder, shards = read_ground_truths(tmp_path / "docs/donut/validation"), read_ground_truths(tmp_path / "conv")
    assert folder == shards and len(folder) == 3 and "text_sequence" in folder[0][0]
    with Image.open(tmp_path / "docs/donut/train/docs_train_000000.jpg") as image:
        assert image.size == (96, 64)
    train = read_ground_truths(tmp_path / "docs/donut/train")
    base = most_common_json_baseline([g[0] for g in train], folder)
    assert base["json"] in [g[0] for g in train] and 0 <= base["ted_accuracy"] < 1


def test_a_real_donut_gets_the_tokens_trains_and_evaluates(receipts, tmp_path):
    import pytorch_lightning as pl

    from mmlm.encoders import HFVisionEncoder
    from mmlm.language.cross_attention import CrossAttentionLM
    from mmlm.models import Donut

    swin = {"image_size": [32, 48], "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
            "window_size": 4, "drop_path_rate": 0.0}
    mbart = {"model_type": "mbart", "d_model": 32, "decoder_layers": 1, "encoder_layers": 1, "decoder_attention_heads": 2,
             "decoder_ffn_dim": 64, "max_position_embeddings": 128, "scale_embedding": True, "vocab_size": 60,
             "add_final_layer_norm": True, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "dropout": 0.0,
             "forced_eos_token_id": None}
    torch.manual_seed(0)
    model = Donut(HFVisionEncoder(model_type="donut-swin", config=swin), CrossAttentionLM(config=mbart),
                  tokenizer=str(receipts / "tokenizer"))
    model.generation = dataclasses.replace(model.generation, max_new_tokens=8)
    dm = DocumentDataModule(train_path=str(receipts / "donut/train"), val_path=str(receipts / "shards/validation"),
                            batch_size=4)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, accelerator="cpu",
                         default_root_dir=str(tmp_path), enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert model.added_tokens == dm.added_tokens and "<s_cord-v2>" in model.added_tokens
    assert model.decoder.vocab_size >= len(model.tokenizer)
    assert {"val/ted_accuracy", "val/f1", "val/ned"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_a_missing_path_is_named_in_setup(tmp_path, receipts):
    dm = DocumentDataModule(val_path=str(tmp_path / "nowhere"), tokenizer=str(receipts / "tokenizer"), image_size=SIZE)
    with pytest.raises(FileNotFoundError, match="nowhere.*neither a Donut folder"):
        dm.setup("validate")


def test_predict_needs_no_ground_truth(tmp_path, receipts):
    folder = tmp_path / "unlabelled"
    write_folder(folder, [("q.png", {"gt_parse": {"question": "total?"}}), ("r.png", {"gt_parse": {"question": "date?"}})])
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "q.png"}) + "\n")  # no ground truth at all
    dm = DocumentDataModule(predict_path=str(folder), task="docvqa", prompt_end="<s_answer>",
                            tokenizer=str(receipts / "tokenizer"), image_size=SIZE, batch_size=4)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    tok = dm.tokenizer
    prompts = [tok.decode(row[mask.bool()]).replace("> ", ">") for row, mask in zip(batch.prompt_ids, batch.prompt_mask)]
    assert prompts == ["<s_docvqa><s_question>total?</s_question><s_answer>",
                       "<s_docvqa><s_question>date?</s_question><s_answer>", "<s_docvqa>"]
    assert batch.references[2] == [] and dm.skipped == {}
    assert batch.labels[batch.labels != IGNORE_INDEX].tolist() == [tok.eos_token_id] * 3  # empty targets
    validation = DocumentDataModule(val_path=str(folder), task="docvqa", prompt_end="<s_answer>",
                                    tokenizer=str(receipts / "tokenizer"), image_size=SIZE, batch_size=4)
    validation.setup("validate")
    assert list(validation.val_dataloader()) == []  # evaluation needs ground truth: all three skipped
    assert validation.skipped == {"missing_prompt_end": 2, "bad_ground_truth": 1}


@pytest.mark.parametrize("model_flag, argument, expected", [(True, None, True), (False, None, False),
                                                            (True, False, False), (None, None, False)])
def test_align_long_axis_follows_the_model_unless_given(receipts, model_flag, argument, expected):
    from types import SimpleNamespace

    dm = DocumentDataModule(val_path=str(receipts / "shards/validation"), tokenizer=str(receipts / "tokenizer"),
                            image_size=(32, 32), align_long_axis=argument)
    spec = DataSpec() if model_flag is None else DataSpec(align_long_axis=model_flag)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(data_spec=lambda: spec))
    dm.setup("validate")
    assert dm.align_long_axis is expected
