"""Caption scores against pycocoevalcap's own COCO pipeline (``COCOEvalCap.evaluate``).

The reference here is what ``COCOEvalCap.evaluate`` runs: ``PTBTokenizer().tokenize`` on the
references and on the candidates (two Java calls), then ``Bleu(4)``, ``Rouge()`` and ``Cider()`` on the
tokenized dicts. Tests that need Java skip without it; the mimic tests run everywhere.
"""

from __future__ import annotations

import os
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from mmlm.metrics import captioning
from mmlm.metrics.captioning import (
    CAPTION_SCORE_KEYS,
    CaptionMetrics,
    caption_scores,
    java_ptb_tokenize,
    ptb_tokenize,
    resolve_caption_tokenizer,
)

HAS_JAVA = shutil.which("java") is not None
requires_java = pytest.mark.skipif(not HAS_JAVA, reason="the PTB tokenizer of pycocoevalcap needs `java` on PATH")

# Eight images (COCO-like ids), one candidate and five references each: punctuation, upper case,
# contractions, hyphens, numbers, quotes, parentheses.
IMAGE_IDS = [391895, 522418, 184613, 318219, 554625, 397133, 37777, 87038]
PREDICTIONS = [
    "A man riding a wave on top of a surfboard.",
    "A woman's hand holding a slice of pizza (with cheese).",
    "Two dogs don't like the rain; it's cold!",
    "A red double-decker bus at 10:30 on 5th Ave.",
    "The cat's toy is a \"mouse\" -- isn't it cute?",
    "A 3-year-old boy plays with 2 frisbees...",
    "People standing near a sign that reads 'NO PARKING'.",
    "a kitchen with a stove, a sink and a refrigerator",
]
REFERENCES = [
    ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave.",
     "Man on a surfboard riding an ocean wave.", "A person surfing (in the ocean).", "The surfer's board is white."],
    ["A woman eating pizza at a table.", "Someone's hand holds a slice of pizza.",
     "A slice of cheese pizza, held by a woman.", "A lady with a slice of PIZZA.", "It's a woman holding pizza."],
    ["Two dogs standing in the rain.", "A pair of dogs that don't want to go out.",
     "Dogs (two of them) in the rain!", "Two wet dogs on a rainy day.", "The dogs' fur is wet."],
    ["A red double-decker bus on a city street.", "A double decker bus parked at 10:30.",
     "The red bus drives down 5th Avenue.", "A big red bus: two levels.", "A London-style bus on the road."],
    ["A cat playing with a toy mouse.", "The cat's toy is a fake mouse.",
     "A \"cute\" cat with its toy.", "Isn't that a cute cat?", "A kitten plays with a mouse-shaped toy."],
    ["A young boy playing with a frisbee.", "A 3-year-old child holding 2 frisbees.",
     "A little kid with two frisbees...", "The boy's frisbees are red & blue.", "A toddler plays in the park."],
    ["People walking past a no parking sign.", "A sign that says 'No Parking' near people.",
     "A group of people next to a street sign.", "Pedestrians by a sign (no parking).", "Some people near a sign."],
    ["A kitchen with a stove, sink, and refrigerator.", "A clean kitchen with white appliances.",
     "The kitchen has a stainless-steel fridge.", "A small kitchen; it's very tidy.", "Kitchen with a sink and oven."],
]

# Typical COCO captions and their tokens from the Java PTB tokenizer of the COCO pipeline (recorded
# from pycocoevalcap's PTBTokenizer; ``test_recorded_ptb_tokens_are_current`` re-checks them). The
# pure-Python mimic reproduces every one of them.
TYPICAL_CAPTIONS = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "A giraffe standing next to a tree .": "a giraffe standing next to a tree",
    "A plate of food with broccoli, rice and meat.": "a plate of food with broccoli rice and meat",
    "A man's hand holding a cell phone.": "a man 's hand holding a cell phone",
    "The dog's head is sticking out of the car window.": "the dog 's head is sticking out of the car window",
    "It's a sunny day at the beach.": "it 's a sunny day at the beach",
    "There's a clock on the side of the building.": "there 's a clock on the side of the building",
    "A kitchen that doesn't have any appliances.": "a kitchen that does n't have any appliances",
    "The cat can't get off the couch.": "the cat ca n't get off the couch",
    "The player won't hit the ball.": "the player wo n't hit the ball",
    "They're playing frisbee in the park.": "they 're playing frisbee in the park",
    "I'm looking at a red car.": "i 'm looking at a red car",
    "A young boy in a t-shirt plays with a frisbee.": "a young boy in a t-shirt plays with a frisbee",
    "A double-decker bus driving down the street.": "a double-decker bus driving down the street",
    "A 747 jet flying through a blue sky.": "a 747 jet flying through a blue sky",
    "A 10 year old boy is riding a bike.": "a 10 year old boy is riding a bike",
    "A sign that says \"STOP\" on a pole.": "a sign that says stop on a pole",
    "A cake with the words 'Happy Birthday' on it.": "a cake with the words happy birthday on it",
    "A bowl of soup (with a spoon) on a table.": "a bowl of soup -lrb- with a spoon -rrb- on a table",
    "A man in a black jacket; holding a kite.": "a man in a black jacket holding a kite",
    "Is this a cat or a dog?": "is this a cat or a dog",
    "Wow! A very big bear!": "wow a very big bear",
    "A  black and white photo of a city street.": "a black and white photo of a city street",
    "A women's tennis match is in progress.": "a women 's tennis match is in progress",
    "The dogs' toys are on the floor.": "the dogs toys are on the floor",
    "A bird perched on a branch - looking around.": "a bird perched on a branch looking around",
    "A horse drawn carriage on a city street...": "a horse drawn carriage on a city street",
    "A clock tower showing 12 o'clock.": "a clock tower showing 12 o'clock",
    "The clock reads 10:30 and it costs $3.50.": "the clock reads 10:30 and it costs $ 3.50",
    "A man cannot reach the 1,000 lb weight.": "a man can not reach the 1,000 lb weight",
    "A U.S. flag on a pole on St. Patrick's day.": "a u.s. flag on a pole on st. patrick 's day",
    "A TV shows the news at 5 p.m. today.": "a tv shows the news at 5 p.m. today",
    "What a game!! Who's winning?!": "what a game !! who 's winning ?!",
    "A sign says 50% off -- everything must go.": "a sign says 50 % off everything must go",
    "A dog \u2013 with a ball \u2014 runs\u2026": "a dog with a ball runs",
    "A woman\u2019s \u201cbig\u201d hat.": "a woman 's big hat",
    "Living room with a couch and a coffee table": "living room with a couch and a coffee table",
}


def _reference_pipeline(predictions: list[str], references: list[list[str]], image_ids: list[int]) -> tuple:
    """What ``COCOEvalCap.evaluate`` computes for these captions: (scores dict, tokenized gts, tokenized res)."""
    gts = {i: [{"caption": c} for c in refs] for i, refs in zip(image_ids, references)}
    res = {i: [{"caption": p}] for i, p in zip(image_ids, predictions)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = {"cider": cider, "rouge_l": rouge, **{f"bleu{n + 1}": b for n, b in enumerate(bleu)}}
    return scores, gts, res


def _reference_or_skip(predictions: list[str], references: list[list[str]], image_ids: list[int]) -> tuple:
    """The reference pipeline, skipped where it cannot run (``PTBTokenizer`` writes into its package folder)."""
    package_dir = os.path.dirname(captioning.PTB_JAR)
    if not os.access(package_dir, os.W_OK):
        pytest.skip(f"PTBTokenizer writes its temporary file into {package_dir}, which is read-only here")
    return _reference_pipeline(predictions, references, image_ids)


# --------------------------------------------------------------------------- the Java (official) path


@requires_java
def test_ptb_scores_equal_coco_eval_pipeline() -> None:
    expected, gts, res = _reference_or_skip(PREDICTIONS, REFERENCES, IMAGE_IDS)
    got = caption_scores(PREDICTIONS, REFERENCES, tokenizer="ptb")
    assert set(got) == set(CAPTION_SCORE_KEYS)
    assert got == {key: float(expected[key]) for key in CAPTION_SCORE_KEYS}  # exact, not approximate
    assert got["cider"] > 1.0 and 0.0 < got["bleu4"] < 1.0
    # the tokens themselves are the pipeline's too
    assert java_ptb_tokenize(PREDICTIONS) == [res[i][0] for i in IMAGE_IDS]
    assert java_ptb_tokenize([r for refs in REFERENCES for r in refs]) == [t for i in IMAGE_IDS for t in gts[i]]


@requires_java
def test_ptb_keeps_empty_and_punctuation_only_captions_aligned() -> None:
    predictions = [*PREDICTIONS[:3], "", "...", *PREDICTIONS[5:]]
    expected, _, res = _reference_or_skip(predictions, REFERENCES, IMAGE_IDS)
    assert res[IMAGE_IDS[3]] == [""] and res[IMAGE_IDS[4]] == [""]
    got = caption_scores(predictions, REFERENCES, tokenizer="ptb")
    assert got == {key: float(expected[key]) for key in CAPTION_SCORE_KEYS}


@requires_java
def test_line_breaks_inside_a_caption_do_not_shift_the_others() -> None:
    # Java ends a line at \r, \v, \f, U+2028 and U+2029; pycocoevalcap only replaces "\n", so these
    # would move every later caption onto the wrong image. They are spaces here.
    broken = ["a dog\ron a\u2028couch", "a cat\fon a\vbed", "two birds"]
    assert java_ptb_tokenize(broken) == ["a dog on a couch", "a cat on a bed", "two birds"]
    clean = [" ".join(c.split()) for c in broken]
    references = [["a dog on a couch"], ["a cat on a bed"], ["two birds in a tree"]]
    assert caption_scores(broken, references, tokenizer="ptb") == caption_scores(clean, references, tokenizer="ptb")


@requires_java
def test_recorded_ptb_tokens_are_current() -> None:
    captions = list(TYPICAL_CAPTIONS)
    assert java_ptb_tokenize(captions) == [TYPICAL_CAPTIONS[c] for c in captions]


@requires_java
def test_caption_metric_with_ptb_tokenizer() -> None:
    metric = CaptionMetrics(tokenizer="ptb", keys=CAPTION_SCORE_KEYS)
    assert metric.resolved_tokenizer == "ptb"
    metric.update(PREDICTIONS[:5], REFERENCES[:5])
    metric.update(PREDICTIONS[5:], REFERENCES[5:])
    scores = metric.compute()
    assert set(scores) == set(CAPTION_SCORE_KEYS)
    expected = caption_scores(PREDICTIONS, REFERENCES, tokenizer="ptb")
    assert all(scores[k].item() == pytest.approx(expected[k], rel=1e-6) for k in CAPTION_SCORE_KEYS)


# ------------------------------------------------------------------------------- choosing a tokenizer


@requires_java
def test_auto_picks_ptb_when_java_is_on_path() -> None:
    assert resolve_caption_tokenizer("auto") == "ptb"
    assert CaptionMetrics().resolved_tokenizer == "ptb"
    assert caption_scores(PREDICTIONS, REFERENCES) == caption_scores(PREDICTIONS, REFERENCES, tokenizer="ptb")


def test_auto_picks_python_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(captioning.shutil, "which", lambda name, *args, **kwargs: None)
    assert resolve_caption_tokenizer("auto") == "python"
    assert resolve_caption_tokenizer("ptb") == "ptb"  # an explicit choice is kept ...
    with pytest.raises(RuntimeError, match="java"):  # ... and fails clearly
        caption_scores(PREDICTIONS, REFERENCES, tokenizer="ptb")
    assert CaptionMetrics().resolved_tokenizer == "python"
    assert caption_scores(PREDICTIONS, REFERENCES) == caption_scores(PREDICTIONS, REFERENCES, tokenizer="python")


def test_tokenizer_names_and_bad_input_are_checked() -> None:
    with pytest.raises(ValueError, match="caption tokenizer"):
        resolve_caption_tokenizer("spacy")
    with pytest.raises(ValueError, match="caption tokenizer"):
        CaptionMetrics(tokenizer="spacy")
    with pytest.raises(ValueError, match="unknown caption score keys"):
        CaptionMetrics(keys=("cider", "meteor"))
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        caption_scores(["a", "b"], [["a"]], tokenizer="ptb")
    with pytest.raises(ValueError, match="example 1"):
        caption_scores(["a", "b"], [["a"], []], tokenizer="ptb")
    # empty input needs no tokenizer run at all
    assert caption_scores([], [], tokenizer="ptb") == dict.fromkeys(CAPTION_SCORE_KEYS, 0.0)
    assert java_ptb_tokenize([]) == []


# ------------------------------------------------------------------------------- the Python mimic


def test_mimic_tokenizes_typical_coco_captions_like_ptb() -> None:
    assert {c: ptb_tokenize(c) for c in TYPICAL_CAPTIONS} == TYPICAL_CAPTIONS


def test_python_scores_use_the_mimic() -> None:
    got = caption_scores(PREDICTIONS, REFERENCES, tokenizer="python")
    gts = {i: [ptb_tokenize(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [ptb_tokenize(p)] for i, p in enumerate(PREDICTIONS)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert got["cider"] == float(cider) and got["bleu4"] == float(bleu[3])
