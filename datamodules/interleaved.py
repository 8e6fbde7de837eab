"""Interleaved web documents, image–caption pairs and text, mixed by weight → :class:`mmlm.batch.SentenceBatch`.

Every sample becomes a multimodal sentence (:mod:`mmlm.sentences`); each image is a span
``<image>`` + M placeholders + ``</image>`` (M = the connector's output length, from the model):

* ``interleaved``: a document in the OBELICS layout (``texts``/``images`` lists of equal length,
  exactly one of each pair non-null) or the MMC4 layout (``text_list`` + ``image_info`` whose
  ``matched_text_index`` places each image before that sentence), in the sample's ``json``;
  images inline in the tar (member ``{key}.{ref}``) or base64 in the JSON (see
  ``docs/data-formats.md``). Layout: ``<s> text <image>…</image> text … </s>``.
* ``caption``: ``<s> <image>…</image> [prompt] caption </s>`` (img2dataset shards).
* ``vqa``: ``<s> <image>…</image> prompt answer </s>``.
* ``text``: ``<s> text </s>`` (``txt`` member or ``json["text"]``).

Truncation: images after the first ``max_images`` end the document there; then the sentence is
cut at ``max_tokens`` without cutting an image span (a span that would be cut is dropped with
everything after it); ``</s>`` stays only when the whole document fits. A ``text`` document is never
cut: longer than ``max_tokens`` it continues in the next rows of the batch (:func:`continuation_rows`,
each row ``<s>`` + the next tokens). Raw text never becomes special ids (a literal ``</s>`` stays text,
:meth:`mmlm.sentences.SentenceBuilder.text`). The LM loss is on text
tokens only (never placeholders, wrappers, prompts or padding).

Evaluation (``caption``/``vqa`` sources) builds k-shot prompts: ``shots`` demonstrations from the
``support`` shards (never showing the query's image), each ``<image>…</image>`` + ``demo_template``,
then the query's image and prompt. Shape legend: B rows, T tokens.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds

from datamodules.base import WebDataModule
from datamodules.image_text import ExampleBuilder, image_bytes, json_field, text_field
from datamodules.pipeline.packing import SentenceCollator, SentenceSample
from datamodules.pipeline.skips import SkipSample, note
from datamodules.pipeline.transforms import ImageTransform
from datamodules.pipeline.urls import expand_urls
from mmlm.batch import SentenceBatch
from mmlm.encoders.base import ImagePreprocess
from mmlm.sentences import Marker, Sentence, SentenceBuilder, kosmos_image_marker, special_tokens
from mmlm.tokenizers import load_tokenizer

KINDS = ("interleaved", "caption", "vqa", "text")
#: Image members may be named ``{key}.{ref}`` with any of these endings.
IMAGE_ENDINGS = ("jpg", "jpeg", "png", "webp")

#: A document segment: text, or the raw bytes of an image.
Segment = str | bytes


@dataclass
class MixSource:
    """One shard set of the mixture.

    Attributes:
        urls: brace pattern, glob or list of shards.
        kind: ``"interleaved"``, ``"caption"``, ``"vqa"`` or ``"text"``.
        weight: relative sampling weight in training (KOSMOS-1 mixes all three kinds).
        prompt: caption prompt or VQA template (``{}`` = the question); ``None``: the datamodule's.
    """

    urls: str | list[str]
    kind: str = "interleaved"
    weight: float = 1.0
    prompt: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"MixSource kind {self.kind!r} is not one of {KINDS} (urls {self.urls!r})")


# ------------------------------------------------------------------------------------ layouts


def image_ref_bytes(ref: Any, sample: dict[str, Any]) -> bytes:
    """The bytes of one image reference of a document.

    A reference is a tar member of the sample (``"0.jpg"`` → member ``{key}.0.jpg``), a dict with
    ``member`` or ``base64``/``image_base64``, or a ``data:image/…;base64,`` URI.

    Raises:
        SkipSample: ``missing_image`` when it resolves to nothing (e.g. a URL that was never downloaded).
    """
    if isinstance(ref, dict):
        encoded = ref.get("base64") or ref.get("image_base64")
        if isinstance(encoded, str):
            return _b64(encoded)
        ref = ref.get("member")
    if isinstance(ref, str) and ref.startswith("data:") and "," in ref:
        return _b64(ref.split(",", 1)[1])
    if isinstance(ref, str) and sample.get(ref):
        return sample[ref]
    raise SkipSample("missing_image", f"image reference {str(ref)[:80]!r} is neither a member nor base64")


def available_image(ref: Any, sample: dict[str, Any]) -> bytes | None:
    """The bytes of an image reference, or ``None`` (counted as ``converted_missing_image``) when it resolves to
    nothing — an undownloaded URL, a member a download left out: the document keeps its text and other images."""
    try:
        return image_ref_bytes(ref, sample)
    except SkipSample as skip:
        if skip.reason != "missing_image":
            raise
        note("converted_missing_image")
        return None


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exn:
        raise SkipSample("bad_base64", str(exn)) from exn


def obelics_segments(doc: dict[str, Any], sample: dict[str, Any]) -> list[Segment]:
    """OBELICS layout: ``texts[i]`` or ``images[i]`` (exactly one non-null) in reading order; an image that is not
    available is left out (:func:`available_image`)."""
    texts, images = doc.get("texts"), doc.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise SkipSample("bad_document", "OBELICS texts/images must be lists of equal length")
    segments: list[Segment] = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise SkipSample("bad_document", f"position {i}: exactly one of texts/images must be null")
        segment = text if text is not None else available_image(image, sample)
        if segment is not None:
            segments.append(segment)
    return segments


def mmc4_segments(doc: dict[str, Any], sample: dict[str, Any], min_similarity: float) -> list[Segment]:
    """MMC4 layout: each image (``matched_sim >= min_similarity``) goes before its matched sentence; an image that is
    not available is left out (:func:`available_image`), the rest of the document kept."""
    texts, infos = doc.get("text_list"), doc.get("image_info") or []
    if not isinstance(texts, list) or not isinstance(infos, list):
        raise SkipSample("bad_document", "MMC4 text_list/image_info must be lists")
    before: dict[int, list[dict[str, Any]]] = {}
    for info in infos:
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(texts):
            raise SkipSample("bad_document", f"image_info entry without a valid matched_text_index: {info!r:.80}")
        if float(info.get("matched_sim", 1.0)) < min_similarity:
            note("converted_mmc4_low_similarity")
            continue
        before.setdefault(index, []).append(info)
    segments: list[Segment] = []
    for i, text in enumerate(texts):
        found = [available_image(info, sample) for info in before.get(i, [])]
        segments += [data for data in found if data is not None]
        segments.append(str(text))
    return segments


def document_segments(sample: dict[str, Any], min_similarity: float = 0.0) -> list[Segment]:
    """The segments of an interleaved sample, whichever of the two layouts its ``json`` uses."""
    doc = json_field(sample)
    if "texts" in doc:
        return obelics_segments(doc, sample)
    if "text_list" in doc:
        return mmc4_segments(doc, sample, min_similarity)
    raise SkipSample("bad_document", f"json has neither texts/images (OBELICS) nor text_list (MMC4): {sorted(doc)}")


def limit_images(segments: list[Segment], max_images: int) -> list[Segment]:
    """The segments before the ``max_images + 1``-th image (the document ends there)."""
    seen = 0
    for i, segment in enumerate(segments):
        if isinstance(segment, bytes):
            seen += 1
            if seen > max_images:
                return segments[:i]
    return segments


# ------------------------------------------------------------------------------ k-shot support


@dataclass(frozen=True)
class Demo:
    """One support example for k-shot prompts: image bytes, its identity, prompt and target."""

    image: bytes
    image_id: str
    prompt: str
    target: str
    question_type: str = ""


def image_identity(data: bytes, meta: dict[str, Any]) -> set[str]:
    """What identifies an image: its ``image_id`` (when given) and a hash of its bytes."""
    ids = {"sha1:" + hashlib.sha1(data).hexdigest()}
    if meta.get("image_id") is not None:
        ids.add(f"id:{meta['image_id']}")
    return ids


def load_support(urls: str | list[str], kind: str, prompt: str, limit: int) -> list[Demo]:
    """The first ``limit`` usable samples of the support shards as :class:`Demo` (bad ones skipped)."""
    builder = ExampleBuilder(kinds=(kind,), prompts=(prompt,), image=None)  # type: ignore[arg-type]
    demos: list[Demo] = []
    for sample in wds.WebDataset(expand_urls(urls), shardshuffle=False, empty_check=False):
        try:
            text = builder.vqa_text(sample, prompt) if kind == "vqa" else builder.caption_text(sample, prompt)
            data, meta = image_bytes(sample), json_field(sample)
        except SkipSample:
            continue
        identity = "|".join(sorted(image_identity(data, meta)))
        demos.append(Demo(data, identity, text["prompt"], text["target"], text.get("question_type", "")))
        if len(demos) >= limit:
            break
    return demos


def pick_demos(support: Sequence[Demo], query_ids: set[str], question_type: str, shots: int,
               match_type: bool, seed: str) -> list[Demo]:
    """Up to ``shots`` random demos (fixed per ``seed``) whose image is not the query's.

    With ``match_type`` only demos of the query's ``question_type`` are used.
    """
    pool = [d for d in support if not (set(d.image_id.split("|")) & query_ids)
            and (not match_type or d.question_type == question_type)]
    return random.Random(seed).sample(pool, min(shots, len(pool)))


# ------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class InterleavedExampleBuilder:
    """Picklable ``(sample, source_index) -> SentenceSample`` for DataLoader workers (built by
    :meth:`InterleavedDataModule.example_fn`, whose signature holds the defaults).

    Attributes:
        tokenizer: the model's tokenizer (knows the marker tokens).
        marker: the image marker (span length M, wrappers).
        kinds: kind per source index.
        prompts: prompt per source index.
        image: image transform (bytes → ``[3, H, W]``).
        max_tokens: cap on the sentence length (prompt included).
        max_images: cap on images per document.
        evaluate: build prompts for generation (``caption``/``vqa`` sources).
        shots: demonstrations per evaluation prompt.
        support: demonstrations to draw from.
        demo_template: text after a demo's image (``{prompt}``, ``{target}``).
        match_question_type: demos share the query's question type.
        min_similarity: MMC4 images below this ``matched_sim`` are dropped.
        seed: seed of the demo choice (with the sample key).
    """

    tokenizer: Any
    marker: Marker
    kinds: tuple[str, ...]
    prompts: tuple[str, ...]
    image: ImageTransform
    max_tokens: int
    max_images: int
    evaluate: bool
    shots: int
    support: tuple[Demo, ...]
    demo_template: str
    match_question_type: bool
    min_similarity: float
    seed: int

    def builder(self) -> SentenceBuilder:
        return SentenceBuilder(self.tokenizer, [self.marker])

    def bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [] if bos is None else [bos]

    def __call__(self, sample: dict[str, Any], source: int) -> SentenceSample:
        kind = self.kinds[source]
        if kind == "interleaved":
            return self.document(sample, document_segments(sample, self.min_similarity))
        if kind == "text":
            return self.text(sample)
        return self.paired(sample, kind, self.prompts[source])

    def _finish(self, sentence: Sentence, images: list[bytes], key: str) -> SentenceSample:
        """Truncate (spans kept whole), check there is text to learn, decode the kept images."""
        sentence = sentence.truncate(self.max_tokens)
        if sum(sentence.targets) < 1:
            raise SkipSample("empty_document", f"no text token left within max_tokens={self.max_tokens}")
        kept = images[:len(sentence.spans)]
        items = {"image": torch.stack([self.image(b) for b in kept])} if kept else {}
        return SentenceSample(sentence, items, key=key)

    def document(self, sample: dict[str, Any], segments: list[Segment]) -> SentenceSample:
        """``<s>`` + text and image spans in reading order + ``</s>``."""
        kept = limit_images(segments, self.max_images)
        builder, images = self.builder().ids(self.bos(), target=False), []
        for i, segment in enumerate(kept):
            if isinstance(segment, bytes):
                builder.marker(self.marker)
                images.append(segment)
            elif segment.strip():
                builder.text(segment if i == 0 or segment[:1].isspace() else " " + segment)
        if len(kept) == len(segments):  # the whole document: it ends here
            builder.ids([self.tokenizer.eos_token_id])
        return self._finish(builder.build(), images, sample["__key__"])

    def text(self, sample: dict[str, Any]) -> SentenceSample:
        """``<s> text </s>`` from ``txt`` or ``json["text"]``, whole: the collator splits it into rows of
        ``max_tokens`` (:func:`continuation_rows`)."""
        body = text_field(sample, "txt") or json_field(sample).get("text")
        if not isinstance(body, str) or not body.strip():
            raise SkipSample("missing_text", "no txt member and no json text")
        sentence = self.builder().ids(self.bos(), target=False).text(body).ids([self.tokenizer.eos_token_id]).build()
        return SentenceSample(sentence, {}, key=sample["__key__"])

    def paired(self, sample: dict[str, Any], kind: str, prompt: str) -> SentenceSample:
        """An image–caption or VQA pair; with ``evaluate`` also its (k-shot) prompt."""
        examples = ExampleBuilder(kinds=(kind,), prompts=(prompt,), image=self.image)
        text = examples.vqa_text(sample, prompt, kind) if kind != "caption" else examples.caption_text(sample, prompt)
        data = image_bytes(sample)
        demos = self._demos(data, sample, text) if self.evaluate else []
        query = self.builder().marker(self.marker, item=len(demos))  # demos are items 0 … k-1
        query.text(" " + text["prompt"] if text["prompt"] else "", target=False)
        prompt_sentence = self._demo_sentence(demos) + query.build().as_prompt()
        answer = self.builder().text(" " + text["target"] if text["target"] else "")
        full = prompt_sentence + answer.ids([self.tokenizer.eos_token_id]).build()
        out = self._finish(full, [d.image for d in demos] + [data], sample["__key__"])
        if len(out.sentence.spans) != len(demos) + 1:
            raise SkipSample("too_long", f"prompt with {len(demos)} demos exceeds max_tokens={self.max_tokens}")
        if self.evaluate:
            out.prompt = prompt_sentence
            out.task, out.references, out.id = kind, text["references"], text["id"]
            out.question_type, out.answer_type = text.get("question_type", ""), text.get("answer_type", "")
        return out

    def _demos(self, data: bytes, sample: dict[str, Any], text: dict[str, Any]) -> list[Demo]:
        """The demos of one query, as many as fit into ``max_tokens`` (fewer are counted)."""
        if self.shots == 0:
            return []
        ids = image_identity(data, json_field(sample))
        demos = pick_demos(self.support, ids, text.get("question_type", ""), self.shots,
                           self.match_question_type, f"{self.seed}-{sample['__key__']}")
        reserve = len(self.tokenizer(" " + text["prompt"] + " " + text["target"], add_special_tokens=False)["input_ids"])
        while demos and len(self._demo_sentence(demos)) + self.marker.count + 4 + reserve > self.max_tokens:
            demos = demos[1:]
        if len(demos) < self.shots:
            note("converted_fewer_shots")
        return demos

    def _demo_sentence(self, demos: Sequence[Demo]) -> Sentence:
        """``<s>`` + for each demo its image span and ``" " + demo_template``, as a prompt (no targets)."""
        builder = self.builder().ids(self.bos(), target=False)
        for demo in demos:
            builder.marker(self.marker)
            builder.text(" " + self.demo_template.format(prompt=demo.prompt, target=demo.target).lstrip(),
                         target=False)
        return builder.build().as_prompt()


# --------------------------------------------------------------------------------- text rows


def continuation_rows(sample: SentenceSample, max_tokens: int, bos: Sequence[int]) -> list[SentenceSample]:
    """A text-only sample longer than ``max_tokens`` as consecutive rows, nothing dropped; others as they are.

    The first row is the first ``max_tokens`` tokens; each next row is a lead + the next tokens. The lead is
    ``bos`` (as the kosmos-2/torchscale LM loaders start every block), or without a bos id the previous row's
    last token, so every text token stays a target exactly once (the lead never is).
    """
    s = sample.sentence
    if len(s) <= max_tokens or s.spans or sample.items:
        return [sample]
    rows = [SentenceSample(Sentence(s.ids[:max_tokens], s.targets[:max_tokens]), key=sample.key)]
    start = max_tokens
    while start < len(s):
        lead = list(bos) or s.ids[start - 1:start]
        stop = min(len(s), start + max_tokens - len(lead))
        rows.append(SentenceSample(Sentence(lead + s.ids[start:stop], [False] * len(lead) + s.targets[start:stop]),
                                   key=sample.key))
        start = stop
    return rows


@dataclass(frozen=True)
class ContinuingCollator:
    """Picklable collate that first splits over-long text samples into rows (:func:`continuation_rows`),
    then pads or packs them with ``collate``; a batch of B samples may so hold more than B samples' rows."""

    collate: SentenceCollator
    max_tokens: int
    bos: tuple[int, ...]

    def __call__(self, samples: list[SentenceSample]) -> SentenceBatch:
        return self.collate([row for s in samples for row in continuation_rows(s, self.max_tokens, self.bos)])


# --------------------------------------------------------------------------------- datamodule


@dataclass
class _Resolved:
    tokenizer: Any = None
    preprocess: ImagePreprocess | None = None
    marker: Marker | None = None
    support: tuple[Demo, ...] | None = None


class InterleavedDataModule(WebDataModule):
    """KOSMOS-1 style data: interleaved documents + image–caption pairs + text, mixed by weight.

    Tokenizer, image preprocessing and the image marker come from the arguments or — when
    ``tokenizer`` / ``image_size`` / ``image_tokens`` is ``None`` — from the trainer's model's
    :class:`~mmlm.data_spec.DataSpec` (``tokenizer``, ``image_preprocess``, ``markers[0]``).

    Args:
        train: training sources, mixed by weight.
        val: validation sources (``caption``/``vqa`` are evaluated with generation, k-shot).
        test: test sources (as ``val``).
        predict: prediction sources.
        tokenizer: hub id or directory (the marker tokens are added).
        image_size: square image side (ImageNet mean/std).
        image_tokens: M, placeholders per image (the connector's output length).
        batch_size: samples per batch and rank (packed into fewer rows when ``pack``).
        num_workers: DataLoader workers per rank.
        epoch_samples: training samples per epoch over all ranks.
        shuffle_buffer: training shuffle buffer in samples.
        resampled: draw training shards with replacement.
        seed: base seed (shards, shuffling, mixing, demo choice).
        max_tokens: sequence length: cap per sample and packed row length.
        max_images: images per document; later images end the document.
        pack: pack training samples into rows of ``max_tokens`` (attention blocked between them).
        caption_prompt: prompt of caption samples.
        vqa_prompt: VQA template, ``{}`` = the question.
        shots: demonstrations per evaluation prompt (k-shot).
        support: shards (caption or VQA, like the evaluated source) the demonstrations come from.
        support_size: support samples loaded into memory.
        demo_template: text after a demonstration's image, ``{prompt}`` and ``{target}``.
        match_question_type: demonstrations share the query's question type.
        mmc4_min_similarity: MMC4 images with a lower ``matched_sim`` are dropped.
        train_crop_scale: smallest area fraction of the training crop.
    """

    def __init__(
        self,
        train: list[MixSource] | None = None,
        val: list[MixSource] | None = None,
        test: list[MixSource] | None = None,
        predict: list[MixSource] | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        image_tokens: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        seed: int = 0,
        max_tokens: int = 2048,
        max_images: int = 8,
        pack: bool = True,
        caption_prompt: str = "",
        vqa_prompt: str = "Question: {} Answer:",
        shots: int = 0,
        support: str | None = None,
        support_size: int = 1000,
        demo_template: str = "{prompt} {target}",
        match_question_type: bool = False,
        mmc4_min_similarity: float = 0.0,
        train_crop_scale: float = 0.9,
    ) -> None:
        super().__init__(train=train, val=val, test=test, predict=predict, batch_size=batch_size,
                         num_workers=num_workers, epoch_samples=epoch_samples,
                         shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed)
        self.tokenizer_name, self.image_size, self.image_tokens = tokenizer, image_size, image_tokens
        self.max_tokens, self.max_images, self.pack = max_tokens, max_images, pack
        self.caption_prompt, self.vqa_prompt = caption_prompt, vqa_prompt
        self.shots, self.support_urls, self.support_size = shots, support, support_size
        self.demo_template, self.match_question_type = demo_template, match_question_type
        self.mmc4_min_similarity, self.train_crop_scale = mmc4_min_similarity, train_crop_scale
        self.resolved = _Resolved()

    def setup(self, stage: str | None = None) -> None:
        """Resolve marker, tokenizer and image preprocessing (arguments first, else the model's)."""
        r = self.resolved
        if r.marker is None:
            r.marker = (kosmos_image_marker(self.image_tokens) if self.image_tokens is not None
                        else self.from_model("markers", "image_tokens")[0])
        if r.tokenizer is None:
            r.tokenizer = (load_tokenizer(self.tokenizer_name, special_tokens([r.marker]))
                           if self.tokenizer_name is not None else self.from_model("tokenizer", "tokenizer"))
        if r.preprocess is None:
            r.preprocess = (ImagePreprocess((self.image_size, self.image_size)) if self.image_size is not None
                            else self.from_model("image_preprocess", "image_size"))

    def _support(self, sources: Sequence[MixSource]) -> tuple[Demo, ...]:
        """Demonstrations for k-shot prompts (loaded once, from ``support``)."""
        if self.shots == 0:
            return ()
        if self.resolved.support is None:
            if self.support_urls is None:
                raise ValueError(f"shots={self.shots} needs support=… (shards to draw demonstrations from)")
            kind = next((s.kind for s in sources if s.kind in ("caption", "vqa")), "vqa")
            prompt = self.vqa_prompt if kind == "vqa" else self.caption_prompt
            self.resolved.support = tuple(load_support(self.support_urls, kind, prompt, self.support_size))
            if len(self.resolved.support) < self.shots:
                raise ValueError(f"support {self.support_urls!r} gave {len(self.resolved.support)} usable samples, "
                                 f"fewer than shots={self.shots}")
        return self.resolved.support

    def example_fn(self, stage: str, sources: Sequence[MixSource]) -> InterleavedExampleBuilder:
        self.setup(stage)
        pre, train = self.resolved.preprocess, stage == "fit"
        image = ImageTransform.from_preprocess(pre, train=train, min_crop_scale=self.train_crop_scale)
        defaults = {"caption": self.caption_prompt, "vqa": self.vqa_prompt, "interleaved": "", "text": ""}
        prompts = tuple(defaults[s.kind] if s.prompt is None else s.prompt for s in sources)
        return InterleavedExampleBuilder(
            tokenizer=self.resolved.tokenizer, marker=self.resolved.marker, kinds=tuple(s.kind for s in sources),
            prompts=prompts, image=image, max_tokens=self.max_tokens, max_images=self.max_images,
            evaluate=not train, shots=0 if train else self.shots, support=() if train else self._support(sources),
            demo_template=self.demo_template, match_question_type=self.match_question_type,
            min_similarity=self.mmc4_min_similarity, seed=self.seed)

    def collate_fn(self, stage: str) -> ContinuingCollator:
        self.setup(stage)
        tok = self.resolved.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        bos = () if tok.bos_token_id is None else (tok.bos_token_id,)
        return ContinuingCollator(SentenceCollator(pad, self.max_tokens, pack=self.pack and stage == "fit"),
                                  self.max_tokens, bos)

