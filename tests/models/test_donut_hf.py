"""Donut vs transformers' ``VisionEncoderDecoderModel`` (DonutSwin + MBart) through the production converter:
logits and cached greedy generations, strict key errors, export → reload round trip, processor settings."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    DonutImageProcessor,
    DonutProcessor,
    DonutSwinConfig,
    MBartConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from mmlm.batch import Batch
from mmlm.language import GenerationConfig
from mmlm.models import Donut
from mmlm.piece_tokenizer import train_piece_tokenizer

SWIN = {"image_size": [64, 48], "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
        "window_size": 4}
TASKS = ["<s_cord-v2>", "<s_docvqa>", "<s_question>", "</s_question>", "<s_answer>", "</s_answer>", "<s_total>",
         "</s_total>"]
TEXTS = ["Total 12.50 Cash 20.00", "Latte 3.50 Bagel 2.25", "what is the total ?", "Thank you"] * 8


def mbart(vocab_size: int, d_model: int = 32, **extra) -> MBartConfig:
    return MBartConfig(vocab_size=vocab_size, d_model=d_model, decoder_layers=2, decoder_attention_heads=2,
                       decoder_ffn_dim=64, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                       scale_embedding=True, add_final_layer_norm=True, pad_token_id=1, bos_token_id=0,
                       eos_token_id=2, **extra)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A trained piece tokenizer with the task/field tokens already added (as a Donut checkpoint ships it)."""
    out = tmp_path_factory.mktemp("tok")
    tokenizer = train_piece_tokenizer(TEXTS, vocab_size=80)
    tokenizer.add_special_tokens({"additional_special_tokens": TASKS})
    tokenizer.save_pretrained(out)
    return out


def save_hf(directory, tokenizer_dir, d_model: int = 32, align: bool = True) -> VisionEncoderDecoderModel:
    """A random tiny Donut checkpoint (weights ~N(0, 0.3) so greedy decoding varies) + DonutProcessor files."""
    from mmlm.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(DonutSwinConfig(**SWIN),
                                                                     mbart(len(tokenizer) + 3, d_model))
    config.pad_token_id, config.decoder_start_token_id, config.eos_token_id = 1, 0, 2
    torch.manual_seed(0)
    hf = VisionEncoderDecoderModel(config)
    with torch.no_grad():
        for param in hf.decoder.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.3)
    hf.save_pretrained(directory)
    processor = DonutImageProcessor(size={"height": 64, "width": 48}, do_align_long_axis=align)
    DonutProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(directory)
    return hf.eval()


def prompt_batch(tokenizer, targets: list[str]) -> Batch:
    """Two documents, the same one-token task prompt, right-padded targets."""
    prompt = tokenizer.convert_tokens_to_ids("<s_cord-v2>")
    rows = [[prompt] + tokenizer(t, add_special_tokens=False).input_ids + [2] for t in targets]
    width = max(map(len, rows))
    ids = torch.tensor([r + [1] * (width - len(r)) for r in rows])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    torch.manual_seed(1)
    return Batch(pixels=torch.randn(2, 3, 64, 48), input_ids=ids, attention_mask=mask, labels=labels,
                 prompt_ids=ids[:, :1], prompt_mask=torch.ones(2, 1, dtype=torch.long), tasks=["document"] * 2)


@torch.no_grad()
@pytest.mark.parametrize("d_model", [32, 24], ids=["same-width", "projected"])
def test_logits_and_cached_greedy_generation_match_transformers(tokenizer_dir, tmp_path, d_model):
    hf = save_hf(tmp_path, tokenizer_dir, d_model)
    model = Donut.from_hf(str(tmp_path), generation=GenerationConfig(max_new_tokens=8), suppress_unk=False).eval()
    assert (model.enc_to_dec_proj is None) == (d_model == 32)
    batch = prompt_batch(model.tokenizer, ["<s_total>12.50</s_total>", "<s_total>3</s_total>"])
    ours = model(batch).logits
    theirs = hf(pixel_values=batch.pixels, decoder_input_ids=batch.input_ids,
                decoder_attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ours, theirs)
    new = model.decoder.generate(model.decoder.embed(batch.prompt_ids), batch.prompt_mask, model.generation,
                                 encoder_states=model.encode_images(batch.pixels))
    reference = hf.generate(batch.pixels, decoder_input_ids=batch.prompt_ids, max_new_tokens=8, do_sample=False,
                            num_beams=1, use_cache=True)
    assert torch.equal(new, reference[:, 1:]), (new, reference)
    assert len(set(new[0].tolist())) > 1  # a varied sequence, not one repeated id


@torch.no_grad()
def test_export_round_trips_through_transformers(tokenizer_dir, tmp_path):
    save_hf(tmp_path / "in", tokenizer_dir)
    model = Donut.from_hf(str(tmp_path / "in")).eval()
    model.add_tokens(["<s_menu>", "</s_menu>"])
    model.to_hf(tmp_path / "out")
    hf, info = VisionEncoderDecoderModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    batch = prompt_batch(model.tokenizer, ["<s_menu>Latte</s_menu>", "<s_total>3</s_total>"])
    torch.testing.assert_close(model(batch).logits, hf.eval()(pixel_values=batch.pixels,
                                                             decoder_input_ids=batch.input_ids,
                                                             decoder_attention_mask=batch.attention_mask).logits)
    processor = DonutProcessor.from_pretrained(tmp_path / "out")
    assert processor.tokenizer.convert_tokens_to_ids("</s_menu>") == model.tokenizer.convert_tokens_to_ids("</s_menu>")
    assert processor.image_processor.do_align_long_axis and processor.image_processor.size["height"] == 64
    again = Donut.from_hf(str(tmp_path / "out"))
    assert again.align_long_axis and again.image_preprocess == model.image_preprocess
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, msg=key)


def test_from_hf_reads_size_and_alignment_and_can_override_them(tokenizer_dir, tmp_path):
    save_hf(tmp_path, tokenizer_dir, align=False)
    model = Donut.from_hf(str(tmp_path))
    assert model.image_preprocess.size == (64, 48) and model.image_preprocess.mean == (0.5, 0.5, 0.5)
    assert not model.align_long_axis
    bigger = Donut.from_hf(str(tmp_path), image_size=(96, 64), align_long_axis=True)
    assert bigger.image_preprocess.size == (96, 64) and bigger.align_long_axis
    assert bigger.encode_images(torch.randn(1, 3, 96, 64)).shape == (1, bigger.encoder.num_tokens, 32)
    assert bigger.encoder.num_tokens == (96 // 8) * (64 // 8)  # two stages: patch 4, one 2× merge


@pytest.mark.parametrize("change,message", [("stray", "unexpected keys ['extra_head.weight']"),
                                            ("unknown", "decoder.*: missing keys [], unexpected keys ['extra']"),
                                            ("missing", "encoder.*: missing keys ['embeddings.norm.bias']")])
def test_from_hf_names_stray_and_missing_keys(tokenizer_dir, tmp_path, change, message):
    save_hf(tmp_path, tokenizer_dir)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    if change == "stray":
        state["extra_head.weight"] = torch.zeros(1)
    elif change == "unknown":
        state["decoder.extra"] = torch.zeros(1)
    else:
        del state["encoder.embeddings.norm.bias"]
    save_file(state, path)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        Donut.from_hf(str(tmp_path))


def test_config_of_the_export_has_tokenizer_ids(tokenizer_dir, tmp_path):
    save_hf(tmp_path / "in", tokenizer_dir)
    Donut.from_hf(str(tmp_path / "in")).to_hf(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["pad_token_id"], config["eos_token_id"], config["decoder_start_token_id"]) == (1, 2, 0)
    assert config["encoder"]["image_size"] == [64, 48]


def test_every_base_setting_reaches_from_hf_from_yaml_and_a_typo_is_refused(tokenizer_dir, tmp_path, capsys):
    """``Donut.from_hf`` takes every ``MultimodalModule`` argument through LightningCLI (``ModuleSettings``)."""
    from mmlm.app.lightning import lightning_cli

    save_hf(tmp_path / "hf", tokenizer_dir)
    model = {"class_path": "mmlm.models.Donut.from_hf",
             "init_args": {"name_or_path": str(tmp_path / "hf"), "min_lr_ratio": 0.5, "max_nonfinite_steps": 3,
                           "betas": [0.8, 0.95], "generation": {"max_new_tokens": 7}}}
    data = {"class_path": "datamodules.ImageTextDataModule", "init_args": {}}
    cli = lightning_cli(["--model", json.dumps(model), "--data", json.dumps(data)], run=False)
    assert (cli.model.min_lr_ratio, cli.model.max_nonfinite_steps, cli.model.betas) == (0.5, 3, (0.8, 0.95))
    assert cli.model.generation.max_new_tokens == 7
    model["init_args"]["min_lr_ration"] = 0.5
    with pytest.raises(SystemExit):
        lightning_cli(["--model", json.dumps(model), "--data", json.dumps(data)], run=False)
    assert "min_lr_ration" in capsys.readouterr().err
