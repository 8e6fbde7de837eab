"""An independent re-derivation of the official VQAv2 scorer, in the official code's structure.

Mirrors GT-Vision-Lab/VQA at commit 458a8b2 (2016), the version LAVIS ships: ``VQA`` (index of the
annotations, ``loadRes`` with its assertions) and ``VQAEval.evaluate`` (per-question leave-one-out over
the answer dicts, compared as whole dicts). Tests compare :mod:`mmlm.metrics.vqa` against it.

Departures that cannot change an accuracy: inputs are deep-copied instead of mutated, ``image_id`` is
optional, and nothing is printed.
"""

from __future__ import annotations

import copy
import re

_RESULTS_NOT_LIST = "results is not an array of objects"
_IDS_DIFFER = ("Results do not correspond to current VQA set. Either the results do not have predictions for all "
               "question ids in annotation file or there is atleast one question id that does not belong to the "
               "question ids in the annotation file.")

CONTRACTIONS = {
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
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ["a", "an", "the"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _check(condition: bool, message: str) -> None:
    """An upstream ``assert`` that still fires under ``python -O``."""
    if not condition:
        raise AssertionError(message)


class VQA:
    """Official ``VQA`` helper, reduced to what evaluation uses: the question-id index and ``loadRes``."""

    def __init__(self, dataset: dict, questions: dict) -> None:
        self.dataset = dataset
        self.questions = questions
        self.qa: dict = {}
        self.qqa: dict = {}
        self.create_index()

    def create_index(self) -> None:
        """Index annotations and questions by question id (a repeated id keeps the last one)."""
        for ann in self.dataset["annotations"]:
            self.qa[ann["question_id"]] = ann
        for ques in self.questions["questions"]:
            self.qqa[ques["question_id"]] = ques

    def get_ques_ids(self) -> list:
        """Question ids of every annotation, in file order."""
        return [ann["question_id"] for ann in self.dataset["annotations"]]

    def load_res(self, results: list) -> VQA:
        """Official ``loadRes``: the results must be a list covering exactly the annotated question ids."""
        _check(type(results) is list, _RESULTS_NOT_LIST)
        _check({ann["question_id"] for ann in results} == set(self.get_ques_ids()), _IDS_DIFFER)
        for ann in results:
            ques_id = ann["question_id"]
            if self.questions.get("task_type") == "Multiple Choice":
                _check(ann["answer"] in self.qqa[ques_id]["multiple_choices"],
                       "predicted answer is not one of the multiple choices")
            qa_ann = self.qa[ques_id]
            ann["image_id"] = qa_ann.get("image_id")
            ann["question_type"] = qa_ann["question_type"]
            ann["answer_type"] = qa_ann["answer_type"]
        return VQA({"annotations": results}, self.questions)


class VQAEval:
    """Official ``VQAEval``: ``evaluate()`` fills ``accuracy`` and ``eval_qa`` (×100, rounded to ``n``)."""

    def __init__(self, vqa: VQA, vqa_res: VQA, n: int = 2) -> None:
        self.n = n
        self.accuracy: dict = {}
        self.eval_qa: dict = {}
        self.vqa = vqa
        self.vqa_res = vqa_res
        self.manual_map = dict(MANUAL_MAP)

    def evaluate(self) -> None:
        ques_ids = self.vqa.get_ques_ids()
        gts = {ques_id: self.vqa.qa[ques_id] for ques_id in ques_ids}
        res = {ques_id: self.vqa_res.qa[ques_id] for ques_id in ques_ids}
        acc_qa: list[float] = []
        acc_ques_type: dict[str, list[float]] = {}
        acc_ans_type: dict[str, list[float]] = {}
        for ques_id in ques_ids:
            res_ans = res[ques_id]["answer"].replace("\n", " ").replace("\t", " ").strip()
            res_ans = self.process_digit_article(self.process_punctuation(res_ans))
            gt_answers = [ans["answer"] for ans in gts[ques_id]["answers"]]
            if len(set(gt_answers)) > 1:
                for ans_dic in gts[ques_id]["answers"]:
                    ans_dic["answer"] = self.process_punctuation(ans_dic["answer"])
            gt_acc = []
            for gt_ans_datum in gts[ques_id]["answers"]:
                other_gt_ans = [item for item in gts[ques_id]["answers"] if item != gt_ans_datum]
                matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
                gt_acc.append(min(1, float(len(matching_ans)) / 3))
            avg_gt_acc = float(sum(gt_acc)) / len(gt_acc)
            acc_qa.append(avg_gt_acc)
            acc_ques_type.setdefault(gts[ques_id]["question_type"], []).append(avg_gt_acc)
            acc_ans_type.setdefault(gts[ques_id]["answer_type"], []).append(avg_gt_acc)
            self.eval_qa[ques_id] = round(100 * avg_gt_acc, self.n)
        self.set_accuracy(acc_qa, acc_ques_type, acc_ans_type)

    def process_punctuation(self, in_text: str) -> str:
        out_text = in_text
        for p in PUNCT:
            if (p + " " in in_text or " " + p in in_text) or (re.search(COMMA_STRIP, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return PERIOD_STRIP.sub("", out_text, re.UNICODE)  # the flag lands in ``count``, as upstream

    def process_digit_article(self, in_text: str) -> str:
        out_text = []
        for word in in_text.lower().split():
            word = self.manual_map.setdefault(word, word)
            if word not in ARTICLES:
                out_text.append(word)
        for word_id, word in enumerate(out_text):
            if word in CONTRACTIONS:
                out_text[word_id] = CONTRACTIONS[word]
        return " ".join(out_text)

    def set_accuracy(self, acc_qa: list[float], acc_ques_type: dict[str, list[float]],
                     acc_ans_type: dict[str, list[float]]) -> None:
        def percent(values: list[float]) -> float:
            return round(100 * float(sum(values)) / len(values), self.n)

        self.accuracy["overall"] = percent(acc_qa)
        self.accuracy["perQuestionType"] = {key: percent(values) for key, values in acc_ques_type.items()}
        self.accuracy["perAnswerType"] = {key: percent(values) for key, values in acc_ans_type.items()}


def official_vqa_eval(annotations: dict, questions: dict, results: list, n: int = 2) -> VQAEval:
    """Run the official pipeline (``VQA``, ``loadRes``, ``VQAEval.evaluate``) on deep copies of the inputs."""
    vqa = VQA(copy.deepcopy(annotations), copy.deepcopy(questions))
    vqa_eval = VQAEval(vqa, vqa.load_res(copy.deepcopy(results)), n=n)
    vqa_eval.evaluate()
    return vqa_eval


def official_vqa_accuracy(annotations: dict, questions: dict, results: list, n: int = 2) -> dict:
    """The official ``accuracy`` dict: ``{"overall", "perQuestionType", "perAnswerType"}``, ×100 rounded to ``n``.

    ``annotations`` is ``{"annotations": [{"question_id", "question_type", "answer_type", "answers":
    [{"answer", "answer_confidence", "answer_id"}]}]}``, ``questions`` is ``{"questions": [{"question_id",
    ...}]}`` and ``results`` is ``[{"question_id", "answer"}]``. Raises ``AssertionError`` where the official
    ``loadRes`` does: results not a list, or its question ids (compared with their types) not exactly the
    annotated ones.
    """
    return official_vqa_eval(annotations, questions, results, n).accuracy
