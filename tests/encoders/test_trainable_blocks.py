"""``trainable_blocks``: a frozen encoder whose last blocks (and final norm) still train (KOSMOS-1 trains CLIP's last
block). Only those get gradients and move in a step, they follow train/eval mode while the rest stays in eval mode,
the plain frozen case is unchanged (``no_grad`` forward), lean checkpoints keep the trained blocks, and cached
features refuse such an encoder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mmlm.checkpoint_state import leave_out_frozen
from mmlm.encoders import HFVisionEncoder, OpenClipEncoder, TimmEncoder
from mmlm.models.base import MultimodalModule

CLIP_VIT = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=3, head_width=16))
CLIP_RN = dict(embed_dim=16, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=8, head_width=8))
TIMM_VIT = dict(name="vit_tiny_patch16_224", img_size=32,
                model_kwargs=dict(patch_size=8, embed_dim=32, depth=3, num_heads=2))
HF_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
              intermediate_size=64)

#: encoder → (constructor, prefixes of the parameters that train with trainable_blocks=1 and layer=-1)
CASES = {
    "open_clip": (lambda **kw: OpenClipEncoder(config=CLIP_VIT, **kw),
                  ("visual.transformer.resblocks.2.", "visual.ln_post.")),
    "timm": (lambda **kw: TimmEncoder(**TIMM_VIT, **kw), ("model.blocks.2.", "model.norm.")),
    "hf": (lambda **kw: HFVisionEncoder(config=HF_VIT, model_type="vit", **kw),
           ("model.layers.2.", "model.layernorm.")),
}


def trainable(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", list(CASES))
def test_only_the_last_block_and_norm_train(kind):
    build, prefixes = CASES[kind]
    torch.manual_seed(0)
    encoder = build(freeze=True, trainable_blocks=1)
    names = trainable(encoder)
    assert names and all(n.startswith(prefixes) for n in names)
    assert {p for p in prefixes if any(n.startswith(p) for n in names)} == set(prefixes)  # block and norm

    encoder.train()
    kept = encoder.adapters()
    assert all(m.training for part in kept for m in part.modules())
    assert not any(m.training for m in encoder.modules() if not any(m is k or m in set(k.modules()) for k in kept))
    encoder.eval()
    assert not any(m.training for m in encoder.modules())
    encoder.train()

    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    optimizer = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    tokens = encoder(torch.randn(2, 3, 32, 32))
    assert tokens.requires_grad
    tokens.pow(2).mean().backward()
    graded = {n for n, p in encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert graded == set(names)
    optimizer.step()
    for name, param in encoder.named_parameters():
        assert torch.equal(param, before[name]) != (name in names), name


@pytest.mark.parametrize("kind", list(CASES))
def test_the_frozen_case_is_unchanged(kind):
    build, _ = CASES[kind]
    encoder = build(freeze=True).train()
    assert not trainable(encoder) and not encoder.adapters() and encoder.no_grad_forward
    assert not any(m.training for m in encoder.modules())
    assert not encoder(torch.randn(1, 3, 32, 32)).requires_grad


def test_an_intermediate_layer_trains_the_blocks_up_to_it():
    encoder = OpenClipEncoder(config=CLIP_VIT, layer=-2, freeze=True, trainable_blocks=1)
    names = trainable(encoder)
    assert names and all(n.startswith("visual.transformer.resblocks.1.") for n in names)  # block 2 pruned, no ln_post
    hf = HFVisionEncoder(config=HF_VIT, model_type="vit", layer=-2, freeze=True, trainable_blocks=2)
    assert {n.split(".")[2] for n in trainable(hf)} == {"0", "1"}  # hidden_states[-2] is layer 1's output
    hf(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in hf.parameters() if p.requires_grad)


@pytest.mark.parametrize("build,message", [
    (lambda: OpenClipEncoder(config=CLIP_VIT, trainable_blocks=1), "needs freeze: true"),
    (lambda: OpenClipEncoder(config=CLIP_VIT, freeze=True, trainable_blocks=4), "between 0 and the 3 blocks"),
    (lambda: OpenClipEncoder(config=CLIP_RN, freeze=True, trainable_blocks=1), "not supported"),
    (lambda: TimmEncoder("resnet10t", img_size=64, model_kwargs=dict(channels=(8, 16, 32, 64), stem_width=8),
                         freeze=True, trainable_blocks=1), "not supported"),
])
def test_impossible_settings_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_lean_checkpoints_keep_the_trained_blocks():
    encoder = OpenClipEncoder(config=CLIP_VIT, freeze=True, trainable_blocks=1)
    encoder.source = "some/source"
    module = torch.nn.Module()
    module.encoder = encoder
    checkpoint = {"state_dict": module.state_dict()}
    leave_out_frozen(module, checkpoint, "source")
    assert set(checkpoint["state_dict"]) == {f"encoder.{n}" for n in trainable(encoder)}


class WithEncoder(MultimodalModule):
    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder


def test_cached_features_refuse_an_encoder_with_trainable_blocks():
    encoder = OpenClipEncoder(config=CLIP_VIT, freeze=True, trainable_blocks=1)
    batch = SimpleNamespace(features=torch.zeros(2, encoder.num_tokens, encoder.width))
    with pytest.raises(ValueError, match="encoder is trainable"):
        WithEncoder(encoder)._check_cached_features(batch)
    WithEncoder(OpenClipEncoder(config=CLIP_VIT, freeze=True))._check_cached_features(batch)  # frozen: accepted


def test_blip2_vision_trains_its_post_layernorm_with_the_last_layer():
    encoder = HFVisionEncoder(config={k: v for k, v in HF_VIT.items()}, model_type="blip_2_vision_model", freeze=True,
                              trainable_blocks=1)
    names = trainable(encoder)
    assert {n.split(".")[1] for n in names} == {"encoder", "post_layernorm"}
    encoder(torch.randn(1, 3, 32, 32)).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters() if p.requires_grad)
