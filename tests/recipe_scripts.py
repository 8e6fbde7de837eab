"""Import a recipe under ``scripts/`` as a module, for the tests that run the tiny recipes end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str, register: pytest.MonkeyPatch | None = None) -> ModuleType:
    """``scripts/NAME.py`` as module ``NAME``. ``register``: also put it in ``sys.modules`` for the test's duration
    (forked worker processes can then unpickle the script's functions)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register is not None:
        register.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
