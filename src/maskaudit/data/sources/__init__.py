"""Data sources by name: each yields the same records (see ``base``).

Every module of this package is a source: a :class:`~maskaudit.data.sources.base.Source` subclass that names the
schema of its ``data`` section (``config_type``, a member of :data:`maskaudit.config.DataConfig`) and builds
itself from a run's config (:meth:`~maskaudit.data.sources.base.Source.from_config`). :data:`SOURCES` finds them
here by that schema's ``source`` tag, so adding a source is its schema in ``config.py`` and its module here
(README, "Extending maskaudit").
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import get_args

from maskaudit.config import AuditConfig
from maskaudit.data.sources.base import Source


def _sources() -> dict[str, type[Source]]:
    """Each ``data.source`` tag and the source class of this package whose ``config_type`` carries it."""
    found: dict[str, type[Source]] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
        for _, cls in inspect.getmembers(importlib.import_module(f"{__name__}.{module}"), inspect.isclass):
            if issubclass(cls, Source) and cls.__module__ == f"{__name__}.{module}" and "config_type" in vars(cls):
                (tag,) = get_args(cls.config_type.model_fields["source"].annotation)
                if tag in found and found[tag] is not cls:
                    raise RuntimeError(f"two sources for data.source {tag!r}: {found[tag]} and {cls}")
                found[tag] = cls
    return found


#: each ``data.source`` and its class
SOURCES: dict[str, type[Source]] = _sources()


def make_source(config: AuditConfig) -> Source:
    """The source the config's ``data.source`` names."""
    return SOURCES[config.data.source].from_config(config)
