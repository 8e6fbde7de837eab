"""Shared fixtures: offline Hugging Face, a tiny shapes data set and a tiny Frozen module (CPU, seconds)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import pytorch_lightning  # noqa: E402, F401 - before any test module imports rich (see test_cli's int-limit test)
import torch  # noqa: E402

# Tiny tensors gain nothing from intra-op threads, and on a shared CPU two threads ran the same test 10× slower.
torch.set_num_threads(1)

# initializer_range 0.3 (GPT-2's 0.02 gives near-flat logits): a random frozen LM a prefix can steer.
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128,
             "vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
             "initializer_range": 0.3}
TINY_RESNET = {"channels": [8, 16, 16, 16], "stem_width": 8, "output_stride": 16}


@pytest.fixture
def tiny_gpt2() -> dict:
    """Config dict of a 2-layer, 32-wide GPT-2 over 64 ids (fits the shapes tokenizer + ``<image>``)."""
    return dict(TINY_GPT2)


@pytest.fixture
def tiny_resnet() -> dict:
    """``model_kwargs`` of a narrow timm resnet10t (16 channels out, output stride 16)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in TINY_RESNET.items()}


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """A tiny shapes data set (64 train / 16 val images, 32 samples per shard) with its tokenizer."""
    from datamodules.synthetic.shapes import write_shapes

    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, train=64, val=16, seed=0, shard_size=32, progress=False)
    return out


@pytest.fixture
def make_frozen(shapes_data) -> Callable[..., torch.nn.Module]:
    """Factory of tiny Frozen modules: narrow resnet10t at 32 px → prefix → 2-layer GPT-2 (64 words).

    Keyword arguments go to ``Frozen`` (``lm_freeze`` to ``HFCausalLM(freeze=…)``).
    """
    from mmlm.encoders import TimmEncoder
    from mmlm.language import HFCausalLM
    from mmlm.models import Frozen

    def make(lm_freeze: bool = True, **kwargs):
        torch.manual_seed(0)
        encoder = TimmEncoder("resnet10t", img_size=32, model_kwargs=TINY_RESNET)
        lm = HFCausalLM(config=TINY_GPT2, freeze=lm_freeze)
        return Frozen(encoder=encoder, language_model=lm, tokenizer=str(shapes_data / "tokenizer"), **kwargs)

    return make


@pytest.fixture
def frozen(make_frozen):
    """One tiny Frozen module with default settings."""
    return make_frozen()


@pytest.fixture
def shapes_batch(shapes_data) -> Callable[..., object]:
    """Factory: the first ``size`` examples of a ``split``'s ``kind`` shards as the batch ``model``'s datamodule
    gives it (a :class:`mmlm.batch.SentenceBatch` for a model with an image marker, else a :class:`mmlm.batch.Batch`;
    ``model=None``: a ``Batch``)."""
    from datamodules import ImageTextDataModule, Source
    from datamodules.pipeline.prefix_sentences import image_marker

    def load(kind: str = "vqa", split: str = "train", size: int = 8, image_size: int = 32, model=None,
             eval_shots: int = 0):
        prefix = "vqa" if kind == "vqa" else "captions"
        source = Source(str(shapes_data / split / f"{prefix}-*.tar"), kind=kind)
        marker = None if model is None else image_marker(model.data_spec().markers)
        dm = ImageTextDataModule(val=[source], tokenizer=str(shapes_data / "tokenizer"), image_size=image_size,
                                 batch_size=size, image_tokens=None if marker is None else marker.count,
                                 eval_shots=eval_shots)
        dm.setup("validate")
        return next(iter(dm.val_dataloader()))

    return load
