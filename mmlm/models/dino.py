"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"): self-distillation without
labels on any vision encoder (a timm ViT through :class:`~mmlm.encoders.TimmEncoder`).

multi-crop views ─► student encoder + :class:`~mmlm.ssl.DinoHead` ─► log-softmax(·/τ_s) of every view
global views only ─► teacher (EMA copy, no gradient) ─► softmax((· − centre)/τ_t) ─► cross-entropy to the other views

Schedules follow ``main_dino.py``, counted in optimizer steps: teacher momentum 0.996 → 1 and weight decay 0.04 → 0.4
(cosine over the run), teacher temperature 0.04 → 0.07 (linear warm-up), the last layer's gradients dropped for the
first ``freeze_last_layer_steps`` (one epoch in the paper), each gradient clipped to norm 3 on its own. The learning
rate is the base's warm-up + cosine. Validation is weighted k-NN on the teacher's features (:mod:`mmlm.evaluation.knn`).
Shape legend: B batch, G global views, L local views, D width, K prototypes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mmlm.encoders.base import VisionEncoder
from mmlm.evaluation import Evaluation, KnnEvaluator
from mmlm.hub import sub_state
from mmlm.models.base import MultimodalModule, param_groups
from mmlm.ssl import (
    DinoHead,
    DinoLoss,
    MultiCropBatch,
    clip_per_parameter_,
    cosine_schedule,
    ema_update_,
    linear_warmup,
    target_entropies,
)

POOLING = ("cls", "mean")


class Dino(MultimodalModule):
    """DINO self-distillation of ``encoder`` (see the module docstring).

    The teacher's parameters (under :attr:`ema_prefixes`) have no gradient but move: an EMA of the student's.

    Args:
        encoder: the student backbone (``TimmEncoder`` of a ViT with ``dynamic_img_size: true`` when local crops have
            another size than global ones); the teacher is a copy of it and of the head.
        out_dim: prototypes ``K`` of the head (65536 in the paper).
        hidden_dim: head MLP width.
        bottleneck_dim: head bottleneck width.
        head_layers: linear layers of the head MLP.
        norm_last_layer: fix the weight norm of the head's last layer to 1.
        pooling: ``"cls"`` (the first token: a ViT's class token) or ``"mean"`` of the encoder's tokens.
        student_temp: student temperature τ_s.
        teacher_temp: teacher temperature τ_t after warm-up.
        warmup_teacher_temp: τ_t at step 0.
        teacher_temp_warmup_steps: optimizer steps of the linear τ_t warm-up (30 epochs in the paper's ViT-S runs).
        center_momentum: EMA momentum of the centre.
        momentum_teacher: teacher EMA momentum at step 0 (cosine to 1 at the end).
        weight_decay: AdamW weight decay at step 0 (not on biases and 1-d parameters: :meth:`optimizer_groups`).
        weight_decay_end: weight decay at the end (cosine from ``weight_decay``).
        freeze_last_layer_steps: optimizer steps during which the head's last layer gets no update.
        clip_grad: per-parameter gradient-norm clip (0: none).
        knn_k: neighbours of the k-NN validation.
        knn_temperature: vote temperature of the k-NN validation.
        backbone_file: where ``on_fit_end`` writes the teacher backbone as a timm ``safetensors`` state dict
            (:meth:`export_backbone`); ``None``: not written.
        **kwargs: optimisation settings of :class:`MultimodalModule` (``lr``, ``warmup_steps``, ``betas`` …).
    """

    #: parameters without gradient that training still moves (the EMA teacher)
    ema_prefixes: tuple[str, ...] = ("teacher.",)

    def __init__(self, encoder: VisionEncoder, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, head_layers: int = 3, norm_last_layer: bool = True, pooling: str = "cls",
                 student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 teacher_temp_warmup_steps: int = 0, center_momentum: float = 0.9, momentum_teacher: float = 0.996,
                 weight_decay: float = 0.04, weight_decay_end: float = 0.4, freeze_last_layer_steps: int = 0,
                 clip_grad: float = 3.0, knn_k: int = 20, knn_temperature: float = 0.07,
                 backbone_file: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(weight_decay=weight_decay, **kwargs)
        self.save_hyperparameters()
        if pooling not in POOLING:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLING}")
        self.encoder = encoder
        self.head = DinoHead(encoder.width, out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer)
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.teacher.encoder.source = None  # its weights are the EMA's, never re-read from the student's source
        self.loss = DinoLoss(out_dim, student_temp, center_momentum)
        self.pooling = pooling
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.teacher_temp_warmup_steps = teacher_temp_warmup_steps
        self.momentum_teacher, self.weight_decay_end = momentum_teacher, weight_decay_end
        self.freeze_last_layer_steps, self.clip_grad = freeze_last_layer_steps, clip_grad
        self.backbone_file = backbone_file
        self.total_steps: int | None = None  # the run's optimizer steps, read when training starts
        self.ema_step: int | None = None  # global step at the last teacher update
        self.evaluation = Evaluation(KnnEvaluator(knn_k, knn_temperature))

    # --- the method -----------------------------------------------------------------------------
    def pooled(self, encoder: nn.Module, pixels: Tensor) -> Tensor:
        """``pixels [B, 3, H, W]`` → one feature per image ``[B, D]`` (class token or mean of the tokens)."""
        tokens = encoder(pixels)
        return tokens[:, 0] if self.pooling == "cls" else tokens.mean(1)

    def student_views(self, batch: MultiCropBatch) -> Tensor:
        """Head logits of every view ``[G + L, B, K]``; views of one size go through the encoder together."""
        groups = [batch.global_crops] + ([batch.local_crops] if batch.local_crops.shape[1] else [])
        features = [self.pooled(self.encoder, g.transpose(0, 1).flatten(0, 1)) for g in groups]
        logits = self.head(torch.cat(features))
        return logits.unflatten(0, (-1, len(batch)))

    @torch.no_grad()
    def teacher_views(self, batch: MultiCropBatch) -> Tensor:
        """Teacher head logits of the global views ``[G, B, K]``. The teacher runs in eval mode (no drop path: the
        paper builds it without), whatever mode Lightning gave the module's children."""
        self.teacher.eval()
        pixels = batch.global_crops.transpose(0, 1).flatten(0, 1)
        logits = self.teacher.head(self.pooled(self.teacher.encoder, pixels))
        return logits.unflatten(0, (-1, len(batch)))

    def current_teacher_temp(self) -> float:
        return linear_warmup(self.warmup_teacher_temp, self.teacher_temp, self.global_step,
                             self.teacher_temp_warmup_steps)

    def training_loss(self, batch: MultiCropBatch) -> Tensor:
        """DINO's loss over all (teacher global view, other student view) pairs. In training mode it logs the
        teacher targets' entropies (``train/teacher_entropy`` per image, ``train/teacher_mean_entropy`` of the batch
        mean: :func:`~mmlm.ssl.target_entropies`; both at ``ln K`` is the uniform collapse), then the centre moves
        towards this step's teacher mean (all ranks)."""
        teacher = self.teacher_views(batch)
        temperature = self.current_teacher_temp()
        loss = self.loss(self.student_views(batch), teacher, temperature)
        if self.training:
            if self._trainer is not None:
                per_image, batch_mean = target_entropies(self.loss.teacher_probs(teacher, temperature))
                self.log_dict({"train/teacher_entropy": per_image, "train/teacher_mean_entropy": batch_mean},
                              batch_size=len(batch))
            self.loss.update_center(teacher)
        return loss

    @torch.no_grad()
    def knn_features(self, pixels: Tensor) -> Tensor:
        """The teacher backbone's pooled features ``[B, D]`` (what DINO evaluates and releases)."""
        return self.pooled(self.teacher.encoder, pixels)

    # --- schedules and the teacher --------------------------------------------------------------
    def on_train_start(self) -> None:
        self.total_steps = int(self.trainer.estimated_stepping_batches)
        self.ema_step = self.global_step

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """``main_dino.py``'s split (``utils.get_params_groups``): only biases and 1-d parameters go undecayed; the
        class token and position embeddings, which timm lists in ``no_weight_decay()``, are decayed."""
        return param_groups(self, self.weight_decay, declared=False)

    def on_train_batch_start(self, batch: MultiCropBatch, batch_idx: int) -> None:
        """The base's, then this step's weight decay (cosine) on the decayed parameter group."""
        super().on_train_batch_start(batch, batch_idx)
        if self._trainer is not None and self.trainer.optimizers:
            decayed = self.trainer.optimizers[0].param_groups[0]  # mmlm.models.base.param_groups: decay first
            decayed["weight_decay"] = cosine_schedule(self.weight_decay, self.weight_decay_end, self.global_step,
                                                      self.total_steps or 1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The base's (non-finite steps), then per-parameter clipping and, early on, no last-layer update."""
        super().on_before_optimizer_step(optimizer)
        if self.clip_grad > 0:
            clip_per_parameter_([p for p in self.parameters() if p.requires_grad], self.clip_grad)
        if self.global_step < self.freeze_last_layer_steps:
            for param in self.head.last_layer.parameters():
                param.grad = None

    def on_train_batch_end(self, outputs: Any, batch: MultiCropBatch, batch_idx: int) -> None:
        """After each optimizer step: the teacher's EMA update with this step's momentum (cosine 0.996 → 1)."""
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.ema_step is not None and self.global_step == self.ema_step:
            return  # gradient accumulation: no optimizer step yet
        momentum = cosine_schedule(self.momentum_teacher, 1.0, self.global_step - 1, self.total_steps or 1)
        self.update_teacher(momentum)
        self.ema_step = self.global_step

    def update_teacher(self, momentum: float) -> None:
        """``teacher ← momentum·teacher + (1 − momentum)·student`` (encoder and head)."""
        ema_update_(self.teacher.encoder, self.encoder, momentum)
        ema_update_(self.teacher.head, self.head, momentum)

    # --- export ---------------------------------------------------------------------------------
    def export_backbone(self, path: str | Path, which: str = "teacher",
                        state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write the ``teacher`` (or ``student``) encoder's timm model state dict as ``safetensors``: the file that
        ``TimmEncoder(name, pretrained=path)`` (and ``timm.create_model(name, num_classes=0)``) load strictly.
        ``state_dict``: this module's weights as gathered from FSDP2 shards, read instead of its own."""
        encoder = self.teacher.encoder if which == "teacher" else self.encoder
        model = getattr(encoder, "model", encoder)
        if state_dict is None:
            state = model.state_dict()
        else:
            prefix = next(name for name, module in self.named_modules() if module is model) + "."
            state = sub_state(state_dict, prefix)
        state = {key: value.detach().cpu().contiguous() for key, value in state.items()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"format": "pt", "source": f"mmlm Dino {which}",
                                              "global_step": str(self.global_step)})
        return path

    def on_fit_end(self) -> None:
        """Write the teacher backbone to ``backbone_file`` (global rank zero writes; every rank gathers sharded
        weights)."""
        if self.backbone_file is None:
            return
        state = self.gathered_state_dict()
        if self.trainer.is_global_zero:
            self.export_backbone(self.backbone_file, state_dict=state)

