"""Issue 9 performance switches: ``torch_compile`` gives the eager loss and gradients, and frozen parts build no
autograd graph (the frozen encoder runs under ``no_grad``; frozen LM weights get no gradient) in every family
with a frozen encoder (Frozen with ``freeze: true``, BLIP-2 stage 2)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mmlm.encoders import HFVisionEncoder, TimmEncoder
from mmlm.language import HFCausalLM
from mmlm.models import Blip2, Frozen

TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 8, "initializer_range": 0.02}
QFORMER = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "dropout": 0.0}


def tiny_frozen(shapes_data, gpt2: dict, resnet: dict, freeze_encoder: bool, **kwargs) -> Frozen:
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet10t", img_size=32, model_kwargs=resnet, freeze=freeze_encoder)
    return Frozen(encoder=encoder, language_model=HFCausalLM(config=gpt2), tokenizer=str(shapes_data / "tokenizer"),
                  **kwargs)


def tiny_blip2(shapes_data, gpt2: dict, **kwargs) -> Blip2:
    torch.manual_seed(0)
    encoder = HFVisionEncoder(model_type="blip_2_vision_model", config=TINY_VIT)
    return Blip2(encoder, HFCausalLM(config=gpt2), tokenizer=str(shapes_data / "tokenizer"), num_query_tokens=4,
                 qformer=QFORMER, **kwargs)


def loss_and_grads(model: torch.nn.Module, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    loss = model.training_loss(batch)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_parts_give_the_eager_loss_and_gradients(shapes_data, shapes_batch, tiny_gpt2, tiny_resnet):
    eager = tiny_frozen(shapes_data, tiny_gpt2, tiny_resnet, freeze_encoder=False)
    batch = shapes_batch(size=4, model=eager)
    compiled = tiny_frozen(shapes_data, tiny_gpt2, tiny_resnet, freeze_encoder=False, torch_compile=True,
                           compile_options={"backend": "aot_eager"})  # inductor: same path, minutes of C++ here
    compiled.configure_model()
    compiled.configure_model()  # Lightning calls it per entry point: compiling twice must be a no-op
    assert [type(m).__name__ for m in compiled.compile_targets()] == ["TimmEncoder", "HFCausalLM"]
    assert all(m._compiled_call_impl is not None for m in compiled.compile_targets())
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints do not change
    counters.clear()
    loss_c, grads_c = loss_and_grads(compiled, batch)
    assert counters["stats"]["unique_graphs"] >= 2  # dynamo really traced the encoder and the LM
    loss_e, grads_e = loss_and_grads(eager, batch)
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    assert grads_c.keys() == grads_e.keys() and any(k.startswith("encoder.") for k in grads_c)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)


def test_compile_is_off_by_default(frozen):
    frozen.configure_model()
    assert all(m._compiled_call_impl is None for m in frozen.compile_targets())


@pytest.mark.parametrize("family", ["frozen", "blip2"])
def test_frozen_parts_build_no_autograd_graph(family, shapes_data, shapes_batch, tiny_gpt2, tiny_resnet):
    if family == "frozen":
        model = tiny_frozen(shapes_data, tiny_gpt2, tiny_resnet, freeze_encoder=True)
        batch = shapes_batch(size=4, model=model)
    else:
        model = tiny_blip2(shapes_data, tiny_gpt2)
        batch = shapes_batch(size=4, image_size=32, model=model)
    outputs = []
    model.encoder.register_forward_hook(lambda module, args, out: outputs.append(out))
    loss = loss_and_grads(model, batch)[0]
    assert len(outputs) == 1 and outputs[0].grad_fn is None and not outputs[0].requires_grad
    assert torch.isfinite(torch.tensor(loss))
    frozen_parts = [*model.encoder.parameters(), *model.language_model.parameters()]
    assert frozen_parts and all(p.grad is None and not p.requires_grad for p in frozen_parts)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)  # the graph still reaches what trains
    assert not model.encoder.training and not model.language_model.training  # frozen parts stay in eval mode
