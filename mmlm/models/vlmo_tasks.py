"""VLMO fine-tuning tasks on the fusion encoder: VQA as answer classification, NLVR2-style pair reasoning. As unilm's
``compute_vqa``/``compute_nlvr2`` (``vlmo/modules/objectives.py``): the text ``[CLS]`` of the fusion pass goes
through the pooler (kept from stage 3's ITM) and then the task classifier (``vqa_classifier``/``nlvr2_classifier``
of ``vlmo_module.py``).

Retrieval fine-tuning is :class:`mmlm.models.VLMOStage3` with ``itm_weight: 0, mlm_weight: 0``
(dual encoder, ITC only); its validation reports R@1/5/10 in both directions.
Shape legend: B batch, T text tokens, D width, A answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlm.batch import Batch, PairBatch
from mmlm.evaluation import ClassificationEvaluator, Evaluation, GenerationEvaluator, LossEvaluator, VQAScorer
from mmlm.metrics.vqa import build_answer_vocab, normalize_answer, vqa_accuracy_normalized  # noqa: F401 (re-export)
from mmlm.models.vlmo import VLMOModule, VLMOPooler
from mmlm.models.vlmo_stage3 import ITC_VL_HEADS

#: Pre-training heads a fine-tuning task drops when it starts from a stage-3 (or earlier) checkpoint; the pooler
#: stays (the tasks read the pooled ``[CLS]``).
PRETRAINING_HEADS = ("mim_head.*", "mlm_head.*", "itc_image_proj.*", "itc_text_proj.*", "itm_head.*", "temperature.*",
                     *ITC_VL_HEADS)


def classifier_head(dim: int, out: int, hidden: int) -> nn.Sequential:
    """ViLT/VLMO task head: ``Linear(dim, hidden) → LayerNorm → GELU → Linear(hidden, out)``."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))


def vqa_soft_targets(references: Sequence[Sequence[str]], index: dict[str, int], device: Any = None) -> Tensor:
    """``[B, A]`` VQA-score targets: entry ``(i, a)`` is the VQA accuracy of answering ``a`` to question ``i``
    (leave-one-out over its human answers, both sides normalised as the vocabulary is:
    :func:`~mmlm.metrics.vqa.vqa_accuracy_normalized`); answers outside the vocabulary get no target."""
    targets = torch.zeros(len(references), len(index), device=device)
    for row, answers in enumerate(references):
        for answer in {normalize_answer(a) for a in answers} & index.keys():
            targets[row, index[answer]] = vqa_accuracy_normalized(answer, answers)
    return targets


def load_answers(answers: str | list[str]) -> list[str]:
    """A list of answers, or a JSON file holding one (``mmlm data vqa-answers`` writes it)."""
    if isinstance(answers, list):
        return answers
    path = Path(answers)
    if not path.is_file():
        raise FileNotFoundError(f"answer vocabulary {answers} does not exist (write it with `mmlm data vqa-answers`)")
    loaded = json.loads(path.read_text())
    if not isinstance(loaded, list) or not all(isinstance(a, str) for a in loaded):
        raise ValueError(f"{answers}: expected a JSON list of answer strings")
    return loaded


class VLMOVQA(VLMOModule):
    """VQA as classification over an answer vocabulary with VQA-score soft targets (binary cross-entropy).

    The question (the prompt of a :class:`~mmlm.batch.Batch` from a VQA datamodule; use ``vqa_prompt: "{}"``)
    and the image go through the fusion encoder; the pooled text ``[CLS]`` (``pooler``) feeds ``vqa_head``. Validation and test report the
    official VQAv2 accuracy (``{stage}/vqa_acc``) and write predictions like every family.

    Args:
        answers: the answer vocabulary (a list, or a JSON file of one), built from the training answers.
        **kwargs: :class:`~mmlm.models.VLMOModule` arguments (``init_from`` a stage-3 checkpoint).
    """

    NEW_KEYS = ("vqa_head.*",)
    DROPPED_KEYS = PRETRAINING_HEADS
    MODES = ("fusion",)  # V/L-FFNs of the blocks with a VL-FFN and the mask token stay frozen (never reached)

    def __init__(self, answers: str | list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.answers = list(dict.fromkeys(normalize_answer(a) for a in load_answers(answers)))
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        dim = self.transformer.dim
        self.pooler = VLMOPooler(dim)
        self.vqa_head = classifier_head(dim, len(self.answers), 2 * dim)
        self.evaluation = Evaluation(LossEvaluator(), GenerationEvaluator([VQAScorer()]))

    def pooled(self, batch: Batch) -> Tensor:
        """Fusion pass over question and image → pooled text ``[CLS]`` ``[B, D]``."""
        ids, mask = self.prompt_inputs(batch)
        return self.pooler(self.transformer("fusion", batch.pixels, ids, mask).text[:, 0])

    def logits(self, batch: Batch) -> Tensor:
        """Answer logits ``[B, A]`` of the pooled text ``[CLS]``."""
        return self.vqa_head(self.pooled(batch))

    def training_loss(self, batch: Batch) -> Tensor:
        """Binary cross-entropy against the soft targets, summed over answers (× A, as ViLT/VLMO)."""
        logits = self.logits(batch)
        targets = vqa_soft_targets(batch.references, self.answer_index, logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]

    def generate_text(self, batch: Batch) -> list[str]:
        """The highest-scoring answer of each question."""
        return [self.answers[i] for i in self.logits(batch).argmax(dim=-1).tolist()]


class VLMONLVR2(VLMOModule):
    """NLVR2-style reasoning: ``(left image, statement)`` and ``(right image, statement)`` through the fusion
    encoder, the two pooled text ``[CLS]`` vectors concatenated → true/false. Reports ``{stage}/accuracy``.

    Args:
        **kwargs: :class:`~mmlm.models.VLMOModule` arguments (``init_from`` a stage-3 checkpoint).
    """

    NEW_KEYS = ("nlvr2_head.*",)
    DROPPED_KEYS = PRETRAINING_HEADS
    MODES = ("fusion",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        dim = self.transformer.dim
        self.pooler = VLMOPooler(dim)
        self.nlvr2_head = classifier_head(2 * dim, 2, 2 * dim)
        self.evaluation = Evaluation(ClassificationEvaluator())

    def logits(self, batch: PairBatch) -> Tensor:
        """``[B, 2]`` (class 1 = the statement is true) from a :class:`~datamodules.pairs.PairBatch`."""
        ids, mask = self.with_cls(batch.input_ids, batch.attention_mask)
        left = self.pooler(self.transformer("fusion", batch.pixels_left, ids, mask).text[:, 0])
        right = self.pooler(self.transformer("fusion", batch.pixels_right, ids, mask).text[:, 0])
        return self.nlvr2_head(torch.cat([left, right], dim=-1))

    def training_loss(self, batch: PairBatch) -> Tensor:
        return F.cross_entropy(self.logits(batch).float(), batch.targets)

    def classify(self, batch: PairBatch) -> tuple[Tensor, Tensor]:
        """``(logits [B, 2], targets [B])`` for :class:`~mmlm.evaluation.ClassificationEvaluator`."""
        return self.logits(batch), batch.targets
