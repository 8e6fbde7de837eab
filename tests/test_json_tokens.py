"""JSON ↔ token sequences (Donut's json2token / token2json), special tokens and task prompts; Donut's own
parser and post-processing equal to transformers' ``DonutProcessor``."""

from __future__ import annotations

import json
import random
import re
import string
from typing import Any

import pytest
from transformers import DonutImageProcessor, DonutProcessor

from mmlm.json_tokens import (
    SEP,
    TASK_TOKENS,
    TEXT_SEQUENCE,
    VQA_PROMPT_END,
    donut_prediction,
    donut_token2json,
    json_to_tokens,
    special_tokens,
    strip_task_token,
    task_sequence,
    tokens_to_json,
)
from mmlm.piece_tokenizer import train_piece_tokenizer

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
    kinds = json_to_tokens({"kinds": ["a", "b"]}, categorical_fields={"kinds"})
    assert kinds == f"<s_kinds><a/>{SEP}<b/></s_kinds>"
    spaced = {"class": "scientific report"}
    assert tokens_to_json(json_to_tokens(spaced, categorical_fields={"class"})) == spaced


def test_special_tokens_cover_keys_categories_tasks_and_sep():
    tokens = special_tokens([RECEIPT, {"class": "memo"}, {"text_sequence": "hi"}],
                            categorical_fields={"class"}, tasks=[TASK_TOKENS["extraction"]])
    assert tokens == sorted(tokens)
    expected = {"<s_menu>", "</s_menu>", "<s_nm>", "</s_nm>", "<s_total_price>", "</s_total_price>",
                "<memo/>", SEP, "<s_cord-v2>", "<s_class>", "</s_class>"}
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
    memo = task_sequence({"class": "memo"}, "<s_rvlcdip>", categorical_fields={"class"})
    assert memo[1] == "<s_class><memo/></s_class>"
    with pytest.raises(ValueError, match="prompt_end"):
        task_sequence({"a": "1"}, "<s_docvqa>", prompt_end=VQA_PROMPT_END)
    assert strip_task_token(" <s_synthdog> hi", "<s_synthdog>") == "hi"


# --------------------------------------------------------------------------- Donut's parser vs transformers

KEYS = ["a", "b", "menu", "nm", "a.b", "x+y", "k(1)", "[q]", "with space", "A", "^$"]
CATEGORIES = ["memo", "invoice", "scientific report"]           # all three in the added vocabulary
ADDED = sorted({tag for key in KEYS[:8] for tag in (f"<s_{key}>", f"</s_{key}>")}
               | {f"<{c}/>" for c in CATEGORIES}
               | {SEP, "<s_cord-v2>", "<s_docvqa>", "<s_question>", "</s_question>", "<s_answer>",
                  "</s_answer>", "<s_class>", "</s_class>"})


@pytest.fixture(scope="module")
def processor() -> DonutProcessor:
    """A DonutProcessor over a tiny offline piece tokenizer with the tags and categories as added tokens."""
    alphabet = string.ascii_letters + string.digits + string.punctuation       # every character reads back
    texts = ["Total 12.50 Cash 20.00", "cake tea what is the total ?", alphabet] * 4
    tokenizer = train_piece_tokenizer(texts, vocab_size=160)
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED})
    images = DonutImageProcessor(size={"height": 32, "width": 24})
    return DonutProcessor(image_processor=images, tokenizer=tokenizer)


def same(a: Any, b: Any) -> bool:
    """Equal values with equal key order and types."""
    return type(a) is type(b) and json.dumps(a) == json.dumps(b)


def random_atoms(rng: random.Random) -> str:
    """Tag soup: start/end tags (some upper-case, some keys with regex characters), separators, categorical
    tokens in and out of the added vocabulary, partial tags, text, whitespace and newlines."""
    key = rng.choice(KEYS)
    atoms = [f"<s_{key}>", f"</s_{key}>", f"<S_{key.upper()}>", f"</S_{key}>", SEP, SEP, "<memo/>",
             "<scientific report/>", "<other/>", "1", " cake ", "\n", "<", ">", "<s_", "</s_", "/>", "x y",
             "<s_cord-v2>", f"<s_{rng.choice(KEYS)}>", f"</s_{rng.choice(KEYS)}>"]
    return "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A dict of strings, categories, lists of strings and lists of dicts (as Donut's ground truths)."""
    out: dict[str, Any] = {}
    for key in rng.sample(KEYS, rng.randint(1, 3)):
        roll = rng.random()
        if key == "A":
            out[key] = rng.choice(CATEGORIES + ["letter"])                      # "<letter/>" is not added
        elif depth >= 2 or roll < 0.4:
            out[key] = rng.choice(["cake", "12.50", "", " tea ", "two words", "a\nb"])
        elif roll < 0.6:
            out[key] = [rng.choice(["1", "2", "x"]) for _ in range(rng.randint(1, 3))]
        elif roll < 0.85:
            out[key] = [random_json(rng, depth + 1) for _ in range(rng.randint(1, 3))]
        else:
            out[key] = random_json(rng, depth + 1)
    return out


def test_donut_token2json_equals_transformers_on_generated_garbage(processor):
    rng, vocab = random.Random(0), processor.tokenizer.get_added_vocab()
    assert "<memo/>" in vocab and "<other/>" not in vocab
    outputs = set()
    for _ in range(3000):
        sequence = random_atoms(rng)
        expected = processor.token2json(sequence)
        assert same(donut_token2json(sequence, vocab), expected), sequence
        outputs.add(json.dumps(expected))
    assert len(outputs) > 500                                  # many different parses, not one fallback


def test_donut_token2json_equals_transformers_on_well_formed_sequences(processor):
    rng, vocab = random.Random(1), processor.tokenizer.get_added_vocab()
    for _ in range(500):
        obj = random_json(rng)
        sequence = json_to_tokens(obj, sort_keys=rng.random() < 0.5, categorical_fields={"A"})
        for variant in (sequence, f" {sequence} ", sequence.replace("</s_", " </s_"),
                        f"{sequence}{SEP}{json_to_tokens(random_json(rng))}"):
            assert same(donut_token2json(variant, vocab), processor.token2json(variant)), variant


@pytest.mark.parametrize("sequence, expected", [
    ("<s_a>1</s_a><s_a>2</s_a>", {"a": "2"}),                                   # repeated key: the LAST value
    ("<s_b>x</s_b><s_a>1</s_a><s_b>y</s_b>", {"b": "y", "a": "1"}),             # ... at the first position
    ("<s_menu><s_nm>A</s_nm><sep/><s_nm>B</s_nm></s_menu>", {"menu": [{"nm": "A"}, {"nm": "B"}]}),
    ("<s_a>1</s_a><sep/><s_a>2</s_a>", [{"a": "1"}, {"a": "2"}]),               # top-level records: a list
    ("<s_a>x<sep/> y <sep/></s_a>", {"a": ["x", "y", ""]}),                     # leaves, stripped
    ("<s_a>1</s_a><s_b>2", {"a": "1"}),                                         # unclosed start tag deleted
    ("<s_a><s_b>x</s_b>", {"b": "x"}),                                          # ... its content read outside
    ("<s_cord-v2><s_a>1</s_a>", {"a": "1"}),
    ("garbage <s_a>1</s_a> more </s_zz>", {"a": "1"}),                          # text next to keys lost
    ("<s_a>1</s_a> tail", {"a": "1"}),
    ("<S_A>x</s_a>", {"A": "x"}),                                               # case-insensitive tags
    ("<s_a>line\nbreak</s_a>", {"a": "line\nbreak"}),                           # DOTALL content
    ("<s_a.b>1</s_a.b><s_axb>2</s_axb>", {"a.b": "1", "axb": "2"}),             # keys are regex-escaped
    ("<s_x+y>1</s_x+y>", {"x+y": "1"}),
    ("<s_class><memo/></s_class>", {"class": "memo"}),                          # categorical, in the vocab
    ("<s_class><letter/></s_class>", {"class": "<letter/>"}),                   # not in the vocab: kept
    ("<s_class><scientific report/></s_class>", {"class": "scientific report"}),
    ("<s_a><s_x></s_y></s_a>", {"text_sequence": ""}),                          # nothing read at all
    ("just text", {"text_sequence": "just text"}),
    ("", {"text_sequence": ""}),
    ("</s_a></s_a><sep/>x", {"text_sequence": "</s_a></s_a><sep/>x"}),
])
def test_donut_token2json_hand_cases(processor, sequence, expected):
    assert same(donut_token2json(sequence, ADDED), expected)
    assert same(processor.token2json(sequence), expected)


def test_donut_token2json_recursion_limit_gives_text_not_an_error():
    keys = [f"k{i}" for i in range(3000)]
    sequence = "".join(f"<s_{k}>" for k in keys) + "x" + "".join(f"</s_{k}>" for k in reversed(keys))
    assert donut_token2json(sequence) == {TEXT_SEQUENCE: sequence}
    assert donut_token2json("<s_k0><s_k1>x</s_k1></s_k0>") == {"k0": {"k1": "x"}}


def test_donut_prediction_is_donut_post_processing_of_decoded_ids(processor):
    """Ids → ``batch_decode`` → Donut's recipe (drop eos and pad strings, the first tag, strip) →
    token2json."""
    tokenizer = processor.tokenizer
    rng, vocab = random.Random(2), tokenizer.get_added_vocab()
    prompts = ["<s_cord-v2>", "<s_docvqa><s_question>what is the total ?</s_question><s_answer>"]
    for _ in range(200):
        body = random_atoms(rng)
        if rng.random() < 0.7:  # mostly well-formed
            body = json_to_tokens(random_json(rng), categorical_fields={"A"})
        ids = tokenizer(rng.choice(prompts) + body, add_special_tokens=False).input_ids
        ids += [tokenizer.eos_token_id] * rng.randint(0, 1) + [tokenizer.pad_token_id] * rng.randint(0, 3)
        decoded = processor.batch_decode([ids])[0]
        donut = decoded.replace(tokenizer.eos_token, "").replace(tokenizer.pad_token, "")
        donut = re.sub(r"<.*?>", "", donut, count=1).strip()
        expected = processor.token2json(donut)
        parsed = donut_prediction(decoded, vocab, tokenizer.eos_token, tokenizer.pad_token)
        assert same(parsed, expected), decoded


def test_donut_prediction_of_a_docvqa_sequence():
    sequence = "<s_docvqa><s_question>what is the total?</s_question><s_answer>10.45</s_answer></s><pad><pad>"
    parsed = donut_prediction(sequence, eos_token="</s>", pad_token="<pad>")
    assert parsed == {"question": "what is the total?", "answer": "10.45"}
    # Without eos/pad tokens given they stay (and the unclosed-looking "</s>" is text after the last key).
    assert donut_prediction("<s_cord-v2><s_a>1</s_a></s>") == {"a": "1"}
    assert donut_prediction("<s_cord-v2>plain text</s>", eos_token="</s>") == {TEXT_SEQUENCE: "plain text"}
    assert donut_prediction("") == {TEXT_SEQUENCE: ""}
