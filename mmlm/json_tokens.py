"""JSON as tokens (Donut): ground-truth JSON ↔ a flat sequence of key tags, separators and text.

Rules of :func:`json_to_tokens` (Donut's ``json2token``):

- a dict ``{"k": v}`` becomes ``<s_k>`` + tokens(v) + ``</s_k>`` for each key; with ``sort_keys`` the
  keys come in *reverse* sorted order, as Donut does (so checkpoints converted from Donut emit
  the keys in the order they were trained on; for DocVQA ``question`` comes before ``answer``);
- a list becomes its items' tokens joined with ``<sep/>``;
- a leaf is ``str(value)``; under a key named in ``categorical_fields`` it becomes one category
  token ``<value/>`` (e.g. ``{"class": "invoice"}`` → ``<s_class><invoice/></s_class>``);
- ``{"text_sequence": text}`` (the reading task, SynthDoG) is the bare text.

Two parsers go from a sequence back to JSON:

- :func:`donut_token2json` is Donut's own ``token2json`` (the semantics of transformers'
  ``DonutProcessor.token2json``), and :func:`donut_prediction` is Donut's inference post-processing
  around it (drop eos/pad strings and the first tag, the task token, then parse). **Evaluation
  scores use these**, so that TED accuracy, F1, ANLS and exact match equal what Donut's own
  evaluation reports for the same generated text: Donut's quirks change scores (a repeated key
  keeps its *last* value, an unclosed start tag is deleted and its content read as if it were not
  there, text outside tags is lost unless there are no tags at all, a categorical leaf ``<x/>``
  becomes ``x`` only when ``<x/>`` is in the tokenizer's added vocabulary).
- :func:`tokens_to_json` is a lenient, structure-preserving inverse for ``predict`` output and
  inspection; it never raises on generated garbage: start tags that are never closed are dropped
  (their content stays at the outer level, so a leading task token such as ``<s_cord-v2>`` is
  ignored), stray end tags are ignored, an end tag of an outer key closes the inner ones, a
  repeated key keeps its first value, text next to keys is dropped, and text without any key
  becomes ``{"text_sequence": text}``. Its results can differ from Donut's on malformed sequences,
  so it is not used for scoring.

Lossy corners of both (same as Donut): a one-item list comes back as its item, numbers come back
as strings.

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
        return "".join(start_tag(k) + json_to_tokens(obj[k], sort_keys, categorical_fields,
                                                     k in categorical_fields) + end_tag(k) for k in keys)
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


# --------------------------------------------------------------------------- Donut's parser (scoring)

_DONUT_START = re.compile(r"<s_", re.IGNORECASE)
_FIRST_TAG = re.compile(r"<.*?>")


def donut_token2json(sequence: str, added_vocab: Collection[str] = ()) -> dict[str, Any] | list[Any]:
    """Donut's ``token2json``: exactly what transformers' ``DonutProcessor.token2json`` returns.

    Repeatedly takes the first ``<s_key>`` (case-insensitive); without a matching ``</s_key>`` anywhere,
    every copy of that start tag is deleted; otherwise the text up to the nearest following end tag is
    the value: nested keys when it holds both ``<s_`` and ``</s_``, else ``<sep/>``-separated stripped
    leaves (``<x/>`` → ``x`` when ``<x/>`` is in ``added_vocab``; one leaf comes back as itself). Text
    outside the tags is discarded, a later value of a key replaces an earlier one (keeping the key's first
    position), and ``<sep/>`` right after an end tag starts the next record of a list.

    Args:
        sequence: the generated sequence after Donut's post-processing (see :func:`donut_prediction`).
        added_vocab: the tokenizer's added vocabulary (``tokenizer.get_added_vocab()``).

    Returns:
        A dict, a list of dicts (top-level records), or ``{"text_sequence": rest}`` when no key was read.
        Where transformers would hit Python's recursion limit (keys nested hundreds deep) this returns
        ``{"text_sequence": sequence}`` instead of raising.
    """
    vocab = added_vocab if isinstance(added_vocab, (set, frozenset, dict)) else frozenset(added_vocab)
    try:
        return _donut_parse(sequence, vocab, inner=False)
    except RecursionError:
        return {TEXT_SEQUENCE: sequence}


def _donut_start_tag(tokens: str) -> str | None:
    """The first ``<s_…>`` of ``tokens`` as written (``<s_`` found case-insensitively), if a ``>`` follows."""
    found = _DONUT_START.search(tokens)
    if found is None:
        return None
    close = tokens.find(">", found.start())
    return None if close < 0 else tokens[found.start():close + 1]


def _donut_parse(tokens: str, vocab: Collection[str], inner: bool) -> dict[str, Any] | list[Any]:
    """One level of ``token2json``; ``inner`` values come back as lists of records."""
    records: list[dict[str, Any]] = []
    output: dict[str, Any] = {}
    while tokens:
        start = _donut_start_tag(tokens)
        if start is None:
            break
        key = start[3:-1]
        end = re.search(rf"</s_{re.escape(key)}>", tokens, re.IGNORECASE)
        if end is None:
            tokens = tokens.replace(start, "")
            continue
        end_text = end.group()
        content = re.search(f"{re.escape(start)}(.*?){re.escape(end_text)}", tokens,
                            re.IGNORECASE | re.DOTALL)
        if content is not None:
            _donut_store(output, key, content.group(1).strip(), vocab)
        tokens = tokens[tokens.find(end_text) + len(end_text):].strip()
        if tokens.startswith(SEP):  # the next record of a list: the rest is parsed as an inner value
            records.append(output)
            output, tokens = {}, tokens[len(SEP):]
    if records:
        return records + ([output] if output else [])
    if output:
        return [output] if inner else output
    return [] if inner else {TEXT_SEQUENCE: tokens}


def _donut_store(output: dict[str, Any], key: str, content: str, vocab: Collection[str]) -> None:
    """Set ``output[key]`` from the stripped text between a key's tags (nested keys or leaves)."""
    if "<s_" in content and "</s_" in content:
        value = _donut_parse(content, vocab, inner=True)
        if value:  # nothing read: the key is left as it was
            output[key] = value[0] if len(value) == 1 else value
        return
    leaves = [_donut_leaf(leaf.strip(), vocab) for leaf in content.split(SEP)]
    output[key] = leaves[0] if len(leaves) == 1 else leaves


def _donut_leaf(leaf: str, vocab: Collection[str]) -> str:
    """A categorical token ``<x/>`` of the added vocabulary becomes ``x``; any other leaf stays as it is."""
    if leaf.startswith("<") and leaf.endswith("/>") and leaf in vocab:
        return leaf[1:-2]
    return leaf


def donut_prediction(sequence: str, added_vocab: Collection[str] = (), eos_token: str | None = None,
                     pad_token: str | None = None) -> dict[str, Any] | list[Any]:
    """Donut's inference post-processing of one decoded sequence, then :func:`donut_token2json`.

    ``sequence`` is the whole decoded sequence, prompt included (``batch_decode`` without skipping
    special tokens). Every ``eos_token`` and then every ``pad_token`` string is deleted, then the first
    ``<…>`` tag (the task start token, e.g. ``<s_cord-v2>``; for DocVQA ``<s_docvqa>``, so the question
    and answer of the prompt + generation are both parsed), then surrounding whitespace.
    """
    for token in (eos_token, pad_token):
        if token:
            sequence = sequence.replace(token, "")
    return donut_token2json(_FIRST_TAG.sub("", sequence, count=1).strip(), added_vocab)


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
        raise ValueError(f"prompt_end {prompt_end!r} is not in the sequence {body[:200]!r} "
                         f"of ground truth {gt!r}")
    cut += len(prompt_end)
    return task_token + body[:cut], body[cut:]


def strip_task_token(sequence: str, task_token: str) -> str:
    """``sequence`` without a leading ``task_token`` (and surrounding whitespace)."""
    sequence = sequence.strip()
    return sequence[len(task_token):].lstrip() if sequence.startswith(task_token) else sequence
