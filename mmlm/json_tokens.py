"""JSON as tokens (Donut): ground-truth JSON ↔ a flat sequence of key tags, separators and text.

Rules of :func:`json_to_tokens` (Donut's ``json2token``):

- a dict ``{"k": v}`` becomes ``<s_k>`` + tokens(v) + ``</s_k>`` for each key; with ``sort_keys`` the
  keys come in *reverse* sorted order, as Donut does (so checkpoints converted from Donut emit
  the keys in the order they were trained on; for DocVQA ``question`` comes before ``answer``);
- a list becomes its items' tokens joined with ``<sep/>``;
- a leaf is ``str(value)``; under a key named in ``categorical_fields`` it becomes one category
  token ``<value/>`` (e.g. ``{"class": "invoice"}`` → ``<s_class><invoice/></s_class>``);
- ``{"text_sequence": text}`` (the reading task, SynthDoG) is the bare text.

:func:`tokens_to_json` is the inverse and never raises on generated garbage: start tags that are
never closed are dropped (their content stays at the outer level, so a leading task token such
as ``<s_cord-v2>`` is ignored), stray end tags are ignored, an end tag of an outer key closes the
inner ones, a repeated key keeps its first value, text next to keys is dropped, and text without
any key becomes ``{"text_sequence": text}``. Lossy corners (same as Donut): a one-item list comes
back as its item, numbers come back as strings.

Task prompts are start tokens: reading ``<s_synthdog>``, extraction ``<s_cord-v2>``,
classification ``<s_rvlcdip>``, document VQA ``<s_docvqa><s_question>…</s_question><s_answer>``
(``prompt_end="<s_answer>"``). :func:`task_sequence` splits a ground truth into the prompt (not in
the loss) and the target.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

SEP = "<sep/>"
TEXT_SEQUENCE = "text_sequence"
#: Task start tokens of Donut's four tasks (any ``<s_name>`` works).
TASK_TOKENS = {"reading": "<s_synthdog>", "extraction": "<s_cord-v2>", "classification": "<s_rvlcdip>",
               "vqa": "<s_docvqa>"}
#: The prompt of document VQA ends with this tag; the answer and ``</s_answer>`` are the target.
VQA_PROMPT_END = "<s_answer>"

#: Start tags nested deeper than this are ignored (keeps the parser's recursion bounded on garbage).
MAX_DEPTH = 64
_TAG = re.compile(r"(<s_[^<>]*>|</s_[^<>]*>|<[^<>/]+/>)")


def start_tag(key: str) -> str:
    """``<s_key>``."""
    return f"<s_{key}>"


def end_tag(key: str) -> str:
    """``</s_key>``."""
    return f"</s_{key}>"


def category_token(value: str) -> str:
    """``<value/>``, the single token of a categorical leaf."""
    return f"<{value}/>"


def json_to_tokens(obj: Any, sort_keys: bool = True, categorical_fields: Collection[str] = (),
                   _category: bool = False) -> str:
    """The token sequence of a JSON value (rules in the module docstring)."""
    if isinstance(obj, dict):
        if len(obj) == 1 and TEXT_SEQUENCE in obj:
            return str(obj[TEXT_SEQUENCE])
        keys = sorted(obj, reverse=True) if sort_keys else list(obj)
        return "".join(start_tag(k) + json_to_tokens(obj[k], sort_keys, categorical_fields, k in categorical_fields)
                       + end_tag(k) for k in keys)
    if isinstance(obj, list):
        return SEP.join(json_to_tokens(item, sort_keys, categorical_fields, _category) for item in obj)
    return category_token(str(obj)) if _category else str(obj)


def special_tokens(objs: Iterable[Any], categorical_fields: Collection[str] = (),
                   tasks: Iterable[str] = ()) -> list[str]:
    """Sorted special tokens the sequences of ``objs`` need: ``<s_k>``/``</s_k>`` per key, the category
    tokens of ``categorical_fields``, ``<sep/>`` and the given task tokens (e.g. ``"<s_cord-v2>"``)."""
    found = {SEP, *tasks}
    for obj in objs:
        _collect(obj, categorical_fields, found, category=False)
    return sorted(found)


def _collect(obj: Any, categorical_fields: Collection[str], found: set[str], category: bool) -> None:
    """Add the tokens of one JSON value to ``found``."""
    if isinstance(obj, dict):
        if len(obj) == 1 and TEXT_SEQUENCE in obj:
            return
        for key, value in obj.items():
            found.update((start_tag(key), end_tag(key)))
            _collect(value, categorical_fields, found, key in categorical_fields)
    elif isinstance(obj, list):
        for item in obj:
            _collect(item, categorical_fields, found, category)
    elif category:
        found.add(category_token(str(obj)))


# --------------------------------------------------------------------------- sequence → JSON


def _pieces(sequence: str) -> list[str]:
    """Tags and the text between them, with start tags that are never closed left out."""
    pieces = [p for p in _TAG.split(sequence) if p]
    closing_after: set[str] = set()
    kept: list[str] = []
    for piece in reversed(pieces):
        if piece.startswith("</s_"):
            closing_after.add(piece[4:-1])
        elif piece.startswith("<s_") and piece[3:-1] not in closing_after:
            continue
        kept.append(piece)
    return kept[::-1]


@dataclass
class _Cursor:
    """Position in the piece list while parsing."""

    pieces: list[str]
    at: int = 0

    def peek(self) -> str | None:
        return self.pieces[self.at] if self.at < len(self.pieces) else None


def _item_value(fields: dict[str, Any], text: list[str]) -> Any:
    """One list item: the keys parsed in it, else its text (``None`` when there is neither)."""
    if fields:
        return fields
    joined = "".join(text).strip()
    return joined if text else None


def _parse_value(cur: _Cursor, open_keys: tuple[str, ...]) -> Any:
    """Parse up to the end tag of ``open_keys[-1]`` (consumed) or of an outer key (not consumed).

    Returns a dict, a leaf string, a list of those, or ``None`` for nothing at all.
    """
    items: list[Any] = []
    fields: dict[str, Any] = {}
    text: list[str] = []
    while (piece := cur.peek()) is not None:
        if piece.startswith("</s_"):
            key = piece[4:-1]
            if open_keys and key == open_keys[-1]:
                cur.at += 1
                break
            if key in open_keys:
                break  # closes an outer key: this one was left open
            cur.at += 1  # stray end tag
        elif piece.startswith("<s_"):
            cur.at += 1
            if len(open_keys) >= MAX_DEPTH:
                continue
            key = piece[3:-1]
            value = _parse_value(cur, (*open_keys, key))
            if key not in fields:
                fields[key] = "" if value is None else value
        elif piece == SEP:
            cur.at += 1
            items.append(_item_value(fields, text))
            fields, text = {}, []
        else:
            cur.at += 1
            text.append(piece[1:-2] if piece.startswith("<") and piece.endswith("/>") else piece)
    items.append(_item_value(fields, text))
    return _join_items(items)


def _join_items(items: list[Any]) -> Any:
    """A single item as itself, several as a list (empty items dropped from lists of dicts)."""
    if len(items) == 1:
        return items[0]
    if any(isinstance(item, dict) for item in items):
        return [item for item in items if isinstance(item, dict)]
    return ["" if item is None else item for item in items]


def tokens_to_json(sequence: str) -> dict[str, Any] | list[Any]:
    """Parse a (generated) token sequence back into JSON; never raises (see the module docstring).

    Returns:
        A dict (``{}`` for an empty sequence, ``{"text_sequence": text}`` for text without keys), or
        a list of dicts when the top level holds ``<sep/>``-separated records.
    """
    value = _parse_value(_Cursor(_pieces(sequence)), ())
    if value is None:
        return {}
    if isinstance(value, str):
        return {TEXT_SEQUENCE: value} if value else {}
    if isinstance(value, list) and not any(isinstance(v, dict) for v in value):
        return {TEXT_SEQUENCE: SEP.join(value)}
    return value


# --------------------------------------------------------------------------- tasks


def task_sequence(gt: Any, task_token: str, prompt_end: str | None = None, sort_keys: bool = True,
                  categorical_fields: Collection[str] = ()) -> tuple[str, str]:
    """``(prompt, target)`` of one ground truth for the task whose start token is ``task_token``.

    The full sequence is ``task_token + json_to_tokens(gt)``. The prompt is the task token, or —
    with ``prompt_end`` (DocVQA: ``"<s_answer>"``) — everything up to and including the first
    ``prompt_end``; the target is the rest (eos is added by the collator).

    Raises:
        ValueError: ``prompt_end`` is given but does not occur in the sequence.
    """
    body = json_to_tokens(gt, sort_keys, categorical_fields)
    if prompt_end is None:
        return task_token, body
    cut = body.find(prompt_end)
    if cut < 0:
        raise ValueError(f"prompt_end {prompt_end!r} is not in the sequence {body[:200]!r} of ground truth {gt!r}")
    cut += len(prompt_end)
    return task_token + body[:cut], body[cut:]


def strip_task_token(sequence: str, task_token: str) -> str:
    """``sequence`` without a leading ``task_token`` (and surrounding whitespace)."""
    sequence = sequence.strip()
    return sequence[len(task_token):].lstrip() if sequence.startswith(task_token) else sequence
