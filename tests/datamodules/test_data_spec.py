"""Datamodules read the model only through ``model.data_spec()`` (a typed ``DataSpec``); their own arguments win."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from datamodules import ImageTextDataModule, Source
from mmlm.data_spec import DataSpec
from mmlm.encoders.base import ImagePreprocess
from mmlm.tokenizers import load_tokenizer


def attach(datamodule, module) -> None:
    """What ``Trainer.fit`` does for ``setup``: a trainer whose ``lightning_module`` is ``module``."""
    datamodule.trainer = SimpleNamespace(lightning_module=module)


class SpecOnly:
    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec

    def data_spec(self) -> DataSpec:
        return self.spec


def test_the_spec_gives_tokenizer_and_preprocessing(shapes_data):
    tokenizer = load_tokenizer(str(shapes_data / "tokenizer"))
    preprocess = ImagePreprocess((24, 24))
    dm = ImageTextDataModule(val=[Source(str(shapes_data / "val" / "captions-*.tar"))])
    attach(dm, SpecOnly(DataSpec(tokenizer=tokenizer, image_preprocess=preprocess)))
    dm.setup("validate")
    assert dm.tokenizer is tokenizer and dm.preprocess is preprocess


def test_an_argument_wins_over_the_spec(shapes_data):
    dm = ImageTextDataModule(val=[Source(str(shapes_data / "val" / "captions-*.tar"))], image_size=16,
                             tokenizer=str(shapes_data / "tokenizer"))
    attach(dm, SpecOnly(DataSpec(tokenizer=object(), image_preprocess=ImagePreprocess((24, 24)))))
    dm.setup("validate")
    assert dm.preprocess.size == (16, 16) and hasattr(dm.tokenizer, "convert_tokens_to_ids")


def test_attributes_outside_the_spec_are_not_read(shapes_data):
    """A model with ``tokenizer``/``image_preprocess`` attributes but no ``data_spec`` gives the datamodule nothing:
    the error names the argument and ``data_spec()``."""
    module = SimpleNamespace(tokenizer=load_tokenizer(str(shapes_data / "tokenizer")),
                             image_preprocess=ImagePreprocess((24, 24)))
    dm = ImageTextDataModule(val=[Source(str(shapes_data / "val" / "captions-*.tar"))])
    attach(dm, module)
    with pytest.raises(ValueError, match=r"ImageTextDataModule needs tokenizer=… or a trainer whose model's "
                                         r"data_spec\(\) gives tokenizer"):
        dm.setup("validate")


def test_every_family_gives_what_its_datamodule_reads(make_frozen):
    model = make_frozen()
    spec = model.data_spec()
    assert spec.tokenizer is not None and spec.image_preprocess is not None
    assert spec.markers == (model.image_marker,) and model.image_marker.count == model.connector(
        torch.zeros(1, model.encoder.num_tokens, model.encoder.width)).shape[1]  # the span the connector fills
    with pytest.raises(ValueError, match="EmbodiedDataModule needs markers"):
        DataSpec(tokenizer=spec.tokenizer).require("markers", "EmbodiedDataModule", "markers")
