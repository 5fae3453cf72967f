"""The source registry: one class per ``data.source`` of the config, each naming its config schema."""

from __future__ import annotations

from typing import Annotated, get_args, get_origin

from maskaudit.config import DataConfig, config_from_dict
from maskaudit.data.sources import SOURCES, make_source
from maskaudit.data.sources.synthetic import SyntheticSource


def _members() -> dict[str, type]:
    """``DataConfig``'s union members by their ``source`` literal."""
    assert get_origin(DataConfig) is Annotated
    union = get_args(DataConfig)[0]
    members = {}
    for member in get_args(union):
        (literal,) = get_args(member.model_fields["source"].annotation)
        members[literal] = member
    return members


def test_registry_names_every_source_of_the_config():
    assert set(SOURCES) == set(_members())


def test_each_source_names_its_config_schema():
    members = _members()
    for name, cls in SOURCES.items():
        assert cls.name == name
        assert cls.config_type is members[name], name


def test_make_source_builds_the_named_source_from_the_run_config():
    config = config_from_dict({"seed": 7, "image_size": 64, "data": {"source": "synthetic", "n_patients": 4}})
    source = make_source(config)
    assert isinstance(source, SyntheticSource)
    assert (source.seed, source.size) == (7, 64)
