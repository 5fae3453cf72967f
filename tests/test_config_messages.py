"""Config errors in the user's words: the key as written in the YAML, and a guess for a mistyped one (issue 18)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from maskaudit.config import load_config
from maskaudit.errors import MaskauditError


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "audit.yaml"
    path.write_text(text)
    with pytest.raises(MaskauditError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "\n" not in message
    return message.removeprefix(f"{path}: ")


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    (tmp_path / "labels.csv").write_text("image,mask,a\n")
    return tmp_path / "labels.csv"


def test_message_names_the_file(tmp_path: Path):
    path = tmp_path / "audit.yaml"
    path.write_text("data: {source: synthetic}\nfill: blue\n")
    with pytest.raises(MaskauditError, match=f"^{re.escape(str(path))}: fill: "):
        load_config(path)


def test_missing_labels_csv_has_no_union_tag(tmp_path: Path):
    message = _error(tmp_path, "data: {source: folder, labels_csv: nope.csv, classes: [a]}\n")
    assert message == f"data.labels_csv: labels CSV not found: {tmp_path.resolve() / 'nope.csv'}"


def test_top_level_typo(tmp_path: Path):
    message = _error(tmp_path, "data: {source: synthetic}\nstrategis: [full, no_roi]\n")
    assert message == "unknown key 'strategis' (did you mean 'strategies'?)"


def test_typo_under_data(tmp_path: Path, labels: Path):
    message = _error(tmp_path, "data: {source: folder, labels_csv: labels.csv, labels_cvs: labels.csv, classes: [a]}\n")
    assert message == "unknown key 'data.labels_cvs' (did you mean 'labels_csv'?)"


def test_typo_in_train(tmp_path: Path):
    message = _error(tmp_path, "data: {source: synthetic}\ntrain: {epoch: 3}\n")
    assert message == "unknown key 'train.epoch' (did you mean 'epochs'?)"


def test_typo_in_external_data(tmp_path: Path):
    message = _error(tmp_path, "data: {source: synthetic}\nexternal:\n"
                               "  - {name: one, data: {source: synthetic}}\n"
                               "  - {name: two, data: {source: synthetic, n_patient: 10}}\n")
    assert message == "unknown key 'external[1].data.n_patient' (did you mean 'n_patients'?)"


def test_wrong_value(tmp_path: Path):
    message = _error(tmp_path, "data: {source: synthetic}\nfill: blue\n")
    assert message == "fill: Input should be 'zero', 'mean' or 'noise'"


def test_value_error_in_external_data(tmp_path: Path):
    message = _error(tmp_path, "data: {source: synthetic}\nexternal:\n  - {name: fundus, data: {source: chaksu, "
                               "root: nowhere}}\n")
    assert message == f"external[0].data.root: data.root (Chákṣu) folder not found: {tmp_path.resolve() / 'nowhere'}"


def test_no_close_key_no_guess(tmp_path: Path):
    assert _error(tmp_path, "data: {source: synthetic}\nzzz: 1\n") == "unknown key 'zzz'"


def test_typo_in_a_mapping_of_models(tmp_path: Path):
    message = _error(tmp_path, "data: {source: synthetic, classes: {opacity: {signl: roi}}}\n")
    assert message == "unknown key 'data.classes.opacity.signl' (did you mean 'signal'?)"


def test_probed_models_named_as_written(tmp_path: Path):
    one = _error(tmp_path, "data: {source: synthetic}\nmodel: {source: python, entry_point: 'a:b', "
                           "output: {name: [x]}}\n")
    assert one == "unknown key 'model.output.name' (did you mean 'names'?)"
    listed = _error(tmp_path, "data: {source: synthetic}\nmodels:\n  - {name: a, source: torchxrayvision, "
                              "weights: densenet121-res224-all}\n  - {name: b, source: onnx, fil: b.onnx}\n")
    assert listed == "unknown key 'models[1].fil' (did you mean 'file'?)"


def test_source_missing_or_unknown(tmp_path: Path):
    assert _error(tmp_path, "data: {labels_csv: x.csv}\n") == "missing key 'data.source'"
    assert _error(tmp_path, "data: {source: folders}\n").startswith(
        "data.source: Input tag 'folders' found using 'source' does not match any of the expected tags: ")


def test_list_index_and_several_errors(tmp_path: Path):
    message = _error(tmp_path, "data: {source: synthetic}\nstrategies: [full, nolung]\nfolds: 1\n")
    assert message == ("strategies[1]: Input should be 'full', 'no_roi', 'no_roi_bbox', 'only_roi', 'only_roi_bbox' "
                       "or 'roi_shape'; folds: Input should be greater than or equal to 2")
