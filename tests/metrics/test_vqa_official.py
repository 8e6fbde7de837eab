"""mmlm's VQA accuracy is exactly the official VQAv2 scorer (GT-Vision-Lab/VQA 458a8b2, as in LAVIS).

Literal cases worked out from the official code, then a randomized comparison against the independent
re-derivation in ``tests/reference/vqa_eval.py``.
"""

from __future__ import annotations

import random

import pytest
from reference import vqa_eval as reference
from reference.vqa_eval import official_vqa_accuracy

from mmlm.metrics import VQAAccuracy
from mmlm.metrics.vqa import (
    CONTRACTIONS,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_accuracy_normalized,
    vqa_summary,
)

# --------------------------------------------------------------------------- literal expectations


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # the examples of the issue
        ("one", ["1", "1"] + ["one"] * 8, 0.6),  # prediction -> "1"; raw "one" answers never match
        ("the red one", ["red one"] * 4 + ["red"] * 6, 0.0),  # prediction -> "red 1"
        ("yes", ["Yes"] * 10, 0.0),  # human answers are not lower-cased
        ("red", ["red"], 0.0),  # one answer: leaving it out leaves nothing to match
        ("2", ["2", "2", "2"], 2 / 3),  # each subset keeps 2 of 3
        # leave-one-out with few answers
        ("2", ["2", "2"], 1 / 3),
        ("2", ["2", "3"], 1 / 6),  # leave out "2": 0; leave out "3": 1/3
        ("red", ["red"] * 3 + ["blue"] * 7, 0.9),
        ("red", ["red"] * 4 + ["blue"] * 6, 1.0),
        # human answers get processPunctuation only when they are not all identical
        ("yes", ["yes."] * 10, 0.0),  # identical: "yes." is compared raw
        ("yes", ["yes."] * 3 + ["no"] * 7, 0.9),  # differing: "yes." -> "yes"
        ("yes", ["yes!"] * 3 + ["no"] * 7, 0.0),  # "yes!" -> "yes " (trailing space is not stripped)
        ("yes", ["yes "] * 8 + ["yes"] * 2, 0.6),  # "yes " (trailing space) never matches: 2 of 10
        ("1,000", ["1,000"] * 5 + ["1000"] * 5, 1.0),  # comma between digits: "," deleted on both sides
        ("1,000", ["1,000"] * 10, 0.0),  # identical answers stay raw: "1,000" != "1000"
        ("black-and-white", ["black-and-white"] * 3 + ["gray"], 0.75),  # both -> "black and white"
        ("black and white", ["black-and-white"] * 10, 0.0),
        # number words, articles and contractions apply to the prediction only
        ("two", ["2"] * 10, 1.0),
        ("two", ["two"] * 10, 0.0),
        ("a dog", ["dog"] * 10, 1.0),
        ("a dog", ["a dog"] * 10, 0.0),
        ("dont", ["don't"] * 10, 1.0),
        ("Dont", ["dont"] * 10, 0.0),
        ("  RED\n", ["red"] * 10, 1.0),
        ("red\tcar", ["red car"] * 10, 1.0),
    ],
)
def test_vqa_accuracy_matches_the_official_scorer(prediction: str, answers: list[str], expected: float) -> None:
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_without_answers_names_the_prediction() -> None:
    with pytest.raises(ValueError, match="at least one human answer.*'blue'"):
        vqa_accuracy("blue", [])
    with pytest.raises(ValueError, match="'blue'"):
        vqa_accuracy_normalized("blue", [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes.", "yes"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1.2.3.", "1.2.3"),
        ("a.b.c", "abc"),
        ("." * 40, "." * 8),  # count=re.UNICODE: at most 32 periods are removed
        ("a." * 33, "a" * 33 + "."),
        ("red,blue", "red blue"),  # no space around "," -> space
        ("red, blue-green", "red blue green"),  # "," touches a space -> deleted; "-" -> space
        ("red -green", "red green"),
        ("1,000 (approx)", "1000 approx"),  # comma between digits: every mark is deleted
        ("(yes)", " yes "),
        ("why?!", "why  "),
        ("yes!", "yes "),  # processPunctuation does not strip
        ("it's", "it's"),  # apostrophes are not punctuation
    ],
)
def test_process_punctuation(text: str, expected: str) -> None:
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The One", "1"),
        ("one two three", "1 2 3"),
        ("None of the above", "0 of above"),
        ("an apple", "apple"),
        ("the the a", ""),
        ("Dont", "don't"),  # lower-cased before the table
        ("Im", "im"),  # the capitalised entries never fire
        ("Ive", "ive"),
        ("somebody'd", "somebodyd"),  # the official table runs this one backwards
        ("somebodyd", "somebodyd"),
        ("lets", "lets"),
        ("twas", "'twas"),
        ("youd've", "you'd've"),
        ("ten  eleven", "10 eleven"),
    ],
)
def test_process_digit_article(text: str, expected: str) -> None:
    assert process_digit_article(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" Yes, it is.\n", "yes it is"),
        ("Two!", "2"),
        ("two-thirds", "2 thirds"),
        ("\tthe\tcat\t", "cat"),
        ("A.", ""),  # "A" is an article once the period is gone
        ("one.", "1"),
        ("don't.", "don't"),
    ],
)
def test_normalize_answer_is_the_prediction_pipeline(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_contraction_table_is_the_official_one() -> None:
    assert CONTRACTIONS == reference.CONTRACTIONS and list(CONTRACTIONS) == list(reference.CONTRACTIONS)
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["somebody'd"] == "somebodyd" and CONTRACTIONS["Im"] == "I'm"


def test_vqa_summary_is_the_official_accuracy_dict() -> None:
    scores = [1.0, 0.6, 0.0, 2 / 3]
    summary = vqa_summary(scores, ["how many", "how many", "what color", "how many"],
                          ["number", "number", "other", "number"])
    assert summary == {"overall": 56.67, "perQuestionType": {"how many": 75.56, "what color": 0.0},
                       "perAnswerType": {"number": 75.56, "other": 0.0}}
    assert vqa_summary([1 / 3], ["a"], ["b"], digits=4)["overall"] == 33.3333
    with pytest.raises(ValueError, match="at least one"):
        vqa_summary([], [], [])
    with pytest.raises(ValueError, match="2 scores but 1 question_types"):
        vqa_summary([1.0, 0.0], ["a"], ["b", "b"])


# --------------------------------------------------------------------------- reference pipeline


def official_inputs(questions: list[tuple[int, str, str, list[str]]], predictions: list[str]) -> tuple:
    """Official-format annotations, questions and results for ``(id, question type, answer type, answers)``."""
    annotations = {"annotations": [
        {"question_id": qid, "image_id": 0, "question_type": qtype, "answer_type": atype,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
        for qid, qtype, atype, answers in questions]}
    question_file = {"questions": [{"question_id": qid, "image_id": 0, "question": "?"} for qid, *_ in questions]}
    results = [{"question_id": qid, "answer": p} for (qid, *_), p in zip(questions, predictions)]
    return annotations, question_file, results


def test_reference_reproduces_the_issue_examples() -> None:
    questions = [(1, "how many", "number", ["1", "1"] + ["one"] * 8),
                 (2, "what color", "other", ["red one"] * 4 + ["red"] * 6),
                 (3, "is the", "yes/no", ["Yes"] * 10),
                 (4, "what color", "other", ["red"]),
                 (5, "how many", "number", ["2", "2", "2"])]
    accuracy = official_vqa_accuracy(*official_inputs(questions, ["one", "the red one", "yes", "red", "2"]))
    assert accuracy == {"overall": 25.33, "perQuestionType": {"how many": 63.33, "what color": 0.0, "is the": 0.0},
                        "perAnswerType": {"number": 63.33, "other": 0.0, "yes/no": 0.0}}


def test_reference_enforces_the_load_res_assertions() -> None:
    annotations, questions, results = official_inputs([(7, "is the", "yes/no", ["yes"] * 10)], ["yes"])
    assert official_vqa_accuracy(annotations, questions, results)["overall"] == 100.0
    with pytest.raises(AssertionError, match="not an array"):
        official_vqa_accuracy(annotations, questions, tuple(results))
    with pytest.raises(AssertionError, match="do not correspond"):
        official_vqa_accuracy(annotations, questions, [{"question_id": "7", "answer": "yes"}])
    with pytest.raises(AssertionError, match="do not correspond"):
        official_vqa_accuracy(annotations, questions, results + [{"question_id": 8, "answer": "no"}])
    assert annotations["annotations"][0]["answers"][0]["answer"] == "yes"  # inputs are not mutated


# --------------------------------------------------------------------------- randomized comparison

#: Spellings of a few answers that the official processing treats differently.
VARIANT_GROUPS = [
    ["yes", "Yes", "yes.", "yes!", "YES", " yes", "yes ", "(yes)", "yes?", "yes ?"],
    ["no", "No", "no.", "nope", "no, it is not"],
    ["2", "two", "Two", "2.", "two!", "2 "],
    ["1,000", "1000", "1 000", "one thousand", "1,000.", "1.000"],
    ["red", "Red", "red.", "the red", "a red one", "red one", "red/blue"],
    ["don't", "dont", "Dont", "do not", "don't."],
    ["black and white", "black-and-white", "black - white", "black/white", "black, white", "black,white"],
    ["3.5", "3.5.", "3,5", "3 .5"],
    ["i'm", "Im", "im", "Ive", "i've"],
    ["somebody'd", "somebodyd", "twas", "'twas", "let's", "lets"],
    ["none", "0", "None", "zero", "none of the above"],
    ["a.b.c", "abc", "a b c", "." * 35, "a." * 34, "..."],
    ["the", "a", "an apple", "apple", "the apple."],
    ["ten", "10", "Ten.", "10!"],
]
QUESTION_TYPES = ["how many", "what color", "is the", "none of the above", "what"]
ANSWER_TYPES = ["yes/no", "number", "other"]


def random_prediction(rng: random.Random, answers: list[str], pool: list[str]) -> str:
    """One of the answers, another spelling from the pool or elsewhere, sometimes with odd case or whitespace."""
    source = rng.choices([answers, pool, rng.choice(VARIANT_GROUPS)], [4, 4, 1])[0]
    text = rng.choice(source)
    decoration = rng.random()
    if decoration < 0.1:
        text = text.upper()
    elif decoration < 0.2:
        text = f"  {text}\n"
    elif decoration < 0.3:
        text = f"\t{text}\t."
    return text


def random_dataset(seed: int, size: int) -> tuple[list[tuple[int, str, str, list[str]]], list[str]]:
    """``size`` questions with 1-10 answers drawn from one or two variant groups, and a prediction each."""
    rng = random.Random(seed)
    questions, predictions = [], []
    for qid in range(size):
        pool = [v for group in rng.sample(VARIANT_GROUPS, rng.choice([1, 1, 2])) for v in group]
        count = rng.choice([1, 2, 3, 4, 10, 10, 10, rng.randint(1, 10)])
        weights = [rng.random() ** 3 for _ in pool]  # a few spellings dominate
        answers = [rng.choice(pool)] * count if rng.random() < 0.2 else rng.choices(pool, weights, k=count)
        questions.append((1000 + 3 * qid, rng.choice(QUESTION_TYPES), rng.choice(ANSWER_TYPES), answers))
        predictions.append(random_prediction(rng, answers, pool))
    return questions, predictions


@pytest.fixture(scope="module")
def random_questions() -> tuple[list[tuple[int, str, str, list[str]]], list[str]]:
    return random_dataset(seed=20160415, size=3000)


def test_random_questions_match_the_reference(random_questions) -> None:
    questions, predictions = random_questions
    scores = [vqa_accuracy(p, answers) for p, (*_, answers) in zip(predictions, questions)]
    inputs = official_inputs(questions, predictions)
    exact = reference.official_vqa_eval(*inputs, n=15)
    assert [exact.eval_qa[qid] for qid, *_ in questions] == [round(100 * s, 15) for s in scores]
    qtypes, atypes = [q[1] for q in questions], [q[2] for q in questions]
    for digits in (2, 10):
        assert vqa_summary(scores, qtypes, atypes, digits=digits) == official_vqa_accuracy(*inputs, n=digits)
    # the data exercises every branch: zero, partial and full credit, and disagreement with the friendly variant
    assert min(sum(s == 0 for s in scores), sum(0 < s < 1 for s in scores), sum(s == 1 for s in scores)) > 200
    friendly = [vqa_accuracy_normalized(p, answers) for p, (*_, answers) in zip(predictions, questions)]
    assert sum(f != s for f, s in zip(friendly, scores)) > 300


def test_metric_is_the_mean_of_vqa_accuracy(random_questions) -> None:
    questions, predictions = random_questions
    metric = VQAAccuracy(question_types=QUESTION_TYPES, answer_types=ANSWER_TYPES)
    for start in range(0, len(questions), 64):
        batch = questions[start:start + 64]
        metric.update(predictions[start:start + 64], [q[3] for q in batch], [q[1] for q in batch],
                      [q[2] for q in batch])
    scores = [vqa_accuracy(p, answers) for p, (*_, answers) in zip(predictions, questions)]
    assert metric.compute().item() == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    summary = vqa_summary(scores, [q[1] for q in questions], [q[2] for q in questions], digits=10)
    per_question_type = {k: round(100 * v.item(), 3) for k, v in metric.compute_per_type().items()}
    per_answer_type = {k: round(100 * v.item(), 3) for k, v in metric.compute_per_answer_type().items()}
    assert per_question_type == pytest.approx(summary["perQuestionType"], abs=1e-3)
    assert per_answer_type == pytest.approx(summary["perAnswerType"], abs=1e-3)


@pytest.mark.parametrize(
    ("prediction", "answers", "official", "normalized"),
    [
        ("one", ["1", "1"] + ["one"] * 8, 0.6, 1.0),  # every answer normalises to "1"
        ("the red one", ["red one"] * 4 + ["red"] * 6, 0.0, 1.0),  # 4 x "red 1"
        ("yes", ["Yes"] * 10, 0.0, 1.0),
        ("red", ["red"], 0.0, 1.0),  # one answer: exact match
        ("A red.", ["red"], 0.0, 1.0),
        ("blue", ["red"], 0.0, 0.0),
        ("2", ["2", "2", "2"], 2 / 3, 2 / 3),  # already normalised answers: the two agree
        ("yes", ["yes!"] * 3 + ["no"] * 7, 0.0, 0.9),
    ],
)
def test_normalized_variant_differs_only_where_expected(prediction, answers, official, normalized) -> None:
    assert vqa_accuracy(prediction, answers) == pytest.approx(official, abs=1e-12)
    assert vqa_accuracy_normalized(prediction, answers) == pytest.approx(normalized, abs=1e-12)
