"""Data sources by name: each yields the same records (see ``base``)."""

from __future__ import annotations

from maskaudit.config import AuditConfig
from maskaudit.data.sources.base import Source


def make_source(config: AuditConfig) -> Source:
    """The source the config's ``data.source`` names."""
    data = config.data
    if data.source == "synthetic":
        from maskaudit.data.sources.synthetic import SyntheticSource

        return SyntheticSource(data, seed=config.seed, image_size=config.image_size)
    if data.source == "padchest":
        from maskaudit.data.sources.padchest import PadChestSource

        return PadChestSource(data)
    if data.source == "chestxray14":
        from maskaudit.data.sources.chestxray14 import ChestXray14Source

        return ChestXray14Source(data)
    if data.source == "chaksu":
        from maskaudit.data.sources.chaksu import ChaksuSource

        return ChaksuSource(data)
    from maskaudit.data.sources.folder import FolderSource

    return FolderSource(data)
