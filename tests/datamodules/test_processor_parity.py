"""Evaluation pixels equal transformers' reference image processors for the same JPEG files.

BLIP-2: ``ImageTransform(resize="squash")`` vs ``BlipImageProcessor``; Donut: ``DocumentTransform`` vs
``DonutImageProcessor`` (the torchvision backends ``Blip2Processor``/``DonutProcessor.from_pretrained`` load). The
reference input is what a user passes: ``Image.open(path).convert("RGB")`` (a full decode). Checked on the
transforms alone, with processors loaded from a saved directory, and through the real data paths: VQAv2 shards
(``convert_vqav2``) → ``ImageTextDataModule`` with a ``Blip2.from_hf`` model's preprocessing, and a Donut folder →
``DocumentDataModule`` with a ``Donut.from_hf`` model's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    DonutImageProcessor,
    DonutProcessor,
    DonutSwinConfig,
    MBartConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from datamodules import ImageTextDataModule, Source
from datamodules.documents import DocumentDataModule
from datamodules.formats.converters import convert_vqav2
from datamodules.pipeline.document_transforms import DocumentTransform
from datamodules.pipeline.transforms import ImageTransform, crop_box, decode_image, pixel_tensor
from mmlm.convert.blip2_hf import CLIP_MEAN, CLIP_STD, image_preprocess
from mmlm.encoders.base import ImagePreprocess, interpolation_of
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

#: ``(height, width)`` of the test JPEGs: both orientations, a sliver-like tiny one, odd sizes, and one large
#: enough that draft decoding would shrink it for every target size below.
IMAGES = {"portrait": (203, 117), "landscape": (117, 203), "tiny": (7, 13), "odd": (61, 301), "large": (720, 540)}
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
RESAMPLE = {"bilinear": 2, "bicubic": 3}
BLIP_SIZE = (40, 48)  # (H, W): BlipImageProcessor takes non-square sizes too
DONUT_SIZE = (64, 48)


def write_jpeg(path: Path, height: int, width: int, seed: int = 0, mode: str = "RGB") -> Path:
    """A JPEG of gradients + noise (resampling differences show) at ``path``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * 3 + y * 5) % 256], -1)
    pixels = np.clip(pixels + rng.integers(-40, 40, pixels.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format="JPEG", quality=90)
    return path


def reference_input(path: Path) -> Image.Image:
    """What a user hands the processor: a full decode converted to RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal within 1e-5 (measured: bit-identical, max |diff| 0)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("jpegs")
    return {name: write_jpeg(out / f"{name}.jpg", h, w, seed) for seed, (name, (h, w)) in enumerate(IMAGES.items())}


# --------------------------------------------------------------------------- BLIP-2: squash


@pytest.mark.parametrize("interpolation", sorted(RESAMPLE))
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_squash_transform_equals_blip_image_processor(jpegs, name, interpolation):
    processor = BlipImageProcessor(size={"height": BLIP_SIZE[0], "width": BLIP_SIZE[1]}, image_mean=list(MEAN),
                                   image_std=list(STD), resample=RESAMPLE[interpolation])
    theirs = processor(images=reference_input(jpegs[name]), return_tensors="pt").pixel_values[0]
    transform = ImageTransform(BLIP_SIZE, MEAN, STD, train=False, min_crop_scale=1.0, resize="squash",
                               interpolation=interpolation)
    assert_same(transform(jpegs[name].read_bytes()), theirs)


def test_blip2_processor_from_a_directory_is_the_torchvision_one_and_matches(jpegs, shapes_data, tmp_path):
    """``Blip2Processor.from_pretrained`` → ``BlipImageProcessor``; ``image_preprocess`` reads its size, mean/std
    and resample, and the transform built from it equals the loaded processor."""
    images = BlipImageProcessor(size={"height": 40, "width": 40}, image_mean=list(MEAN), image_std=list(STD),
                                resample=2)
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    Blip2Processor(images, tokenizer, num_query_tokens=4).save_pretrained(str(tmp_path))
    loaded = Blip2Processor.from_pretrained(str(tmp_path)).image_processor
    assert type(loaded) is BlipImageProcessor
    preprocess = image_preprocess(tmp_path, 40)
    assert preprocess == ImagePreprocess((40, 40), MEAN, STD, resize="squash", interpolation="bilinear")
    transform = ImageTransform.from_preprocess(preprocess, train=False)
    for path in jpegs.values():
        assert_same(transform(path.read_bytes()), loaded(images=reference_input(path), return_tensors="pt").pixel_values[0])


def test_blip2_image_preprocess_defaults_and_size_mismatch(tmp_path):
    assert image_preprocess(tmp_path, 32) == ImagePreprocess((32, 32), CLIP_MEAN, CLIP_STD, resize="squash",
                                                             interpolation="bicubic")
    BlipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"\(224, 224\).*image_size 32"):
        image_preprocess(tmp_path, 32)
    BlipImageProcessor(size={"height": 32, "width": 32}, resample=1).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="resample"):
        image_preprocess(tmp_path, 32)
    BlipImageProcessor(size={"height": 32, "width": 32}, do_center_crop=True).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="do_center_crop"):
        image_preprocess(tmp_path, 32)


def test_evaluation_decodes_fully_and_training_keeps_draft_decoding(jpegs):
    data = jpegs["large"].read_bytes()
    assert decode_image(data, BLIP_SIZE).size != decode_image(data).size  # draft would have kicked in
    evaluation = ImageTransform(BLIP_SIZE, MEAN, STD, train=False, min_crop_scale=1.0, resize="squash")
    training = dataclasses.replace(evaluation, train=True)  # min_crop_scale 1: no crop, only the draft decode
    processor = BlipImageProcessor(size={"height": BLIP_SIZE[0], "width": BLIP_SIZE[1]}, image_mean=list(MEAN),
                                   image_std=list(STD))
    assert_same(evaluation(data), processor(images=reference_input(jpegs["large"]), return_tensors="pt").pixel_values[0])
    assert not torch.equal(training(data), evaluation(data))
    crop = dataclasses.replace(evaluation, resize="crop")  # the crop mode decodes fully in evaluation too
    with Image.open(jpegs["large"]) as full:
        box = full.convert("RGB").resize(BLIP_SIZE[::-1], Image.Resampling.BICUBIC,
                                         box=crop_box(*full.size, BLIP_SIZE, 1.0))
    expected = (torch.from_numpy(np.asarray(box, dtype=np.float32)).permute(2, 0, 1) / 255
                - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(crop(data), expected, atol=1e-5, rtol=0)


def test_squash_training_crops_then_squashes(jpegs):
    transform = ImageTransform(BLIP_SIZE, MEAN, STD, train=True, min_crop_scale=0.5, resize="squash")
    torch.manual_seed(0)
    outs = [transform(jpegs["portrait"].read_bytes()) for _ in range(4)]
    assert all(o.shape == (3, *BLIP_SIZE) for o in outs) and not torch.equal(outs[0], outs[1])


def test_preprocess_values_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="resize='pad'"):
        ImagePreprocess((8, 8), resize="pad")
    with pytest.raises(ValueError, match="interpolation='lanczos'"):
        ImagePreprocess((8, 8), interpolation="lanczos")
    with pytest.raises(ValueError, match="resize='squish'"):
        ImageTransform((8, 8), MEAN, STD, train=False, min_crop_scale=1.0, resize="squish")
    with pytest.raises(ValueError, match="interpolation='nearest'"):
        DocumentTransform((8, 8), MEAN, STD, interpolation="nearest")
    with pytest.raises(ValueError, match="resample=1"):
        interpolation_of(1)
    assert ImagePreprocess((8, 8)).resize == "crop" and ImagePreprocess((8, 8)).interpolation == "bicubic"


# --------------------------------------------------------------------------- Donut: resize, thumbnail, pad


@pytest.mark.parametrize("align", [False, True], ids=["plain", "align"])
@pytest.mark.parametrize("interpolation", sorted(RESAMPLE))
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_document_transform_equals_donut_image_processor(jpegs, name, interpolation, align):
    processor = DonutImageProcessor(size={"height": DONUT_SIZE[0], "width": DONUT_SIZE[1]}, image_mean=list(MEAN),
                                    image_std=list(STD), resample=RESAMPLE[interpolation], do_align_long_axis=align)
    theirs = processor(images=reference_input(jpegs[name]), return_tensors="pt").pixel_values[0]
    transform = DocumentTransform(DONUT_SIZE, MEAN, STD, align_long_axis=align, interpolation=interpolation)
    assert_same(transform(jpegs[name].read_bytes()), theirs)


def test_donut_processor_from_a_directory_reads_a_reversed_list_size(jpegs, tmp_path):
    """A saved processor loads as ``DonutImageProcessor``; a ``size`` list is ``[width, height]``."""
    DonutImageProcessor(do_align_long_axis=True).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config | {"size": [48, 64]}))
    loaded = DonutImageProcessor.from_pretrained(str(tmp_path))
    assert type(loaded) is DonutImageProcessor and (loaded.size.height, loaded.size.width) == (64, 48)
    transform = DocumentTransform((64, 48), tuple(loaded.image_mean), tuple(loaded.image_std), align_long_axis=True,
                                  interpolation=interpolation_of(loaded.resample))
    for path in jpegs.values():
        assert_same(transform(path.read_bytes()), loaded(images=reference_input(path), return_tensors="pt").pixel_values[0])


def test_training_pads_at_random_offsets(jpegs):
    evaluation = DocumentTransform(DONUT_SIZE, MEAN, STD)
    pixels = pixel_tensor(reference_input(jpegs["landscape"]))
    centred = evaluation.resize_and_pad(pixels)
    rows = (centred != 0).any(0).any(1).nonzero().flatten()
    content = centred[:, rows.min():rows.max() + 1]
    training = dataclasses.replace(evaluation, random_padding=True)
    tops = set()
    for _ in range(12):
        padded = training.resize_and_pad(pixels)
        top = int((padded != 0).any(0).any(1).nonzero().min())
        assert torch.equal(padded[:, top:top + content.shape[1]], content)
        tops.add(top)
    assert len(tops) > 1


# --------------------------------------------------------------------------- real data paths

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 48, "patch_size": 8}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
           "encoder_hidden_size": 32, "cross_attention_frequency": 1}
OPT = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 64,
       "vocab_size": 100, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "pad_token_id": 0,
       "bos_token_id": 1, "eos_token_id": 2}


def trainer_of(module) -> SimpleNamespace:
    return SimpleNamespace(lightning_module=module, global_rank=0, world_size=1, current_epoch=0)


@pytest.fixture
def blip2_checkpoint(shapes_data, tmp_path) -> Path:
    """A tiny random BLIP-2 saved with a ``Blip2Processor`` of non-default size (48), mean/std and resample."""
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=2,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    directory = tmp_path / "blip2"
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    images = BlipImageProcessor(size={"height": 48, "width": 48}, image_mean=list(MEAN), image_std=list(STD),
                                resample=2)
    Blip2Processor(images, tokenizer, num_query_tokens=2).save_pretrained(str(directory))
    return directory


def test_vqav2_shards_through_the_datamodule_equal_blip2_processor(blip2_checkpoint, tmp_path):
    from mmlm.models import Blip2

    names = sorted(IMAGES) + ["gray"]
    image_dir = tmp_path / "val2014"
    paths = {i + 1: write_jpeg(image_dir / f"COCO_val2014_{i + 1:012d}.jpg", *IMAGES.get(name, (90, 70)), seed=i,
                               mode="L" if name == "gray" else "RGB") for i, name in enumerate(names)}
    questions = [{"image_id": i, "question": "what is it?", "question_id": i * 10} for i in paths]
    annotations = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
                    "answer_type": "other", "multiple_choice_answer": "red",
                    "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}
                   for q in questions]
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"data_subtype": "val2014", "annotations": annotations}))
    summary = convert_vqav2(tmp_path / "q.json", tmp_path / "a.json", image_dir, tmp_path / "shards", shard_size=3,
                            progress=False)
    assert summary["samples"] == len(paths)

    model = Blip2.from_hf(str(blip2_checkpoint))
    assert model.image_preprocess == ImagePreprocess((48, 48), MEAN, STD, resize="squash", interpolation="bilinear")
    dm = ImageTextDataModule(val=[Source(summary["urls"], kind="vqa")], batch_size=3)
    dm.trainer = trainer_of(model)
    dm.setup("validate")
    processor = Blip2Processor.from_pretrained(str(blip2_checkpoint)).image_processor
    seen = 0
    for batch in dm.val_dataloader():  # the model's sentences: one image per example, in order
        for qid, pixels in zip(batch.ids, batch.images, strict=True):
            path = paths[int(qid) // 10]
            assert_same(pixels, processor(images=reference_input(path), return_tensors="pt").pixel_values[0])
            seen += 1
    assert seen == len(paths)


def test_blip2_export_writes_a_processor_that_round_trips(blip2_checkpoint, tmp_path):
    from mmlm.convert.blip2_hf import blip_image_processor
    from mmlm.models import Blip2

    model = Blip2.from_hf(str(blip2_checkpoint))
    model.to_hf(tmp_path / "export")
    loaded = Blip2Processor.from_pretrained(str(tmp_path / "export")).image_processor
    assert (loaded.size.height, loaded.size.width, loaded.resample) == (48, 48, 2)
    assert Blip2.from_hf(str(tmp_path / "export")).image_preprocess == model.image_preprocess
    with pytest.warns(UserWarning, match="resize='crop'"):
        blip_image_processor(ImagePreprocess((48, 48)))


def test_donut_folder_through_the_datamodule_equals_donut_processor(shapes_data, jpegs, tmp_path):
    from mmlm.models import Donut

    tokenizer = load_tokenizer(shapes_data / "tokenizer")
    swin = DonutSwinConfig(image_size=list(DONUT_SIZE), patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                           window_size=4)
    mbart = MBartConfig(vocab_size=len(tokenizer) + 3, d_model=32, decoder_layers=1, decoder_attention_heads=2,
                        decoder_ffn_dim=64, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(swin, mbart)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.decoder_start_token_id = tokenizer.bos_token_id
    checkpoint = tmp_path / "donut"
    torch.manual_seed(0)
    VisionEncoderDecoderModel(config).save_pretrained(checkpoint)
    images = DonutImageProcessor(size={"height": DONUT_SIZE[0], "width": DONUT_SIZE[1]}, image_mean=list(MEAN),
                                 image_std=list(STD), resample=3, do_align_long_axis=True)
    DonutProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(checkpoint))

    folder = tmp_path / "docs"
    folder.mkdir()
    lines = [json.dumps({"file_name": path.name, "ground_truth": json.dumps({"gt_parse": {"total": "1"}})})
             for path in jpegs.values()]
    for path in jpegs.values():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    model = Donut.from_hf(str(checkpoint))
    assert model.image_preprocess.interpolation == "bicubic" and model.align_long_axis
    dm = DocumentDataModule(val_path=str(folder), task="cord-v2", batch_size=2)
    dm.trainer = trainer_of(model)
    dm.setup("validate")
    processor = DonutProcessor.from_pretrained(str(checkpoint)).image_processor
    assert type(processor) is DonutImageProcessor
    seen = 0
    for batch in dm.val_dataloader():
        for file_name, pixels in zip(batch.ids, batch.pixels):
            assert_same(pixels, processor(images=reference_input(folder / file_name), return_tensors="pt").pixel_values[0])
            seen += 1
    assert seen == len(jpegs)
