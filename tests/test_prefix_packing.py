"""Packed training batches for the prefix families (``ImageTextDataModule(pack_tokens=…)``,
``datamodules.pipeline.prefix_sentences.pack_sentences``): the layout, the loss equal to the padded batch's for
Frozen and BLIP-2 with a transformers causal LM, the refusals, and a CLI fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from datamodules import ImageTextDataModule, Source
from datamodules.pipeline.prefix_sentences import pack_sentences
from mmlm.app.cli import main
from mmlm.sentences import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]


def training_batch(shapes_data: Path, model, pack_tokens: int = 0, size: int = 8):
    """The first training batch of mixed VQA + caption shards as ``model``'s datamodule builds it."""
    sources = [Source(str(shapes_data / "train" / "vqa-*.tar"), kind="vqa"),
               Source(str(shapes_data / "train" / "captions-*.tar"), kind="caption")]
    spec = model.data_spec()
    data = ImageTextDataModule(train=sources, tokenizer=str(shapes_data / "tokenizer"),
                               image_size=spec.image_preprocess.size[0], batch_size=size, shuffle_buffer=0,
                               image_tokens=spec.markers[0].count, pack_tokens=pack_tokens, caption_prompt="a picture of")
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_packed_rows_hold_several_sentences_with_their_spans_positions_and_labels(make_frozen, shapes_data):
    model = make_frozen()
    padded = training_batch(shapes_data, model)
    packed = pack_sentences(padded, 64, model.tokenizer.pad_token_id)
    lengths = padded.attention_mask.sum(1)
    assert packed.packed and len(packed) < len(padded) and packed.num_samples == len(padded) == 8
    assert int(packed.attention_mask.sum()) == int(lengths.sum()) and packed.input_ids.shape[1] <= 64
    seen = []
    for r in range(len(packed)):
        for segment in range(1, int(packed.segment_ids[r].max()) + 1):
            where = (packed.segment_ids[r] == segment).nonzero().flatten()
            start, n = int(where[0]), len(where)
            (b,) = [b for b in range(len(padded)) if b not in seen and int(lengths[b]) == n
                    and torch.equal(padded.input_ids[b, :n], packed.input_ids[r, start:start + n])][:1]
            seen.append(b)
            assert torch.equal(packed.position_ids[r, start:start + n], torch.arange(n))
            assert packed.labels[r, start] == IGNORE_INDEX
            assert torch.equal(packed.labels[r, start + 1:start + n], padded.labels[b, 1:n])
            (span,) = [s for s in packed.spans[r] if s.start == start]
            assert span.item == b and span.length == padded.spans[b][0].length
    assert sorted(seen) == list(range(len(padded)))


def test_the_datamodule_packs_training_batches_only(make_frozen, shapes_data):
    model = make_frozen()
    packed = training_batch(shapes_data, model, pack_tokens=64)
    assert packed.packed and len(packed) < packed.num_samples == 8 and packed.input_ids.shape[1] <= 64
    source = Source(str(shapes_data / "val" / "vqa-*.tar"), kind="vqa")
    data = ImageTextDataModule(val=[source], tokenizer=str(shapes_data / "tokenizer"), image_size=32, batch_size=8,
                               image_tokens=model.data_spec().markers[0].count, pack_tokens=64)
    data.setup("validate")
    assert not next(iter(data.val_dataloader())).packed


def test_frozen_packed_loss_equals_padded_loss(make_frozen, shapes_data):
    model = make_frozen().eval()
    padded = training_batch(shapes_data, model)  # the same images (training crops are random per loader)
    packed = pack_sentences(padded, 64, model.tokenizer.pad_token_id)
    assert packed.packed and len(packed) < len(padded)
    torch.testing.assert_close(model.training_loss(packed), model.training_loss(padded), rtol=1e-5, atol=1e-5)


def test_blip2_packed_loss_equals_padded_loss(shapes_data, tiny_gpt2):
    from mmlm.encoders import HFVisionEncoder
    from mmlm.language import HFCausalLM
    from mmlm.models import Blip2

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, "initializer_range": 0.02}
    model = Blip2(HFVisionEncoder(model_type="blip_2_vision_model", config=vision, freeze=True),
                  HFCausalLM(config=tiny_gpt2), tokenizer=str(shapes_data / "tokenizer"), num_query_tokens=4,
                  qformer={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}).eval()
    padded = training_batch(shapes_data, model)
    packed = pack_sentences(padded, 64, model.tokenizer.pad_token_id)
    assert packed.packed
    torch.testing.assert_close(model.training_loss(packed), model.training_loss(padded), rtol=1e-5, atol=1e-5)


def test_pack_tokens_shorter_than_a_sentence_is_refused_naming_the_numbers(make_frozen, shapes_data):
    with pytest.raises(ValueError, match=r"pack_tokens=40 is shorter .* image_tokens 2 \+ max_text_tokens 48 = 50"):
        training_batch(shapes_data, make_frozen(), pack_tokens=40)


def test_a_seq2seq_blip2_refuses_packed_rows(make_frozen, shapes_data):
    from mmlm.models.base import packing_arguments

    packed = training_batch(shapes_data, make_frozen(), pack_tokens=64)
    with pytest.raises(ValueError, match="pack_tokens=0"):
        packing_arguments(packed, torch.nn.Linear(1, 1))


def test_frozen_fits_on_packed_batches_through_the_cli(shapes_data, tmp_path, tiny_gpt2):
    """``mmlm fit`` of the tiny Frozen config with ``--data.init_args.pack_tokens``: two optimizer steps on packed
    batches, then the checkpoint."""
    config = yaml.safe_load((ROOT / "configs" / "tiny" / "frozen.yaml").read_text())
    config["model"]["init_args"]["language_model"]["init_args"] = {"config": tiny_gpt2}  # not the stage-1 export
    (tmp_path / "frozen.yaml").write_text(yaml.safe_dump(config))
    sources = json.dumps([{"urls": str(shapes_data / "train" / "vqa-*.tar"), "kind": "vqa"}])
    assert main(["fit", "--config", str(tmp_path / "frozen.yaml"),
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2",
                 "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                 "false", "--model.init_args.tokenizer", str(shapes_data / "tokenizer"),
                 "--data.init_args.train", sources, "--data.init_args.val", "null",
                 "--data.init_args.num_workers", "0", "--data.init_args.pack_tokens", "96"]) == 0
    (ckpt,) = tmp_path.rglob("*.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
