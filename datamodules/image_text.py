"""Image + text shards (captions and VQA, img2dataset layout) or raw files → :class:`mmlm.batch.Batch`.

A :class:`Source` is shards or one raw file read directly — the official VQAv2/OK-VQA or GQA questions JSON
(+ annotations), a COCO captions JSON, a Karpathy split file, a captions jsonl/tsv — with its image folder;
raw files give the same samples as the shards their converter writes (:mod:`datamodules.formats.raw`).

A caption sample ``{"jpg", "txt"?, "json"?}`` becomes ``prompt=caption_prompt``, ``target`` =
the ``txt`` (else ``json["caption"]``, or its first entry when it is a list as in LAVIS's evaluation files),
``references`` = ``json["captions"]`` (else a ``json["caption"]`` list, else ``[target]``), ``id`` =
``json["image_id"]`` (else the key). A VQA sample ``{"jpg", "json"}``
becomes ``prompt=vqa_prompt.format(question)``, ``target`` = the most common of
``json["answers"]``, ``references`` = the answers, ``id`` = ``json["question_id"]``, with its
``question_type`` and ``answer_type``; a GQA sample (kind ``"gqa"``) the same, scored by GQA's protocol.
Ids keep their JSON type (VQAv2 and COCO ids are integers), so result files match the official tools.
With ``cached_features=True`` the sample's ``features.npy`` (frozen-encoder features ``[N, D]`` written by
``mmlm data cache-features``, see ``docs/caching.md``) is read instead of decoding the image.
See ``docs/data-formats.md``.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.base import WebDataModule
from datamodules.formats.raw import (
    CAPTION_FORMATS,
    RAW_SUFFIXES,
    VQA_FORMATS,
    RawSpec,
    chunked,
    is_raw,
    load_index,
    open_url,
    raise_if_skipped,
)
from datamodules.pipeline.collate import Collator, Example
from datamodules.pipeline.prefix_sentences import image_marker, sentence_collate
from datamodules.pipeline.shard_pipeline import ShardPipeline
from datamodules.pipeline.skips import SkipSample
from datamodules.pipeline.streams import Opener
from datamodules.pipeline.transforms import MAX_IMAGE_PIXELS, ImageTransform
from mmlm.encoders.base import ImagePreprocess
from mmlm.sentences import Marker, prefix_image_marker, special_tokens
from mmlm.tokenizers import load_tokenizer

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KINDS = ("caption", "vqa", "gqa")
#: What a :class:`Source` reads: shards or one of the raw formats of image–text data.
FORMATS = ("shards", *VQA_FORMATS, *CAPTION_FORMATS)
#: Source fields that only raw files take.
RAW_FIELDS = ("images", "annotations", "split", "image_pattern")
#: The shard member holding a sample's cached encoder features (``{key}.features.npy``: ``[N, D]`` fp16/fp32).
FEATURES = "features.npy"


@dataclass
class Source:
    """One data set: shards, or raw files read directly (no conversion step; :mod:`datamodules.formats.raw`).

    Attributes:
        urls: shards — a brace pattern (``"data/{00000..00009}.tar"``), glob or list of shard paths/urls — or one
            raw file: a VQAv2/OK-VQA or GQA questions ``.json``, a COCO captions ``.json``, a Karpathy split
            ``.json`` (``dataset_coco.json``, ``dataset_flickr30k.json``), a LAVIS caption list ``.json``
            (``coco_karpathy_*.json``), a captions ``.jsonl``/``.tsv``, or a LAION / img2dataset ``.parquet``.
        kind: ``"caption"``, ``"vqa"`` (scored by VQAv2's leave-one-out accuracy over the human answers) or
            ``"gqa"`` (VQA samples with one answer, scored by exact match as GQA).
        weight: relative sampling weight when several training sources are mixed.
        prompt: this source's prompt (``None``: the datamodule's ``caption_prompt``/``vqa_prompt``).
        images: raw files only: the folder their image paths are relative to (VQA: the split's images, e.g.
            ``val2014/``; Karpathy COCO and LAVIS: the folder holding ``train2014/`` and ``val2014/``; jsonl/tsv: default
            the file's folder; a parquet of URLs: the img2dataset download folder).
        annotations: VQAv2/OK-VQA only: the annotations file (``None``: no answers, e.g. test-dev for predict).
        format: ``None`` infers it (``.json`` by its layout, ``.jsonl``, ``.tsv``, ``.parquet``, anything else shards);
            or one of :data:`FORMATS` (``"shards"``, ``"vqav2"``, ``"gqa"``, ``"coco"``, ``"karpathy"``, ``"lavis"``,
            ``"folder-jsonl"``, ``"folder-tsv"``, ``"parquet"``); a ``.json`` must then have that layout.
        split: Karpathy: ``"test"`` (default), ``"val"``, ``"train"`` (= train + restval) or a list of split names
            (exactly those); VQA: the ``{split}`` of ``image_pattern`` (default: the file's ``data_subtype``).
        image_pattern: VQA image file name under ``images`` (default ``"COCO_{split}_{image_id:012d}.jpg"``; COCO
            2017 names: ``"{image_id:012d}.jpg"``).
    """

    urls: str | list[str]
    kind: str = "caption"
    weight: float = 1.0
    prompt: str | None = None
    images: str | None = None
    annotations: str | None = None
    format: str | None = None
    split: str | list[str] | None = None
    image_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Source kind {self.kind!r} is not one of {KINDS} (urls {self.urls!r})")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"Source format {self.format!r} is not one of {FORMATS} (urls {self.urls!r})")
        if not self.raw:
            given = [name for name in RAW_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"Source field {given[0]!r} is for raw files (urls ending in {', '.join(RAW_SUFFIXES)}"
                                 f" or a raw format), but urls {self.urls!r} are shards")
            return
        if not isinstance(self.urls, str):
            raise ValueError(f"Source urls of a raw source (format {self.format!r}) is one file, got {self.urls!r}")
        if self.format is not None:
            check_kind(self.kind, self.format, self.urls)

    @property
    def raw(self) -> bool:
        """Whether ``urls`` is a raw file (read directly) rather than shards."""
        return is_raw(self.urls, self.format)

    def raw_spec(self) -> RawSpec | None:
        """How to read the raw file (absolute paths), ``None`` for shards."""
        if not self.raw:
            return None
        split = tuple(self.split) if isinstance(self.split, list) else self.split
        return RawSpec(self.format or "auto", absolute(self.urls), absolute(self.images), absolute(self.annotations),
                       split, self.image_pattern)


def absolute(path: Any) -> Any:
    """``path`` made absolute (``None`` stays ``None``)."""
    return None if path is None else str(Path(path).resolve())


def check_kind(kind: str, fmt: str, path: Any) -> None:
    """``ValueError`` naming the file when a source of ``kind`` cannot read the raw format ``fmt``."""
    if fmt not in VQA_FORMATS + CAPTION_FORMATS:
        raise ValueError(f"Source {path!r} is a {fmt} file: image-text sources read {FORMATS}")
    allowed = ("vqa", "gqa") if fmt in VQA_FORMATS else ("caption",)
    if kind not in allowed:
        raise ValueError(f"Source {path!r} is a {fmt} file, which kind {kind!r} cannot read: set kind to one of "
                         f"{allowed}")


def text_field(sample: dict[str, Any], ext: str) -> str | None:
    """The UTF-8 text of ``sample[ext]``, ``None`` when absent; ``SkipSample("bad_text")`` if not UTF-8."""
    data = sample.get(ext)
    if data is None:
        return None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise SkipSample("bad_text", f"{ext}: {exn}") from exn


def json_field(sample: dict[str, Any]) -> dict[str, Any]:
    """The parsed ``json`` member (``{}`` when absent); ``SkipSample("bad_json")`` if it is not a JSON object."""
    text = text_field(sample, "json")
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exn:
        raise SkipSample("bad_json", str(exn)) from exn
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The first present image member (jpg, jpeg, png, webp); ``SkipSample("missing_image")`` if none."""
    for ext in IMAGE_EXTENSIONS:
        if sample.get(ext) is not None:  # zero bytes: the decoder skips them as empty_image
            return sample[ext]
    raise SkipSample("missing_image", f"none of {IMAGE_EXTENSIONS} in {sorted(k for k in sample if not k.startswith('__'))}")


def cached_features(sample: dict[str, Any]) -> torch.Tensor:
    """The sample's cached features ``[N, D]``; ``SkipSample("missing_features"/"bad_features")`` otherwise."""
    data = sample.get(FEATURES)
    if data is None:
        raise SkipSample("missing_features", f"no {FEATURES} (cache this split with mmlm data cache-features)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exn:
        raise SkipSample("bad_features", repr(exn)) from exn
    if array.ndim != 2:
        raise SkipSample("bad_features", f"expected [N, D], got shape {array.shape}")
    return torch.from_numpy(array)


def as_strings(values: Any) -> list[str]:
    """A list of non-empty strings from a list of strings or VQA-style ``{"answer": …}`` dicts."""
    if not isinstance(values, list):
        return []
    texts = [v.get("answer") if isinstance(v, dict) else v for v in values]
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


def most_common(answers: list[str]) -> str:
    """The most frequent answer (the first one seen wins ties)."""
    return Counter(answers).most_common(1)[0][0]


def fill_prompt(template: str, meta: dict[str, Any], question: str = "") -> str:
    """``template`` with ``{}`` = the question and ``{field}`` = any field of the sample's JSON.

    Raises:
        SkipSample: ``missing_field`` when the template names a field the sample lacks.
    """
    try:
        return template.format(question, **meta)
    except KeyError as err:
        raise SkipSample("missing_field", f"prompt {template!r} needs json field {err}") from None


@dataclass(frozen=True)
class ExampleBuilder:
    """Picklable ``(sample, source_index) -> Example`` for DataLoader workers.

    Attributes:
        kinds: ``"caption"``/``"vqa"`` per source index.
        prompts: prompt per source index (caption prompt, or VQA format string: ``{}`` is the
            question, ``{field}`` a field of the sample's JSON).
        image: the image transform (bytes → ``[3, H, W]``).
        need_answers: skip VQA samples without answers (``False`` for prediction on test-dev).
        features: read the cached ``features.npy`` ``[N, D]`` as the example's image instead of decoding.
    """

    kinds: tuple[str, ...]
    prompts: tuple[str, ...]
    image: ImageTransform
    need_answers: bool = True
    features: bool = False

    def __call__(self, sample: dict[str, Any], source: int) -> Example:
        raise_if_skipped(sample)
        key = sample["__key__"]
        if self.kinds[source] in ("vqa", "gqa"):
            text = self.vqa_text(sample, self.prompts[source], self.kinds[source])
        else:
            text = self.caption_text(sample, self.prompts[source])
        image = cached_features(sample) if self.features else self.image(image_bytes(sample))
        return Example(image=image, key=key, **text)

    def caption_text(self, sample: dict[str, Any], prompt: str) -> dict[str, Any]:
        """Prompt, target, references, id and task of a caption sample."""
        meta = json_field(sample)
        listed = as_strings(meta.get("caption"))  # LAVIS evaluation files: "caption" is the list of references
        json_caption = meta.get("caption")
        caption = text_field(sample, "txt") or (json_caption.strip() if isinstance(json_caption, str) else "")
        caption = caption or (listed[0] if listed else "")
        if not caption:
            raise SkipSample("missing_caption", "no txt and no json caption")
        references = as_strings(meta.get("captions")) or listed or [caption]
        image_id = meta.get("image_id")
        return dict(prompt=fill_prompt(prompt, meta), target=caption, references=references, task="caption",
                    id=image_id if image_id is not None else sample["__key__"])

    def vqa_text(self, sample: dict[str, Any], template: str, task: str = "vqa") -> dict[str, Any]:
        """Prompt, target, references, id, task, question type and answer type of a VQA (or GQA) sample."""
        meta = json_field(sample)
        question = meta.get("question")
        if not isinstance(question, str) or not question.strip():
            raise SkipSample("missing_question", f"json keys {sorted(meta)}")
        answers = as_strings(meta.get("answers"))
        if not answers and self.need_answers:
            raise SkipSample("missing_answers", f"json keys {sorted(meta)}")
        question_id = meta.get("question_id")
        target = most_common(answers) if answers else ""
        return dict(prompt=fill_prompt(template, meta, question.strip()), target=target,
                    references=answers, task=task, question_type=str(meta.get("question_type") or ""),
                    answer_type=str(meta.get("answer_type") or ""),
                    id=question_id if question_id is not None else sample["__key__"])


@dataclass(frozen=True)
class FeatureCollator:
    """Collate examples whose ``image`` is cached features: ``Batch.features [B, N, D]``, ``pixels [B, 0]``."""

    collate: Collator

    def __call__(self, examples: list[Example]) -> Any:
        batch = self.collate(examples)
        batch.features, batch.pixels = batch.pixels, batch.pixels.new_zeros(len(examples), 0)
        return batch


class ImageTextDataModule(WebDataModule):
    """Caption and VQA shards or raw files (mixable) for every image → text model.

    Tokenizer, image preprocessing and image marker come from the arguments, or — when ``tokenizer`` /
    ``image_size`` / ``image_tokens`` is ``None`` — from the trainer's model's :class:`~mmlm.data_spec.DataSpec` in
    :meth:`setup` (``tokenizer``, a Hugging Face tokenizer; ``image_preprocess``, an
    :class:`~mmlm.encoders.base.ImagePreprocess`; the ``"image"`` marker of ``markers``; the ``end_token_id`` that ends
    targets, when ``end_token_id`` is ``None``). With an image marker (the
    generative families) batches are :class:`~mmlm.batch.SentenceBatch` whose sentences start with the image's span
    (:mod:`datamodules.pipeline.prefix_sentences`); without one (BLIP-2 stage 1, VLMO) they are :class:`~mmlm.batch.Batch`.

    Args:
        train: training sources, mixed by weight.
        val: validation sources (one DataLoader per source when several).
        test: test sources (as ``val``).
        predict: prediction sources (as ``val``).
        tokenizer: hub id or directory for :func:`mmlm.tokenizers.load_tokenizer`.
        image_size: square image side; ImageNet mean/std are used with it.
        batch_size: examples per batch and rank.
        num_workers: DataLoader workers per rank.
        epoch_samples: training samples per epoch over all ranks (``None``: one pass, one rank).
        shuffle_buffer: training shuffle buffer in samples.
        resampled: draw training shards with replacement (needs ``epoch_samples``).
        seed: base seed for shard order, shuffling and mixing.
        max_image_pixels: images with more pixels are skipped as ``image_too_large`` (decompression
            bombs, checked from the header before decoding); ``None``: no limit.
        max_text_tokens: cap on prompt + target + eos tokens.
        caption_prompt: prompt of caption examples.
        vqa_prompt: VQA prompt format string; ``{}`` is replaced by the question, ``{field}`` by a
            field of the sample's JSON (e.g. ``"{caption} Question: {} Answer:"``).
        train_crop_scale: smallest area fraction of the light random crop in training (1: centre crop).
        cached_features: read each sample's cached frozen-encoder features (``features.npy``, written by
            ``mmlm data cache-features``) instead of decoding its image; the model's frozen encoder is then skipped.
            Samples without features are skipped and counted as ``missing_features``.
        raw_chunk: entries (questions, images or caption lines) per chunk url of a raw source; a source gets at
            least ranks × workers chunks (see :mod:`datamodules.formats.raw`).
        image_tokens: M, the image placeholders in front of each sentence (the model's connector output length;
            0: text-only sentences); ``None``: the model's image marker, else plain :class:`~mmlm.batch.Batch`.
        eval_shots: demonstrations before each prompt at evaluation (0 = zero-shot): the next examples of the same
            batch that show another image, with their targets (:func:`mmlm.fewshot.with_demonstrations`); needs
            sentence batches.
        end_token_id: the token id that ends every target; ``None``: the model's
            :attr:`~mmlm.data_spec.DataSpec.end_token_id` (``"\\n"`` for a BLIP-2 OPT checkpoint from LAVIS), else the
            tokenizer's eos.
        pack_tokens: pack several training sentences into each row of at most this many tokens (a block-diagonal
            causal mask and positions restarting per sentence, as KOSMOS-1's batches;
            :func:`~datamodules.pipeline.prefix_sentences.pack_sentences`): fewer padding tokens per step for the
            prefix families (Frozen, BLIP-2 with a decoder-only LM). 0: one sentence per row. At least
            ``image_tokens + max_text_tokens``; evaluation batches are never packed.
    """

    def __init__(
        self,
        train: list[Source] | None = None,
        val: list[Source] | None = None,
        test: list[Source] | None = None,
        predict: list[Source] | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        seed: int = 0,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        max_text_tokens: int = 48,
        caption_prompt: str = "",
        vqa_prompt: str = "Question: {} Answer:",
        train_crop_scale: float = 0.9,
        cached_features: bool = False,
        raw_chunk: int = 64,
        image_tokens: int | None = None,
        eval_shots: int = 0,
        end_token_id: int | None = None,
        pack_tokens: int = 0,
    ) -> None:
        super().__init__(train=train, val=val, test=test, predict=predict, batch_size=batch_size,
                         num_workers=num_workers, epoch_samples=epoch_samples,
                         shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed)
        self.tokenizer_name, self.image_size = tokenizer, image_size
        self.max_image_pixels = max_image_pixels
        self.max_text_tokens, self.train_crop_scale = max_text_tokens, train_crop_scale
        self.caption_prompt, self.vqa_prompt = caption_prompt, vqa_prompt
        self.cached_features = cached_features
        if raw_chunk < 1:
            raise ValueError(f"raw_chunk must be ≥ 1, got {raw_chunk}")
        self.raw_chunk = raw_chunk
        if eval_shots < 0:
            raise ValueError(f"eval_shots must be ≥ 0, got {eval_shots}")
        self.image_tokens, self.eval_shots = image_tokens, eval_shots
        self.end_token_id = end_token_id
        if pack_tokens < 0:
            raise ValueError(f"pack_tokens must be ≥ 0, got {pack_tokens}")
        self.pack_tokens = pack_tokens
        self.tokenizer: Any = None
        self.preprocess: ImagePreprocess | None = None
        self.marker: Marker | None = None

    def setup(self, stage: str | None = None) -> None:
        """Resolve the tokenizer, image preprocessing, image marker and end token (arguments first, else the
        model's)."""
        if self.end_token_id is None:
            self.end_token_id = self.model_spec().end_token_id  # None: the tokenizer's eos
        if self.marker is None:
            self.marker = (prefix_image_marker(self.image_tokens) if self.image_tokens is not None
                           else image_marker(self.model_spec().markers))
        if self.tokenizer is None:
            self.tokenizer = (load_tokenizer(self.tokenizer_name, special_tokens([self.marker] if self.marker else []))
                              if self.tokenizer_name is not None else self.from_model("tokenizer", "tokenizer"))
        if self.preprocess is None:
            self.preprocess = (ImagePreprocess((self.image_size, self.image_size)) if self.image_size is not None
                               else self.from_model("image_preprocess", "image_size"))
        longest = self.max_text_tokens + (self.marker.count if self.marker else 0)
        if self.pack_tokens and self.pack_tokens < longest:
            raise ValueError(f"pack_tokens={self.pack_tokens} is shorter than the longest sentence: image_tokens "
                             f"{longest - self.max_text_tokens} + max_text_tokens {self.max_text_tokens} = {longest}")

    def build_pipeline(self, stage: str, sources: Sequence[Source], *,
                       rank: int | None = None, world_size: int | None = None) -> ShardPipeline:
        """The shard pipeline of ``sources``; a raw source is read through chunk urls, enough for every rank and
        worker (at most ``raw_chunk`` entries each)."""
        if rank is None or world_size is None:
            rank, world_size = self.rank_and_world()
        needed = world_size * max(1, self.num_workers)
        readable = [self._readable(s, needed) for s in sources]
        return super().build_pipeline(stage, readable, rank=rank, world_size=world_size)

    def _readable(self, source: Source, needed: int) -> Any:
        """``source`` itself for shards; for raw files its chunk urls, after checking that its kind reads the file's
        format (the index is read here, once per process)."""
        spec = source.raw_spec()
        if spec is None:
            return source
        check_kind(source.kind, load_index(spec).format, source.urls)
        return chunked(source, spec, needed, self.raw_chunk)

    def opener(self) -> Opener:
        """Shards and raw chunks (``mmlm-raw://``) alike: :func:`datamodules.formats.raw.open_url`."""
        return open_url

    def example_fn(self, stage: str, sources: Sequence[Source]) -> ExampleBuilder:
        if self.preprocess is None:
            self.setup(stage)
        pre = self.preprocess
        image = ImageTransform.from_preprocess(pre, train=stage == "fit",
                                               min_crop_scale=self.train_crop_scale,
                                               max_pixels=self.max_image_pixels)
        defaults = {"caption": self.caption_prompt, "vqa": self.vqa_prompt, "gqa": self.vqa_prompt}
        prompts = tuple(defaults[s.kind] if s.prompt is None else s.prompt for s in sources)
        return ExampleBuilder(kinds=tuple(s.kind for s in sources), prompts=prompts, image=image,
                              need_answers=stage != "predict", features=self.cached_features)

    def collate_fn(self, stage: str) -> Any:
        """Examples → :class:`~mmlm.batch.Batch`, or sentences when there is an image marker (see the class)."""
        if self.tokenizer is None:
            self.setup(stage)
        collate: Collator | FeatureCollator = Collator(self.tokenizer, self.max_text_tokens, self.end_token_id,
                                                       self.model_spec().instruction_tokenizer)
        collate = FeatureCollator(collate) if self.cached_features else collate
        if stage == "fit":
            return sentence_collate(collate, self.marker, self.tokenizer, pack_tokens=self.pack_tokens)
        return sentence_collate(collate, self.marker, self.tokenizer, self.eval_shots)


def url_sources(urls: str | None, kind: str) -> list[Source] | None:
    """``[Source(urls, kind)]``, or ``None`` when ``urls`` is ``None``."""
    return None if urls is None else [Source(urls, kind=kind)]


class SingleKindDataModule(ImageTextDataModule):
    """:class:`ImageTextDataModule` over one shard set per split, all of the class's ``kind``.

    Args:
        train_urls: training shards (pattern, glob or ``::``-joined patterns), or ``None``.
        val_urls: validation shards, or ``None``.
        test_urls: test shards, or ``None``.
        **kwargs: any other :class:`ImageTextDataModule` argument.
    """

    kind = "caption"

    def __init__(self, train_urls: str | None = None, val_urls: str | None = None,
                 test_urls: str | None = None, **kwargs: Any) -> None:
        super().__init__(train=url_sources(train_urls, self.kind), val=url_sources(val_urls, self.kind),
                         test=url_sources(test_urls, self.kind), **kwargs)


class CaptionsDataModule(SingleKindDataModule):
    """Caption shards (img2dataset style) per split: ``train_urls``, ``val_urls``, ``test_urls``."""

    kind = "caption"


class VQADataModule(SingleKindDataModule):
    """VQA shards (image + question + 10 answers) per split: ``train_urls``, ``val_urls``, ``test_urls``."""

    kind = "vqa"
