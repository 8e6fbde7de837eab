"""The real-size Donut configs follow clovaai/donut's config/train_*.yaml: CORD targets in reading order
(sort_json_key: False), DocVQA and RVL-CDIP without long-axis alignment."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from datamodules.documents import DocumentDataModule, DocumentExampleBuilder

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "donut"
#: A CORD v2 parse in the dataset's reading order: the items, then the totals.
CORD_PARSE = {"menu": [{"nm": "Kopi Susu", "cnt": "1", "price": "18,000"}],
              "sub_total": {"subtotal_price": "18,000"},
              "total": {"total_price": "18,000", "cashprice": "20,000"}}


def data_args(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())["data"]["init_args"]


def target(sort_keys: bool) -> str:
    builder = DocumentExampleBuilder(task_tokens=("<s_cord-v2>",), prompt_ends=(None,), image=None,
                                     sort_keys=sort_keys)
    return builder.prompt_and_target(CORD_PARSE, 0)[1]


@pytest.mark.parametrize("name", ["finetune_cord.yaml", "eval_cord.yaml"])
def test_cord_configs_give_targets_in_reading_order(name):
    args = data_args(name)
    assert "sort_keys" in inspect.signature(DocumentDataModule).parameters
    text = target(args["sort_keys"])
    assert text.index("<s_menu>") < text.index("<s_sub_total>") < text.index("<s_total>")
    assert text.startswith("<s_menu><s_nm>Kopi Susu</s_nm><s_cnt>1</s_cnt><s_price>18,000</s_price></s_menu>")
    assert text.index("<s_total_price>") < text.index("<s_cashprice>")  # nested keys keep their order too
    default = target(inspect.signature(DocumentDataModule).parameters["sort_keys"].default)
    assert default.index("<s_total>") < default.index("<s_sub_total>") < default.index("<s_menu>")  # Donut's default


@pytest.mark.parametrize("name", ["finetune_docvqa.yaml", "finetune_rvlcdip.yaml"])
def test_docvqa_and_rvlcdip_do_not_align_the_long_axis(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["model"]["init_args"]["align_long_axis"] is False
    assert config["data"]["init_args"]["align_long_axis"] is False
    assert config["data"]["init_args"].get("sort_keys", True) is True  # sort_json_key: True


def test_no_donut_config_overrides_the_processors_normalisation():
    for path in CONFIGS.glob("*.yaml"):
        text = path.read_text()
        assert "mean" not in yaml.safe_dump(yaml.safe_load(text)["model"]), path.name
