"""lmms-eval model ``mmlm``: an exported mmlm model (or a Lightning checkpoint) behind lmms-eval's ``lmms`` API.

::

    python -m lmms_eval --model mmlm --model_args pretrained=exported/ --tasks vqav2_val --batch_size 8

Model arguments (``--model_args key=value,…``): ``pretrained`` (an ``mmlm export`` directory, either format; with
``family=Blip2``/``Donut`` any Hugging Face checkpoint of that family) or ``checkpoint`` (``.ckpt``, with an
optional ``config`` YAML); ``device`` (default ``cuda`` when available), ``batch_size``, ``dtype`` (cast every
weight: ``bfloat16``, ``float16``, ``float32``; default: as saved), ``max_text_tokens`` (cap on prompt tokens of
one-image families; default none) and ``score`` (what ``loglikelihood`` returns, below).

* ``generate_until``: requests with equal generation settings are batched (longest contexts first, left-padded) and
  run through :func:`mmlm.inference.generate` — the inputs the family's evaluation datamodule builds, so the text
  is what ``mmlm validate`` generates. The model's own ``generation`` applies, overridden per request by
  ``max_new_tokens``, ``num_beams``, ``do_sample``, ``temperature``, ``top_p`` and ``top_k`` (``temperature: 0``
  or ``do_sample: false`` is greedy); the text is cut at the first of the ``until`` strings. KOSMOS-1 and PaLM-E
  take every image of a request, the other families the first. VLMO VQA answers by classification. Donut: a
  context that starts with a task token (``<s_cord-v2>``…) is the prompt as it is, any other context is a DocVQA
  question (``<s_docvqa><s_question>…</s_question><s_answer>``); the answer is the parsed ``answer`` (DocVQA) or
  the parsed JSON as a string.
* ``loglikelihood``: the continuation's summed log-probability after the context and whether it is the greedy
  continuation (:func:`mmlm.inference.loglikelihood`), for Frozen, BLIP-2, KOSMOS-1, PaLM-E, MetaLM and the text LM.
  What it returns follows lmms-eval's own models (``llava``, ``llava_hf``: the mean cross-entropy of the
  continuation's tokens, lower is better), because lmms-eval 0.7.3's ``multiple_choice`` scoring picks the
  *smallest* value: ``score=loss`` (default). ``score=nll`` gives the summed negative log-probability and
  ``score=logprob`` lm-evaluation-harness's summed log-probability (higher is better; not for lmms-eval's argmin).
* ``generate_until_multi_round`` and video/audio inputs are refused, naming what is missing; so is a data-parallel
  launch (``accelerate launch`` with several processes).

Shape legend: none (strings and PIL images in, strings and floats out).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from mmlm.freezing import parse_dtype
from mmlm.inference import generate, generate_documents, load_model, loglikelihood, warn_once
from mmlm.json_tokens import TASK_TOKENS, VQA_PROMPT_END, task_sequence
from mmlm.language.base import GenerationConfig
from mmlm.metrics.documents import answer_text
from mmlm.models.base import MultimodalModule
from mmlm.models.documents import DocumentModule

#: What ``loglikelihood`` returns per request: ``loss`` (mean negative log-probability per continuation token, as
#: lmms-eval's own models return), ``nll`` (summed) or ``logprob`` (summed log-probability, higher is better).
SCORES = ("loss", "nll", "logprob")
#: The DocVQA prompt a plain question becomes for Donut.
DOCVQA_TOKEN = TASK_TOKENS["vqa"]


# --------------------------------------------------------------------------------------- request helpers


def as_bool(value: Any) -> bool:
    """``True``/``"true"``/``1`` → ``True`` (lmms-eval passes settings parsed from strings)."""
    return value.strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


def generation_settings(base: GenerationConfig, kwargs: dict[str, Any]) -> GenerationConfig:
    """``base`` (the model's decoding settings) with a request's ``generation_kwargs`` applied.

    ``do_sample`` (or, without it, ``temperature > 0``) chooses sampling; greedy decoding drops the sampling
    settings (lmms-eval tasks send ``temperature: 0``, ``top_p: 1.0`` with greedy). Neither given: ``base``'s
    sampling settings stay. Settings mmlm does not have (``image_aspect_ratio``…) are ignored.
    """
    changes = {name: int(kwargs[name]) for name in ("max_new_tokens", "num_beams") if kwargs.get(name) is not None}
    temperature = None if kwargs.get("temperature") is None else float(kwargs["temperature"])
    sample = kwargs.get("do_sample")
    if sample is None and temperature is not None:
        sample = temperature > 0
    if sample is None:
        return replace(base, **changes)
    if not as_bool(sample):
        return replace(base, **changes, do_sample=False, temperature=1.0, top_k=0, top_p=1.0)
    changes["do_sample"] = True
    if temperature is not None and temperature > 0:
        changes["temperature"] = temperature
    if kwargs.get("top_p") is not None:
        changes["top_p"] = float(kwargs["top_p"])
    if kwargs.get("top_k") is not None:
        changes["top_k"] = int(kwargs["top_k"])
    return replace(base, **changes)


def stop_strings(kwargs: dict[str, Any]) -> list[str]:
    """The request's ``until`` as a list of non-empty strings."""
    until = kwargs.get("until") or []
    return [s for s in ([until] if isinstance(until, str) else until) if s]


def cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``stops``."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


def flat_images(visuals: Any, request: int) -> list[Image.Image]:
    """A request's ``doc_to_visual`` output (``None``, an image or nested lists) as a flat list of PIL images.

    Raises:
        NotImplementedError: a visual that is not an image (a video path, an audio dict).
    """
    if visuals is None:
        return []
    if isinstance(visuals, Image.Image):
        return [visuals]
    if isinstance(visuals, (list, tuple)):
        return [image for item in visuals for image in flat_images(item, request)]
    raise NotImplementedError(f"request {request}: mmlm models take images; got a {type(visuals).__name__} visual "
                              f"({str(visuals)[:80]!r}: video and audio are not supported)")


def document_prompt(model: DocumentModule, context: str) -> tuple[str, bool]:
    """Donut's prompt for an lmms-eval context and whether it is a DocVQA question: a context that starts with a
    task token is the prompt as given; any other is a question in the DocVQA prompt (the datamodule's layout).

    Raises:
        ValueError: the model has no DocVQA tokens for a plain question.
    """
    text = context.strip()
    if text.startswith("<s_"):
        return text, text.endswith(VQA_PROMPT_END)
    prompt = task_sequence({"question": text, "answer": ""}, DOCVQA_TOKEN, VQA_PROMPT_END)[0]
    vocab = model.tokenizer.get_vocab()
    missing = [t for t in (DOCVQA_TOKEN, "<s_question>", "</s_question>", VQA_PROMPT_END) if t not in vocab]
    if missing:
        raise ValueError(f"{type(model).__name__} has no {missing} tokens, so it cannot read a plain question as a "
                         f"DocVQA prompt: write the task prompt as the context (e.g. '<s_cord-v2>')")
    return prompt, True


def document_answer(parsed: Any, question: bool) -> str:
    """The lmms-eval answer of a parsed Donut prediction: the ``answer`` of a DocVQA parse, else the JSON."""
    return answer_text(parsed) if question else json.dumps(parsed, ensure_ascii=False)


def batches(keys: Sequence[str], lengths: Sequence[int], size: int) -> Iterator[list[int]]:
    """Request indices in batches of at most ``size``: equal ``keys`` together, longest first within a key."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        members.sort(key=lambda i: -lengths[i])
        for start in range(0, len(members), size):
            yield members[start:start + size]


def settings_key(kwargs: dict[str, Any]) -> str:
    """A hashable form of a request's generation settings (requests with equal settings share batches)."""
    return json.dumps(kwargs, sort_keys=True, default=str)


def launched_processes() -> int:
    """Processes of the launch (``WORLD_SIZE`` of ``accelerate launch`` / ``torchrun``; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ------------------------------------------------------------------------------------------------ the model


class MMLM(lmms):
    """lmms-eval's ``mmlm`` model (see the module docstring for the arguments and what is supported).

    Args:
        pretrained: an exported model directory (``mmlm export``), or with ``family`` a Hugging Face checkpoint.
        checkpoint: a Lightning checkpoint (``.ckpt``) instead of ``pretrained``.
        config: the YAML config that builds the checkpoint's module (default: the config it records).
        family: the family class name (``Blip2``, ``Donut``…) for a directory that is not an mmlm export.
        device: torch device (default ``cuda`` when available, else ``cpu``).
        batch_size: requests per forward pass.
        dtype: cast every weight to it (``bfloat16``, ``float16``, ``float32``; ``None``/``auto``: as saved).
        max_text_tokens: cap on prompt tokens of one-image families (``None``: no cap).
        score: ``loglikelihood``'s value — ``loss`` (mean negative log-probability per continuation token, as
            lmms-eval's ``llava`` returns; its ``multiple_choice`` picks the smallest), ``nll`` (summed) or
            ``logprob`` (summed log-probability, higher is better).
        max_batch_size: accepted from lmms-eval's command line; the batch size is ``batch_size``.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, checkpoint: str | None = None, config: str | None = None,
                 family: str | None = None, device: str | None = None, batch_size: int | str = 1,
                 dtype: str | None = None, max_text_tokens: int | None = None, score: str = "loss",
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if launched_processes() > 1:
            raise NotImplementedError("mmlm's lmms-eval model runs in one process (WORLD_SIZE > 1 found): "
                                      "data-parallel evaluation is not supported; launch python -m lmms_eval")
        if not str(batch_size).strip().isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive number (automatic sizes are not supported)")
        if score not in SCORES:
            raise ValueError(f"score={score!r} is not one of {SCORES}")
        self.batch_size, self.score, self.max_text_tokens = int(batch_size), score, max_text_tokens
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self._load(pretrained, checkpoint, config, family, dtype)

    def _load(self, pretrained: str | None, checkpoint: str | None, config: str | None, family: str | None,
              dtype: str | None) -> MultimodalModule:
        """The model on the device, in eval mode, cast to ``dtype`` (few-shot prompts are the task's: ``num_fewshot``;
        the datamodule's in-batch ``eval_shots`` plays no part here)."""
        model = load_model(pretrained, checkpoint, config, family).to(self._device)
        cast = parse_dtype(None if dtype in (None, "auto") else dtype)
        if cast is not None:
            model = model.to(cast)
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self._device

    # --- requests ----------------------------------------------------------------------------------------
    def _doc(self, request: Instance) -> Any:
        """The document a request was built from (``args[3:6]`` = doc id, task, split)."""
        doc_id, task, split = request.args[3:6]
        return self.task_dict[task][split][doc_id]

    def _images(self, request: Instance, index: int) -> list[Image.Image]:
        """The request's images (its task's ``doc_to_visual`` on its document)."""
        to_visual = request.args[2]
        return flat_images(to_visual(self._doc(request)) if to_visual is not None else None, index)

    # --- generate_until ------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Generated text per request, cut at its ``until`` strings (see the module docstring)."""
        outputs = [""] * len(requests)
        keys = [settings_key(r.args[1] or {}) for r in requests]
        chunks = list(batches(keys, [len(r.args[0]) for r in requests], self.batch_size))
        for chunk in tqdm(chunks, desc="mmlm generating", disable=self.rank != 0):
            for i, text in zip(chunk, self._generate([requests[i] for i in chunk], chunk)):
                outputs[i] = text
        return outputs

    def _generate(self, requests: list[Instance], indices: list[int]) -> list[str]:
        """One batch of requests that share their generation settings."""
        kwargs = dict(requests[0].args[1] or {})
        settings = generation_settings(self.model.generation, kwargs)
        contexts = [r.args[0] for r in requests]
        images = [self._images(r, i) for r, i in zip(requests, indices)]
        if isinstance(self.model, DocumentModule):
            prompts = [document_prompt(self.model, c) for c in contexts]
            parsed = generate_documents(self.model, [p for p, _ in prompts], images, settings)
            texts = [document_answer(p, question) for p, (_, question) in zip(parsed, prompts)]
        else:
            texts = generate(self.model, contexts, images, settings, self.max_text_tokens)
        return [cut(text, stop_strings(kwargs)) for text in texts]

    # --- loglikelihood -------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request ``(score, greedy)``: the continuation's mean negative log-probability per token after the
        context and images (``score=nll``: summed; ``logprob``: summed log-probability), and whether it is the
        greedy continuation."""
        self._warn_multiple_choice(requests)
        continuations = [self._continuation(r) for r in requests]
        lengths = [len(r.args[0]) + len(c) for r, c in zip(requests, continuations)]
        outputs: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        chunks = list(batches([""] * len(requests), lengths, self.batch_size))
        for chunk in tqdm(chunks, desc="mmlm scoring", disable=self.rank != 0):
            scored = loglikelihood(self.model, [requests[i].args[0] for i in chunk], [continuations[i] for i in chunk],
                                   [self._images(requests[i], i) for i in chunk], mean=self.score == "loss")
            for i, (logprob, greedy) in zip(chunk, scored):
                outputs[i] = (logprob if self.score == "logprob" else -logprob, greedy)
        return outputs

    def _continuation(self, request: Instance) -> str:
        """The text to score: ``args[1]``, or the task's ``doc_to_target`` applied to the document."""
        target = request.args[1]
        return str(target(self._doc(request)) if callable(target) else target)

    def _warn_multiple_choice(self, requests: list[Instance]) -> None:
        """Several requests of one document are a ``multiple_choice`` task, which 0.7.3 scores with argmin."""
        docs = [(r.args[4], r.args[3]) for r in requests]
        if self.score == "logprob" and len(set(docs)) < len(docs):
            warn_once("multiple_choice", "several loglikelihood requests per document (a multiple_choice task): "
                                         "lmms-eval 0.7.3 picks the choice with the smallest value, but score=logprob "
                                         "returns log-probabilities (higher is better); use score=loss")

    # --- refused -------------------------------------------------------------------------------------------
    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("mmlm does not support generate_until_multi_round (multi-round chat): its models "
                                  "take one prompt per request")
