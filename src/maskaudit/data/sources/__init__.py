"""Data sources by name: each yields the same records (see ``base``).

:data:`SOURCES` maps each ``data.source`` of the config to its class; each class names the schema
of its ``data`` section (``config_type``, a member of :data:`maskaudit.config.DataConfig`) and builds
itself from a run's config (:meth:`~maskaudit.data.sources.base.Source.from_config`).
"""

from __future__ import annotations

from maskaudit.config import AuditConfig
from maskaudit.data.sources.base import Source
from maskaudit.data.sources.chaksu import ChaksuSource
from maskaudit.data.sources.chestxray14 import ChestXray14Source
from maskaudit.data.sources.folder import FolderSource
from maskaudit.data.sources.padchest import PadChestSource
from maskaudit.data.sources.synthetic import SyntheticSource

#: each ``data.source`` and its class
SOURCES: dict[str, type[Source]] = {
    "synthetic": SyntheticSource,
    "folder": FolderSource,
    "padchest": PadChestSource,
    "chestxray14": ChestXray14Source,
    "chaksu": ChaksuSource,
}


def make_source(config: AuditConfig) -> Source:
    """The source the config's ``data.source`` names."""
    return SOURCES[config.data.source].from_config(config)
