"""VQA accuracy: the official VQAv2 answer normalisation and leave-one-out human agreement.

The normalisation follows the behaviour of the VQAv2 evaluation script (``vqaEval.py`` of
GT-Vision-Lab/VQA, the version the LAVIS/MMF ports use): ``processPunctuation`` then
``processDigitArticle``. Deliberate differences, none of which changes a VQAv2 answer:

- the official period regex is applied with ``count=re.UNICODE`` (at most 32 periods removed);
  here every period not followed by a digit is removed;
- the official contraction table has a few entries that can never fire after lower-casing
  (``"Im"``, ``"Ive"``, ``"Id've"``) or that run backwards (``"somebody'd" → "somebodyd"``);
  here the table is built from the canonical contractions, keyed by each spelling with one
  apostrophe left out, which reproduces every other official entry.
- the official scorer only punctuation-normalises the human answers (VQAv2 ships them already
  normalised); here both prediction and human answers go through :func:`normalize_answer`, so
  raw answers such as ``"two"`` and ``"2"`` match.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" has a malformed look-behind, so in effect it drops
# every period that is not followed by a digit ("3." -> "3", "3.5" stays).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_CANONICAL_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's they'd
they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've
when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _one_apostrophe_dropped(word: str) -> set[str]:
    """Every spelling of ``word`` with exactly one of its apostrophes left out."""
    return {word[:i] + word[i + 1:] for i, char in enumerate(word) if char == "'"}


CONTRACTIONS: dict[str, str] = {
    variant: word for word in _CANONICAL_CONTRACTIONS for variant in _one_apostrophe_dropped(word)
}


def _process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop or space out punctuation, strip non-decimal periods.

    A punctuation mark is deleted when it touches a space anywhere in the text, or when the text
    has a comma between digits (``"1,000"`` → ``"1000"``); otherwise it becomes a space
    (``"black-and-white"`` → ``"black and white"``).
    """
    has_number_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCT:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or has_number_comma else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words → digits, drop articles, fix contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """Normalise an answer like the official VQAv2 evaluation.

    Examples: ``"Two!"`` → ``"2"``, ``"a dog"`` → ``"dog"``, ``"dont"`` → ``"don't"``,
    ``"1,000"`` → ``"1000"``, ``"Yes, it is."`` → ``"yes it is"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _score_normalized(prediction: str, answers: Sequence[str]) -> float:
    """Leave-one-out accuracy of an already normalised prediction against normalised answers."""
    if len(answers) == 1:
        return float(prediction == answers[0])
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    # Leaving out human i leaves ``total - matches[i]`` matching humans among the rest.
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10).

    The mean, over the subsets that leave out one human, of ``min(#matching humans / 3, 1)``;
    prediction and answers are compared after :func:`normalize_answer`. With a single answer
    the score is exact match (leaving it out would leave nothing to match).

    Raises:
        ValueError: ``answers`` is empty.
    """
    if not answers:
        raise ValueError(f"vqa_accuracy needs at least one human answer for prediction {prediction!r}")
    return _score_normalized(normalize_answer(prediction), [normalize_answer(a) for a in answers])


def _most_common(answers: Sequence[str]) -> str:
    """The most frequent normalised answer (first seen wins a tie)."""
    return Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]


def majority_answer_baseline(
    train_answers: Sequence[Sequence[str]],
    val_answers: Sequence[Sequence[str]],
    train_types: Sequence[str] | None = None,
    val_types: Sequence[str] | None = None,
) -> float:
    """VQA accuracy on ``val_answers`` of always answering the most common train answer.

    Each train question votes with its most frequent human answer. With ``train_types`` and
    ``val_types`` the vote is per question type (a type unseen in train falls back to the
    overall winner), giving the "most common answer per question type" baseline.

    Raises:
        ValueError: ``train_answers`` or ``val_answers`` is empty, or types do not match in length.
    """
    if not train_answers or not val_answers:
        raise ValueError("majority_answer_baseline needs non-empty train_answers and val_answers")
    if (train_types is None) != (val_types is None):
        raise ValueError("give both train_types and val_types, or neither")
    votes = [_most_common(answers) for answers in train_answers]
    overall = Counter(votes).most_common(1)[0][0]
    if train_types is None or val_types is None:
        guesses = [overall] * len(val_answers)
    else:
        if len(train_types) != len(train_answers) or len(val_types) != len(val_answers):
            raise ValueError("train_types/val_types must have one entry per question")
        per_type: dict[str, Counter[str]] = {}
        for qtype, vote in zip(train_types, votes):
            per_type.setdefault(qtype, Counter())[vote] += 1
        guesses = [per_type[t].most_common(1)[0][0] if t in per_type else overall for t in val_types]
    scores = [vqa_accuracy(guess, answers) for guess, answers in zip(guesses, val_answers)]
    return sum(scores) / len(scores)


class VQAAccuracy(Metric):
    """Mean VQA accuracy over questions, DDP-safe (sums of tensors).

    Args:
        question_types: optional fixed list of question types to also track per type
            (read with :meth:`compute_per_type`); types outside the list count only overall.

    ``compute()`` returns a scalar tensor in ``[0, 1]`` (0 before any update).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, question_types: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.question_types = list(question_types)
        self._type_index = {name: i for i, name in enumerate(self.question_types)}
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        num_types = len(self.question_types)
        self.add_state("type_score_sum", torch.zeros(num_types, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("type_count", torch.zeros(num_types, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        question_types: Sequence[str] | None = None,
    ) -> None:
        """Score a batch: ``predictions[i]`` against the human ``answers[i]`` (``question_types[i]``)."""
        if len(predictions) != len(answers):
            raise ValueError(f"VQAAccuracy.update: {len(predictions)} predictions but {len(answers)} answer lists")
        if question_types is not None and len(question_types) != len(predictions):
            raise ValueError(f"VQAAccuracy.update: {len(question_types)} question_types for {len(predictions)} predictions")
        scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
        self.score_sum += sum(scores)
        self.count += len(scores)
        for qtype, score in zip(question_types or (), scores):
            index = self._type_index.get(qtype)
            if index is not None:
                self.type_score_sum[index] += score
                self.type_count[index] += 1

    def compute(self) -> Tensor:
        """Mean accuracy in ``[0, 1]`` as a float32 scalar."""
        return (self.score_sum / self.count.clamp(min=1)).float()

    def compute_per_type(self) -> dict[str, Tensor]:
        """Mean accuracy per declared question type (synced across ranks; 0 for an unseen type)."""
        fresh = not self._is_synced
        with self.sync_context(should_sync=fresh, should_unsync=fresh):
            means = (self.type_score_sum / self.type_count.clamp(min=1)).float()
        return {name: means[i] for i, name in enumerate(self.question_types)}
