"""MLM masking (BERT 80/10/10) and masked-patch selection / targets for masked image modelling."""

from __future__ import annotations

import pytest
import torch

from mmlm.mlm_masking import (
    block_patch_mask,
    mask_tokens,
    masked_patch_regression_loss,
    patchify,
    random_patch_mask,
)

MASK_ID, VOCAB = 3, 50


def test_bert_masking_splits_80_10_10_and_never_touches_special_tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, VOCAB, (400, 50), generator=generator)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -5:] = False  # [CLS] and padding/eos
    masked, labels = mask_tokens(ids, maskable, MASK_ID, VOCAB, prob=0.15, generator=generator)
    chosen = labels != -100
    assert not chosen[~maskable].any() and torch.equal(masked[~maskable], ids[~maskable])
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert abs(chosen.float().sum() / maskable.sum() - 0.15) < 0.01
    as_mask = (masked[chosen] == MASK_ID).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert abs(as_mask - 0.8) < 0.02 and 0.08 < kept < 0.13  # 10 % kept (+ random ids that hit the original)
    assert (masked[chosen] < VOCAB).all()


def test_every_row_with_a_maskable_token_gets_one_masked():
    ids = torch.arange(12).reshape(3, 4) + 10
    maskable = torch.tensor([[False, True, False, False], [False, False, False, False], [True, True, True, True]])
    for seed in range(20):
        _, labels = mask_tokens(ids, maskable, MASK_ID, VOCAB, prob=0.01, generator=torch.Generator().manual_seed(seed))
        assert (labels[0] != -100).tolist() == [False, True, False, False]
        assert (labels[1] == -100).all() and (labels[2] != -100).sum() >= 1


def test_mlm_probability_must_be_a_fraction():
    with pytest.raises(ValueError, match="mlm probability"):
        mask_tokens(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), 1, 5, prob=0.0)


def test_patch_masks_have_exact_counts():
    mask = random_patch_mask(6, 16, 0.4, torch.Generator().manual_seed(0))
    assert mask.shape == (6, 16) and (mask.sum(1) == 6).all()
    assert not torch.equal(mask[0], mask[1])
    blocks = block_patch_mask(3, grid=8, block=2, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert blocks.shape == (3, 64) and (blocks.sum(1) == 32).all()
    grid = blocks[0].reshape(4, 2, 4, 2)  # every 2×2 square is all masked or all visible
    assert ((grid.sum(dim=(1, 3)) == 0) | (grid.sum(dim=(1, 3)) == 4)).all()
    with pytest.raises(ValueError, match="must divide"):
        block_patch_mask(1, grid=7, block=2, ratio=0.5)


def test_patchify_matches_the_patch_embedding_order():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 16, 24)
    conv = torch.nn.Conv2d(3, 5, kernel_size=8, stride=8)
    tokens = conv(pixels).flatten(2).transpose(1, 2)  # [B, P, 5], timm's PatchEmbed order
    weight = conv.weight.permute(0, 2, 3, 1).reshape(5, -1)  # (out, p, p, C) like patchify's (p, p, C)
    torch.testing.assert_close(patchify(pixels, 8) @ weight.t() + conv.bias, tokens, atol=1e-5, rtol=1e-5)
    assert patchify(pixels, 8).shape == (2, 6, 192)


def test_regression_loss_counts_only_masked_patches():
    target = torch.zeros(1, 4, 3)
    prediction = torch.tensor([[[1.0] * 3, [5.0] * 3, [2.0] * 3, [9.0] * 3]])
    mask = torch.tensor([[True, False, True, False]])
    assert masked_patch_regression_loss(prediction, target, mask).item() == pytest.approx(1.5)
