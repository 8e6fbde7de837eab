"""``mmlm report RUN_DIR``: one self-contained HTML page of a run (written also at the end of ``validate``/``test``).

What it reads, all under the run's log dir (``<default_root_dir>/lightning_logs/version_N``; RUN_DIR may be that
folder or any folder above it, the newest log dir below it is taken):

* ``metrics.csv`` (Lightning's CSV logger): the final ``{stage}/…`` values and one curve per column (loss, lr, each
  metric). A ``validate``/``test`` run records no training: its curves come from the log dir of the checkpoint it
  evaluated (``ckpt_path`` in its ``config.yaml``);
* ``predictions/{stage}-{task}-step{N}…`` (:mod:`mmlm.evaluation`): VQA/GQA/caption/plan predictions, the
  ``.accuracy.json`` per-type breakdown, ``.scores.json``, Donut's ``documents.jsonl``, retrieval recall and the
  top texts retrieved per image (``retrieval-step{N}.top.json``);
* ``config.yaml``: the data sources of the stage, whose shards are read again for the images, questions and
  references of the shown examples (at most ``max_examples``; the shards are found relative to the current directory
  or any folder above the run).

The page (``<log dir>/report.html`` unless ``--out``) holds a metrics table with per-type breakdowns, the curves as
inline SVG, and a gallery of examples — image, prompt, prediction, references, verdict — filterable by verdict and
type; Donut predictions are shown beside their ground truth with field differences marked. Images are embedded as
``data:`` URIs (thumbnails); the page loads nothing. ``--load-model`` adds what the evaluated checkpoint tells of the
first examples: BLIP-2's attention per query, Donut's per-field confidence (:func:`add_model_views`). See
``docs/report.md``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmlm.app.report_page import GalleryRow, Page, Section, charts, esc, gallery, json_diff, page, table

#: What the gallery shows at most (examples re-read from the shards).
DEFAULT_MAX_EXAMPLES = 200
#: Longest side of an embedded image, in pixels (documents: :data:`DOCUMENT_SIDE`).
THUMBNAIL_SIDE = 256
DOCUMENT_SIDE = 720
#: Examples that get model views with ``--load-model`` (each one a pass of the model).
MAX_MODEL_EXAMPLES = 24
#: Unigram F1 from which a caption that matches no reference counts as ``partial`` (:func:`caption_score`).
CAPTION_PARTIAL = 0.5
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
RESULT_NAME = re.compile(r"(?P<stage>val|test|predict)-(?P<task>.+?)-step(?P<step>\d+)(?P<suffix>(\.[a-z]+)*)")
#: Prediction files per task: the file suffix and the id field of its rows.
PREDICTION_SUFFIX = {"documents": ".jsonl"}


@dataclass(frozen=True)
class ResultFile:
    """One file of ``predictions/``: ``{stage}-{task}-step{step}{suffix}`` (``suffix`` ``.json``, ``.accuracy.json``,
    ``.jsonl``, ``""`` for a folder …)."""

    stage: str
    task: str
    step: int
    suffix: str
    path: Path


def find_log_dir(run_dir: str | Path) -> Path:
    """The log dir of ``run_dir``: itself when it holds ``metrics.csv``, ``predictions/`` or ``config.yaml``, else
    the most recently modified such folder below it.

    Raises:
        FileNotFoundError: none, naming ``run_dir``.
    """
    root = Path(run_dir)
    markers = ("metrics.csv", "predictions", "config.yaml")
    if any((root / m).exists() for m in markers):
        return root
    found = {p.parent for m in markers for p in root.rglob(m)} if root.is_dir() else set()
    if not found:
        raise FileNotFoundError(f"{run_dir}: no run found (no metrics.csv, predictions/ or config.yaml in it or below)")
    return max(found, key=lambda p: max((p / m).stat().st_mtime for m in markers if (p / m).exists()))


def result_files(log_dir: Path) -> list[ResultFile]:
    """Every ``predictions/{stage}-{task}-step{N}…`` entry of ``log_dir``."""
    folder = log_dir / "predictions"
    matches = [(RESULT_NAME.fullmatch(p.name), p) for p in sorted(folder.iterdir())] if folder.is_dir() else []
    return [ResultFile(m["stage"], m["task"], int(m["step"]), m["suffix"], p) for m, p in matches if m]


def latest(files: Sequence[ResultFile], stage: str | None) -> tuple[str, int] | None:
    """``(stage, step)`` to show: the given stage (else that of the newest file) at its highest step; ``None``
    when there is no file of it."""
    if stage is None and files:
        stage = max(files, key=lambda f: f.path.stat().st_mtime).stage
    steps = [f.step for f in files if f.stage == stage]
    return (stage, max(steps)) if steps else None


def read_metrics_csv(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``column → [(step, value)]`` of a CSV logger's ``metrics.csv`` (empty cells skipped; ``epoch``/``step`` are
    the x axis, not curves)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = float(row.get("step") or 0)
            for name, value in row.items():
                if name not in ("epoch", "step") and value not in ("", None):
                    try:
                        curves.setdefault(name, []).append((step, float(value)))
                    except ValueError:
                        continue
    return curves


def training_metrics(log_dir: Path, config: dict[str, Any]) -> Path | None:
    """The ``metrics.csv`` with the training curves: ``log_dir``'s when it has ``train/`` columns, else the one
    nearest above the evaluated checkpoint (``ckpt_path`` of ``config``), else ``log_dir``'s if any."""
    own = log_dir / "metrics.csv"
    if own.is_file() and any(c.startswith("train/") for c in own.open().readline().split(",")):
        return own
    ckpt = config.get("ckpt_path")
    for parent in Path(ckpt).resolve().parents if isinstance(ckpt, str) else []:
        if (parent / "metrics.csv").is_file():
            return parent / "metrics.csv"
    return own if own.is_file() else None


def ordered_curves(curves: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """Losses first, then learning rates, then the rest, each group by name."""
    def rank(name: str) -> tuple[int, str]:
        return (0 if "loss" in name else 1 if name.endswith("/lr") or "lr-" in name else 2, name)
    return {name: curves[name] for name in sorted(curves, key=rank)}


# --------------------------------------------------------------------------- shards of the evaluated stage


@dataclass(frozen=True)
class ShardSet:
    """The shards of one data source: expanded local paths and the source's ``kind`` (``None``: not stated)."""

    urls: tuple[str, ...]
    kind: str | None


def stage_sources(config: dict[str, Any], stage: str) -> list[tuple[str, str | None]]:
    """``(pattern, kind)`` of every data source of ``stage`` in a saved LightningCLI config: ``data.init_args``
    entries named ``{stage}`` or ``{stage}_…`` (``val``, ``val_urls``, ``val_path``), as a pattern, a list of
    patterns or a list of ``{urls, kind}``."""
    args = ((config.get("data") or {}).get("init_args") or {})
    prefix = "validation" if stage == "val" else stage
    found: list[tuple[str, str | None]] = []
    for name, value in args.items():
        if name != stage and not name.startswith((f"{stage}_", f"{prefix}_")):
            continue
        for entry in value if isinstance(value, list) else [value]:
            if isinstance(entry, dict) and isinstance(entry.get("urls"), str) and not entry.get("format"):
                found.append((entry["urls"], entry.get("kind")))
            elif isinstance(entry, str):
                found.append((entry, None))
    return found


def expand_local(pattern: str, bases: Sequence[Path]) -> tuple[str, ...]:
    """The shard files of ``pattern`` (glob, brace pattern or a folder of ``*.tar``), tried as given and then
    relative to each of ``bases``; ``()`` when none exists there."""
    from datamodules.pipeline.urls import expand_urls

    candidates = [Path(pattern)] if Path(pattern).is_absolute() else [base / pattern for base in bases]
    for candidate in candidates:
        if candidate.is_dir():
            shards = sorted(str(p) for p in candidate.glob("*.tar"))
        else:
            try:
                shards = expand_urls(str(candidate))
            except (FileNotFoundError, ValueError):
                continue
        if shards and Path(shards[0]).is_file():
            return tuple(shards)
    return ()


def samples(shards: ShardSet) -> Iterator[dict[str, Any]]:
    """The raw samples of ``shards`` in order (``__key__`` and one bytes value per extension)."""
    import webdataset as wds

    yield from wds.WebDataset(list(shards.urls), shardshuffle=False, empty_check=False)


def sample_json(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's ``json`` member as a dict (``{}`` when absent or not an object)."""
    try:
        meta = json.loads(sample.get("json") or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def find_samples(shard_sets: Sequence[ShardSet], wanted: set[str], id_fields: tuple[str, ...],
                 kinds: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """The samples whose ``json[f]`` for a field ``f`` of ``id_fields``, or ``__key__``, is in ``wanted``, from the
    shard sets of ``kinds`` (``None``: any; a set without a kind always counts); stops when all are found."""
    found: dict[str, dict[str, Any]] = {}
    for shards in shard_sets:
        if kinds is not None and shards.kind is not None and shards.kind not in kinds:
            continue
        for sample in samples(shards):
            meta = sample_json(sample)
            for key in [str(meta[f]) for f in id_fields if f in meta] + [str(sample["__key__"])]:
                if key in wanted and key not in found:
                    found[key] = sample | {"meta": meta}
            if len(found) == len(wanted):
                return found
    return found


def image_of(sample: dict[str, Any] | None) -> bytes | None:
    """The encoded bytes of the sample's first image member (``jpg``, ``png``, ``img1.png`` …), ``None`` if none."""
    return next((v for k, v in sorted((sample or {}).items()) if k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
                 and isinstance(v, bytes) and v), None)


def thumbnail(sample: dict[str, Any] | None, side: int) -> str:
    """The sample's image (its first member named ``*.jpg``/``png``/…) as a ``data:`` URI (JPEG, or PNG with
    transparency), longest side at most ``side``; ``""`` when it has none or it does not decode."""
    from PIL import Image, UnidentifiedImageError

    data = image_of(sample)
    if data is None:
        return ""
    try:
        image = Image.open(io.BytesIO(data))
        image.thumbnail((side, side))
        fmt = "PNG" if image.mode in ("RGBA", "LA", "P") else "JPEG"
        out = io.BytesIO()
        image.convert("RGBA" if fmt == "PNG" else "RGB").save(out, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    except (UnidentifiedImageError, OSError, ValueError):
        return ""
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(out.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- gallery rows per task


def verdict(score: float | None, partial_from: float = 0.0) -> str:
    """``right`` (score 1), ``partial`` (``partial_from`` < score < 1, or any score above 0 by default), ``wrong``
    or ``unscored`` (``None``)."""
    if score is None:
        return "unscored"
    return "right" if score >= 1.0 - 1e-9 else "partial" if score > max(partial_from, 0.0) else "wrong"


def text_list(values: Sequence[str]) -> str:
    """Reference strings as HTML, repeated ones counted (``red ×7``)."""
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return "<br>".join(esc(v) + (f" ×{n}" if n > 1 else "") for v, n in counts.items()) or '<span class="note">—</span>'


def caption_score(prediction: str, references: Sequence[str]) -> float | None:
    """1 when the caption equals a reference (VQA answer processing), else the best unigram F1 with one (below 1;
    a verdict of ``partial`` from :data:`CAPTION_PARTIAL`)."""
    from mmlm.metrics.vqa import normalize_answer

    if not references:
        return None
    words = normalize_answer(prediction).split()
    best = 0.0
    for reference in references:
        if normalize_answer(reference) == normalize_answer(prediction):
            return 1.0
        ref = normalize_answer(reference).split()
        common = sum(min(words.count(w), ref.count(w)) for w in set(words))
        best = max(best, 2 * common / (len(words) + len(ref)) if common else 0.0)
    return min(best, 0.99)


@dataclass(frozen=True)
class Example:
    """One prediction joined with its sample: what a task's row builder needs."""

    id: str
    record: dict[str, Any]
    sample: dict[str, Any] | None
    prompt: str = ""

    @property
    def meta(self) -> dict[str, Any]:
        return (self.sample or {}).get("meta", {})


def vqa_row(example: Example) -> GalleryRow:
    """A VQA prediction scored by VQAv2's ``vqaEval.py`` against the sample's human answers."""
    from mmlm.metrics.vqa import vqa_accuracy

    answers = [a.get("answer") if isinstance(a, dict) else a for a in example.meta.get("answers", [])]
    answers = [str(a) for a in answers if a]
    prediction = str(example.record.get("answer", ""))
    score = vqa_accuracy(prediction, answers) if len(answers) > 1 else None
    qtype = str(example.meta.get("question_type") or "")
    return GalleryRow(example.id, f"vqa · {qtype}" if qtype else "vqa", verdict(score), thumbnail(example.sample,
                      THUMBNAIL_SIDE), str(example.meta.get("question", "")), esc(prediction), text_list(answers), score)


def gqa_row(example: Example) -> GalleryRow:
    """A GQA prediction: right when its processed answer equals the ground truth (LAVIS)."""
    from mmlm.metrics.vqa import normalize_answer

    answer = example.meta.get("answer") or next(iter(example.meta.get("answers") or []), None)
    prediction = str(example.record.get("prediction", ""))
    score = None if answer is None else float(normalize_answer(prediction) == str(answer))
    return GalleryRow(example.id, "gqa", verdict(score), thumbnail(example.sample, THUMBNAIL_SIDE),
                      str(example.meta.get("question", "")), esc(prediction), text_list([str(answer or "")]), score)


def caption_row(example: Example) -> GalleryRow:
    """A caption beside the image's reference captions (:func:`caption_score`)."""
    meta = example.meta
    captions = meta.get("captions") or meta.get("caption") or []
    references = [str(c) for c in (captions if isinstance(captions, list) else [captions])]
    if not references and example.sample and example.sample.get("txt"):
        references = [example.sample["txt"].decode("utf-8", "replace")]
    prediction = str(example.record.get("caption", ""))
    score = caption_score(prediction, references)
    return GalleryRow(example.id, "caption", verdict(score, CAPTION_PARTIAL), thumbnail(example.sample, THUMBNAIL_SIDE),
                      example.prompt, esc(prediction), text_list(references), score)


def plan_row(example: Example) -> GalleryRow:
    """A PaLM-E plan: right on exact match of the parsed plan, partial by per-step accuracy."""
    from mmlm.metrics.plans import parse_plan, step_accuracy

    plan, reference = str(example.record.get("plan", "")), str(example.record.get("reference", ""))
    score = step_accuracy(parse_plan(plan), parse_plan(reference)) if reference else None
    return GalleryRow(example.id, "plan", verdict(score), thumbnail(example.sample, THUMBNAIL_SIDE),
                      str(example.meta.get("instruction", example.meta.get("question", ""))), esc(plan),
                      text_list([reference] if reference else []), score)


def confidence_notes(record: dict[str, Any]) -> dict[str, str]:
    """``path → "p̄ 0.93 · min 0.41"`` from a Donut row's ``confidence`` (per-field token probabilities), if any."""
    fields = record.get("confidence") or {}
    return {path: f"p̄ {c['mean']:.2f} · min {c['min']:.2f}" for path, c in fields.items()
            if isinstance(c, dict) and {"mean", "min"} <= set(c)}


def document_row(example: Example) -> GalleryRow:
    """A Donut prediction beside its first ground-truth parse, fields marked; scored by TED accuracy
    (DocVQA: ANLS)."""
    from mmlm.metrics.documents import answer_text, reference_answers, score_answer, score_document

    record = example.record
    prediction, references = record.get("prediction", {}), record.get("references") or []
    task = str(record.get("task") or "documents")
    if not references:
        score = None
    elif task == "docvqa":
        score = score_answer(answer_text(prediction), reference_answers(references))["anls"]
    else:
        score = score_document(prediction, references).ted_accuracy
    predicted, truth = json_diff(prediction, references[0] if references else {}, confidence_notes(record))
    return GalleryRow(example.id, task, verdict(score), thumbnail(example.sample, DOCUMENT_SIDE), "", predicted,
                      truth if references else '<span class="note">—</span>', score, document=True)


def retrieval_row(example: Example) -> GalleryRow:
    """An image and the texts retrieval ranked first for it (``retrieval-step{N}.top.json``), its own captions marked
    ✓; scored by the reciprocal rank of the first of them (right when it is first, wrong when none is listed)."""
    record = example.record
    texts = [t for t in record.get("texts") or [] if isinstance(t, dict)]
    ranks = [rank for rank, t in enumerate(texts, 1) if t.get("match")]
    score = 1.0 / ranks[0] if ranks else 0.0 if texts else None
    marked = ('<li class="f-same">✓ ', "<li>")
    items = "".join(f'{marked[not t.get("match")]}{esc(t.get("text", ""))} <span class="conf">'
                    f'{float(t.get("score", float("nan"))):.3f}</span></li>' for t in texts)
    return GalleryRow(example.id, "retrieval", verdict(score), thumbnail(example.sample, THUMBNAIL_SIDE),
                      f"top {len(texts)} texts", f'<ol class="ranked">{items}</ol>',
                      text_list([str(c) for c in record.get("captions") or []]), score)


@dataclass(frozen=True)
class TaskRows:
    """How one task's predictions become gallery rows: the file suffix, the id field of its rows, the fields of
    the samples' JSON that may hold that id (else the sample key), the source kinds holding its samples, the
    row builder, and (``records``) the list of rows inside a file that is a JSON object."""

    suffix: str
    row_id: str
    sample_ids: tuple[str, ...]
    kinds: tuple[str, ...] | None
    build: Callable[[Example], GalleryRow]
    records: str | None = None


TASKS: dict[str, TaskRows] = {
    "vqa": TaskRows(".json", "question_id", ("question_id", "id"), ("vqa",), vqa_row),
    "gqa": TaskRows(".json", "questionId", ("question_id", "questionId", "id"), ("gqa",), gqa_row),
    "caption": TaskRows(".json", "image_id", ("image_id", "id"), ("caption",), caption_row),
    "plan": TaskRows(".json", "id", ("id",), None, plan_row),
    "documents": TaskRows(".jsonl", "key", (), None, document_row),
    "retrieval": TaskRows(".top.json", "id", ("image_id", "id"), ("caption",), retrieval_row, records="images"),
}


def read_records(path: Path, records: str | None = None) -> list[dict[str, Any]]:
    """The rows of a predictions ``.json`` (a list, or with ``records`` the list under that key of an object) or
    ``.jsonl`` file."""
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    if records is not None:
        rows = rows.get(records) if isinstance(rows, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def task_examples(files: Sequence[ResultFile], stage: str, step: int, max_examples: int) -> dict[str, list[dict]]:
    """Up to ``max_examples`` prediction rows in all, shared evenly by the tasks with a predictions file."""
    present = {f.task: f for f in files if f.stage == stage and f.step == step and f.task in TASKS
               and f.suffix == TASKS[f.task].suffix}
    share = max_examples // max(len(present), 1)
    return {task: read_records(f.path, TASKS[task].records)[:share] for task, f in sorted(present.items())}


def gallery_rows(records: dict[str, list[dict]], shard_sets: Sequence[ShardSet],
                 prompts: dict[str, str] | None = None) -> list[tuple[GalleryRow, Example]]:
    """Each task's rows joined with their samples (found in ``shard_sets``) and built into gallery rows, each with
    its example; ``prompts``: a prompt per task where the samples do not carry one (the caption prompt)."""
    rows: list[tuple[GalleryRow, Example]] = []
    for task, task_records in records.items():
        spec = TASKS[task]
        ids = [str(r.get(spec.row_id, r.get("id", ""))) for r in task_records]
        found = find_samples(shard_sets, set(ids), spec.sample_ids, spec.kinds)
        shown = [str(r.get("id", i)) if task == "documents" else i for i, r in zip(ids, task_records)]
        examples = [Example(s, r, found.get(i), (prompts or {}).get(task, "")) for s, i, r in zip(shown, ids,
                                                                                                  task_records)]
        rows += [(spec.build(e), e) for e in examples]
    return rows


# --------------------------------------------------------------------------- metrics tables


def final_metrics(curves: dict[str, list[tuple[float, float]]], stage: str) -> list[tuple[str, float]]:
    """The last logged value of each ``{stage}/…`` column."""
    return [(name, max(points)[1] if points else float("nan")) for name, points in sorted(curves.items())
            if name.startswith(f"{stage}/") and points]


def breakdown_tables(files: Sequence[ResultFile], stage: str, step: int) -> str:
    """The scores files of ``stage``/``step``: VQA's per question type and answer type (``.accuracy.json``, in
    percent), captions' and documents' ``.scores.json``, retrieval recall."""
    parts = []
    for f in files:
        if f.stage != stage or f.step != step:
            continue
        scores = f.suffix in (".accuracy.json", ".scores.json") or (f.task == "retrieval" and f.suffix == ".json")
        data = json.loads(f.path.read_text()) if scores else None
        if f.suffix == ".accuracy.json" and isinstance(data, dict):
            parts.append(table(["", "accuracy (%)"], [["overall", data.get("overall", float("nan"))]],
                               f"{f.task}: overall (VQAv2 scorer)"))
            for group in ("perQuestionType", "perAnswerType"):
                rows = [[k or "(none)", v] for k, v in (data.get(group) or {}).items()]
                parts.append(table(["type", "accuracy (%)"], rows, f"{f.task}: {group}") if rows else "")
        elif isinstance(data, dict):
            parts.append(table(["metric", "value"], list(data.items()), f"{f.task}: {f.path.name}"))
    return "".join(parts)


def gallery_breakdown(rows: Sequence[GalleryRow]) -> str:
    """Examples shown, mean score and verdict counts per type."""
    types: dict[str, list[GalleryRow]] = {}
    for row in rows:
        types.setdefault(row.type, []).append(row)
    table_rows = []
    for name, group in sorted(types.items()):
        scores = [r.score for r in group if r.score is not None]
        counts = [sum(r.verdict == v for r in group) for v in ("right", "partial", "wrong")]
        table_rows.append([name, len(group), sum(scores) / len(scores) if scores else "—", *counts])
    return table(["type", "examples", "mean score", "right", "partial", "wrong"], table_rows,
                 "shown examples by type")


# --------------------------------------------------------------------------- the report


def read_config(log_dir: Path) -> dict[str, Any]:
    """The run's saved ``config.yaml`` (``{}`` when absent)."""
    path = log_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def search_bases(log_dir: Path) -> list[Path]:
    """Where relative shard paths of the config may start: the current directory, then every folder above the run."""
    return [Path.cwd(), *log_dir.resolve().parents]


def run_prompts(config: dict[str, Any]) -> dict[str, str]:
    """The run's prompt per task (``caption_prompt``; ``vqa_prompt``, a template) where its data config sets them."""
    data = (config.get("data") or {}).get("init_args") or {}
    names = {"caption": "caption_prompt", "vqa": "vqa_prompt", "gqa": "vqa_prompt"}
    return {task: data[key] for task, key in names.items() if isinstance(data.get(key), str)}


def instruction_of(example: Example) -> str:
    """The prompt the model read for ``example``: its task's prompt, with a VQA template filled with the question."""
    from datamodules.image_text import fill_prompt

    question = example.meta.get("question")
    return fill_prompt(example.prompt, example.meta, str(question)) if question is not None else example.prompt


def add_model_views(report: Page, rows: list[tuple[GalleryRow, Example]], log_dir: Path,
                    config: dict[str, Any]) -> list[GalleryRow]:
    """What only the run's model can tell about the first :data:`MAX_MODEL_EXAMPLES` examples: BLIP-2's Q-Former
    attention per query under the image (:mod:`mmlm.app.report_attention`), Donut's per-field confidence
    (:mod:`mmlm.app.report_confidence`); the rows, rebuilt where they changed. The checkpoint is the evaluated one."""
    from mmlm.app.report_attention import QueryAttention, evaluated_checkpoint
    from mmlm.app.report_confidence import DocumentConfidence
    from mmlm.models.exported import load_checkpoint

    ckpt = evaluated_checkpoint(log_dir, config)
    model = None if ckpt is None else load_checkpoint(ckpt)
    drawn = [(row, example, image) for row, example in rows if (image := image_of(example.sample))]
    drawn = drawn[:MAX_MODEL_EXAMPLES]
    if model is not None and hasattr(model, "qformer"):
        attention = QueryAttention(model)
        for row, example, image in drawn:
            row.extra = attention.overlays(image, instruction_of(example))
        report.subtitle.append(f"attention maps: Q-Former cross-attention per query under {len(drawn)} images")
    elif model is not None and hasattr(model, "token_probabilities"):
        confidence = DocumentConfidence(model)
        pictures = {}
        for _, example, image in drawn:
            example.record["confidence"] = confidence.confidences(image, example.record)
            pictures[id(example)] = confidence.attention_overlays(image, example.record)
        report.subtitle.append(f"field confidence (p̄ mean · min token probability) and the decoder's attention per "
                               f"field of {len(drawn)} documents")
        rebuilt = [TASKS["documents"].build(example) if "confidence" in example.record else row for row, example in rows]
        for row, (_, example) in zip(rebuilt, rows):
            row.extra = pictures.get(id(example), row.extra)
        return rebuilt
    else:
        report.subtitle.append("no model views: no checkpoint of a BLIP-2 or Donut model in this run"
                               if model is None or ckpt is None else f"no model views for {type(model).__name__}")
    return [row for row, _ in rows]


def build_page(log_dir: Path, stage: str | None = None, max_examples: int = DEFAULT_MAX_EXAMPLES,
               load_model: bool = False) -> Page:
    """Collect the run's metrics, curves and examples into a :class:`Page` (see the module docstring);
    ``load_model``: also what the run's model tells of the shown examples (:func:`add_model_views`)."""
    config, files = read_config(log_dir), result_files(log_dir)
    chosen = latest(files, stage)
    metrics_file = training_metrics(log_dir, config)
    curves = ordered_curves(read_metrics_csv(metrics_file)) if metrics_file else {}
    own = read_metrics_csv(log_dir / "metrics.csv") if (log_dir / "metrics.csv").is_file() else curves
    report = Page(f"mmlm report: {log_dir}", [f"model: {(config.get('model') or {}).get('class_path', '?')}"])
    if chosen is None:
        report.subtitle.append(f"no predictions{'' if stage is None else f' of stage {stage}'} under {log_dir}")
    else:
        evaluated, step = chosen
        report.subtitle.append(f"evaluated: {evaluated} at step {step}")
        metrics = table(["metric", "value"], final_metrics(own, evaluated), f"{evaluated} metrics (metrics.csv)")
        shard_sets = [ShardSet(expand_local(p, search_bases(log_dir)), kind) for p, kind in
                      stage_sources(config, evaluated)]
        joined = gallery_rows(task_examples(files, evaluated, step, max_examples), [s for s in shard_sets if s.urls],
                              run_prompts(config))
        rows = add_model_views(report, joined, log_dir, config) if load_model else [row for row, _ in joined]
        tables = metrics + breakdown_tables(files, evaluated, step) + (gallery_breakdown(rows) if rows else "")
        report.sections.append(Section("Metrics", f'<div class="tables">{tables}</div>', "metrics"))
    if curves:
        report.sections.append(Section("Curves", f'<p class="note">from {esc(metrics_file)}</p>' + charts(curves),
                                       "curves"))
    if chosen is not None:
        missing = "" if all(r.image for r in rows) else (
            '<p class="note">some images were not found: the shards named in config.yaml are not reachable from '
            "here</p>")
        report.sections.append(Section(f"Examples ({len(rows)})", missing + gallery(rows), "examples"))
    return report


def build_report(run_dir: str | Path, out: str | Path | None = None, stage: str | None = None,
                 max_examples: int = DEFAULT_MAX_EXAMPLES, load_model: bool = False) -> Path:
    """Write the report of ``run_dir`` (:func:`find_log_dir`) to ``out`` (default ``<log dir>/report.html``);
    returns the path written. ``stage``: ``val``, ``test`` or ``predict`` (default: the newest predictions');
    ``load_model``: add BLIP-2's attention per query and Donut's per-field confidence of the first examples, from
    the run's checkpoint (:func:`add_model_views`)."""
    log_dir = find_log_dir(run_dir)
    path = Path(out) if out is not None else log_dir / "report.html"
    html = page(build_page(log_dir, stage, max_examples, load_model))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def report_after_run(trainer: Any, command: str) -> Path | None:
    """The report at the end of ``mmlm validate``/``test`` (global rank zero; a failure is printed, never raised:
    the evaluation itself succeeded)."""
    log_dir = getattr(trainer, "log_dir", None)
    if not getattr(trainer, "is_global_zero", True) or log_dir is None:
        return None
    try:
        path = build_report(log_dir, stage={"validate": "val"}.get(command, command))
    except Exception as err:  # noqa: BLE001 - a report must not turn a finished evaluation into a failure
        print(f"mmlm {command}: the report could not be written: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    print(f"mmlm {command}: report → {path}", file=sys.stderr)
    return path


def report_main(argv: Sequence[str]) -> int:
    """``mmlm report RUN_DIR [--out FILE] [--stage val|test|predict] [--max-examples N]``."""
    parser = argparse.ArgumentParser(prog="mmlm report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's log dir or any folder above it (the newest log dir below is taken)")
    parser.add_argument("--out", default=None, help="the HTML file to write (default: <log dir>/report.html)")
    parser.add_argument("--stage", default=None, choices=["val", "test", "predict"],
                        help="which evaluation to show (default: the newest predictions')")
    parser.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES, help="gallery size cap")
    parser.add_argument("--load-model", action="store_true",
                        help=f"load the run's checkpoint and add, for the first {MAX_MODEL_EXAMPLES} examples, "
                             "BLIP-2's Q-Former attention per query and Donut's per-field confidence")
    args = parser.parse_args(list(argv))
    try:
        path = build_report(args.run_dir, args.out, args.stage, args.max_examples, args.load_model)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(path)
    return 0
