"""Image-only and text-only streams over caption shards: batches, the other modality never decoded, skips counted."""

from __future__ import annotations

import io
import json

import torch
import webdataset as wds
from PIL import Image

from datamodules.caption_views import ImageOnlyDataModule, TextOnlyDataModule
from mmlm.batch import ImageBatch, TextBatch
from mmlm.tokenizers import load_tokenizer


def write_shard(path, samples) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def jpeg(colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_text_only_batches_never_decode_images(shapes_data, tmp_path):
    samples = [{"__key__": "a", "jpg": b"not an image", "txt": b"a red circle."},
               {"__key__": "b", "jpg": b"", "json": json.dumps({"caption": "two blue squares."}).encode()},
               {"__key__": "c", "jpg": jpeg(), "json": b"{}"}]  # no caption: skipped and counted
    url = write_shard(tmp_path / "t.tar", samples)
    dm = TextOnlyDataModule(val_urls=url, tokenizer=str(shapes_data / "tokenizer"), batch_size=4, max_text_tokens=5)
    (batch,) = list(dm.val_dataloader())
    tokenizer = load_tokenizer(shapes_data / "tokenizer")
    assert isinstance(batch, TextBatch) and len(batch) == 2 and batch.keys == ["a", "b"]
    assert batch.input_ids.shape == (2, 5) and batch.attention_mask.sum(1).tolist() == [5, 5]
    assert (batch.input_ids[:, -1] == tokenizer.eos_token_id).all()  # truncated, eos kept
    assert tokenizer.decode(batch.input_ids[0, :4]) == "a red circle ."
    assert dm.skipped == {"missing_caption": 1}


def test_image_only_batches_ignore_text(tmp_path):
    samples = [{"__key__": "a", "jpg": jpeg(), "json": json.dumps({"image_id": 7}).encode()},
               {"__key__": "b", "png": jpeg((0, 0, 250)), "txt": b"\xff\xfe"},  # undecodable text is never read
               {"__key__": "c", "txt": b"no image"}]
    url = write_shard(tmp_path / "i.tar", samples)
    dm = ImageOnlyDataModule(val_urls=url, image_size=16, batch_size=4)
    (batch,) = list(dm.val_dataloader())
    assert isinstance(batch, ImageBatch) and batch.pixels.shape == (2, 3, 16, 16) and batch.ids == ["7", "b"]
    assert batch.attention_mask.shape == (2, 0)
    assert batch.pixels[0, 0].mean() > batch.pixels[0, 2].mean() and batch.pixels[1, 2].mean() > 0  # red, then blue
    assert dm.skipped == {"missing_image": 1}


def test_caption_views_modules_read_the_shapes_caption_shards(shapes_data):
    urls = str(shapes_data / "train" / "captions-*.tar")
    text = TextOnlyDataModule(train_urls=urls, tokenizer=str(shapes_data / "tokenizer"), batch_size=8,
                              epoch_samples=16)
    images = ImageOnlyDataModule(train_urls=urls, image_size=32, batch_size=8, epoch_samples=16)
    text_batches, image_batches = list(text.train_dataloader()), list(images.train_dataloader())
    assert len(text_batches) == len(image_batches) == 2
    assert all(b.input_ids.shape[0] == 8 for b in text_batches)
    assert torch.stack([b.pixels for b in image_batches]).shape == (2, 8, 3, 32, 32)
