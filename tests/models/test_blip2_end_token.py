"""BLIP-2 checkpoints whose text ends with another token than the tokenizer's eos (Salesforce's OPT checkpoints end
with ``"\\n"``, the eos of their generation config, as LAVIS's ``blip2_opt.py`` trains and generates): the model
reads that token from the checkpoint, the datamodule ends every target with it, generation stops at it, and it
survives the export and training-checkpoint round trips; a checkpoint without one keeps the tokenizer's eos."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from test_blip2 import OPT, QFORMER, VISION, M  # the tiny BLIP-2 sizes of the parity tests
from transformers import AddedToken, Blip2Config, Blip2ForConditionalGeneration

from datamodules import ImageTextDataModule, Source
from datamodules.pipeline.collate import Example, collate_examples
from mmlm.batch import SentenceBatch
from mmlm.language import GenerationConfig
from mmlm.models import Blip2
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

NEWLINE = "\n"


def write_checkpoint(directory, shapes_data, newline_ends_text: bool):
    """A random tiny OPT ``Blip2ForConditionalGeneration`` saved with the shapes tokenizer + ``<image>`` + ``"\\n"``;
    with ``newline_ends_text`` its generation config's eos is the ``"\\n"`` id (the text config keeps ``</s>``)."""
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    tokenizer.add_tokens([AddedToken(NEWLINE, normalized=False)])
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=M,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config)
    newline = tokenizer.convert_tokens_to_ids(NEWLINE)
    if newline_ends_text:
        hf.generation_config.eos_token_id = newline
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, tokenizer, newline


@pytest.fixture
def newline_checkpoint(shapes_data, tmp_path):
    return write_checkpoint(tmp_path / "newline", shapes_data, newline_ends_text=True)


@pytest.fixture
def eos_checkpoint(shapes_data, tmp_path):
    return write_checkpoint(tmp_path / "eos", shapes_data, newline_ends_text=False)


def val_batch(shapes_data, model: Blip2, **arguments) -> SentenceBatch:
    """The first caption batch of the shapes val split as ``ImageTextDataModule`` gives it to ``model`` (tokenizer,
    preprocessing, marker and end token from ``model.data_spec()``, unless ``arguments`` say otherwise)."""
    dm = ImageTextDataModule(val=[Source(str(shapes_data / "val" / "captions-*.tar"))], batch_size=4, **arguments)
    dm.trainer = SimpleNamespace(lightning_module=model, global_rank=0, world_size=1, current_epoch=0)
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


def last_labels(batch: SentenceBatch) -> list[int]:
    """The last supervised token of every row (the one each target ends with)."""
    return [row[row != -100][-1].item() for row in batch.labels]


def always_emit(model: Blip2, token: int) -> None:
    """Make the (tied) LM predict ``token`` at every step, whatever it reads: the final layer norm outputs that
    token's embedding, made the longest row of the table."""
    lm = model.language_model.model
    embeddings, norm = lm.get_input_embeddings().weight, lm.model.decoder.final_layer_norm
    with torch.no_grad():
        embeddings[token] = embeddings[token] / embeddings[token].norm() * 10 * embeddings.norm(dim=-1).max()
        norm.weight.zero_()
        norm.bias.copy_(embeddings[token])


def test_from_hf_takes_the_generation_configs_end_token(newline_checkpoint):
    directory, tokenizer, newline = newline_checkpoint
    model = Blip2.from_hf(str(directory))
    assert newline != tokenizer.eos_token_id
    assert model.end_token_id == newline
    assert model.data_spec().end_token_id == newline
    assert model.language_model.model.generation_config.eos_token_id == newline
    assert model.hparams["end_token_id"] == newline  # recorded: a checkpoint rebuilds with it


def test_the_datamodules_targets_end_with_the_models_end_token(newline_checkpoint, shapes_data):
    directory, tokenizer, newline = newline_checkpoint
    model = Blip2.from_hf(str(directory))
    batch = val_batch(shapes_data, model)
    assert last_labels(batch) == [newline] * 4
    assert not (batch.labels == tokenizer.eos_token_id).any()
    lengths = batch.attention_mask.sum(dim=1)
    assert [batch.input_ids[i, n - 1].item() for i, n in enumerate(lengths)] == [newline] * 4
    # an argument of the datamodule wins over the spec
    assert last_labels(val_batch(shapes_data, model, end_token_id=tokenizer.eos_token_id)) == [2] * 4


def test_generation_stops_at_the_end_token(newline_checkpoint, eos_checkpoint, shapes_data):
    settings = GenerationConfig(max_new_tokens=5)
    generated = {}
    for name, (directory, _, newline) in {"newline": newline_checkpoint, "eos": eos_checkpoint}.items():
        model = Blip2.from_hf(str(directory), generation=settings).eval()
        always_emit(model, newline)
        batch = val_batch(shapes_data, model)
        embeds = model.embed(batch.prompt_ids, batch.prompt_spans, batch)
        generated[name] = model.language_model.generate(embeds, batch.prompt_mask, settings)
        texts = model.generate_text(batch)
        assert texts == [""] * 4  # "\n" is stripped like the eos is dropped
    assert generated["newline"].tolist() == [[newline]] * 4  # stopped where it was trained to
    assert generated["eos"].tolist() == [[newline] * 5] * 4  # "\n" is text for a model that ends with </s>


def test_export_and_training_checkpoint_keep_the_end_token(newline_checkpoint, tmp_path):
    directory, _, newline = newline_checkpoint
    model = Blip2.from_hf(str(directory))
    model.to_hf(tmp_path / "export")
    written = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert written["eos_token_id"] == newline
    assert Blip2.from_hf(str(tmp_path / "export")).end_token_id == newline

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    (directory / "generation_config.json").unlink()  # the source no longer says "\n": the checkpoint does
    assert Blip2.from_hf(str(directory)).end_token_id == 2
    reloaded = Blip2.load_from_checkpoint(tmp_path / "last.ckpt")
    assert reloaded.end_token_id == newline and reloaded.data_spec().end_token_id == newline
    assert reloaded.language_model.model.generation_config.eos_token_id == newline


def test_a_checkpoint_without_another_end_token_keeps_the_tokenizers_eos(eos_checkpoint, shapes_data, tmp_path):
    directory, tokenizer, newline = eos_checkpoint
    model = Blip2.from_hf(str(directory))
    assert model.end_token_id == tokenizer.eos_token_id == 2
    assert model.data_spec().end_token_id is None
    assert last_labels(val_batch(shapes_data, model)) == [tokenizer.eos_token_id] * 4
    model.to_hf(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text())["eos_token_id"] == 2
    # an explicit end token wins over the checkpoint's
    chosen = Blip2.from_hf(str(directory), end_token_id=newline)
    assert chosen.data_spec().end_token_id == newline
    assert chosen.language_model.model.generation_config.eos_token_id == newline


def test_collate_ends_targets_with_the_given_token(shapes_data):
    tokenizer = load_tokenizer(shapes_data / "tokenizer")
    example = Example(image=torch.zeros(3, 8, 8), prompt="what colour", target="red", references=["red"], id=0,
                      task="vqa", key="k")
    assert collate_examples([example], tokenizer, 48).labels[0, -1].item() == tokenizer.eos_token_id
    assert collate_examples([example], tokenizer, 48, end_token_id=7).labels[0, -1].item() == 7
    assert collate_examples([example], tokenizer, 3, end_token_id=7).input_ids[0].tolist()[-1] == 7  # kept when cut
    with pytest.raises(ValueError, match=r"end_token_id=999 is not an id of"):
        collate_examples([example], tokenizer, 48, end_token_id=999)


def test_blip2_rejects_an_end_token_outside_the_tokenizer(eos_checkpoint):
    directory, tokenizer, _ = eos_checkpoint
    with pytest.raises(ValueError, match=r"Blip2: end_token_id=500 is not an id of the tokenizer"):
        Blip2.from_hf(str(directory), end_token_id=500)
