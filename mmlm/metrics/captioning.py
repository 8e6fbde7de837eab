"""Captioning metrics: CIDEr-D and BLEU-4 from pycocoevalcap, with a Java-free tokenizer.

pycocoevalcap's ``Cider`` is the CIDEr-D variant used by the COCO server: tf-idf n-gram vectors
(n = 1..4), clipped hypothesis counts, a Gaussian length penalty (sigma 6), averaged over
references and scaled by 10; the idf comes from the references of the whole evaluated corpus,
so a corpus of one image scores 0. ``Bleu(4)`` is corpus-level BLEU with the "closest"
reference length. Its ``PTBTokenizer`` needs Java, so :func:`ptb_tokenize` mimics it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from torch import Tensor
from torchmetrics import Metric

_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'\w+|\w+(?:[-./]\w+)*|[^\w\s]+")
_PUNCTUATION_ONLY = re.compile(r"^[^\w\s]+$")
_KEPT_SYMBOLS = frozenset({"$", "%", "&", "#", "+", "=", "@", "*", "/", "<", ">"})


def ptb_tokenize(text: str) -> str:
    """Lower-case and tokenize like the COCO caption pipeline (Stanford PTB tokenizer + punctuation removal).

    Clitics are split (``"don't"`` → ``"do n't"``, ``"dog's"`` → ``"dog 's"``), words with inner
    hyphens, periods or slashes stay whole (``"t-shirt"``, ``"3.5"``), and punctuation tokens
    (``. , ? ! : ; - ' " ` ( ) …``) are dropped. Returns the tokens joined by single spaces.
    """
    text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
    tokens = _TOKEN.findall(text)
    return " ".join(t for t in tokens if not _PUNCTUATION_ONLY.match(t) or t in _KEPT_SYMBOLS)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus CIDEr-D and BLEU-4 of ``predictions`` against ``references`` (both untokenized).

    Raises:
        ValueError: lengths differ, or an example has no reference.
    """
    _check_lengths(predictions, references)
    if not predictions:
        return {"cider": 0.0, "bleu4": 0.0}
    res = {i: [ptb_tokenize(p)] for i, p in enumerate(predictions)}
    gts = {i: [ptb_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), "bleu4": float(bleu[3])}


def _check_lengths(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise if the batch is inconsistent, naming the offending example."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"example {i}: references must be a non-empty list of strings, got {refs!r}")


class CaptionMetrics(Metric):
    """Corpus CIDEr-D and BLEU-4 over all updates, DDP-safe.

    States are lists of strings (predictions and their references); under an initialised
    process group they are gathered with ``torch.distributed.all_gather_object`` before
    ``compute``. ``compute()`` returns ``{"cider": Tensor, "bleu4": Tensor}`` (float32 scalars,
    zeros before any update).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _string_states = ("predictions", "references")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("predictions", [], dist_reduce_fx=None)
        self.add_state("references", [], dist_reduce_fx=None)

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Add a batch: ``predictions[i]`` is scored against the strings in ``references[i]``."""
        _check_lengths(predictions, references)
        self.predictions.extend(str(p) for p in predictions)
        self.references.extend([str(r) for r in refs] for refs in references)

    def compute(self) -> dict[str, Tensor]:
        """CIDEr-D and BLEU-4 over everything seen (on every rank)."""
        scores = caption_scores(self.predictions, self.references)
        return {name: torch.tensor(value, dtype=torch.float32, device=self.device) for name, value in scores.items()}

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
