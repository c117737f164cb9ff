"""Plug-ins: strategies, models and data sources, each named by a built-in name or by `module:Attribute`.

Built-ins are found, not listed: every module of a kind's package (`dccl_sim.strategies`, `dccl_sim.models`,
`dccl_sim.data.sources`) is imported and each object it defines with a string `name` that the kind accepts is
registered under that name, so a new built-in is one file. A user's plug-in is `module:Attribute`, imported from
the current directory or `PYTHONPATH`; the Ray runtime ships its module to the actors (`shipped_modules`).
A plug-in may carry its own settings: a pydantic model `Settings` and the config section it is read from,
`settings_key` (default: its `name`). See docs/architecture.md.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel


class PluginError(ValueError):
    """A plug-in that cannot be found, imported or used; the message names it and says why."""


@dataclass(frozen=True)
class Kind:
    """One kind of plug-in: where its built-ins live and what an object of the kind is."""

    name: str  # "strategy", as users read it in messages
    package: str  # the package whose modules hold the built-ins
    accepts: Callable[[Any], bool]  # is this object a plug-in of the kind?
    expected: str  # what a plug-in of the kind must be, for the error message


def _subclass_of(module: str, base: str) -> Callable[[Any], bool]:
    def accepts(obj: Any) -> bool:
        cls = getattr(importlib.import_module(module), base)
        return isinstance(obj, type) and issubclass(obj, cls) and obj is not cls

    return accepts


def _data_source(obj: Any) -> bool:
    return callable(obj) and getattr(obj, "is_data_source", False)


STRATEGY = Kind("strategy", "dccl_sim.strategies", _subclass_of("dccl_sim.strategies.base", "Strategy"), "a Strategy")
MODEL = Kind("model", "dccl_sim.models", _subclass_of("dccl_sim.models.base", "Recommender"), "a Recommender")
SOURCE = Kind("data source", "dccl_sim.data.sources", _data_source, "a function decorated with @data_source")
KINDS = (STRATEGY, MODEL, SOURCE)


@cache
def builtins(kind: Kind) -> dict[str, Any]:
    """The kind's built-in plug-ins by name."""
    package = importlib.import_module(kind.package)
    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{kind.package}.{info.name}")
        for obj in vars(module).values():
            name = vars(obj).get("name") if isinstance(obj, type) else getattr(obj, "name", None)
            if getattr(obj, "__module__", None) == module.__name__ and isinstance(name, str) and kind.accepts(obj):
                if name in found and found[name] is not obj:
                    raise PluginError(f"two built-in {kind.name} plug-ins are named {name!r}")
                found[name] = obj
    return found


def builtin_with_settings() -> list[Any]:
    """Every built-in plug-in of every kind that has a settings section."""
    return [p for kind in KINDS for p in builtins(kind).values() if settings_key(p) is not None]


def is_reference(spec: str) -> bool:
    """`module:Attribute` (a user's plug-in) rather than a built-in name."""
    return ":" in spec and "://" not in spec


def resolve(kind: Kind, spec: str) -> Any:
    """The plug-in `spec` names: a built-in name, or `module:Attribute` importable from the current directory or
    PYTHONPATH. Raises PluginError naming the plug-in, the reason, and the built-in choices."""
    known = builtins(kind)
    if not is_reference(spec):
        if spec in known:
            return known[spec]
        raise PluginError(
            f"unknown {kind.name} {spec!r}; choose one of {', '.join(sorted(known))}, "
            f"or name your own as module:Attribute"
        )
    module_name, _, attribute = spec.partition(":")
    module = _import(kind, spec, module_name)
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{kind.name} {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not kind.accepts(obj):
        raise PluginError(f"{kind.name} {spec!r} is not {kind.expected} (got {obj!r})")
    return obj


def _import(kind: Kind, spec: str, module_name: str) -> ModuleType:
    # the `dccl-sim` script runs with its own folder first on sys.path: put the current directory back, as
    # `python -m` would, so a plug-in file beside the user's config imports
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            raise PluginError(
                f"{kind.name} {spec!r}: no module named {module_name!r} in the current directory ({cwd}) or on "
                "PYTHONPATH"
            ) from None
        raise PluginError(f"{kind.name} {spec!r}: importing {module_name!r} failed: {error}") from None
    except Exception as error:  # a plug-in's own import-time error, reported with its reason
        raise PluginError(
            f"{kind.name} {spec!r}: importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from None


def settings_key(plugin: Any) -> str | None:
    """The config section a plug-in's settings are read from (None: it has no settings)."""
    if getattr(plugin, "Settings", None) is None:
        return None
    return getattr(plugin, "settings_key", None) or plugin.name


def settings_model(plugin: Any) -> type[BaseModel] | None:
    return getattr(plugin, "Settings", None)


def _installed(path: Path) -> bool:
    roots = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib")}
    return any(path.is_relative_to(root) for root in roots) or "site-packages" in path.parts


def shipped_modules(specs: list[str]) -> list[str]:
    """Local files or package folders to ship to Ray workers (runtime_env `py_modules`) so they import the given
    plug-ins: the top-level module of each `module:Attribute`, unless it is installed or is dccl-sim itself."""
    paths: list[str] = []
    for spec in specs:
        if not is_reference(spec):
            continue
        top = spec.partition(":")[0].split(".")[0]
        if top == "dccl_sim":
            continue
        module = importlib.import_module(top)
        location = Path(module.__path__[0]) if hasattr(module, "__path__") else Path(module.__file__)
        if not _installed(location.resolve()) and str(location) not in paths:
            paths.append(str(location))
    return paths
