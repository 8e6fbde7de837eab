r"""VQA accuracy exactly as the official VQAv2 scorer computes it.

The definition is ``VQAEval.evaluate`` of GT-Vision-Lab/VQA
(``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) as of commit 458a8b2 (2016), which LAVIS ships
unchanged as ``lavis/common/vqa_tools/vqa_eval.py`` and which produced the published BLIP-2 numbers.
Per question:

1. the prediction has ``\n`` and ``\t`` replaced by spaces, is stripped, then goes through
   :func:`process_punctuation` and :func:`process_digit_article` (:func:`normalize_answer`);
2. the human answers are left as they are (not lower-cased, no number words, articles or
   contractions), except that when they are not all identical each goes through
   :func:`process_punctuation` only;
3. the accuracy is the mean, over the subsets that leave out one human, of
   ``min(1, #other humans equal to the prediction / 3)``. This holds for any number of answers, so a
   question with a single human answer always scores 0.

Quirks reproduced on purpose:

- a punctuation mark is deleted (not turned into a space) when the *original* text has it next to a
  space, or when the text has a comma between two digits anywhere (then every mark is deleted);
- the period pattern ``(?!<=\d)(\.)(?!\d)`` has a malformed look-behind, so it drops every period not
  followed by a digit, and it is applied with ``count=re.UNICODE`` (the flag lands in the ``count``
  argument): at most 32 periods are removed;
- the prediction is lower-cased before number words (``none`` → ``0`` ... ``ten`` → ``10``), articles
  and contractions are looked up, so the contraction table's capitalised entries (``"Im"``, ``"Ive"``,
  ``"Id've"``, ``"I'dve"``) never fire; the table is kept verbatim, including ``"somebody'd"`` →
  ``"somebodyd"`` (backwards);
- ``\d`` and ``str.lower``/``str.split`` have their Python 3 (Unicode) meaning, as in LAVIS.

The later upstream commit a013f00 (2021, "Fixed processing answers bug") changed the algorithm: it
strips whitespace on both sides, then fully normalises both prediction and human answers, but only
when the human answers differ. It is not followed: LAVIS and the published BLIP-2 numbers use the
2016 version.

:func:`vqa_accuracy_normalized` is a friendlier, opt-in variant (both sides fully normalised); it is
reported as ``vqa_acc_normalized``, never as ``vqa_acc``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# Official pattern, malformed look-behind included: it matches every "." not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official call passes re.UNICODE where ``sub`` takes ``count``: at most 32 periods are removed.
_PERIOD_STRIP_COUNT = re.UNICODE
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
#: The official contraction table, verbatim (odd entries included).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: delete or space out punctuation, then strip periods.

    Each mark of :data:`PUNCTUATION` is deleted when the original text has it next to a space or has a
    comma between digits (``"1,000"`` → ``"1000"``), otherwise replaced by a space
    (``"black-and-white"`` → ``"black and white"``). Then up to 32 periods not followed by a digit go.
    """
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words → digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The official processing of a prediction (human answers get less, see the module docstring).

    Examples: ``"Two!"`` → ``"2"``, ``"a dog"`` → ``"dog"``, ``"dont"`` → ``"don't"``,
    ``"1,000"`` → ``"1000"``, ``"Yes, it is."`` → ``"yes it is"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def build_answer_vocab(answer_lists: Sequence[Sequence[str]], min_count: int = 1,
                       max_size: int | None = None) -> list[str]:
    """Normalised answers (:func:`normalize_answer`) of the training questions, most frequent first.

    Every human answer counts once; answers seen fewer than ``min_count`` times are dropped, at most
    ``max_size`` are kept; ties keep first-seen order.
    """
    counts = Counter(normalize_answer(a) for answers in answer_lists for a in answers)
    ranked = [a for a, n in counts.most_common() if n >= min_count and a]
    return ranked[:max_size] if max_size is not None else ranked


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """Mean over "leave human i out" of ``min(1, #other answers equal to prediction / 3)``."""
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - own) / 3) for own in matches) / len(answers)


def _check_answers(prediction: str, answers: Sequence[str]) -> None:
    if not answers:
        raise ValueError(f"VQA accuracy needs at least one human answer for prediction {prediction!r}")


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy (2016/LAVIS scorer) of one prediction against its human answers.

    The prediction goes through :func:`normalize_answer`; the answers are compared raw, or after
    :func:`process_punctuation` when they are not all identical. A single answer always scores 0.

    Raises:
        ValueError: ``answers`` is empty.
    """
    _check_answers(prediction, answers)
    humans = list(answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(answer) for answer in humans]
    return _leave_one_out(normalize_answer(prediction), humans)


def vqa_accuracy_normalized(prediction: str, answers: Sequence[str]) -> float:
    """Opt-in friendlier VQA accuracy, reported as ``vqa_acc_normalized`` (never as ``vqa_acc``).

    Prediction and human answers all go through :func:`normalize_answer` (so ``"two"`` matches ``"2"``
    and ``"Yes"`` matches ``"yes"``), then the same leave-one-out mean as :func:`vqa_accuracy`,
    except that a single answer is scored by exact match.

    Raises:
        ValueError: ``answers`` is empty.
    """
    _check_answers(prediction, answers)
    guess = normalize_answer(prediction)
    humans = [normalize_answer(answer) for answer in answers]
    if len(humans) == 1:
        return float(guess == humans[0])
    return _leave_one_out(guess, humans)


def _percent(scores: Sequence[float], digits: int) -> float:
    """Official ``setAccuracy`` arithmetic: ``round(100 * sum / count, digits)``."""
    return round(100 * float(sum(scores)) / len(scores), digits)


def _group(scores: Sequence[float], keys: Sequence[str]) -> dict[str, list[float]]:
    """Scores grouped by key, keys in first-seen order."""
    groups: dict[str, list[float]] = {}
    for key, score in zip(keys, scores):
        groups.setdefault(key, []).append(score)
    return groups


def vqa_summary(scores: Sequence[float], question_types: Sequence[str], answer_types: Sequence[str],
                digits: int = 2) -> dict:
    """The official ``VQAEval.accuracy`` dict from per-question accuracies (in ``[0, 1]``).

    Returns ``{"overall": x, "perQuestionType": {type: x}, "perAnswerType": {type: x}}`` where each ``x``
    is the mean accuracy ×100 rounded to ``digits``; types appear in first-seen order. Pass the scores in
    the annotation file's order to reproduce the official floating-point sums exactly.

    Raises:
        ValueError: no scores, or the type lists do not have one entry per score.
    """
    if not scores:
        raise ValueError("vqa_summary needs at least one score")
    if len(question_types) != len(scores) or len(answer_types) != len(scores):
        raise ValueError(f"vqa_summary: {len(scores)} scores but {len(question_types)} question_types and "
                         f"{len(answer_types)} answer_types")
    values = [float(score) for score in scores]
    return {
        "overall": _percent(values, digits),
        "perQuestionType": {key: _percent(group, digits) for key, group in _group(values, question_types).items()},
        "perAnswerType": {key: _percent(group, digits) for key, group in _group(values, answer_types).items()},
    }


def _most_common(items: Sequence[str]) -> str:
    """The most frequent item (first seen wins a tie)."""
    return Counter(items).most_common(1)[0][0]


def majority_answer_baseline(
    train_answers: Sequence[Sequence[str]],
    val_answers: Sequence[Sequence[str]],
    train_types: Sequence[str] | None = None,
    val_types: Sequence[str] | None = None,
) -> float:
    """Official VQA accuracy (:func:`vqa_accuracy`) on ``val_answers`` of always giving the commonest train answer.

    Each train question votes with its most frequent raw human answer (not normalised, so the guess can
    match the raw human answers it is scored against). With ``train_types`` and ``val_types`` the vote
    is per question type (a type unseen in train falls back to the overall winner), giving the "most
    common answer per question type" baseline.

    Raises:
        ValueError: ``train_answers`` or ``val_answers`` is empty, or types do not match in length.
    """
    if not train_answers or not val_answers:
        raise ValueError("majority_answer_baseline needs non-empty train_answers and val_answers")
    if (train_types is None) != (val_types is None):
        raise ValueError("give both train_types and val_types, or neither")
    votes = [_most_common(answers) for answers in train_answers]
    overall = _most_common(votes)
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
    """Mean official VQA accuracy (:func:`vqa_accuracy`) over questions, DDP-safe (sums of tensors).

    Args:
        question_types: optional fixed list of question types to also track per type
            (read with :meth:`compute_per_type`); types outside the list count only overall.
        answer_types: the same for answer types (read with :meth:`compute_per_answer_type`).

    ``compute()`` returns a scalar tensor in ``[0, 1]`` (0 before any update). The per-type means are
    in ``[0, 1]`` too; :func:`vqa_summary` gives the official ×100 rounded dict from per-question scores.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, question_types: Sequence[str] = (), answer_types: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.question_types = list(question_types)
        self.answer_types = list(answer_types)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for prefix, names in (("question", self.question_types), ("answer", self.answer_types)):
            self.add_state(f"{prefix}_type_score_sum", torch.zeros(len(names), dtype=torch.float64),
                           dist_reduce_fx="sum")
            self.add_state(f"{prefix}_type_count", torch.zeros(len(names), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        question_types: Sequence[str] | None = None,
        answer_types: Sequence[str] | None = None,
    ) -> None:
        """Score a batch: ``predictions[i]`` against the human ``answers[i]`` (of ``question_types[i]``,
        ``answer_types[i]`` when given)."""
        if len(predictions) != len(answers):
            raise ValueError(f"VQAAccuracy.update: {len(predictions)} predictions but {len(answers)} answer lists")
        for name, types in (("question_types", question_types), ("answer_types", answer_types)):
            if types is not None and len(types) != len(predictions):
                raise ValueError(f"VQAAccuracy.update: {len(types)} {name} for {len(predictions)} predictions")
        scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
        self.score_sum += sum(scores)
        self.count += len(scores)
        self._add_per_type(self.question_types, self.question_type_score_sum, self.question_type_count,
                           question_types or (), scores)
        self._add_per_type(self.answer_types, self.answer_type_score_sum, self.answer_type_count,
                           answer_types or (), scores)

    @staticmethod
    def _add_per_type(names: list[str], sums: Tensor, counts: Tensor, types: Sequence[str],
                      scores: Sequence[float]) -> None:
        """Add each score to the sums of its type, if the type is one of ``names``."""
        for kind, score in zip(types, scores):
            if kind in names:
                index = names.index(kind)
                sums[index] += score
                counts[index] += 1

    def compute(self) -> Tensor:
        """Mean accuracy in ``[0, 1]`` as a float32 scalar."""
        return (self.score_sum / self.count.clamp(min=1)).float()

    def compute_per_type(self) -> dict[str, Tensor]:
        """Mean accuracy per declared question type (synced across ranks; 0 for an unseen type)."""
        return self._per_type_means(self.question_types, "question")

    def compute_per_answer_type(self) -> dict[str, Tensor]:
        """Mean accuracy per declared answer type (synced across ranks; 0 for an unseen type)."""
        return self._per_type_means(self.answer_types, "answer")

    def _per_type_means(self, names: list[str], prefix: str) -> dict[str, Tensor]:
        fresh = not self._is_synced
        with self.sync_context(should_sync=fresh, should_unsync=fresh):
            sums, counts = getattr(self, f"{prefix}_type_score_sum"), getattr(self, f"{prefix}_type_count")
            means = (sums / counts.clamp(min=1)).float()
        return {name: means[i] for i, name in enumerate(names)}
