"""JSON ↔ token sequences (Donut's json2token / token2json), special tokens and task prompts."""

from __future__ import annotations

import re

import pytest

from mmlm.json_tokens import (
    SEP,
    TASK_TOKENS,
    VQA_PROMPT_END,
    json_to_tokens,
    special_tokens,
    strip_task_token,
    task_sequence,
    tokens_to_json,
)

RECEIPT = {
    "menu": [{"nm": "COFFEE", "cnt": "2", "price": "7.00"}, {"nm": "TEA", "cnt": "1", "price": "2.50"}],
    "sub_total": {"subtotal_price": "9.50", "tax_price": "0.95"},
    "total": {"total_price": "10.45"},
}


def test_nested_dicts_lists_and_reverse_sorted_keys():
    tokens = json_to_tokens({"b": "x", "a": {"d": "1", "c": "2"}})
    assert tokens == "<s_b>x</s_b><s_a><s_d>1</s_d><s_c>2</s_c></s_a>"
    assert json_to_tokens({"a": "1", "b": "2"}, sort_keys=False) == "<s_a>1</s_a><s_b>2</s_b>"
    assert json_to_tokens({"k": ["x", "y"]}) == f"<s_k>x{SEP}y</s_k>"


@pytest.mark.parametrize("sort_keys", [True, False])
def test_round_trip(sort_keys):
    for obj in (RECEIPT, {"a": {"b": {"c": ["1", "2", "3"]}}}, {"items": [{"x": "1"}, {"x": "2", "y": "3"}]},
                {"empty": ""}, {"text_sequence": "hello world"}):
        assert tokens_to_json(json_to_tokens(obj, sort_keys=sort_keys)) == obj


def test_categorical_fields_become_single_tokens_and_come_back():
    gt = {"class": "invoice"}
    tokens = json_to_tokens(gt, categorical_fields={"class"})
    assert tokens == "<s_class><invoice/></s_class>"
    assert tokens_to_json(tokens) == gt
    assert json_to_tokens({"kinds": ["a", "b"]}, categorical_fields={"kinds"}) == f"<s_kinds><a/>{SEP}<b/></s_kinds>"
    spaced = {"class": "scientific report"}
    assert tokens_to_json(json_to_tokens(spaced, categorical_fields={"class"})) == spaced


def test_special_tokens_cover_keys_categories_tasks_and_sep():
    tokens = special_tokens([RECEIPT, {"class": "memo"}, {"text_sequence": "hi"}], categorical_fields={"class"},
                            tasks=[TASK_TOKENS["extraction"]])
    assert tokens == sorted(tokens)
    expected = {"<s_menu>", "</s_menu>", "<s_nm>", "</s_nm>", "<s_total_price>", "</s_total_price>", "<memo/>",
                SEP, "<s_cord-v2>", "<s_class>", "</s_class>"}
    assert expected <= set(tokens)
    assert "<s_text_sequence>" not in tokens and "<s_memo>" not in tokens
    for obj in (RECEIPT, {"class": "memo"}):  # every tag of the sequence is in the list
        seq = json_to_tokens(obj, categorical_fields={"class"})
        assert all(tag in tokens for tag in re.findall(r"<[^<>]+>", seq))


@pytest.mark.parametrize("sequence, expected", [
    ("<s_a>1</s_a><s_b>2", {"a": "1"}),                                   # unclosed tag dropped, its text too
    ("<s_cord-v2><s_a>1</s_a>", {"a": "1"}),                              # leading task token ignored
    ("<s_a>1</s_a><s_a>2</s_a>", {"a": "1"}),                             # repeated key: first wins
    ("garbage <s_a>1</s_a> more </s_zz>", {"a": "1"}),                    # text next to keys, stray end tag
    ("<s_m><s_n>A</s_m></s_n>", {"m": {"n": "A"}}),                       # outer end tag closes the inner key
    ("<s_m><s_n>A</s_n><sep/><s_n>B</s_n><sep/></s_m>", {"m": [{"n": "A"}, {"n": "B"}]}),  # trailing sep
    ("just text", {"text_sequence": "just text"}),
    ("", {}),
    ("</s_a></s_a><sep/><<<>>>", {"text_sequence": "<sep/><<<>>>"}),
    ("<s_a><s_b>x</s_b>", {"b": "x"}),
])
def test_malformed_sequences_give_the_parsable_part(sequence, expected):
    assert tokens_to_json(sequence) == expected


def test_deep_nesting_is_bounded_not_a_recursion_error():
    result, depth = tokens_to_json("<s_a>" * 5000 + "x" + "</s_a>" * 5000), 0
    while isinstance(result, dict) and "a" in result:
        result, depth = result["a"], depth + 1
    assert depth == 64 and result == "x"


def test_garbage_never_raises():
    import random

    rng = random.Random(0)
    atoms = ["<s_a>", "</s_a>", "<s_b>", "</s_b>", SEP, "<x/>", "text", "<", ">", "/", " ", "<s_", "</s_"]
    for _ in range(500):
        result = tokens_to_json("".join(rng.choice(atoms) for _ in range(rng.randint(0, 30))))
        assert isinstance(result, (dict, list))


def test_task_prompts():
    prompt, target = task_sequence(RECEIPT, TASK_TOKENS["extraction"])
    assert prompt == "<s_cord-v2>" and target == json_to_tokens(RECEIPT)
    prompt, target = task_sequence({"question": "what is the total?", "answer": "10.45"}, TASK_TOKENS["vqa"],
                                   prompt_end=VQA_PROMPT_END)
    assert prompt == "<s_docvqa><s_question>what is the total?</s_question><s_answer>"
    assert target == "10.45</s_answer>"
    assert tokens_to_json(prompt + target) == {"question": "what is the total?", "answer": "10.45"}
    assert task_sequence({"text_sequence": "read me"}, TASK_TOKENS["reading"]) == ("<s_synthdog>", "read me")
    assert task_sequence({"class": "memo"}, "<s_rvlcdip>", categorical_fields={"class"})[1] == "<s_class><memo/></s_class>"
    with pytest.raises(ValueError, match="prompt_end"):
        task_sequence({"a": "1"}, "<s_docvqa>", prompt_end=VQA_PROMPT_END)
    assert strip_task_token(" <s_synthdog> hi", "<s_synthdog>") == "hi"
