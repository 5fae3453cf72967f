from pathlib import Path

import pytest

from maskaudit.config import STUDY_STRATEGIES, config_from_dict, load_config
from maskaudit.errors import MaskauditError

SYN = {"data": {"source": "synthetic"}}


def test_study_defaults():
    c = config_from_dict(SYN)
    assert c.image_size == 512 and c.folds == 5 and c.test_fraction == 0.2 and c.seed == 1907
    assert tuple(c.strategies) == STUDY_STRATEGIES
    assert c.model.arch == "densenet121" and c.model.weights == "imagenet" and c.model.freeze == "study"
    t = c.train
    assert (t.epochs, t.batch_size, t.lr, t.patience, t.min_delta) == (250, 2, 1e-4, 25, 0.001)
    assert (t.augment.rotation, t.augment.hflip, t.augment.brightness) == (45, 0.5, (0.7, 1.1))
    assert c.fill == "zero" and c.spread == 0


def test_unknown_key_is_named():
    with pytest.raises(MaskauditError, match="unknown key 'train.learning_rate'"):
        config_from_dict({**SYN, "train": {"learning_rate": 1}})


def test_wrong_type_is_named():
    with pytest.raises(MaskauditError, match="folds"):
        config_from_dict({**SYN, "folds": "five"})


def test_unknown_strategy_is_named():
    with pytest.raises(MaskauditError, match=r"strategies\[0\]"):
        config_from_dict({**SYN, "strategies": ["nolung"]})


def test_missing_csv_is_named(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {source: folder, labels_csv: nope.csv, classes: [a]}\n")
    with pytest.raises(MaskauditError, match="nope.csv"):
        load_config(cfg)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(MaskauditError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_csv_relative_to_config(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "labels.csv").write_text("image,mask,a\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {source: folder, labels_csv: d/labels.csv, classes: [a]}\n")
    assert load_config(cfg).data.labels_csv == tmp_path / "d" / "labels.csv"


def test_augment_false_means_none():
    c = config_from_dict({**SYN, "train": {"augment": False}})
    assert c.train.augment.rotation == 0 and c.train.augment.hflip == 0


def test_demo_configs_are_valid():
    from maskaudit.cli import demo_config

    for kind in ("cxr", "fundus"):
        config_from_dict(demo_config(kind))


def test_paths_are_resolved_by_field_type_wherever_they_are(tmp_path: Path):
    """Every Path field (and model.weights unless a word) is taken from the config's folder: in data, in an
    external dataset, in a probed model; a new schema's Path field needs no list of keys."""
    from pydantic import BaseModel

    from maskaudit.config import _resolve_paths

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "labels.csv").write_text("image,mask,a\n")
    (tmp_path / "w.pt").write_bytes(b"")
    raw = {"data": {"source": "synthetic"}, "model": {"weights": "w.pt"},
           "external": [{"name": "x", "data": {"source": "folder", "labels_csv": "d/labels.csv", "classes": ["a"]}}]}
    config = config_from_dict(raw, base=tmp_path)
    assert config.external[0].data.labels_csv == tmp_path / "d" / "labels.csv"
    assert config.model.weights == str(tmp_path / "w.pt")
    assert config_from_dict({"data": {"source": "synthetic"}, "model": {"weights": "none"}}).model.weights == "none"
    probed = config_from_dict({"data": {"source": "synthetic"}, "model": {
        "source": "torchscript", "file": "w.pt", "output": {"names": ["opacity"]}}}, base=tmp_path)
    assert probed.models[0].file == tmp_path / "w.pt"

    class NewSource(BaseModel):
        source: str = "new"
        table: Path
        title: str = ""

    assert _resolve_paths({"table": "t.csv", "title": "t.csv"}, tmp_path, NewSource) == {
        "table": str(tmp_path / "t.csv"), "title": "t.csv"}
