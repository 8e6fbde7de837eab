"""Contract and weight-loading tests for every vision encoder, on tiny random configs (CPU, no network)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mmlm.encoders import (  # noqa: E402
    HFVisionEncoder,
    ImagePreprocess,
    OpenClipEncoder,
    TimmEncoder,
    VisionEncoder,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI = (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))

TIMM_VIT = dict(name="vit_tiny_patch16_224", img_size=32,
                model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2))
TIMM_RESNET = dict(name="resnet10t", img_size=64, model_kwargs=dict(channels=(8, 16, 32, 64), stem_width=8))
TIMM_NF = dict(name="nf_resnet26", img_size=64, model_kwargs=dict(channels=(16, 32, 64, 128), depths=(1, 1, 1, 1)))
CLIP_VIT = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
                text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
CLIP_RN = dict(embed_dim=16, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=8, head_width=8))
CLIP_TIMM = dict(embed_dim=16, vision_cfg=dict(image_size=32, timm_model_name="test_vit", timm_pool="", timm_proj="linear"))
HF_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64)
HF_DONUT = dict(image_size=[64, 48], patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2)

# name: (constructor kwargs, expected N, expected D, expected preprocess)
PRESETS = {
    "timm_vit": (TimmEncoder, TIMM_VIT, 17, 32, ImagePreprocess((32, 32), *HALF)),
    "timm_vit_no_prefix": (TimmEncoder, {**TIMM_VIT, "prefix_tokens": False}, 16, 32, ImagePreprocess((32, 32), *HALF)),
    "timm_dino": (TimmEncoder, dict(name="vit_small_patch16_224.dino", img_size=32,
                                    model_kwargs=dict(embed_dim=32, depth=1, num_heads=2)),
                  5, 32, ImagePreprocess((32, 32), *IMAGENET)),
    "timm_resnet": (TimmEncoder, TIMM_RESNET, 4, 64, ImagePreprocess((64, 64), *IMAGENET)),
    "timm_nf_resnet": (TimmEncoder, TIMM_NF, 4, 128, ImagePreprocess((64, 64), *IMAGENET)),
    "open_clip_vit": (OpenClipEncoder, dict(config=CLIP_VIT), 17, 32, ImagePreprocess((32, 32), *OPENAI)),
    "open_clip_resnet": (OpenClipEncoder, dict(config=CLIP_RN), 4, 256, ImagePreprocess((64, 64), *OPENAI)),
    "open_clip_timm": (OpenClipEncoder, dict(config=CLIP_TIMM), 5, 64, ImagePreprocess((32, 32), *OPENAI)),
    "hf_vit": (HFVisionEncoder, dict(model_type="vit", config=HF_VIT), 17, 32, ImagePreprocess((32, 32), *HALF)),
    "hf_clip_vision": (HFVisionEncoder, dict(model_type="clip_vision_model", config=HF_VIT),
                       17, 32, ImagePreprocess((32, 32), *OPENAI)),
    "hf_donut_swin": (HFVisionEncoder, dict(model_type="donut-swin", config=HF_DONUT),
                      48, 16, ImagePreprocess((64, 48), *HALF)),
}


def build(preset: str, **overrides) -> VisionEncoder:
    cls, kwargs, *_ = PRESETS[preset]
    return cls(**{**kwargs, **overrides})


def images(encoder: VisionEncoder, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *encoder.preprocess.size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_shapes_and_preprocess(preset: str) -> None:
    _, _, num_tokens, width, preprocess = PRESETS[preset]
    encoder = build(preset)
    assert (encoder.num_tokens, encoder.width) == (num_tokens, width)
    assert encoder.preprocess.size == preprocess.size
    torch.testing.assert_close(encoder.preprocess.mean, preprocess.mean)
    torch.testing.assert_close(encoder.preprocess.std, preprocess.std)
    assert encoder(images(encoder)).shape == (2, num_tokens, width)


@pytest.mark.parametrize("preset", PRESETS)
def test_frozen_has_no_grads_and_stays_eval(preset: str) -> None:
    encoder = build(preset, freeze=True)
    encoder.train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not any(m.training for m in encoder.modules())
    pixels = images(encoder).requires_grad_(True)
    assert not encoder(pixels).requires_grad


# CLIP's post_layernorm only normalises the pooled vector, never last_hidden_state.
UNUSED_PARAMS = {"hf_clip_vision": {"model.post_layernorm.weight", "model.post_layernorm.bias"}}


@pytest.mark.parametrize("preset", PRESETS)
def test_trainable_backprops_finite_grads(preset: str) -> None:
    encoder = build(preset, grad_checkpointing=True).train()
    encoder(images(encoder)).square().mean().backward()
    grads = {name: p.grad for name, p in encoder.named_parameters()}
    assert {name for name, g in grads.items() if g is None} == UNUSED_PARAMS.get(preset, set())
    used = [g for g in grads.values() if g is not None]
    assert all(torch.isfinite(g).all() for g in used) and any(g.abs().sum() > 0 for g in used)


@pytest.mark.parametrize("preset", ["timm_vit", "timm_resnet", "open_clip_vit", "hf_vit", "hf_donut_swin"])
def test_bfloat16_casts_params_and_inputs(preset: str) -> None:
    encoder = build(preset, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert encoder(images(encoder)).dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["timm_vit", "timm_resnet", "open_clip_vit", "open_clip_resnet", "hf_vit"])
def test_penultimate_layer_differs(preset: str) -> None:
    torch.manual_seed(0)
    last = build(preset)
    torch.manual_seed(0)
    penultimate = build(preset, layer=-2)
    x = images(last)
    a, b = last(x), penultimate(x)
    assert a.shape != b.shape or not torch.allclose(a, b)
    assert b.shape == (2, penultimate.num_tokens, penultimate.width)


# ---- timm weights -------------------------------------------------------------------------------------------


def _timm_reference() -> torch.nn.Module:
    """The same tiny ViT as TIMM_VIT, with a classifier head (as a saved checkpoint would have)."""
    return timm.create_model(TIMM_VIT["name"], num_classes=10, img_size=32, **TIMM_VIT["model_kwargs"]).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_local_weights_round_trip(tmp_path, suffix: str) -> None:
    reference = _timm_reference()
    path = str(tmp_path / f"vit{suffix}")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    encoder = TimmEncoder(**TIMM_VIT, pretrained=path).eval()
    x = images(encoder)
    torch.testing.assert_close(encoder(x), reference.forward_features(x))


def test_timm_strict_loading_names_bad_keys(tmp_path) -> None:
    state = _timm_reference().state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.7.extra"] = torch.zeros(1)
    path = str(tmp_path / "bad.pth")
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"blocks\.1\.mlp\.fc2\.bias.*blocks\.7\.extra"):
        TimmEncoder(**TIMM_VIT, pretrained=path)


def test_probe_falls_back_to_a_real_forward(monkeypatch) -> None:
    import mmlm.encoders.common as common_module

    def unsupported(**_):
        raise NotImplementedError("no fake tensors here")

    monkeypatch.setattr(common_module, "FakeTensorMode", unsupported)
    encoder = TimmEncoder(**TIMM_VIT)
    assert (encoder.num_tokens, encoder.width) == (17, 32)


def test_timm_swin_nhwc_features() -> None:
    encoder = TimmEncoder("swin_tiny_patch4_window7_224", img_size=56,
                          model_kwargs=dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2)))
    assert encoder(images(encoder)).shape == (2, 49, 32)


# ---- open_clip weights --------------------------------------------------------------------------------------


def _clip_reference() -> torch.nn.Module:
    return open_clip.CLIP(**CLIP_VIT).eval()


def _reference_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's own token output (``output_tokens``): patch tokens after ``ln_post``."""
    model.visual.output_tokens = True
    return model.visual(x)[1]


def test_open_clip_local_checkpoint_round_trip(tmp_path) -> None:
    reference = _clip_reference()
    path = str(tmp_path / "clip.pt")
    torch.save({"state_dict": reference.state_dict()}, path)
    encoder = OpenClipEncoder(config=CLIP_VIT, pretrained=path, prefix_tokens=False).eval()
    x = images(encoder)
    torch.testing.assert_close(encoder(x), _reference_tokens(reference, x))


def test_open_clip_named_local_dir(tmp_path) -> None:
    reference = _clip_reference()
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    config = {"model_cfg": CLIP_VIT, "preprocess_cfg": preprocess_cfg}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    encoder = OpenClipEncoder(name=f"local-dir:{tmp_path}", prefix_tokens=False).eval()
    assert encoder.preprocess == ImagePreprocess((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = images(encoder)
    torch.testing.assert_close(encoder(x), _reference_tokens(reference, x))


def test_open_clip_strict_loading_names_bad_keys(tmp_path) -> None:
    state = _clip_reference().state_dict()
    del state["visual.ln_post.weight"]
    path = str(tmp_path / "bad.pt")
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"ln_post\.weight"):
        OpenClipEncoder(config=CLIP_VIT, pretrained=path)


def test_open_clip_needs_name_or_config() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        OpenClipEncoder()


# ---- transformers weights -----------------------------------------------------------------------------------


def test_hf_save_pretrained_round_trip(tmp_path) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    reference = ViTModel(ViTConfig(**HF_VIT)).eval()
    reference.save_pretrained(tmp_path)
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    encoder = HFVisionEncoder(name_or_path=str(tmp_path)).eval()
    assert encoder.preprocess == ImagePreprocess((32, 32), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    x = images(encoder)
    torch.testing.assert_close(encoder(x), reference(pixel_values=x).last_hidden_state)
    assert encoder.model.pooler is None


def test_hf_strict_loading_names_missing_keys(tmp_path) -> None:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(**HF_VIT)).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"missing keys \[.layers?\.2\."):
        HFVisionEncoder(name_or_path=str(tmp_path), config={"num_hidden_layers": 3})


def test_hf_composite_checkpoint_keeps_vision_tower(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                bos_token_id=0, eos_token_id=1)
    reference = CLIPModel(CLIPConfig(vision_config=HF_VIT, text_config=text, projection_dim=8)).eval()
    reference.save_pretrained(tmp_path)
    encoder = HFVisionEncoder(name_or_path=str(tmp_path)).eval()
    assert encoder.preprocess == ImagePreprocess((32, 32), *OPENAI)
    x = images(encoder)
    expected = reference.vision_model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(encoder(x), expected)


def test_hf_donut_checkpoint_keeps_swin_encoder(tmp_path) -> None:
    from transformers import (
        DonutSwinConfig,
        DonutSwinModel,
        MBartConfig,
        MBartForCausalLM,
        VisionEncoderDecoderModel,
    )

    decoder = MBartConfig(vocab_size=64, d_model=16, decoder_layers=1, encoder_layers=1, decoder_attention_heads=2,
                          encoder_attention_heads=2, decoder_ffn_dim=32, encoder_ffn_dim=32,
                          max_position_embeddings=32, is_decoder=True, add_cross_attention=True)
    reference = VisionEncoderDecoderModel(
        encoder=DonutSwinModel(DonutSwinConfig(**HF_DONUT)), decoder=MBartForCausalLM(decoder)).eval()
    reference.save_pretrained(tmp_path)
    encoder = HFVisionEncoder(name_or_path=str(tmp_path)).eval()
    assert type(encoder.model).__name__ == "DonutSwinModel" and encoder.preprocess.size == (64, 48)
    x = images(encoder)
    torch.testing.assert_close(encoder(x), reference.encoder(pixel_values=x).last_hidden_state)


def test_hf_needs_a_source() -> None:
    with pytest.raises(ValueError, match="model_type"):
        HFVisionEncoder(config=HF_VIT)


# ---- YAML / jsonargparse ------------------------------------------------------------------------------------


def test_encoders_build_from_config_dicts() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--encoder", type=VisionEncoder)
    cfg = parser.parse_object({"encoder": {"class_path": "mmlm.encoders.TimmEncoder", "init_args": TIMM_VIT}})
    encoder = parser.instantiate_classes(cfg).encoder
    assert isinstance(encoder, TimmEncoder) and encoder.num_tokens == 17


def test_hf_sub_config_missing_from_automodel_uses_its_named_class(monkeypatch) -> None:
    """Some transformers 5.x releases leave e.g. ``Blip2VisionConfig`` out of ``AutoModel``: build the class
    named after the config instead of failing."""
    import transformers

    from mmlm.encoders import hf

    def refuse(config):
        raise ValueError(f"Unrecognized configuration class {type(config)}")

    monkeypatch.setattr(hf.AutoModel, "from_config", refuse)
    encoder = HFVisionEncoder(config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                      "intermediate_size": 64, "image_size": 32, "patch_size": 16},
                              model_type="blip_2_vision_model")
    assert isinstance(encoder.model, transformers.Blip2VisionModel)
    assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32)


# ---- 2D sin-cos positions on CNN feature maps ---------------------------------------------------------------------


def test_sincos_2d_by_hand() -> None:
    from mmlm.encoders.common import sincos_2d

    table = sincos_2d(2, 3, 8)  # 4 channels per axis: sin, sin, cos, cos of index × (1, 1/100)
    assert table.shape == (6, 8)
    s, c = torch.sin, torch.cos
    one, two, hundredth, fiftieth = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.01), torch.tensor(0.02)
    row1_col1 = torch.stack([s(one), s(hundredth), c(one), c(hundredth), s(one), s(hundredth), c(one), c(hundredth)])
    row0_col2 = torch.stack([torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0),
                             s(two), s(fiftieth), c(two), c(fiftieth)])
    torch.testing.assert_close(table[1 * 3 + 1], row1_col1)  # row-major, as map_to_tokens flattens
    torch.testing.assert_close(table[0 * 3 + 2], row0_col2)
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        sincos_2d(2, 3, 6)


def test_timm_cnn_sincos_positions_are_added_per_grid_cell() -> None:
    from mmlm.encoders.common import sincos_2d

    torch.manual_seed(0)
    encoder = TimmEncoder(**{**TIMM_RESNET, "img_size": (64, 96)}, sincos_positions=True)
    assert encoder.preprocess.size == (64, 96) and encoder.num_tokens == 2 * 3  # output stride 32: a 2×3 grid
    x = torch.randn(2, 3, 64, 96)
    with_positions = encoder(x)
    encoder.sincos_positions = False
    torch.testing.assert_close(with_positions - encoder(x), sincos_2d(2, 3, 64).expand(2, -1, -1))


def test_timm_sincos_positions_refused_for_token_models() -> None:
    with pytest.raises(ValueError, match="sincos_positions is for CNN feature maps"):
        TimmEncoder(**TIMM_VIT, sincos_positions=True)
