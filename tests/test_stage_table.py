"""The stage table (issue 13): every fingerprint comes from the declarations, and a key changes exactly what reads it.

Three checks. The walk: every key of a full audit's and of a probe's config is changed in turn, and
the stages whose fingerprints change must be exactly those that declare the key (or a section that
holds it) and every stage after them. The view: a stage that reads a key it does not declare is an
error, so the declarations are complete wherever a stage runs in the suite. The run: on a finished
tiny run, changing ``report.formats`` reruns exactly the stages that draw figures (and those after
them), and the new SVG files appear.
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from maskaudit.config import AuditConfig, config_from_dict
from maskaudit.kinds import audit_class
from maskaudit.rundir import RunDir, read_json
from maskaudit.stages import EXECUTION_KEYS, ConfigView, UndeclaredRead

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import TINY  # noqa: E402

FULL = {**TINY, "analyses": {"run": ["baseline", "explain", "embed", "sweep", "reader", "localize", "verdict"]},
        "test_strategies": ["full", "no_roi", "only_roi"],
        "external": [{"name": "other", "data": {"source": "synthetic", "n_patients": 8}}]}
PROBE = {**{k: v for k, v in TINY.items() if k not in ("model", "train")},
         "model": {"source": "torchxrayvision", "weights": "densenet121-res224-all", "pretrained": False}}
#: A probe with light cross-masking (issue 17): its adapted models' jobs and the adapt stage.
PROBE_ADAPT = {**PROBE, "strategies": ["full", "no_roi", "only_roi", "roi_shape"],
               "test_strategies": ["full", "no_roi", "only_roi", "roi_shape"],
               "adapt": {"strategies": ["only_roi", "no_roi", "roi_shape"]}}


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every key of a dumped config with its value: dicts are walked, list items of dicts by index."""
    if isinstance(value, dict) and value:
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{path}.{key}" if path else key)]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [leaf for i, item in enumerate(value) for leaf in _leaves(item, f"{path}[{i}]")]
    return [(path, value)]


def _field(path: str) -> Any:
    """The annotation of the config field at ``path`` (dotted, ``[i]`` for list items), unions unwrapped."""
    here: Any = AuditConfig
    for part in path.replace("[", ".[").split("."):
        while get_origin(here) in (typing.Union, __import__("types").UnionType, typing.Annotated):
            args = [a for a in get_args(here) if a is not type(None)]
            here = args[0]
        if part.startswith("["):
            here = get_args(here)[0]
            continue
        if isinstance(here, type) and issubclass(here, BaseModel):
            here = here.model_fields[part].annotation
        else:
            return None
    return here


def _candidates(path: str, value: Any) -> list[Any]:
    """Values to try in place of ``value`` (the first that validates and changes the config is used)."""
    annotation = _field(path)
    literals = [a for a in get_args(annotation) if isinstance(a, str | int)] if get_origin(annotation) is \
        typing.Literal else []
    if literals:
        return [a for a in literals if a != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2]
    if isinstance(value, float):
        return [round(value * 0.9, 6), round(value + 0.01, 6), round(value * 1.1, 6)]
    if isinstance(value, str):
        return [f"{value}x", "none", "imagenet"]
    if isinstance(value, list):
        options = [value[:-1]] if value else []
        if len(value) == 2 and all(isinstance(v, float) for v in value):  # a (low, high) range
            options += [[value[0] * 0.9, value[1]], [value[0], value[1] * 0.9]]
        if value and isinstance(value[0], int | float) and not isinstance(value[0], bool):
            options += [[*value, value[-1] + 1], [value[0] + 1, *value[1:]]]
        if value and isinstance(value[0], str):
            options += [[*value[:-1], "no_roi_bbox"], [*value, "only_roi_bbox"], ["svg"], ["png", "svg"]]
        if value and isinstance(value[0], list):  # a list of pairs
            options += [[["full", "only_roi"]]]
        if not value:
            options += [["png"], [1], [["full", "full"]], ["sex"], ["verdict"]]
        return options
    if value is None:
        return [1, 32, 0.5, "full", "lungs", ["full"], [["full", "full"]], [0], "x"]
    if isinstance(value, dict) and not value:
        return []
    return []


def _set(raw: dict, path: str, value: Any) -> dict:
    out = __import__("copy").deepcopy(raw)
    here: Any = out
    parts = path.replace("[", ".[").split(".")
    for part in parts[:-1]:
        here = here[int(part[1:-1])] if part.startswith("[") else here.setdefault(part, {})
    last = parts[-1]
    here[int(last[1:-1]) if last.startswith("[") else last] = value
    return out


def _declarers(kind, key: str) -> set[str]:
    """The parts whose declared reads hold ``key``: the key itself, a section above it, or everything."""
    plain = key.split("[")[0]
    return {name for name, part in kind.TABLE.items()
            if any(read == "" or plain == read or plain.startswith(f"{read}.") for read in part.reads)}


def _stage_fingerprints(audit) -> dict[str, str]:
    return {stage: audit.fingerprint(stage) for stage in audit.FLOW}


@pytest.mark.parametrize("raw", [FULL, PROBE, PROBE_ADAPT], ids=["audit", "probe", "probe-adapt"])
def test_every_key_changes_exactly_the_stages_that_declare_it(raw, tmp_path: Path):
    base = config_from_dict(raw, check_files=False)
    kind = audit_class(base)
    before = _stage_fingerprints(kind(RunDir(tmp_path), base))
    dumped = base.model_dump(mode="json")
    unchanged, walked = [], 0
    for key, value in _leaves(dumped):
        for candidate in _candidates(key, value):
            try:
                changed = config_from_dict(_set(dumped, key, candidate), check_files=False)
            except Exception:  # noqa: BLE001 - not a valid value for this key: try the next
                continue
            if changed.model_dump(mode="json") == dumped or changed.kind != base.kind:
                continue
            break
        else:
            unchanged.append(key)
            continue
        walked += 1
        audit = kind(RunDir(tmp_path), changed)
        after = _stage_fingerprints(audit)
        rerun = {stage for stage in before if before[stage] != after[stage] and audit._active(stage)}
        if key.split("[")[0] in EXECUTION_KEYS:
            assert rerun == set(), f"{key}: an execution key reruns {sorted(rerun)}"
            continue
        expected = audit.fingerprints.downstream(_declarers(kind, key)) & set(audit.FLOW)
        # an analysis left out of analyses.run has no stage to rerun
        expected = {s for s in expected if audit._active(s)} | ({"report"} if expected else set())
        assert rerun == expected, f"{key} = {candidate!r}: reran {sorted(rerun)}, declared {sorted(expected)}"
    # the keys this walk has no other valid value for (the source itself: another source needs other keys; empty
    # mappings; a probe's optional preprocessing); every other key was walked
    assert set(unchanged) <= NOT_WALKED, sorted(set(unchanged) - NOT_WALKED)
    assert walked >= 75


NOT_WALKED = {"data.source", "data.metadata", "predict.images", "external", "models", "external[0].data.source",
              "external[0].data.metadata", "models[0].source", "models[0].arguments", "models[0].input.channels",
              "models[0].input.mean", "models[0].input.std", "models[0].output.aliases",
              "data.classes.opacity.anchors", "data.classes.device.anchors",  # None, or names a walk cannot pick
              "external[0].data.classes.opacity.anchors", "external[0].data.classes.device.anchors",
              "adapt.strategies"}  # empty (no adaptation) outside PROBE_ADAPT: no masking a list of one could add


def test_a_stage_reading_an_undeclared_key_is_an_error():
    config = config_from_dict(TINY)
    view = ConfigView(config, frozenset({"seed", "analyses.verdict"}), "verdict")
    assert view.seed == 7 and view.analyses.verdict.alpha == 0.05
    with pytest.raises(UndeclaredRead, match="'folds'"):
        _ = view.folds
    with pytest.raises(UndeclaredRead, match="'analyses.explain'"):
        _ = view.analyses.explain
    with pytest.raises(UndeclaredRead, match="'test_strategies'"):
        _ = view.eval_strategies  # a property is read through the view: what it reads is checked too


def test_changing_report_formats_redraws_every_figure(tmp_path: Path):
    config = config_from_dict({**TINY, "analyses": {"run": ["sweep", "verdict"]}})
    kind = audit_class(config)
    out = tmp_path / "run"
    kind.create(out, config).run_all()
    first = read_json(out / "stages.json")
    assert not list((out / "figures").glob("*.svg"))
    svg = config.model_copy(update={"report": config.report.model_copy(update={"formats": ["png", "svg"]})})
    audit = kind.create(out, svg)
    audit.run_all()
    second = read_json(out / "stages.json")
    rerun = {stage for stage in second if second[stage]["fingerprint"] != first[stage]["fingerprint"]}
    assert rerun == {"metrics", "sweep", "verdict", "report"}
    drawn = {path.stem for path in (out / "figures").glob("*.svg")}
    assert {"auc_opacity", "auc_device", "sweep_full", "training_curves"} <= drawn


def test_an_analysis_naming_a_model_the_run_lacks_is_one_line_naming_the_key(tmp_path: Path):
    from maskaudit.errors import MaskauditError

    for raw, words in ((TINY, "strategies (full, no_roi, only_roi)"), (PROBE, "probed models (densenet121")):
        config = config_from_dict(raw, check_files=False)
        plan = audit_class(config)(RunDir(tmp_path), config).plan()
        expected = f"analyses.sweep.train_strategies: 'nope' is not one of this run's {words}"
        with pytest.raises(MaskauditError, match=re.escape(expected)):
            plan.require("nope", "sweep.train_strategies")
