"""MoME transformer: modes and shapes, routing of tokens to modality experts, padding, timm ViT initialisation."""

from __future__ import annotations

import pytest
import timm
import torch

from mmlm.convert.vlmo_timm import NEW_MOME_KEYS, load_timm_into_mome, timm_key_to_mome
from mmlm.encoders.mome import MoMEBlock, MoMETransformer

SIZES = {"img_size": 32, "patch_size": 8, "dim": 32, "depth": 3, "num_heads": 2, "vl_start": 2, "vocab_size": 40,
         "max_text_len": 12}
B, T, N = 2, 7, 17  # N = 1 + (32 / 8)²
#: unilm VLMO's additions off: the image path is then exactly a timm ViT
PLAIN_VIT = {"layer_scale_init": 0.0, "rel_pos_bias": False, "modality_type_embed": False}


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


def perturb_(mome: MoMETransformer, expert: str) -> None:
    with torch.no_grad():
        for block in mome.blocks:
            if expert in block.experts:
                for param in block.experts[expert].parameters():
                    param.add_(torch.randn_like(param))


def outputs(mome: MoMETransformer, inputs) -> dict[str, torch.Tensor]:
    pixels, ids, mask = inputs
    with torch.no_grad():
        fusion = mome("fusion", pixels, ids, mask)
        return {"image": mome("image", pixels=pixels).image, "text": mome("text", text_ids=ids, text_mask=mask).text,
                "fusion": torch.cat([fusion.text, fusion.image], dim=1)}


def test_modes_give_the_documented_shapes(mome, inputs):
    pixels, ids, mask = inputs
    assert mome("image", pixels=pixels).text is None and mome("image", pixels=pixels).image.shape == (B, N, 32)
    assert mome("text", text_ids=ids, text_mask=mask).text.shape == (B, T, 32)
    fused = mome("fusion", pixels, ids, mask)
    assert fused.text.shape == (B, T, 32) and fused.image.shape == (B, N, 32)
    assert [len(block.experts) for block in mome.blocks] == [2, 2, 3]  # VL-FFN from vl_start = 2 on
    with pytest.raises(ValueError, match="needs pixels"):
        mome("fusion", text_ids=ids)
    with pytest.raises(ValueError, match="not one of"):
        mome("audio", pixels=pixels)


@pytest.mark.parametrize("expert, unchanged, changed", [
    ("v", ["text"], ["image", "fusion"]),
    ("l", ["image"], ["text", "fusion"]),
    ("vl", ["image", "text"], ["fusion"]),
])
def test_each_expert_serves_only_its_modality(mome, inputs, expert, unchanged, changed):
    before = outputs(mome, inputs)
    perturb_(mome, expert)
    after = outputs(mome, inputs)
    for mode in unchanged:
        torch.testing.assert_close(after[mode], before[mode], rtol=0, atol=0)
    for mode in changed:
        assert (after[mode] - before[mode]).abs().max() > 1e-3, mode


def test_fusion_routes_text_to_l_ffn_and_image_to_v_ffn_below_vl_start():
    torch.manual_seed(0)
    block = MoMEBlock(16, 2, with_vl=False)
    x = torch.randn(2, 9, 16)
    routed = block.route(x, "fusion", num_text=4)
    torch.testing.assert_close(routed[:, :4], block.experts["l"](x[:, :4]))
    torch.testing.assert_close(routed[:, 4:], block.experts["v"](x[:, 4:]))
    top = MoMEBlock(16, 2, with_vl=True)
    torch.testing.assert_close(top.route(x, "fusion", num_text=4), top.experts["vl"](x))


def test_fusion_only_uses_vl_ffn_when_it_starts_at_the_bottom(inputs):
    torch.manual_seed(0)
    mome = MoMETransformer(**{**SIZES, "vl_start": 0}).eval()
    before = outputs(mome, inputs)["fusion"]
    perturb_(mome, "v")
    perturb_(mome, "l")
    torch.testing.assert_close(outputs(mome, inputs)["fusion"], before, rtol=0, atol=0)


def test_padding_does_not_change_real_tokens(mome, inputs):
    pixels, ids, mask = inputs
    padded_ids = torch.cat([ids, torch.zeros(B, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short, long = mome("fusion", pixels, ids, mask), mome("fusion", pixels, padded_ids, padded_mask)
    torch.testing.assert_close(long.text[0, :T], short.text[0, :T], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long.text[1, :5], short.text[1, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long.image, short.image, atol=1e-5, rtol=1e-5)


def test_masked_patches_become_the_mask_token(mome, inputs):
    pixels = inputs[0]
    patch_mask = torch.zeros(B, 16, dtype=torch.bool)
    patch_mask[:, :5] = True
    embedded = mome.embed_image(pixels, patch_mask)
    expected = mome.mask_token[0, 0] + mome.pos_embed[0, 1:6]
    torch.testing.assert_close(embedded[0, 1:6], expected)
    torch.testing.assert_close(embedded[1, 7:], mome.embed_image(pixels)[1, 7:])


def test_gradients_reach_every_part_used_in_fusion(mome, inputs):
    pixels, ids, mask = inputs
    out = mome("fusion", pixels, ids, mask)
    (out.text.sum() + out.image.sum()).backward()
    unused = {name for name, p in mome.named_parameters() if p.grad is None}
    # fusion below vl_start uses V/L, above uses VL: only the top block's V/L experts and the mask token are idle
    assert unused == {n for n, _ in mome.named_parameters()
                      if n.startswith(("blocks.2.experts.v.", "blocks.2.experts.l.")) or n == "mask_token"}


def tiny_vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=3, num_heads=2, num_classes=5).eval()


def test_timm_vit_file_loads_strictly_and_matches_forward_features(tmp_path, inputs):
    torch.manual_seed(3)
    vit = tiny_vit()
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    mome = MoMETransformer(**SIZES, **PLAIN_VIT).eval()
    load_timm_into_mome(mome, str(path))
    with torch.no_grad():
        torch.testing.assert_close(mome("image", pixels=inputs[0]).image, vit.forward_features(inputs[0]),
                                   rtol=0, atol=0)
    assert timm_key_to_mome("blocks.1.mlp.fc2.weight") == "blocks.1.experts.v.mlp.fc2.weight"
    assert timm_key_to_mome("blocks.0.norm2.bias") == "blocks.0.experts.v.norm.bias"
    assert timm_key_to_mome("head.weight") is None and "word_embed.*" in NEW_MOME_KEYS


def test_timm_loading_names_missing_and_unknown_keys():
    state = tiny_vit().state_dict()
    mome = MoMETransformer(**SIZES)
    with pytest.raises(RuntimeError, match=r"missing keys \['blocks.0.attn.qkv.weight'\]"):
        load_timm_into_mome(mome, {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"})
    with pytest.raises(KeyError, match="blocks.0.ls1.gamma"):
        load_timm_into_mome(mome, {**state, "blocks.0.ls1.gamma": torch.ones(32)})
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_timm_into_mome(mome, "missing.pth")
