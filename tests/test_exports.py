"""Every public class is exported from its package (or a package above it), and configs name classes by package path.

A class a user may name in a config or import is reachable as ``package.Name`` (``mmlm.models.VLMOStage1``, not
``mmlm.models.vlmo.VLMOStage1``), so moving it between the package's modules breaks no config.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import yaml

import datamodules
import mmlm

REPO = Path(__file__).resolve().parents[1]
#: Packages whose ``__init__`` stays import-free on purpose: ``mmlm.app`` keeps ``mmlm --help`` instant (each command
#: imports what it needs when it runs); ``mmlm.integrations`` is loaded by lmms-eval's plugin scan on every start.
LAZY_PACKAGES = ("mmlm.app", "mmlm.integrations")


def packages() -> list[str]:
    """Every package of mmlm and datamodules (the two roots included) outside :data:`LAZY_PACKAGES`."""
    names = ["mmlm", "datamodules"]
    for root in (mmlm, datamodules):
        names += [info.name for info in pkgutil.walk_packages(root.__path__, root.__name__ + ".") if info.ispkg]
    return [name for name in names if name not in LAZY_PACKAGES and name != "mmlm"]


def exports(package_name: str) -> set[str]:
    """The ``__all__`` of the package and of every package above it: a floor of a package (``datamodules.pipeline``)
    may leave its classes to the package's one public surface (``datamodules.ShardPipeline``)."""
    parts = package_name.split(".")
    names: set[str] = set()
    for depth in range(1, len(parts) + 1):
        names |= set(getattr(importlib.import_module(".".join(parts[:depth])), "__all__", ()))
    return names


def unexported(package_name: str) -> list[str]:
    """``module.Class`` for each public class defined in a module of the package and missing from the ``__all__`` of the
    package and of the packages above it."""
    package = importlib.import_module(package_name)
    exported = exports(package_name)
    missing = []
    for info in pkgutil.iter_modules(package.__path__, package_name + "."):
        if info.ispkg:
            continue
        module = importlib.import_module(info.name)
        missing += [f"{info.name}.{name}" for name, value in vars(module).items()
                    if inspect.isclass(value) and value.__module__ == info.name and not name.startswith("_")
                    and name not in exported]
    return missing


@pytest.mark.parametrize("package_name", packages())
def test_every_public_class_is_exported_from_its_package(package_name):
    assert unexported(package_name) == []


def class_paths(node: object) -> list[str]:
    """Every ``class_path`` value in a parsed YAML tree."""
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [path for value in node.values() for path in class_paths(value)]
    if isinstance(node, list):
        return [path for value in node for path in class_paths(value)]
    return []


def is_module(name: str) -> bool:
    """Whether ``name`` is an importable module or package (``mmlm.models.Blip2.from_hf`` is not)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_configs_name_classes_by_their_package_path(config):
    wrong = []
    for path in class_paths(yaml.safe_load(config.read_text())):
        if not path.startswith(("mmlm.", "datamodules.")):
            continue
        parts = path.split(".")
        package_name = next(".".join(parts[:i]) for i in range(len(parts), 0, -1) if is_module(".".join(parts[:i])))
        package = importlib.import_module(package_name)
        name = parts[len(package_name.split("."))]
        lazy = any(package_name.startswith(lazy) for lazy in LAZY_PACKAGES)
        if not lazy and (not hasattr(package, "__path__") or name not in getattr(package, "__all__", ())):
            wrong.append(path)
    assert wrong == [], f"{config}: name these by package path (e.g. mmlm.models.Blip2): {wrong}"


def test_the_check_finds_a_class_missing_from_all(tmp_path, monkeypatch):
    package = tmp_path / "probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text('from probe_pkg.parts import Shown\n__all__ = ["Shown"]\n')
    (package / "parts.py").write_text("class Shown: ...\nclass Hidden: ...\nclass _Private: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert unexported("probe_pkg") == ["probe_pkg.parts.Hidden"]
