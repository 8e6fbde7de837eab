"""Embodied multimodal sentences (PaLM-E) from shards → :class:`mmlm.batch.SentenceBatch`.

A sample is ``{"img1.png", "img2.png"?, "json"}`` (``mmlm data synth-tabletop`` writes them): the
JSON holds ``prompt`` (text with the markers ``<img1>``, ``<img2>``, …, ``<state>``, ``<obj>``),
``target``, ``task`` (``"vqa"`` or ``"plan"``), ``answers``, ``id``, ``question_type``, the scene
``state`` vector and the ``objects`` (one vector per object). ``<obj>`` becomes one marker per object
(``<obj1><obj2>…``, one object token each); ``<imgK>`` is image item ``K-1`` of the sample.

Modalities left out of ``modalities`` lose their markers (the text around them stays) and their
items, e.g. ``modalities: []`` gives the text-only baseline on the same sentences. Layout of one
sentence: ``[bos] prompt(with spans) target eos`` with the LM loss on ``target eos`` only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from datamodules.base import WebDataModule
from datamodules.image_text import json_field
from datamodules.pipeline.collate import pad_id
from datamodules.pipeline.packing import SentenceCollator, SentenceSample
from datamodules.pipeline.skips import SkipSample
from datamodules.pipeline.transforms import ImageTransform
from mmlm.encoders.base import ImagePreprocess
from mmlm.sentences import Marker, Sentence, SentenceBuilder, special_tokens
from mmlm.tokenizers import load_tokenizer

MODALITIES = ("image", "state", "object")
DATA_MARKER = re.compile(r"<img(\d+)>|<state>|<obj>")
TASKS = ("vqa", "plan")


@dataclass
class UrlSource:
    """One shard set (``urls``: brace pattern, glob or list) with its mixing ``weight``."""

    urls: str | list[str]
    weight: float = 1.0


def rewrite_markers(prompt: str, modalities: Sequence[str], num_objects: int) -> str:
    """The prompt for the model: ``<obj>`` → ``<obj1>…<objN>``; markers of modalities not kept removed.

    >>> rewrite_markers("Image: <img1> Objects: <obj> A:", ["object"], 2)
    'Image: Objects: <obj1><obj2> A:'
    """
    def replace(match: re.Match) -> str:
        modality = "image" if match.group(1) else "state" if match.group(0) == "<state>" else "object"
        if modality not in modalities:
            return ""
        return "".join(f"<obj{i}>" for i in range(1, num_objects + 1)) if modality == "object" else match.group(0)

    return re.sub(r"\s{2,}", " ", DATA_MARKER.sub(replace, prompt)).strip()


def image_items(sample: dict[str, Any], prompt: str, transform: ImageTransform) -> torch.Tensor:
    """``[K, 3, H, W]``: images ``img1.png`` … ``imgK.png`` for the highest ``<imgK>`` of ``prompt``."""
    count = max(int(n) for n in re.findall(r"<img(\d+)>", prompt))
    images = []
    for k in range(1, count + 1):
        data = sample.get(f"img{k}.png") or sample.get(f"img{k}.jpg")
        if not data:
            raise SkipSample("missing_image", f"<img{k}> without img{k}.png")
        images.append(transform(data))
    return torch.stack(images)


def vectors(meta: dict[str, Any], key: str, width: int) -> torch.Tensor:
    """``meta[key]`` as a float tensor ``[S, width]`` (one vector → ``[1, width]``); ``SkipSample`` if malformed."""
    try:
        tensor = torch.tensor(meta[key], dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as exn:
        raise SkipSample(f"bad_{key}", repr(exn)) from exn
    tensor = tensor.reshape(1, -1) if tensor.ndim == 1 else tensor
    if tensor.ndim != 2 or tensor.shape[1] != width or tensor.shape[0] == 0:
        raise SkipSample(f"bad_{key}", f"shape {tuple(tensor.shape)}, expected [S, {width}]")
    return tensor


@dataclass(frozen=True)
class EmbodiedExampleBuilder:
    """Picklable ``(sample, source) -> SentenceSample`` for DataLoader workers.

    Attributes:
        tokenizer: the model's tokenizer (knows the markers' special tokens).
        markers: the model's markers (``<img{}>``, ``<state>``, ``<obj{}>``).
        image: bytes → ``[3, H, W]``.
        modalities: modalities kept (see the module docstring).
        max_tokens: samples longer than this are skipped (``too_long``), never cut inside a span.
        with_prompt: also build the generation prompt (evaluation).
        widths: expected vector width per modality (``{"state": Ds, "object": Do}``).
    """

    tokenizer: Any
    markers: tuple[Marker, ...]
    image: ImageTransform
    modalities: tuple[str, ...]
    max_tokens: int
    with_prompt: bool
    widths: dict[str, int]

    def __call__(self, sample: dict[str, Any], source: int) -> SentenceSample:
        meta = json_field(sample)
        task, prompt, target = meta.get("task"), meta.get("prompt"), meta.get("target")
        if task not in TASKS or not isinstance(prompt, str) or not isinstance(target, str):
            raise SkipSample("bad_sentence", f"task {task!r}, prompt {prompt!r}, target {target!r}")
        objects = vectors(meta, "objects", self.widths["object"]) if "object" in self.modalities and "<obj>" in prompt else None
        text = rewrite_markers(prompt, self.modalities, 0 if objects is None else objects.shape[0])
        head, full = self.sentences(text, target)
        if len(full) > self.max_tokens:
            raise SkipSample("too_long", f"{len(full)} tokens > max_tokens {self.max_tokens}")
        answers = [a for a in meta.get("answers", [target]) if isinstance(a, str)] or [target]
        return SentenceSample(sentence=full, items=self.items(sample, meta, text, objects), key=sample["__key__"],
                              prompt=head if self.with_prompt else None, task=task, references=answers,
                              id=str(meta.get("id", sample["__key__"])), question_type=str(meta.get("question_type", "")))

    def sentences(self, prompt: str, target: str) -> tuple[Sentence, Sentence]:
        """``([bos] prompt, [bos] prompt target eos)`` with the LM loss on ``target eos``."""
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        builder = SentenceBuilder(self.tokenizer, self.markers)
        head = builder.ids([bos] if bos is not None else [], target=False).expand(prompt, target=False).build()
        tail = builder.text(" " + target).ids([eos]).build()
        return head, head + tail

    def items(self, sample: dict[str, Any], meta: dict[str, Any], prompt: str,
              objects: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The sample's items of every modality its prompt uses."""
        items = {}
        if "<img" in prompt:
            items["image"] = image_items(sample, prompt, self.image)
        if "<state>" in prompt:
            items["state"] = vectors(meta, "state", self.widths["state"])
        if objects is not None:
            items["object"] = objects
        return items


class EmbodiedDataModule(WebDataModule):
    """PaLM-E sentences (tabletop VQA, before/after questions, plans) from shards.

    Tokenizer, markers, vector widths and image preprocessing come from the arguments or, when ``None``,
    from the trainer's model's :class:`~mmlm.data_spec.DataSpec` in :meth:`setup` (``tokenizer``, ``markers``,
    ``state_dim``, ``object_dim``, ``image_preprocess``).

    Args:
        train_urls: training shards (pattern, glob or list), or ``None``.
        val_urls: validation shards, or ``None``.
        test_urls: test shards, or ``None``.
        predict_urls: prediction shards, or ``None``.
        modalities: modalities whose markers are kept (``[]``: the text-only baseline).
        tokenizer: tokenizer directory / hub id (``None``: the model's).
        markers: the markers (``None``: the model's).
        image_size: square image side (``None``: the model's encoder preprocessing).
        state_dim: width of ``state`` vectors (``None``: the model's); other widths are skipped as ``bad_state``.
        object_dim: width of ``objects`` vectors (``None``: the model's); else ``bad_objects``.
        max_text_tokens: longer sentences are skipped and counted as ``too_long``.
        batch_size, num_workers, epoch_samples, shuffle_buffer, resampled, seed: see :class:`WebDataModule`.
        pack: pack several training sentences into rows of at most ``max_text_tokens`` (a block-diagonal causal
            mask, positions restarting; :class:`~datamodules.pipeline.packing.SentenceCollator`); evaluation batches
            keep one sentence per row.
    """

    def __init__(self, train_urls: str | list[str] | None = None, val_urls: str | list[str] | None = None,
                 test_urls: str | list[str] | None = None, predict_urls: str | list[str] | None = None,
                 modalities: Sequence[str] = MODALITIES, tokenizer: str | None = None,
                 markers: Sequence[Marker] | None = None, image_size: int | None = None,
                 state_dim: int | None = None, object_dim: int | None = None,
                 max_text_tokens: int = 160, batch_size: int = 32, num_workers: int = 1,
                 epoch_samples: int | None = None, shuffle_buffer: int = 1000, resampled: bool = False,
                 seed: int = 0, pack: bool = False) -> None:
        def sources(urls: str | list[str] | None) -> list[UrlSource] | None:
            return None if urls is None else [UrlSource(urls)]

        super().__init__(train=sources(train_urls), val=sources(val_urls), test=sources(test_urls),
                         predict=sources(predict_urls), batch_size=batch_size, num_workers=num_workers,
                         epoch_samples=epoch_samples, shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed)
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"EmbodiedDataModule: modalities {sorted(unknown)} are not among {MODALITIES}")
        self.modalities, self.max_text_tokens = tuple(modalities), max_text_tokens
        self.tokenizer_name, self.image_size = tokenizer, image_size
        self.markers = None if markers is None else tuple(markers)
        self.state_dim, self.object_dim = state_dim, object_dim
        self.pack = pack
        self.tokenizer: Any = None
        self.preprocess: ImagePreprocess | None = None

    def setup(self, stage: str | None = None) -> None:
        """Resolve tokenizer, markers and image preprocessing (arguments first, else the model's)."""
        if self.markers is None:
            self.markers = tuple(self.from_model("markers", "markers"))
        if self.state_dim is None:
            self.state_dim = self.from_model("state_dim", "state_dim")
        if self.object_dim is None:
            self.object_dim = self.from_model("object_dim", "object_dim")
        if self.tokenizer is None:
            self.tokenizer = (load_tokenizer(self.tokenizer_name, special_tokens(self.markers))
                              if self.tokenizer_name else self.from_model("tokenizer", "tokenizer"))
        if self.preprocess is None:
            self.preprocess = (ImagePreprocess((self.image_size, self.image_size)) if self.image_size
                               else self.from_model("image_preprocess", "image_size"))

    def example_fn(self, stage: str, sources: Sequence[UrlSource]) -> EmbodiedExampleBuilder:
        if self.preprocess is None or self.tokenizer is None:
            self.setup(stage)
        pre = self.preprocess
        image = ImageTransform.from_preprocess(pre, train=False)  # no crops: block positions are the content
        return EmbodiedExampleBuilder(self.tokenizer, self.markers, image, self.modalities, self.max_text_tokens,
                                      with_prompt=stage != "fit",
                                      widths={"state": self.state_dim, "object": self.object_dim})

    def collate_fn(self, stage: str) -> SentenceCollator:
        if self.tokenizer is None:
            self.setup(stage)
        return SentenceCollator(pad_id(self.tokenizer), self.max_text_tokens, self.pack and stage == "fit")
