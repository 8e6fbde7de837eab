"""Images + prompts → generated text, and continuation log-probabilities, for any generative mmlm family.

The inputs are built the way the family's evaluation datamodule builds them, so :func:`generate` returns exactly
what ``mmlm validate`` generates for the same examples (the text of ``model.generate_text(batch)``):

* every image goes through the evaluation transform of the model's preprocessing — ``ImageTransform`` of
  ``model.image_preprocess`` (train=False), or Donut's ``DocumentTransform`` — from lossless PNG bytes (TIFF for
  modes PNG cannot hold), so a decoded JPEG gives the pixels a shard of that JPEG gives;
* one-image families (Frozen, BLIP-2, MetaLM, VLMO VQA, the text LM) and Donut: ``Example(prompt=…, target="")``
  through ``datamodules.pipeline.collate.collate_examples`` (``collate_documents`` for Donut); one image per request (the
  first, with a warning once when there are more); a model with an image marker (Frozen, BLIP-2, MetaLM, the text
  LM) gets the sentences of ``datamodules.pipeline.prefix_sentences`` (its image span first), as its datamodule gives them;
* KOSMOS-1: the interleaved datamodule's sentence, ``[bos] <image>…</image> … " " prompt``, one image span per
  image (the images go where the prompt writes ``<image>`` when it writes one per image, else before the text);
* PaLM-E: the embodied datamodule's sentence ``[bos] prompt`` with ``<img1>``, ``<img2>``… spans (added before the
  text when the prompt has none).

:func:`loglikelihood` scores a continuation after each context with the family's own teacher-forced pass
(``training_loss``): the language model's logits and labels are read from that call, so each family keeps its
own fusion code. :func:`load_model` loads an exported directory or a Lightning checkpoint.

Shape legend: B requests, T text tokens, V vocabulary, H/W image height/width.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pytorch_lightning.utilities import move_data_to_device

from datamodules.documents import collate_documents
from datamodules.embodied import EmbodiedExampleBuilder, rewrite_markers
from datamodules.pipeline.collate import Example, collate_examples, pad_id, pad_right, token_ids
from datamodules.pipeline.document_transforms import DocumentTransform
from datamodules.pipeline.packing import SentenceSample, collate_rows
from datamodules.pipeline.prefix_sentences import image_marker, to_sentences
from datamodules.pipeline.skips import SkipSample
from datamodules.pipeline.transforms import ImageTransform
from mmlm.batch import Batch, SentenceBatch
from mmlm.json_tokens import donut_prediction
from mmlm.language.base import GenerationConfig, LanguageModel
from mmlm.language.hf_seq2seq import HFSeq2SeqLM
from mmlm.losses import IGNORE_INDEX
from mmlm.models import Blip2, CausalLMPretraining, Frozen, Kosmos1, MetaLM, MetaLMPretraining, PaLME
from mmlm.models.base import MultimodalModule
from mmlm.models.documents import DocumentModule
from mmlm.models.exported import INFO_FILE, MODEL_FILE, load_checkpoint
from mmlm.sentences import Sentence, SentenceBuilder

log = logging.getLogger(__name__)

#: Requests: one list of images per prompt (``[]`` for a text-only request).
Images = Sequence[Sequence[Image.Image]]
#: No cap on prompt tokens (``max_text_tokens=None``).
UNLIMITED = 1 << 30
#: PIL modes a PNG file holds; other modes (CMYK, YCbCr, LAB…) travel as uncompressed TIFF.
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
#: Families whose teacher-forced pass scores a continuation (:func:`loglikelihood`).
SCORING_FAMILIES = (Frozen, Blip2, Kosmos1, PaLME, MetaLM, CausalLMPretraining)
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# ----------------------------------------------------------------------------------------------- loading


def load_model(pretrained: str | None = None, checkpoint: str | None = None, config: str | None = None,
               family: str | None = None) -> MultimodalModule:
    """A trained module in eval mode, from exactly one of:

    Args:
        pretrained: an ``mmlm export`` directory (mmlm or Hugging Face format, the family read from
            ``mmlm_export.json``), or — with ``family`` — any directory or hub id the family's ``from_pretrained``
            reads (``family=Blip2``: a ``Blip2ForConditionalGeneration`` checkpoint).
        checkpoint: a Lightning checkpoint (``.ckpt``), rebuilt from its recorded config or from ``config``.
        config: a YAML config whose model section builds the checkpoint's module.
        family: class name in :mod:`mmlm.models` (``Blip2``, ``Donut``…) or ``module.Class``.

    Raises:
        ValueError: neither or both of ``pretrained`` and ``checkpoint``; a directory that is no export without
            ``family``.
    """
    if (pretrained is None) == (checkpoint is None):
        raise ValueError("give exactly one of pretrained=DIR (an mmlm export) and checkpoint=X.ckpt")
    if checkpoint is not None:
        return load_checkpoint(checkpoint, config).eval()
    return family_class(pretrained, family).from_pretrained(pretrained).eval()


def family_class(pretrained: str, family: str | None) -> type[MultimodalModule]:
    """The class that loads ``pretrained``: ``family`` when given, else the export's recorded family."""
    info = Path(pretrained) / INFO_FILE
    if family is None and (Path(pretrained) / MODEL_FILE).is_file():
        return MultimodalModule  # the mmlm format names its class in model.yaml
    if family is None and info.is_file():
        family = json.loads(info.read_text())["family"]
    if family is None:
        raise ValueError(f"{pretrained} is not an mmlm export (no {MODEL_FILE} or {INFO_FILE}): name its family, "
                         "e.g. family=Blip2 for a Blip2ForConditionalGeneration checkpoint")
    module, _, name = family.rpartition(".")
    cls = getattr(importlib.import_module(module or "mmlm.models"), name, None)
    if not (isinstance(cls, type) and issubclass(cls, MultimodalModule)):
        raise ValueError(f"family {family!r} is not an mmlm model class (e.g. Blip2, Donut, mmlm.models.Frozen)")
    return cls


# ------------------------------------------------------------------------------------------------ images


def image_bytes(image: Image.Image) -> bytes:
    """``image`` as lossless file bytes (PNG, or uncompressed TIFF for modes PNG cannot hold)."""
    out = io.BytesIO()
    image.save(out, format="PNG" if image.mode in PNG_MODES else "TIFF")
    return out.getvalue()


def image_transform(model: MultimodalModule) -> Any:
    """The evaluation transform ``bytes → [3, H, W]`` of the model's datamodule, ``None`` without an image input."""
    preprocess = getattr(model, "image_preprocess", None)
    if preprocess is None:
        return None
    if isinstance(model, DocumentModule):
        return DocumentTransform(size=tuple(preprocess.size), mean=tuple(preprocess.mean), std=tuple(preprocess.std),
                                 align_long_axis=bool(getattr(model, "align_long_axis", False)),
                                 random_padding=False, train=False, interpolation=preprocess.interpolation)
    return ImageTransform.from_preprocess(preprocess, train=False)


def pixels(transform: Any, image: Image.Image, request: int) -> torch.Tensor:
    """One image through ``transform`` → ``[3, H, W]``; ``ValueError`` naming the request when it is unusable."""
    try:
        return transform(image_bytes(image))
    except SkipSample as exn:
        raise ValueError(f"request {request}: image not usable ({exn})") from exn


def first_image(model: MultimodalModule, transform: Any, images: Sequence[Image.Image], request: int) -> torch.Tensor:
    """The request's image for a one-image family ``[3, H, W]`` (a ``[3, 1, 1]`` stand-in without image input).

    Raises:
        ValueError: the model reads an image and the request has none.
    """
    family = type(model).__name__
    if transform is None:
        if images:
            warn_once(f"{family}-no-images", f"{family} has no image input: the requests' images are ignored")
        return torch.zeros(3, 1, 1)
    if not images:
        raise ValueError(f"request {request}: {family} needs an image and the request has none")
    if len(images) > 1:
        warn_once(f"{family}-first-image", f"{family} reads one image per request: requests with several images "
                                           "use their first image only")
    return pixels(transform, images[0], request)


# ------------------------------------------------------------------------------------------------ batches


def build_batch(model: MultimodalModule, prompts: Sequence[str], images: Images,
                continuations: Sequence[str] | None = None, max_text_tokens: int | None = None
                ) -> Batch | SentenceBatch:
    """The evaluation batch of ``B`` requests, as the family's datamodule builds it (see the module docstring).

    Args:
        model: the family's module (its tokenizer, image preprocessing and markers are used).
        prompts: ``B`` prompts (the text the model continues).
        images: ``B`` lists of PIL images.
        continuations: for scoring: ``B`` texts after the prompts, whose tokens alone carry labels (no eos).
        max_text_tokens: cap on prompt tokens of ``Batch`` families (the datamodules' ``max_text_tokens``;
            ``None``: no cap).

    Returns:
        A :class:`Batch` (``pixels [B, 3, H, W]``, left-padded ``prompt_ids [B, P]``) or a :class:`SentenceBatch`
        (KOSMOS-1, PaLM-E: ``images [I, 3, H, W]``, ``prompt_ids`` with their spans).
    """
    if len(prompts) != len(images) or (continuations is not None and len(continuations) != len(prompts)):
        raise ValueError(f"{len(prompts)} prompts, {len(images)} image lists"
                         + ("" if continuations is None else f", {len(continuations)} continuations"))
    limit = UNLIMITED if max_text_tokens is None else max_text_tokens
    if isinstance(model, (Kosmos1, PaLME)):
        samples = [sentence_sample(model, p, list(ims), i, None if continuations is None else continuations[i])
                   for i, (p, ims) in enumerate(zip(prompts, images))]
        return collate_rows([[s] for s in samples], pad_id(model.tokenizer))
    transform = image_transform(model)
    examples = [Example(image=first_image(model, transform, ims, i), prompt=p, target="", references=[], id=i,
                        task="", key=str(i)) for i, (p, ims) in enumerate(zip(prompts, images))]
    if isinstance(model, DocumentModule):
        if continuations is not None:
            raise NotImplementedError(f"{type(model).__name__} does not score continuations")
        return collate_documents(examples, model.tokenizer, limit)
    spec = model.data_spec()
    batch = collate_examples(examples, model.tokenizer, limit, spec.end_token_id)
    batch = batch if continuations is None else with_continuations(batch, model.tokenizer, continuations)
    marker = image_marker(spec.markers)
    return batch if marker is None else to_sentences(batch, marker, model.tokenizer)


def with_continuations(batch: Batch, tokenizer: Any, continuations: Sequence[str]) -> Batch:
    """``batch`` with ``input_ids``/``labels [B, T]`` = each prompt followed by its continuation's tokens (as
    written: no space added, no eos), labels on the continuation only."""
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch.prompt_ids, batch.prompt_mask)]
    tails = token_ids(tokenizer, list(continuations))
    rows = [p + t for p, t in zip(prompts, tails)]
    batch.input_ids = pad_right(rows, pad_id(tokenizer))
    batch.attention_mask = pad_right([[1] * len(r) for r in rows], 0)
    batch.labels = pad_right([[IGNORE_INDEX] * len(p) + t for p, t in zip(prompts, tails)], IGNORE_INDEX)
    return batch


def sentence_sample(model: Kosmos1 | PaLME, prompt: str, images: list[Image.Image], request: int,
                    continuation: str | None) -> SentenceSample:
    """One KOSMOS-1 or PaLM-E request as the datamodule's sample: the prompt sentence (+ the continuation as LM
    targets) and its images ``[K, 3, H, W]``."""
    head, used = (kosmos_prompt(model, prompt, len(images)) if isinstance(model, Kosmos1)
                  else palme_prompt(model, prompt, len(images), request))
    sentence = head
    if continuation is not None:
        markers = [model.image_marker] if isinstance(model, Kosmos1) else model.markers
        sentence = head + SentenceBuilder(model.tokenizer, markers).text(continuation, target=True).build()
    transform = image_transform(model)
    items = {"image": torch.stack([pixels(transform, im, request) for im in images[:used]])} if used else {}
    return SentenceSample(sentence=sentence, items=items, key=str(request), prompt=head, id=request)


def bos_ids(tokenizer: Any) -> list[int]:
    """``[bos]``, or ``[]`` for a tokenizer without one."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def kosmos_prompt(model: Kosmos1, prompt: str, count: int) -> tuple[Sentence, int]:
    """``([bos] spans + " " prompt, images used)``: the interleaved datamodule's VQA/caption prompt layout with one
    ``<image>…</image>`` span per image; a prompt that writes ``<image>`` once per image gets the spans there."""
    marker = model.image_marker
    builder = SentenceBuilder(model.tokenizer, [marker]).ids(bos_ids(model.tokenizer), target=False)
    if count and prompt.count(marker.text) == count:
        return builder.expand(prompt, target=False).build(), count
    for _ in range(count):
        builder.marker(marker)
    return builder.text(" " + prompt if count and prompt else prompt, target=False).build(), count


def palme_prompt(model: PaLME, prompt: str, count: int, request: int) -> tuple[Sentence, int]:
    """``([bos] prompt, images used)`` as the embodied datamodule builds it; ``<img1> … <imgK>`` are put before
    the text when the prompt names no image (``<state>``/``<obj>`` markers are dropped: requests carry images
    only)."""
    if count and not re.search(r"<img\d+>", prompt):
        prompt = " ".join(f"<img{k}>" for k in range(1, count + 1)) + " " + prompt
    text = rewrite_markers(prompt, ("image",), 0)
    used = max((int(k) for k in re.findall(r"<img(\d+)>", text)), default=0)
    if used > count:
        raise ValueError(f"request {request}: the prompt names <img{used}> but the request has {count} image(s)")
    builder = EmbodiedExampleBuilder(model.tokenizer, tuple(model.markers), None, ("image",), UNLIMITED, True,
                              {"state": model.state_dim, "object": model.object_dim})
    return builder.sentences(text, "")[0], used


def to_model(batch: Batch | SentenceBatch, model: MultimodalModule) -> Batch | SentenceBatch:
    """``batch`` on the model's device (as Lightning moves it). When every weight of the model was cast to one
    half-precision dtype (``model.to(torch.bfloat16)``), the pixels too, as Lightning's ``bf16-true`` does; a model
    with per-part dtypes (BLIP-2) gets fp32 pixels, which its encoders cast themselves."""
    batch = move_data_to_device(batch, model.device)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or dtypes == {torch.float32}:
        return batch
    for name in ("pixels", "images"):
        value = getattr(batch, name, None)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(batch, name, value.to(*dtypes))
    return batch


# ----------------------------------------------------------------------------------------------- generation


@contextlib.contextmanager
def decoding(model: MultimodalModule, generation: GenerationConfig | None) -> Iterator[None]:
    """``model.generation = generation`` (when given) and eval mode, no gradients, for the block."""
    saved, mode = model.generation, model.training
    model.generation = generation or saved
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.generation = saved
        model.train(mode)


def generate(model: MultimodalModule, prompts: Sequence[str], images: Images,
             generation: GenerationConfig | None = None, max_text_tokens: int | None = None) -> list[str]:
    """Generated text of ``B`` requests — exactly ``model.generate_text`` on the batch the family's evaluation
    datamodule builds (what ``mmlm validate`` writes as predictions).

    Args:
        model: any generative family (Frozen, BLIP-2, KOSMOS-1, PaLM-E, MetaLM, VLMO VQA, Donut, the text LM).
        prompts: ``B`` prompts as the datamodule's prompt template gives them (e.g. ``"Question: … Answer:"``).
        images: ``B`` lists of PIL images (KOSMOS-1 and PaLM-E take several; other families the first).
        generation: decoding settings for this call (``None``: the model's ``generation``).
        max_text_tokens: cap on prompt tokens of ``Batch`` families (``None``: no cap).

    Returns:
        ``B`` strings (Donut: the generated part with its JSON tags; see :func:`generate_documents`).
    """
    if type(model).generate_text is MultimodalModule.generate_text:
        raise NotImplementedError(f"{type(model).__name__} does not generate text")
    if not prompts:
        return []
    batch = build_batch(model, prompts, images, max_text_tokens=max_text_tokens)
    with decoding(model, generation):
        return model.generate_text(to_model(batch, model))


def generate_documents(model: DocumentModule, prompts: Sequence[str], images: Images,
                       generation: GenerationConfig | None = None) -> list[Any]:
    """Donut: each document's sequence (prompt + generation, decoded together) parsed as validation parses it
    (:func:`mmlm.json_tokens.donut_prediction` with the tokenizer's added vocabulary) → ``B`` JSON values."""
    if not isinstance(model, DocumentModule):
        raise TypeError(f"generate_documents needs a document model (Donut), got {type(model).__name__}")
    if not prompts:
        return []
    batch = build_batch(model, prompts, images)
    with decoding(model, generation):
        sequences = model.generate_sequences(to_model(batch, model))
    vocab = set(model.tokenizer.get_added_vocab())
    return [donut_prediction(sequence, vocab) for sequence in sequences]


# ----------------------------------------------------------------------------------------------- scoring


def scoring_lm(model: MultimodalModule) -> LanguageModel:
    """The language model whose teacher-forced logits score continuations.

    Raises:
        NotImplementedError: the family has no deterministic teacher-forced LM pass over a prompt + continuation
            (BLIP-2 stage 1, VLMO, Donut, MetaLM's random-span pretraining), naming it.
    """
    if not isinstance(model, SCORING_FAMILIES) or isinstance(model, MetaLMPretraining):
        names = ", ".join(cls.__name__ for cls in SCORING_FAMILIES)
        raise NotImplementedError(f"loglikelihood: {type(model).__name__} cannot score a text continuation "
                                  f"(families that can: {names})")
    return model.language_model


@contextlib.contextmanager
def lm_calls(lm: LanguageModel) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(logits [B, T', V], labels [B, T'])`` of every call of ``lm`` inside the block."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    signature = inspect.signature(lm.forward)

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append((output.logits, signature.bind(*args, **kwargs).arguments.get("labels")))

    handle = lm.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def loglikelihood(model: MultimodalModule, contexts: Sequence[str], continuations: Sequence[str],
                  images: Images, mean: bool = False) -> list[tuple[float, bool]]:
    """Per request: the summed log-probability of the continuation's tokens after the context (and images; ``mean``:
    per token), and whether each of them is the most likely token there (the greedy continuation, teacher-forced).

    The family's ``training_loss`` runs on the batch whose labels are the continuation's tokens; the logits and
    labels its language model receives are recorded, so every family keeps its own fusion (prefix, spans,
    docking, encoder-decoder). A causal LM's position ``t`` predicts label ``t + 1``; a seq2seq decoder's position
    ``t`` predicts label ``t``.

    Raises:
        NotImplementedError: the family cannot score text (:func:`scoring_lm`).
        ValueError: nothing precedes a continuation (empty context and no bos), or the LM saw other labels.
    """
    if not contexts:
        return []
    lm = scoring_lm(model)
    batch = build_batch(model, contexts, images, continuations)
    expected = [row[row != IGNORE_INDEX] for row in batch.labels]
    with decoding(model, None), lm_calls(lm) as calls:
        model.training_loss(to_model(batch, model))
    if len(calls) != 1 or calls[0][1] is None:
        raise ValueError(f"{type(model).__name__}.training_loss called its language model {len(calls)} times "
                         "(expected once, with labels)")
    logits, labels = calls[0]
    if not isinstance(lm, HFSeq2SeqLM):
        logits, labels = logits[:, :-1], labels[:, 1:]
    return [row_score(logits[i], labels[i], expected[i].to(labels.device), i, mean) for i in range(len(expected))]


def row_score(logits: torch.Tensor, labels: torch.Tensor, expected: torch.Tensor, request: int,
              mean: bool = False) -> tuple[float, bool]:
    """``(summed log-probability, greedy)`` of ``expected [n]`` (``mean``: the log-probability per token): the last ``n`` labelled positions of ``labels [T]``,
    predicted by ``logits [T, V]`` at the same positions."""
    n = expected.numel()
    if n == 0:
        return 0.0, True
    positions = (labels != IGNORE_INDEX).nonzero().flatten()[-n:]
    if positions.numel() != n or not torch.equal(labels[positions], expected):
        raise ValueError(f"request {request}: the continuation's {n} token(s) are not the last labels the language "
                         "model scores (an empty context without bos leaves the first token unpredicted)")
    logprobs = logits[positions].float().log_softmax(-1)
    chosen = logprobs.gather(-1, expected[:, None]).squeeze(-1)
    return float(chosen.mean() if mean else chosen.sum()), bool((logprobs.argmax(-1) == expected).all())
