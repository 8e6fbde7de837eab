"""LoRA through peft on every LM adapter: only the adapters train (counted), the loss falls on a toy task while the
base stays bit for bit, merged weights give the unmerged outputs (``save_pretrained``, BLIP-2's Hugging Face export),
exported peft adapter directories load onto their base with peft, and a Frozen run with a LoRA LM checkpoints the
adapters only (the base is re-read from its source), round-trips with ``weights_only=True`` and exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, Blip2Config, Blip2ForConditionalGeneration

from mmlm.checkpoint_state import FROZEN_KEY
from mmlm.freezing import freeze_
from mmlm.language import CrossAttentionLM, HFCausalLM, HFSeq2SeqLM, SubLNDecoder
from mmlm.lora import ADAPTER_WEIGHTS, LoRA, read_adapter_config
from mmlm.models import Blip2, Frozen
from mmlm.models.exported import build_from_config, export, load_checkpoint, merge_adapters
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

GPT2 = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 32, "n_layer": 2, "n_head": 2, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.3}  # GPT-2's 0.02 leaves a tiny model inert
OPT = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
       "vocab_size": 50, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "pad_token_id": 0,
       "bos_token_id": 1, "eos_token_id": 2}
T5 = {"model_type": "t5", "vocab_size": 50, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
      "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
MBART = {"model_type": "mbart", "d_model": 32, "decoder_layers": 2, "decoder_attention_heads": 4,
         "decoder_ffn_dim": 64, "vocab_size": 50, "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0,
         "eos_token_id": 2}

#: adapter → (trainable LoRA parameters at rank 4, counted by hand)
CASES = {
    # 2 layers x (c_attn 32 -> 96: 4 * (32 + 96) + attn.c_proj 32 -> 32: 4 * (32 + 32))
    "gpt2": (lambda lora: HFCausalLM(config=GPT2, lora=lora), 2 * (4 * 128 + 4 * 64)),
    # 2 layers x q, k, v, out_proj (32 -> 32 each)
    "opt": (lambda lora: HFCausalLM(config=OPT, lora=lora), 2 * 4 * (4 * 64)),
    # T5: q, k, v, o (32 -> 32) in 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions
    "t5": (lambda lora: HFSeq2SeqLM(config=T5, lora=lora), 6 * 4 * (4 * 64)),
    # MBart decoder: self- and cross-attention q, k, v, out_proj in 2 layers
    "mbart": (lambda lora: CrossAttentionLM(config=MBART, lora=lora), 4 * 4 * (4 * 64)),
    # Sub-LN decoder: q_proj, k_proj, v_proj, out_proj in 2 layers
    "subln": (lambda lora: SubLNDecoder(vocab_size=50, width=32, depth=2, num_heads=4, lora=lora), 2 * 4 * (4 * 64)),
}


def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(CASES))
def test_only_the_adapters_train(name):
    build, expected = CASES[name]
    lm = build(LoRA(rank=4))
    params = trainable(lm)
    assert sum(p.numel() for p in params.values()) == expected
    assert params and all(".lora_A." in n or ".lora_B." in n for n in params)
    assert lm.frozen  # LoRA freezes the base whatever ``freeze`` says
    freeze_(lm)  # as Frozen and BLIP-2 do to their LM: the adapters stay trainable
    assert trainable(lm).keys() == params.keys()
    lm.train()
    dropouts = [m for m in lm.modules() if type(m).__name__ == "Dropout" and m.training]
    assert dropouts and all("lora_dropout" in n for n, m in lm.named_modules() if m in dropouts)  # base stays eval


def test_target_modules_and_settings_are_checked():
    lm = HFCausalLM(config=OPT, lora=LoRA(rank=2, target_modules=["fc1"]))
    assert {n.split(".lora_")[0] for n in trainable(lm)} == {"model.model.decoder.layers.0.fc1",
                                                             "model.model.decoder.layers.1.fc1"}
    with pytest.raises(ValueError, match="rank=0 must be >= 1"):
        LoRA(rank=0)
    with pytest.raises(ValueError, match="Target modules.*not found"):
        HFCausalLM(config=OPT, lora=LoRA(target_modules=["no_such_layer"]))


def toy_batch(vocab: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """8 fixed rows of 6 tokens to memorise: ``(input_ids [8, 6], attention_mask [8, 6])``."""
    ids = torch.randint(3, vocab, (8, 6), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def train(lm, steps: int = 40, lr: float = 3e-2) -> list[float]:
    ids, mask = toy_batch()
    optimizer = torch.optim.AdamW(trainable(lm).values(), lr=lr)
    losses = []
    lm.train()
    for _ in range(steps):
        loss = lm(lm.embed(ids), mask, ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", ["gpt2", "subln"])
def test_loss_falls_on_a_toy_task_and_the_base_does_not_move(name):
    torch.manual_seed(0)
    lm = CASES[name][0](LoRA(rank=4, dropout=0.0))
    base = {k: v.clone() for k, v in lm.state_dict().items() if ".lora_" not in k}
    losses = train(lm)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in base.items())


def logits(lm, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return lm.eval()(lm.embed(ids), mask, ids).logits


@pytest.mark.parametrize("name", ["gpt2", "t5", "subln"])
def test_merged_weights_give_the_unmerged_outputs(name):
    torch.manual_seed(0)
    lm = CASES[name][0](LoRA(rank=4, dropout=0.0))
    train(lm, steps=5)
    ids, mask = toy_batch()
    before = logits(lm, ids, mask)
    lm.merge_lora()
    assert lm.lora is None and not any(".lora_" in k or "base_layer" in k for k in lm.state_dict())
    # W x + B(A x) vs (W + BA) x: one more rounding per product; a wrong merge is off by orders of magnitude more
    torch.testing.assert_close(logits(lm, ids, mask), before, atol=1e-4, rtol=1e-4)


def test_save_pretrained_merges_and_a_peft_adapter_directory_loads_onto_its_base(tmp_path):
    from mmlm.lora import save_adapter

    torch.manual_seed(0)
    HFCausalLM(config=GPT2).save_pretrained(str(tmp_path / "base"))
    lm = HFCausalLM(name_or_path=str(tmp_path / "base"), lora=LoRA(rank=4, dropout=0.0))
    train(lm, steps=5)
    ids, mask = toy_batch()
    expected = logits(lm, ids, mask)
    lm.save_pretrained(str(tmp_path / "merged"))  # plain transformers weights
    torch.testing.assert_close(logits(HFCausalLM(name_or_path=str(tmp_path / "merged")), ids, mask), expected,
                               atol=1e-4, rtol=1e-4)  # merged: one more rounding per product
    assert lm.lora is not None  # the adapter itself keeps its LoRA layers

    save_adapter(lm.lora_root(), tmp_path / "adapter", lm.source, lm.peft_task_type)
    config = read_adapter_config(tmp_path / "adapter")
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["r"] == 4
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size < 64 * 1024  # the adapter alone
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                           str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ families: Frozen (mmlm export), BLIP-2 (to_hf)


def frozen_config(shapes_data: Path, base: Path, path: Path) -> Path:
    model = {"class_path": "mmlm.models.Frozen", "init_args": {
        "tokenizer": str(shapes_data / "tokenizer"), "lr": 1e-2, "warmup_steps": 0,
        "encoder": {"class_path": "mmlm.encoders.TimmEncoder", "init_args": {
            "name": "resnet10t", "img_size": 32,
            "model_kwargs": {"channels": [8, 16, 16, 16], "stem_width": 8, "output_stride": 16}}},
        "language_model": {"class_path": "mmlm.language.HFCausalLM", "init_args": {
            "name_or_path": str(base), "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0}}}}}
    path.write_text(yaml.safe_dump({"model": model}))
    return path


def fit(model, batch, root: Path, steps: int) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(model, DataLoader([batch] * 8, batch_size=None, collate_fn=lambda b: b))
    return trainer


def test_frozen_with_a_lora_lm_checkpoints_adapters_only_and_exports(shapes_data, shapes_batch, tmp_path):
    torch.manual_seed(0)
    HFCausalLM(config={**GPT2, "vocab_size": 128}).save_pretrained(str(tmp_path / "base"))
    config = frozen_config(shapes_data, tmp_path / "base", tmp_path / "frozen.yaml")
    model = build_from_config(config)
    assert isinstance(model, Frozen)
    lm_trainable = [n for n in trainable(model) if n.startswith("language_model.")]
    assert lm_trainable and all(".lora_" in n for n in lm_trainable)  # Frozen froze the base, not the adapters
    batch = shapes_batch(kind="vqa", size=4, image_size=32, model=model)
    fit(model, batch, tmp_path / "run", 3)

    (path,) = (tmp_path / "run").rglob("*.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    lm_keys = {k for k in checkpoint["state_dict"] if k.startswith("language_model.")}
    assert lm_keys == set(lm_trainable)  # adapters saved, base left out (re-read from its source)
    assert checkpoint[FROZEN_KEY]["sources"] == {"language_model": str(tmp_path / "base")}
    assert not any(".lora_" in k for k in checkpoint[FROZEN_KEY]["tensors"])
    reloaded = load_checkpoint(path, config)  # built from the config (base re-read), weights loaded strictly
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert any(v.abs().sum() > 0 for k, v in model.state_dict().items() if ".lora_B." in k)  # B moved off zero

    export(path, tmp_path / "export", config)
    exported = Frozen.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(exported.eval().training_loss(batch), model.eval().training_loss(batch))
    adapter = tmp_path / "export" / "adapters" / "language_model"
    assert read_adapter_config(adapter)["base_model_name_or_path"] == str(tmp_path / "base")
    peft_lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                        str(adapter)).eval()
    ids, mask = toy_batch()
    with torch.no_grad():
        torch.testing.assert_close(peft_lm(input_ids=ids, attention_mask=mask).logits,
                                   logits(model.language_model, ids, mask), atol=1e-5, rtol=1e-5)


@pytest.fixture
def blip2_checkpoint(shapes_data, tmp_path) -> Path:
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                        "encoder_hidden_size": 32, "cross_attention_frequency": 1},
        text_config={**OPT, "vocab_size": 100}, num_query_tokens=2,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path / "blip2")
    tokenizer.save_pretrained(tmp_path / "blip2")
    return tmp_path / "blip2"


def test_blip2_hf_export_merges_the_adapters(blip2_checkpoint, shapes_batch, tmp_path):
    model = Blip2.from_hf(str(blip2_checkpoint)).eval()
    model.language_model.add_lora(LoRA(rank=4))
    with torch.no_grad():
        for name, param in model.language_model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)  # as after training: the update is not zero
    batch = shapes_batch(kind="vqa", size=4, image_size=32, model=model)
    with torch.no_grad():
        unmerged = model(batch).logits
        merge_adapters(model)
        model.to_hf(tmp_path / "hf")  # what ``mmlm export`` writes for BLIP-2 (merge, then to_hf)
        exported = Blip2.from_hf(str(tmp_path / "hf")).eval()
        torch.testing.assert_close(exported(batch).logits, unmerged, atol=1e-5, rtol=1e-5)
