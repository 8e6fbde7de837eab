"""Loading large LMs sanely: ``dtype``, ``attn_implementation`` and bitsandbytes ``quantization_config`` reach
``from_pretrained`` (monkeypatched: no weights are downloaded and no GPU is needed), and a machine without a CUDA GPU
refuses 4/8-bit with one message."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BitsAndBytesConfig

from mmlm.hub import build_hf_config
from mmlm.language import HFCausalLM, HFSeq2SeqLM
from mmlm.language.hf_base import bnb_config

GPT2 = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 32, "n_layer": 2, "n_head": 2, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0}
T5 = {"model_type": "t5", "vocab_size": 50, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
      "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}


def capture(monkeypatch, auto_class, config: dict) -> list[dict]:
    """Replace ``auto_class.from_pretrained`` by one that records its keyword arguments and builds ``config``."""
    calls: list[dict] = []

    def from_pretrained(name_or_path, **kwargs):
        calls.append({"name_or_path": name_or_path, **kwargs})
        model = auto_class.from_config(build_hf_config(config))
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}

    monkeypatch.setattr(auto_class, "from_pretrained", from_pretrained)
    return calls


@pytest.mark.parametrize("adapter, auto_class, config", [(HFCausalLM, AutoModelForCausalLM, GPT2),
                                                         (HFSeq2SeqLM, AutoModelForSeq2SeqLM, T5)])
def test_dtype_and_attention_kernel_reach_from_pretrained(monkeypatch, adapter, auto_class, config):
    calls = capture(monkeypatch, auto_class, config)
    adapter(name_or_path="org/large-lm", dtype="bfloat16", attn_implementation="sdpa")
    (call,) = calls
    assert call["name_or_path"] == "org/large-lm" and call["output_loading_info"] is True
    assert call["dtype"] == torch.bfloat16 and call["attn_implementation"] == "sdpa"
    assert "quantization_config" not in call and "device_map" not in call


def test_defaults_pass_nothing_extra(monkeypatch):
    calls = capture(monkeypatch, AutoModelForCausalLM, GPT2)
    HFCausalLM(name_or_path="org/large-lm")
    assert set(calls[0]) == {"name_or_path", "output_loading_info"}  # transformers' own defaults (dtype auto, sdpa)


@pytest.mark.parametrize("quantization, expected", [("4bit", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                               "bnb_4bit_use_double_quant": True}),
                                                     ("8bit", {"load_in_8bit": True})])
def test_quantization_config_reaches_from_pretrained_on_a_gpu(monkeypatch, quantization, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU path, without a GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    prepared = []
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda model, **kw: prepared.append(kw) or model)
    calls = capture(monkeypatch, AutoModelForCausalLM, GPT2)
    lm = HFCausalLM(name_or_path="org/large-lm", dtype="bfloat16", quantization=quantization)
    (call,) = calls
    config = call["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig)
    assert all(getattr(config, key) == value for key, value in expected.items())
    if quantization == "4bit":
        assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert call["device_map"] == {"": 1} and call["dtype"] == torch.bfloat16  # this rank's GPU
    assert prepared == [{"use_gradient_checkpointing": False}]  # peft's k-bit preparation (QLoRA)
    assert lm.frozen and not any(p.requires_grad for p in lm.parameters())  # a quantized base only trains via LoRA
    assert lm.offline_args()["quantization"] is None  # an export rebuilds the architecture unquantized


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_is_refused_without_a_gpu(monkeypatch, quantization):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = capture(monkeypatch, AutoModelForCausalLM, GPT2)
    with pytest.raises(ValueError, match=rf"quantization='{quantization}' needs a CUDA GPU \(bitsandbytes\)"):
        HFCausalLM(name_or_path="org/large-lm", quantization=quantization)
    assert calls == []  # refused before anything is loaded


def test_unknown_quantization_and_quantized_config_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"quantization='3bit' is not one of \('8bit', '4bit'\)"):
        bnb_config("3bit", None)
    with pytest.raises(ValueError, match="quantization needs pretrained weights"):
        HFCausalLM(config=GPT2, quantization="4bit")
