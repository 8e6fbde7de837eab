"""Shard pipeline: decoding, collation, rank/worker split, epochs, mixing, resampling, skip counts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules.image_text import ImageTextDataModule, Source
from datamodules.pipeline.collate import IGNORE_INDEX, Example, collate_examples
from datamodules.pipeline.loader import SkipCountingLoader
from datamodules.pipeline.skips import SkipCounter
from datamodules.pipeline.streams import batches_per_rank
from datamodules.pipeline.transforms import ImageTransform, decode_image, to_rgb
from mmlm.batch import Batch
from mmlm.tokenizers import train_word_tokenizer

WORDS = "a red blue green square circle on the left right question what colour is it answer"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def image_bytes(color=(255, 0, 0), size=(12, 10), fmt="JPEG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def caption_sample(key: str, caption: str = "a red square") -> dict:
    meta = {"caption": caption, "captions": [caption, "a square"], "image_id": key}
    return {"__key__": key, "jpg": image_bytes(), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def write_shards(directory: Path, samples: list[dict], per_shard: int) -> str:
    """Write ``samples`` into ``directory/{00000..}.tar`` and return the brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    chunks = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    for n, chunk in enumerate(chunks):
        with wds.TarWriter(str(directory / f"{n:05d}.tar")) as writer:
            for sample in chunk:
                writer.write(sample)
    return str(directory / f"{{00000..{len(chunks) - 1:05d}}}.tar")


def caption_shards(directory: Path, n: int, per_shard: int, prefix: str = "") -> str:
    return write_shards(directory, [caption_sample(f"{prefix}{i:09d}") for i in range(n)], per_shard)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tok")
    train_word_tokenizer([WORDS], out_dir=out)
    return str(out)


def datamodule(tokenizer_dir: str, **kwargs) -> ImageTextDataModule:
    kwargs = {"tokenizer": tokenizer_dir, "image_size": 8, "batch_size": 2, "shuffle_buffer": 4, **kwargs}
    dm = ImageTextDataModule(**kwargs)
    dm.setup()
    return dm


def keys_of(items) -> list[str]:
    return [k for item in items if item.batch is not None for k in item.batch.keys]


# -- transforms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, color", [("L", 128), ("RGBA", (0, 0, 255, 255)), ("CMYK", (0, 0, 0, 0)),
                                         ("P", 3), ("LA", (10, 255)), ("1", 1)])
def test_to_rgb_converts_every_mode(mode, color):
    image = to_rgb(Image.new(mode, (4, 3), color))
    assert image.mode == "RGB" and image.size == (4, 3)


def test_transparent_pixels_become_white_and_16_bit_gray_is_rescaled():
    assert to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    gray16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert gray16.mode.startswith("I") and to_rgb(gray16).getpixel((1, 1)) == (255, 255, 255)


def test_eval_transform_shape_and_normalisation():
    transform = ImageTransform(size=(6, 8), mean=MEAN, std=STD, train=False, min_crop_scale=1.0)
    pixels = transform(image_bytes((255, 0, 128), size=(40, 20), fmt="PNG"))
    assert pixels.shape == (3, 6, 8) and pixels.dtype == torch.float32
    expected = (torch.tensor([255, 0, 128]) / 255 - 0.5) / 0.25
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)


def test_train_transform_and_grayscale_png_give_three_channels():
    transform = ImageTransform(size=(8, 8), mean=MEAN, std=STD, train=True, min_crop_scale=0.5)
    assert transform(image_bytes(200, size=(30, 17), fmt="PNG", mode="L")).shape == (3, 8, 8)


def test_large_jpeg_decodes_in_draft_mode():
    assert decode_image(image_bytes(size=(256, 256)), draft_size=(16, 16)).size == (32, 32)
    assert decode_image(image_bytes(size=(256, 256))).size == (256, 256)


# -- collate --------------------------------------------------------------------------------------


def example(prompt: str, target: str) -> Example:
    return Example(torch.zeros(3, 2, 2), prompt, target, [target], "1", "vqa", "k")


def test_collate_ids_labels_and_left_padded_prompts(tokenizer_dir):
    dm = datamodule(tokenizer_dir)
    tok = dm.tokenizer
    ids = tok.convert_tokens_to_ids
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    batch = collate_examples([example("what colour", "red"), example("", "a blue circle")], tok, max_text_tokens=48)
    p0 = [bos, ids("what"), ids("colour")]
    row0 = p0 + [ids("red"), eos]
    row1 = [bos, ids("a"), ids("blue"), ids("circle"), eos]
    assert batch.input_ids.tolist() == [row0, row1]
    assert batch.labels.tolist() == [[IGNORE_INDEX] * 3 + row0[3:], [IGNORE_INDEX] + row1[1:]]
    assert batch.attention_mask.tolist() == [[1] * 5, [1] * 5]
    assert batch.prompt_ids.tolist() == [p0, [pad, pad, bos]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.pixels.shape == (2, 3, 2, 2) and batch.tasks == ["vqa", "vqa"]


def test_collate_right_pads_and_truncates_keeping_eos(tokenizer_dir):
    tok = datamodule(tokenizer_dir).tokenizer
    ids = tok.convert_tokens_to_ids
    eos, pad = tok.eos_token_id, tok.pad_token_id
    batch = collate_examples([example("", "a red square on the left"), example("", "red")], tok, max_text_tokens=4)
    assert batch.input_ids.tolist() == [[tok.bos_token_id, ids("a"), ids("red"), eos],
                                        [tok.bos_token_id, ids("red"), eos, pad]]
    assert batch.labels[1].tolist() == [IGNORE_INDEX, ids("red"), eos, IGNORE_INDEX]
    assert batch.attention_mask[1].tolist() == [1, 1, 1, 0]


# -- splitting, epochs, mixing, resampling ---------------------------------------------------------


def test_two_ranks_two_workers_get_disjoint_shards_and_equal_batches(tmp_path, tokenizer_dir):
    urls = caption_shards(tmp_path, 24, per_shard=3)  # 8 shards
    dm = datamodule(tokenizer_dir, epoch_samples=20, num_workers=2, shuffle_buffer=0)
    pipes = [dm.build_pipeline("fit", [Source(urls)], rank=r, world_size=2) for r in range(2)]
    shards = [p._pass_shards(0, w, 2, rep=0) for p in pipes for w in range(2)]
    flat = [s for part in shards for s in part]
    assert len(flat) == len(set(flat)) == 8 and all(part for part in shards)
    per_rank = [[len(list(p.iter_worker(w, 2))) for w in range(2)] for p in pipes]
    assert per_rank == [[3, 2], [3, 2]] and len(pipes[0]) == batches_per_rank(20, 2, 2) == 5
    shard_keys = {f"{i:09d}": i // 3 for i in range(24)}
    first_pass = [k for k in keys_of(pipes[0].iter_worker(0, 2))][:6]
    assert {shard_keys[k] for k in first_pass} <= {int(Path(s).stem) for s in shards[0]}


def test_set_epoch_reshuffles_training_order(tmp_path, tokenizer_dir):
    urls = caption_shards(tmp_path, 16, per_shard=2)
    pipe = datamodule(tokenizer_dir, epoch_samples=16, shuffle_buffer=0).build_pipeline("fit", [Source(urls)])
    first = keys_of(pipe.iter_worker(0, 1))
    assert keys_of(pipe.iter_worker(0, 1)) == first
    pipe.set_epoch(1)
    assert keys_of(pipe.iter_worker(0, 1)) != first and sorted(first) == sorted(keys_of(pipe.iter_worker(0, 1)))


def test_validation_visits_each_sample_once_across_ranks_and_workers(tmp_path, tokenizer_dir):
    urls = caption_shards(tmp_path, 15, per_shard=3)  # 5 shards, uneven split
    dm = datamodule(tokenizer_dir, num_workers=2)
    keys = [k for r in range(2) for w in range(2)
            for k in keys_of(dm.build_pipeline("validate", [Source(urls)], rank=r, world_size=2).iter_worker(w, 2))]
    assert sorted(keys) == [f"{i:09d}" for i in range(15)]


def test_too_few_shards_names_the_number_needed(tmp_path, tokenizer_dir):
    urls = caption_shards(tmp_path, 6, per_shard=2)  # 3 shards
    dm = datamodule(tokenizer_dir, num_workers=2, epoch_samples=8)
    with pytest.raises(ValueError, match=r"has 3 shard\(s\) .* need at least 4"):
        dm.build_pipeline("fit", [Source(urls)], rank=0, world_size=2)  # training: ranks × workers
    with pytest.raises(ValueError, match=r"has 3 shard\(s\) .* need at least 4"):
        dm.build_pipeline("validate", [Source(urls)], rank=0, world_size=4)  # evaluation: ranks


def test_evaluation_caps_workers_to_the_shards_of_a_rank(tmp_path, tokenizer_dir):
    urls = caption_shards(tmp_path, 6, per_shard=2)  # 3 shards: 1 per rank of 2 (the other gets 2)
    dm = datamodule(tokenizer_dir, num_workers=2)
    loader = dm.make_loader(dm.build_pipeline("validate", [Source(urls)], rank=0, world_size=2))
    assert loader.num_workers == 1
    assert sorted(k for b in loader for k in b.keys) == ["000000000", "000000001", "000000004", "000000005"]


def test_missing_shard_is_named(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        datamodule(tokenizer_dir).build_pipeline("validate", [Source(str(tmp_path / "nope.tar"))])


def test_weighted_mixing_of_two_sources(tmp_path, tokenizer_dir):
    a = caption_shards(tmp_path / "a", 8, per_shard=4, prefix="a")
    b = caption_shards(tmp_path / "b", 8, per_shard=4, prefix="b")
    dm = datamodule(tokenizer_dir, epoch_samples=200, batch_size=10, shuffle_buffer=0)
    pipe = dm.build_pipeline("fit", [Source(a, weight=3.0), Source(b, weight=1.0)])
    keys = keys_of(pipe.iter_worker(0, 1))
    assert len(keys) == 200
    assert 0.65 < sum(k.startswith("a") for k in keys) / len(keys) < 0.85


def test_resampled_mode_yields_the_epoch_length_from_few_shards(tmp_path, tokenizer_dir):
    urls = caption_shards(tmp_path, 4, per_shard=2)  # 2 shards < 2 ranks × 2 workers: fine when resampled
    dm = datamodule(tokenizer_dir, epoch_samples=16, num_workers=2, resampled=True)
    pipes = [dm.build_pipeline("fit", [Source(urls)], rank=r, world_size=2) for r in range(2)]
    counts = [sum(len(list(p.iter_worker(w, 2))) for w in range(2)) for p in pipes]
    assert counts == [4, 4]
    assert set(keys_of(pipes[0].iter_worker(0, 2))) <= {f"{i:09d}" for i in range(4)}
    with pytest.raises(ValueError, match="epoch_samples"):
        datamodule(tokenizer_dir, resampled=True).build_pipeline("fit", [Source(urls)])


# -- bad samples ---------------------------------------------------------------------------------


def corrupt_samples() -> list[dict]:
    good = [caption_sample(f"{i:09d}") for i in range(5)]
    bad = [
        {**caption_sample("bad_image"), "jpg": b"not a jpeg"},
        {"__key__": "no_caption", "jpg": image_bytes()},
        {"__key__": "bad_json", "jpg": image_bytes(), "json": b"{not json"},
        {"__key__": "bad_text", "jpg": image_bytes(), "txt": b"\xff\xfe caption"},
        {"__key__": "no_image", "txt": b"a red square"},
    ]
    return good[:2] + bad + good[2:]


EXPECTED_SKIPS = {"bad_image": 1, "missing_caption": 1, "bad_json": 1, "bad_text": 1, "missing_image": 1}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_samples_are_skipped_and_counted_by_reason(tmp_path, tokenizer_dir, num_workers):
    urls = write_shards(tmp_path, corrupt_samples(), per_shard=10)
    dm = datamodule(tokenizer_dir, val=[Source(urls)], num_workers=num_workers)
    batches = list(dm.val_dataloader())
    assert all(isinstance(b, Batch) for b in batches)
    assert sum(len(b) for b in batches) == 5
    assert dm.skip_counts() == EXPECTED_SKIPS and dm.skipped == EXPECTED_SKIPS


def test_truncated_shard_is_counted_not_fatal(tmp_path, tokenizer_dir):
    urls = caption_shards(tmp_path, 6, per_shard=3)
    shard = tmp_path / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    dm = datamodule(tokenizer_dir, val=[Source(urls)])
    assert sum(len(b) for b in dm.val_dataloader()) == 3
    assert dm.skipped == {"tar_error": 1}


def test_skip_counts_reach_the_module_through_a_trainer(tmp_path, tokenizer_dir):
    import pytorch_lightning as pl

    class Echo(pl.LightningModule):
        def predict_step(self, batch, batch_idx):
            assert isinstance(batch, Batch)
            return len(batch)

    urls = write_shards(tmp_path, corrupt_samples(), per_shard=10)
    dm = datamodule(tokenizer_dir, predict=[Source(urls)])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    assert sum(trainer.predict(Echo(), datamodule=dm)) == 5
    assert dm.skip_counts() == EXPECTED_SKIPS


# -- VQA and the datamodule ------------------------------------------------------------------------


def vqa_sample(key: str, answers: list[str]) -> dict:
    meta = {"question": "what colour is it", "answers": answers, "question_id": 7, "image_id": 3,
            "question_type": "what color"}
    return {"__key__": key, "png": image_bytes(fmt="PNG"), "json": json.dumps(meta).encode()}


def test_vqa_examples_use_the_most_common_answer_and_mix_with_captions(tmp_path, tokenizer_dir):
    answers = ["red"] * 6 + ["blue"] * 4
    vqa = write_shards(tmp_path / "vqa", [vqa_sample(f"{i:09d}", answers) for i in range(2)], per_shard=2)
    caps = caption_shards(tmp_path / "cap", 2, per_shard=2)
    dm = datamodule(tokenizer_dir, val=[Source(vqa, kind="vqa"), Source(caps)], vqa_prompt="question: {} answer:")
    vqa_loader, caption_loader = dm.val_dataloader()
    batch = next(iter(vqa_loader))
    assert batch.tasks == ["vqa", "vqa"] and batch.ids == [7, 7] and batch.references[0] == answers
    assert batch.question_types == ["what color"] * 2 and batch.pixels.shape == (2, 3, 8, 8)
    target = batch.input_ids[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert target == [dm.tokenizer.convert_tokens_to_ids("red"), dm.tokenizer.eos_token_id]
    caption = next(iter(caption_loader))
    assert caption.tasks == ["caption"] * 2 and caption.references[0] == ["a red square", "a square"]


def test_setup_takes_tokenizer_and_preprocess_from_the_model(tmp_path, tokenizer_dir):
    from types import SimpleNamespace

    from mmlm.data_spec import DataSpec
    from mmlm.encoders.base import ImagePreprocess
    from mmlm.tokenizers import load_tokenizer

    dm = ImageTextDataModule(val=[Source(caption_shards(tmp_path, 2, per_shard=2))])
    spec = DataSpec(tokenizer=load_tokenizer(tokenizer_dir), image_preprocess=ImagePreprocess((6, 4)))
    module = SimpleNamespace(data_spec=lambda: spec)
    dm.trainer = SimpleNamespace(lightning_module=module, global_rank=0, world_size=1, current_epoch=0)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader())).pixels.shape == (2, 3, 6, 4)
    with pytest.raises(ValueError, match="tokenizer"):
        ImageTextDataModule().setup()


def test_skip_counter_take_resets():
    counter = SkipCounter()
    counter.update({"bad_image": 2})
    counter.add("bad_image")
    assert counter.take() == {"bad_image": 3} and counter.skipped == {} and counter.total() == 0


def test_skips_after_the_last_batch_travel_in_a_counts_only_item(tmp_path, tokenizer_dir):
    samples = [caption_sample("000000000"), caption_sample("000000001"), {"__key__": "tail", "txt": b"x"}]
    pipe = datamodule(tokenizer_dir).build_pipeline("validate", [Source(write_shards(tmp_path, samples, 10))])
    items = list(pipe.iter_worker(0, 1))
    assert [len(i.batch) if i.batch else None for i in items] == [2, None]
    assert items[-1].skipped == {"missing_image": 1}
    counter = SkipCounter()
    assert [len(b) for b in SkipCountingLoader(pipe, counter)] == [2]
    assert counter.skipped == {"missing_image": 1}


def test_a_source_prompt_overrides_the_default_and_fills_json_fields(tmp_path, tokenizer_dir):
    vqa = write_shards(tmp_path / "vqa", [vqa_sample(f"{i:09d}", ["red"] * 10) for i in range(2)], per_shard=2)
    caps = caption_shards(tmp_path / "cap", 2, per_shard=2)
    dm = datamodule(tokenizer_dir, val=[Source(vqa, kind="vqa", prompt="{question_type} question: {} answer:"),
                                        Source(caps, prompt="{caption} <s> a"), Source(caps)],
                    caption_prompt="the")
    vqa_loader, context_loader, plain_loader = dm.val_dataloader()
    decode = dm.tokenizer.decode
    vqa_batch = next(iter(vqa_loader))
    expected = "<s> what <unk> question <unk> what colour is it answer <unk>"  # "color" and ":" are not in WORDS
    assert decode(vqa_batch.prompt_ids[0][vqa_batch.prompt_mask[0].bool()]) == expected
    context = next(iter(context_loader))
    assert decode(context.prompt_ids[0][context.prompt_mask[0].bool()]) == "<s> a red square <s> a"
    plain = next(iter(plain_loader))
    assert decode(plain.prompt_ids[0][plain.prompt_mask[0].bool()]) == "<s> the"


def test_a_prompt_naming_a_missing_field_skips_and_counts(tmp_path, tokenizer_dir):
    caps = caption_shards(tmp_path / "cap", 2, per_shard=2)
    dm = datamodule(tokenizer_dir, val=[Source(caps, prompt="{nope} a")])
    assert list(dm.val_dataloader()) == []
    assert dm.skip_counts() == {"missing_field": 2}


def test_single_kind_datamodules_take_urls_and_build_from_a_config(tmp_path, tokenizer_dir):
    from jsonargparse import ArgumentParser

    from datamodules import CaptionsDataModule, VQADataModule

    vqa = write_shards(tmp_path / "vqa", [vqa_sample(f"{i:09d}", ["red"] * 10) for i in range(2)], per_shard=2)
    caps = caption_shards(tmp_path / "cap", 2, per_shard=2)
    parser = ArgumentParser()
    parser.add_argument("--data", type=ImageTextDataModule)
    config = {"class_path": "datamodules.VQADataModule",
              "init_args": {"val_urls": vqa, "tokenizer": tokenizer_dir, "image_size": 8, "batch_size": 2}}
    dm = parser.instantiate(parser.parse_object({"data": config})).data
    assert isinstance(dm, VQADataModule)
    dm.setup()
    assert next(iter(dm.val_dataloader())).tasks == ["vqa", "vqa"]
    captions = CaptionsDataModule(val_urls=caps, tokenizer=tokenizer_dir, image_size=8, batch_size=2)
    captions.setup()
    assert next(iter(captions.val_dataloader())).tasks == ["caption", "caption"]
