"""Captioning metrics: the scores of pycocoevalcap's COCO pipeline (CIDEr-D, BLEU-1..4, ROUGE-L).

``COCOEvalCap.evaluate`` tokenizes references and candidates with ``PTBTokenizer`` (the Stanford
CoreNLP 3.4.1 ``PTBTokenizer`` in Java, ``-preserveLines -lowerCase``, then the punctuation tokens
of ``ptbtokenizer.PUNCTUATIONS`` are dropped) and hands the tokenized strings to ``Bleu(4)``,
``Rouge()`` and ``Cider()``. :func:`caption_scores` does the same with ``tokenizer="ptb"`` (same jar,
same command, same punctuation list, same scorers, corpus-level idf), so its numbers equal the
official ones. pycocoevalcap's ``Cider`` is CIDEr-D: tf-idf n-gram vectors (n = 1..4), clipped
hypothesis counts, a Gaussian length penalty (sigma 6), averaged over references and scaled by 10;
its idf comes from the references of the whole evaluated corpus, so a corpus of one image scores 0.
``Bleu(4)`` is corpus-level BLEU with the "closest" reference length.

Without Java, ``tokenizer="python"`` uses :func:`ptb_tokenize`, a pure-Python mimic of the PTB
tokenizer that agrees on typical COCO captions but not on every string; ``"auto"`` picks ``"ptb"``
when ``java`` is on ``PATH``. Record :func:`resolve_caption_tokenizer` next to reported scores.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from torch import Tensor
from torchmetrics import Metric

CAPTION_TOKENIZERS = ("auto", "ptb", "python")
CAPTION_SCORE_KEYS = ("cider", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l")

PTB_JAR = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
_PTB_MAIN = ("edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase")
_PTB_PUNCTUATIONS = frozenset(ptbtokenizer.PUNCTUATIONS)
# Characters the Java tokenizer treats as line ends. pycocoevalcap only replaces "\n", so any of the
# others inside a caption shifts every later caption onto the wrong image; they become spaces here.
_LINE_BREAKS = re.compile("[\n\r\v\f\u2028\u2029]")

# --- the pure-Python mimic. Every rule below was checked against the Java tokenizer (see the tests).
# Characters the PTB tokenizer normalises: curly quotes and guillemets to straight quotes (dropped as
# punctuation; "’" inside "don’t" acts as an apostrophe), dashes to "--", "…" to "...", some symbols.
_CHARACTER_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... ", "\u20ac": " $ ", "\u00a3": " # ",
    "\u00a2": " cents ", "\u00bd": " 1/2 ", "\u00bc": " 1/4 ", "\n": " ",
})
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")  # emoji and other non-BMP characters: deleted by the lexer
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                "lemme": "lem me", "gimme": "gim me", "'tis": "'t is", "'twas": "'t was"}
_SPLIT_WORD = re.compile(r"(?<![\w'])(?:cannot|gonna|gotta|wanna|lemme|gimme|'tis|'twas)(?!\w)")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Abbreviations whose final period the PTB tokenizer keeps in every context tried (any case).
_ABBREVIATIONS = (
    "mr mrs ms dr st mt jr sr vs inc co ltd ave rd blvd dept univ est corp bros etc prof gen sen rep gov capt lt "
    "col sgt rev hon ft jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri"
).split()
_TOKEN = re.compile(
    r"(?<!\w)y'(?=[^\W\d_])"  # y'all -> y' all
    r"|'n'|'(?:s|re|ve|ll|d|m|t|em|til|till|cause|n|[2-9]0s|\d\d)(?!\w)"  # clitics, 'em, 'n', '90s
    r"|n't(?!\w)"
    r"|(?:[^\W\d_]\.){2,}(?!\w)"  # u.s., p.m., e.g.
    rf"|(?<!\w)(?:{'|'.join(_ABBREVIATIONS)})\.(?!\w)|(?<!\w)no\.(?=\s+\d)"
    r"|[^\W\d_]+'[^\W\d_]{2,}"  # o'clock, ma'am
    r"|\w+(?:(?:[-./]|(?<=\d)[,:](?=\d))\w+)*"  # t-shirt, 3.5, 1,000, 10:30, a/b
    r"|[-+]\d+(?:[.,:]\d+)*|\.\d+"  # -5, +3, .5
    r"|\.{2,}|[!?]+|-{2,}|\S"
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# The PTB output tokens the COCO pipeline drops, as the mimic spells them ('"' is "``" or "''" in PTB;
# runs of periods are "..." or ". ."). The bracket tokens are NOT dropped: PUNCTUATIONS lists "-LRB-",
# but the tokenizer runs with -lowerCase and emits "-lrb-".
_MIMIC_DROPPED = frozenset(ptbtokenizer.PUNCTUATIONS) | {'"'}
_DOTS_OR_DASHES = re.compile(r"\.{2,}|-{2,}")  # "...." is "...", "---" is "--": dropped


# ------------------------------------------------------------------------------------- tokenizers


def resolve_caption_tokenizer(name: str = "auto") -> str:
    """The tokenizer ``name`` stands for here: ``"ptb"`` (Java, the official one) or ``"python"`` (the mimic).

    ``"auto"`` is ``"ptb"`` when ``java`` is on ``PATH``, else ``"python"``.

    Raises:
        ValueError: ``name`` is not one of :data:`CAPTION_TOKENIZERS`.
    """
    if name not in CAPTION_TOKENIZERS:
        raise ValueError(f"caption tokenizer must be one of {CAPTION_TOKENIZERS}, got {name!r}")
    if name == "auto":
        return "ptb" if shutil.which("java") else "python"
    return name


def ptb_tokenize(text: str) -> str:
    """Lower-case and tokenize like the COCO caption pipeline, in pure Python (a mimic of the Java PTB path).

    Clitics are split (``"don't"`` → ``"do n't"``, ``"dog's"`` → ``"dog 's"``, ``"cannot"`` →
    ``"can not"``), words with inner hyphens, periods, slashes or apostrophes stay whole
    (``"t-shirt"``, ``"3.5"``, ``"o'clock"``), as do abbreviations (``"u.s."``, ``"st."``),
    brackets become ``-lrb-``/``-rrb-`` (kept, as in the official pipeline) and the tokens the pipeline
    drops (periods, commas, ``? ! : ; - -- ...``, quotes) are dropped. Returns the tokens joined by
    single spaces.
    It agrees with the Java tokenizer on typical captions, not on every string.
    """
    text = _ASTRAL.sub(" ", text.lower().translate(_CHARACTER_MAP))
    text = _CLITIC.sub(r" \1", _SPLIT_WORD.sub(lambda m: _SPLIT_WORDS[m.group()], text))
    tokens = (_BRACKETS.get(token, token) for token in _TOKEN.findall(text))
    return " ".join(token for token in tokens if token not in _MIMIC_DROPPED and not _DOTS_OR_DASHES.match(token))


def java_ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenize ``captions`` exactly as pycocoevalcap's ``PTBTokenizer.tokenize`` does, in one Java call.

    Same jar, same command line (``-preserveLines -lowerCase``) on a UTF-8 file of one caption per
    line, same removal of ``PUNCTUATIONS``. Differences from ``PTBTokenizer``: the temporary file goes
    to the system temp directory rather than into the installed package, the tokenizer's stderr chatter
    is captured, and line-break characters other than ``"\\n"`` (``\\r``, ``\\v``, ``\\f``, U+2028,
    U+2029) become spaces too, where ``PTBTokenizer`` would misalign every later caption.

    Raises:
        RuntimeError: ``java`` is not on ``PATH``, the tokenizer fails, or it returns the wrong number of lines.
    """
    if not captions:
        return []
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("caption tokenizer 'ptb' needs Java: no `java` on PATH (use tokenizer='python')")
    text = "\n".join(_LINE_BREAKS.sub(" ", caption) for caption in captions)
    lines = _run_ptb_jar(java, text).split("\n")
    if len(lines) != len(captions):
        raise RuntimeError(f"Java PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [_drop_punctuation(line) for line in lines]


def _run_ptb_jar(java: str, text: str) -> str:
    """stdout of the Stanford PTBTokenizer run on ``text`` written to a temporary UTF-8 file."""
    with tempfile.TemporaryDirectory(prefix="mmlm-ptb-") as folder:
        path = Path(folder) / "captions.txt"
        path.write_bytes(text.encode())
        command = [java, "-cp", str(PTB_JAR), *_PTB_MAIN, str(path)]
        done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"Java PTBTokenizer failed (exit {done.returncode}): {stderr}")
    return done.stdout.decode()


def _drop_punctuation(line: str) -> str:
    """pycocoevalcap's post-processing of one tokenized line: drop the ``PUNCTUATIONS`` tokens."""
    return " ".join(word for word in line.rstrip().split(" ") if word not in _PTB_PUNCTUATIONS)


def tokenize_captions(batches: Sequence[Sequence[str]], tokenizer: str = "auto") -> list[list[str]]:
    """Tokenize each batch of captions; with ``"ptb"`` every batch is one Java call, all running at once.

    Batches are kept apart (not joined into one file) so that each batch sees the same neighbouring
    lines as in ``COCOEvalCap``, which tokenizes the references and the candidates separately.
    """
    if resolve_caption_tokenizer(tokenizer) == "python":
        return [[ptb_tokenize(caption) for caption in batch] for batch in batches]
    with ThreadPoolExecutor(max_workers=max(1, len(batches))) as pool:
        return list(pool.map(java_ptb_tokenize, batches))


# ----------------------------------------------------------------------------------------- scores


def caption_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "auto"
) -> dict[str, float]:
    """Corpus CIDEr-D, BLEU-1..4 and ROUGE-L of ``predictions`` against ``references`` (both untokenized).

    Keys are :data:`CAPTION_SCORE_KEYS`. With ``tokenizer="ptb"`` the values equal those of
    ``COCOEvalCap.evaluate`` on the same captions (one prediction per image, images in this order).
    ``tokenizer`` is ``"ptb"``, ``"python"`` or ``"auto"`` (see :func:`resolve_caption_tokenizer`).

    Raises:
        ValueError: lengths differ, or an example has no reference.
        RuntimeError: ``tokenizer="ptb"`` without Java on ``PATH``.
    """
    _check_lengths(predictions, references)
    resolve_caption_tokenizer(tokenizer)  # a bad name fails even on empty input
    if not predictions:
        return dict.fromkeys(CAPTION_SCORE_KEYS, 0.0)
    flat_references = [str(r) for refs in references for r in refs]
    tokenized_refs, tokenized_preds = tokenize_captions([flat_references, [str(p) for p in predictions]], tokenizer)
    gts = _by_image(tokenized_refs, [len(refs) for refs in references])
    res = {i: [prediction] for i, prediction in enumerate(tokenized_preds)}
    return score_tokenized(gts, res)


def score_tokenized(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> dict[str, float]:
    """pycocoevalcap's ``Bleu(4)``, ``Rouge()`` and ``Cider()`` on already tokenized ``gts``/``res`` dicts."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = {"cider": float(cider), "rouge_l": float(rouge)}
    scores.update({f"bleu{n + 1}": float(value) for n, value in enumerate(bleu)})
    return {key: scores[key] for key in CAPTION_SCORE_KEYS}


def _by_image(flat: list[str], counts: list[int]) -> dict[int, list[str]]:
    """Split the flat list of tokenized references back into ``{image index: references}``."""
    gts, start = {}, 0
    for i, count in enumerate(counts):
        gts[i] = flat[start : start + count]
        start += count
    return gts


def _check_lengths(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise if the batch is inconsistent, naming the offending example."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"example {i}: references must be a non-empty list of strings, got {refs!r}")


# ----------------------------------------------------------------------------------------- metric


class CaptionMetrics(Metric):
    """Corpus caption scores over all updates, DDP-safe.

    States are lists of strings (predictions and their references); under an initialised
    process group they are gathered with ``torch.distributed.all_gather_object`` before
    ``compute``. ``compute()`` returns ``{key: Tensor}`` for ``keys`` (default CIDEr-D and BLEU-4;
    any of :data:`CAPTION_SCORE_KEYS`) as float32 scalars, zeros before any update. ``tokenizer``
    goes to :func:`caption_scores`; :attr:`resolved_tokenizer` names the one actually used.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _string_states = ("predictions", "references")

    def __init__(self, tokenizer: str = "auto", keys: Sequence[str] = ("cider", "bleu4"), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        resolve_caption_tokenizer(tokenizer)  # validate the name now
        unknown = [key for key in keys if key not in CAPTION_SCORE_KEYS]
        if unknown:
            raise ValueError(f"unknown caption score keys {unknown}; choose from {CAPTION_SCORE_KEYS}")
        self.tokenizer = tokenizer
        self.score_keys = tuple(keys)
        self.add_state("predictions", [], dist_reduce_fx=None)
        self.add_state("references", [], dist_reduce_fx=None)

    @property
    def resolved_tokenizer(self) -> str:
        """``"ptb"`` or ``"python"``: the tokenizer :meth:`compute` uses on this machine."""
        return resolve_caption_tokenizer(self.tokenizer)

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Add a batch: ``predictions[i]`` is scored against the strings in ``references[i]``."""
        _check_lengths(predictions, references)
        self.predictions.extend(str(p) for p in predictions)
        self.references.extend([str(r) for r in refs] for refs in references)

    def compute(self) -> dict[str, Tensor]:
        """The scores in ``keys`` over everything seen (on every rank)."""
        scores = caption_scores(self.predictions, self.references, tokenizer=self.tokenizer)
        return {key: torch.tensor(scores[key], dtype=torch.float32, device=self.device) for key in self.score_keys}

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        """Gather the string states from every rank (torchmetrics only gathers tensors)."""
        group = process_group or self.process_group
        world_size = dist.get_world_size(group)
        for name in self._string_states:
            gathered: list[list] = [[] for _ in range(world_size)]
            dist.all_gather_object(gathered, list(getattr(self, name)), group=group)
            setattr(self, name, [item for part in gathered for item in part])

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        """Move tensors as usual but leave the string states alone (``.to(device)`` would fail on them)."""
        return super()._apply(fn, exclude_state=tuple(exclude_state) + self._string_states)
