"""Adapters that let other tools drive mmlm models.

``lmms_eval``: the lmms-eval model ``mmlm`` (optional extra ``mmlm[lmms-eval]``). lmms-eval finds it through the
``lmms_eval.models`` entry point, which calls :func:`lmms_eval_manifest`; this package imports nothing heavy, so
loading the entry point (lmms-eval loads every plugin's on start) costs nothing until the model is used.
"""

from __future__ import annotations

from typing import Any

#: The class lmms-eval instantiates for ``--model mmlm``.
LMMS_EVAL_CLASS = "mmlm.integrations.lmms_eval.MMLM"


def lmms_eval_manifest() -> Any:
    """The ``ModelManifest`` registering ``mmlm`` with lmms-eval (a simple, non-chat model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmlm", simple_class_path=LMMS_EVAL_CLASS)
