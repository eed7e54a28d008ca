"""The detector registry: every detector class by its ``kind``, built-in and from plugins.

Built-in detectors register with :func:`register_detector` when their module is imported
(``lightning_ood.detectors`` imports every module of the package); a third-party distribution
registers its own through the :data:`ENTRY_POINT_GROUP` entry-point group, e.g. in its
``pyproject.toml``::

    [project.entry-points."lightning_ood.detectors"]
    my_score = "my_pkg.my_score:MyScore"

and ``lightning-ood test`` then builds ``detectors: {my_score: {type: my_score}}``.
"""

from __future__ import annotations

import fnmatch
import types
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import TypeVar

from lightning_ood.detectors.base import Detector

#: Entry-point group through which an installed distribution registers detectors: each entry
#: names a :class:`Detector` subclass (``my_pkg.detectors:MyDetector``) or a module whose import
#: registers its detectors with :func:`register_detector`.
ENTRY_POINT_GROUP = "lightning_ood.detectors"


class _Registry(Mapping[str, type[Detector]]):
    """Detector classes by ``kind``: the built-in ones (registered on import by
    :func:`register_detector`), then those of installed plugins, loaded on first lookup."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Detector]] = {}
        self._origin: dict[str, str] = {}
        self._plugins_loaded = False

    def add(self, cls: type[Detector], origin: str) -> None:
        kind = cls.kind
        if not isinstance(kind, str) or not kind.isidentifier():
            raise ValueError(
                f"{origin}: {cls.__name__}.kind={kind!r} must be an identifier-like string "
                "(the config name of the detector)"
            )
        old = self._classes.get(kind)
        if old is not None and old is not cls:
            raise ValueError(
                f"{origin}: detector kind {kind!r} ({cls.__module__}.{cls.__qualname__}) is "
                f"already registered by {self._origin[kind]} ({old.__module__}."
                f"{old.__qualname__}); choose another kind"
            )
        self._classes[kind] = cls
        self._origin[kind] = origin

    def load_plugins(self) -> None:
        """Import the detectors of every installed ``lightning_ood.detectors`` entry point
        (once). Entry points are code the user installed, like pytest plugins; a failing one
        is reported with its distribution, never skipped."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep.dist, "name", "?")
            where = f"entry point {ep.name!r} = {ep.value!r} of distribution {dist!r}"
            try:
                obj = ep.load()
            except Exception as err:
                self._plugins_loaded = False
                raise ImportError(
                    f"lightning_ood: could not load detector plugin {where}: {err}; fix or "
                    f"uninstall {dist!r}"
                ) from err
            if isinstance(obj, type) and issubclass(obj, Detector):
                self.add(obj, where)
            elif not isinstance(obj, types.ModuleType):
                raise TypeError(
                    f"lightning_ood: {where} names {obj!r}, neither a Detector subclass nor a "
                    "module that registers detectors"
                )

    def __getitem__(self, kind: str) -> type[Detector]:
        if kind not in self._classes:
            self.load_plugins()
        return self._classes[kind]

    def __iter__(self) -> Iterator[str]:
        self.load_plugins()
        return iter(sorted(self._classes))

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._classes)

    def origin(self, kind: str) -> str:
        """Where ``kind`` was registered (module or entry point)."""
        self[kind]
        return self._origin[kind]


#: Every registered detector class by kind (built-in and plugins); read-only.
DETECTORS = _Registry()

D = TypeVar("D", bound=type[Detector])


def register_detector(cls: D) -> D:
    """Class decorator: make ``cls`` buildable by its ``kind`` from configs, checkpoints and
    the CLI (``@register_detector`` above ``class MyDetector(Detector)``)."""
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise TypeError(f"register_detector: {cls!r} is not a Detector subclass")
    DETECTORS.add(cls, cls.__module__)
    return cls


def list_detectors(pattern: str = "*") -> list[str]:
    """Registered kinds matching the shell-style ``pattern`` (``"*"``: all), sorted, plugins
    included: ``list_detectors("fssd*") == ["fssd", "fssd_ensemble"]``."""
    return [k for k in DETECTORS if fnmatch.fnmatchcase(k, pattern)]


__all__ = ["DETECTORS", "ENTRY_POINT_GROUP", "list_detectors", "register_detector"]
