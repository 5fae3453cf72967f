"""The report reads the run directory alone: config.yaml, stages.json, the counts and checks, the metric and
analysis tables, the figures. Neither the prepared stores nor the pipeline is needed.

The run here is built file by file, with the functions each stage uses to make its tables (the stores by
``prepare_store``, the counts by ``count_table`` and ``split_count_table``, the metrics from a small prediction
table by :mod:`maskaudit.metrics`, the verdicts by ``class_verdict``), not through :class:`maskaudit.pipeline.Audit`:
so the report is shown to need nothing else.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from maskaudit.config import AuditConfig, config_from_dict, dump_config
from maskaudit.report.html import ReportView, write_report
from maskaudit.rundir import RunDir, write_json, write_table, write_text

SRC = Path(__file__).resolve().parents[1] / "src" / "maskaudit"
SECTIONS = ("verdict", "auc", "splits", "baseline", "explain", "embed", "sweep", "reader", "training", "data",
            "config", "software", "stages")
OTHER = {"source": "synthetic", "kind": "cxr", "n_patients": 8, "images_per_patient": [1, 1],
         "classes": {"opacity": {"signal": "roi"}}}


def _config() -> AuditConfig:
    from test_pipeline import TINY

    return config_from_dict({**TINY, "analyses": {"run": ["verdict"]}, "report": {"title": "run directory alone"},
                             "external": [{"name": "other", "data": OTHER}]})


def _sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([a-z]+)">(.*?)</section>', html, flags=re.S))


def _masked(html: str) -> str:
    """The report without its creation time."""
    return re.sub(r"written \d{4}-\d\d-\d\d \d\d:\d\d UTC", "written …", html)


def _record(**extra: object) -> dict:
    return {"fingerprint": "f", "finished": "2024-01-02T03:04:05+00:00", "seconds": 1.5, **extra}


def write_counts(run: RunDir, stores: dict, splits=None) -> None:
    """The counts tables as ``prepare`` (every dataset: main, then the external ones) and ``split`` write them."""
    from maskaudit.data.splits import split_count_table
    from maskaudit.data.store import count_table

    write_table(run.counts("prepared"), pd.concat([count_table(store.manifest).assign(dataset=name)
                                                   for name, store in stores.items()]), csv=True)
    if splits is not None:
        main = stores["main"]
        write_table(run.counts("splits"), split_count_table(main.kept, splits, main.classes), csv=True)


def _predictions(config: AuditConfig, stores: dict, splits, rng: np.random.Generator) -> pd.DataFrame:
    """Every model of every fold on the hold-out set, its fold's validation images and the external set."""
    parts = []
    for train in config.strategies:
        for fold in range(config.folds):
            sets = [("main", "test", splits.test), ("main", "val", splits.val(fold)),
                    ("other", "external", stores["other"].kept["index"].to_numpy())]
            for dataset, split, idx in sets:
                kept = stores[dataset].kept.set_index("index").loc[idx]
                for test in config.eval_strategies:
                    for name in config.classes:
                        labels = kept[name].to_numpy(dtype=float) if name in kept else np.full(len(kept), np.nan)
                        signal = 2.0 if (train == test) == (name == "opacity") else 0.2
                        scores = 1 / (1 + np.exp(-(signal * (np.nan_to_num(labels) - 0.5)
                                                   + rng.normal(0, 1, len(kept)))))
                        parts.append(pd.DataFrame({
                            "dataset": dataset, "split": split, "train_strategy": train, "fold": fold,
                            "test_strategy": test, "image_id": kept["image_id"].astype(str).to_numpy(),
                            "class": name, "label": labels, "probability": scores}))
    return pd.concat(parts, ignore_index=True)


def build_run(root: Path) -> RunDir:
    """A finished tiny run (prepare, split, train's histories, predict, metrics, verdict), file by file."""
    from maskaudit.analyses.evidence import run_evidence_flags
    from maskaudit.analyses.verdict import class_verdict
    from maskaudit.data.check import check_store, write_check
    from maskaudit.data.sources import make_source
    from maskaudit.data.splits import make_splits, save_splits
    from maskaudit.data.store import prepare_store
    from maskaudit.metrics import auc_by_fold, auc_matrix, delong_table, matrix_of
    from maskaudit.report.figures import auc_heatmap, save_figure

    config, run = _config(), RunDir(root)
    write_text(run.config, dump_config(config))
    other = config.model_copy(update={"data": config.external[0].data, "external": []})  # as the pipeline's
    stores = {}
    for name, where, data in (("main", run.prepared, config), ("other", run.external("other"), other)):
        stores[name] = prepare_store(make_source(data), where, config.image_size, workers=config.workers,
                                     progress=False, masks="required" if name == "main" else "optional")
        write_check(run.check(name), check_store(stores[name], data, name, external=name != "main"))
    splits = make_splits(stores["main"].kept, config.classes, config.test_fraction, config.folds, config.seed)
    save_splits(run.splits, splits, stores["main"].kept)
    write_counts(run, stores, splits)
    for train in config.strategies:
        for fold in range(config.folds):
            write_text(run.job(train, fold) / "history.csv", "epoch,train_loss,val_loss,best\n"
                       "1,0.70,0.69,True\n2,0.60,0.71,False\n")
    predictions = _predictions(config, stores, splits, np.random.default_rng(0))
    write_table(run.predictions, predictions)
    by_fold = auc_by_fold(predictions)
    matrix = auc_matrix(predictions, by_fold)
    write_table(run.metrics / "auc_by_fold.parquet", by_fold, csv=True)
    write_table(run.metrics / "auc_matrix.parquet", matrix, csv=True)
    write_table(run.metrics / "delong.parquet", delong_table(predictions), csv=True)
    for name in config.classes:
        mean, std = (matrix_of(matrix, name, "test", config.strategies, config.eval_strategies, value)
                     for value in ("auc_mean", "auc_std"))
        save_figure(auc_heatmap(mean, std, f"{name}: hold-out AUC"), run.figures / f"auc_{name}")
    flags = run_evidence_flags(run, config.analyses.verdict.evidence)
    holdout = matrix[(matrix["dataset"] == "main") & (matrix["split"] == "test")]
    verdicts = pd.DataFrame([{"class": name, **class_verdict(
        holdout[holdout["class"] == name].set_index(["train_strategy", "test_strategy"]), config.analyses.verdict,
        flags=flags[flags["class"] == name])} for name in config.classes])
    write_table(run.analysis("verdict") / "verdict.parquet", verdicts, csv=True)
    write_json(run.stages, {
        "prepare": _record(kept=stores["main"].n, **{"external other": {"kept": stores["other"].n}}),
        "split": _record(method=splits.method), "train": _record(), "predict": _record(rows=len(predictions)),
        "metrics": _record(), "verdict": _record(verdicts=list(verdicts["verdict"]))})
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    return build_run(tmp_path_factory.mktemp("rundir") / "run")


def test_the_report_renders_the_same_without_the_prepared_stores(built: RunDir, tmp_path: Path):
    """Rendered, then the prepared stores deleted and rendered again: the same page, data counts included."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(built.root, run.root)
    assert write_report(run, ReportView())["bytes"] > 0
    first = run.report.read_text()
    sections = _sections(first)
    assert list(sections) == list(SECTIONS)

    data = sections["data"]
    counts = pd.read_parquet(run.counts("prepared"))
    assert list(counts["dataset"].unique()) == ["main", "other"]
    assert "Rows kept and rejected" in data and "not prepared yet" not in data and "not run yet" not in data
    for _, r in counts.iterrows():
        assert (f'<td class="l">{r["dataset"]}</td><td class="l">{r["status"]}</td><td class="l">'
                f'{r["reason"] or "—"}</td><td>{r["rows"]}</td>') in data
    assert "<b>main</b>" in data and "<b>other</b> (external)" in data  # the data checks
    split_counts = pd.read_parquet(run.counts("splits"))
    assert list(split_counts["split"]) == ["hold-out test", "fold 0", "fold 1"]
    assert list(split_counts.columns) == ["split", "images", "patients", "opacity +", "device +"]
    for _, r in split_counts.iterrows():
        first_cell, *others = (f">{v}</td>" for v in r)
        assert f'<tr><td class="l"{first_cell}' + "".join(f"<td{cell}" for cell in others) + "</tr>" in data
    verdicts = pd.read_parquet(run.analysis("verdict") / "verdict.parquet")
    for _, v in verdicts.iterrows():
        assert re.search(f'<th class="l">{v["class"]}</th><td class="v"[^>]*>{re.escape(v["label"])}</td>',
                         sections["verdict"])
    assert "This is a probe" not in first and "train \\ test" in sections["auc"]
    assert all(f'<img alt="AUC matrix of {name}" src="data:image/png;base64,' in sections["auc"]
               for name in ("opacity", "device")) and "No heatmap" not in sections["auc"]
    stages = sections["stages"]
    for name in ("prepare", "split", "train", "predict", "metrics", "verdict"):
        assert f'<td class="l">{name}</td><td class="l">2024-01-02T03:04:05+00:00</td><td>1.5</td>' in stages
    assert "method: " in stages and "external other: kept=8" in stages
    assert "external: other" in sections["splits"] and "Training curves" in sections["training"]

    shutil.rmtree(run.prepared)
    shutil.rmtree(run.root / "external" / "other" / "prepared")
    assert not list(run.root.rglob("images.npy")) and not list(run.root.rglob("manifest.parquet"))
    write_report(run, ReportView())
    assert _masked(run.report.read_text()) == _masked(first)


def test_a_run_in_progress_reads_the_counts_and_the_stage_records(built: RunDir, tmp_path: Path):
    """"not prepared yet" and "not run yet" follow the counts tables and stages.json, not the stores' files."""
    from maskaudit.rundir import read_json

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    shutil.copy(built.config, run.config)
    write_report(run, ReportView())
    data = _sections(run.report.read_text())["data"]
    assert f"not prepared yet: `maskaudit prepare --out {run.root}`" in data and "Rows kept" not in data
    assert f"not run yet: `maskaudit prepare --out {run.root}`, then `maskaudit split --out {run.root}`" in data

    shutil.copytree(built.prepared, run.prepared)  # a store alone is not a prepared dataset for the report
    write_report(run, ReportView())
    assert f"not prepared yet: `maskaudit prepare --out {run.root}`" in _sections(run.report.read_text())["data"]

    shutil.copytree(built.root / "counts", run.root / "counts")
    main_only = pd.read_parquet(run.counts("prepared")).query("dataset == 'main'")
    write_table(run.counts("prepared"), main_only)
    write_json(run.stages, {"prepare": read_json(built.stages)["prepare"]})
    write_report(run, ReportView())
    data = _sections(run.report.read_text())["data"]
    assert ("not prepared yet (other: the preparation has not finished): "
            f"`maskaudit prepare --out {run.root}`") in data and "Rows kept and rejected" in data
    assert f"not run yet: `maskaudit split --out {run.root}`" in data and "hold-out test" not in data  # no record

    shutil.copy(built.counts("prepared"), run.counts("prepared"))
    write_json(run.stages, {k: read_json(built.stages)[k] for k in ("prepare", "split")})
    write_report(run, ReportView())
    sections = _sections(run.report.read_text())
    assert "not prepared yet" not in sections["data"] and "hold-out test" in sections["data"]
    assert (f"not run yet: `maskaudit train --out {run.root}`, then `maskaudit predict --out {run.root}`, "
            f"`maskaudit metrics --out {run.root}`") in sections["auc"]
    trainless = ReportView(trains=False)  # a probe's chain has no train stage
    write_report(run, trainless)
    assert (f"not run yet: `maskaudit predict --out {run.root}`, then `maskaudit metrics --out {run.root}`"
            in _sections(run.report.read_text())["auc"])


def test_a_probe_view_changes_the_corner_the_notice_and_the_models_section(built: RunDir, tmp_path: Path):
    from maskaudit.probe_report import probe_notice, probe_section, probe_view, report_view

    run = RunDir(tmp_path / "run")
    shutil.copytree(built.root, run.root)
    probe = config_from_dict({**yaml_of(run), "models": [{"name": "mine", "source": "onnx", "file": "gone.onnx",
                                                           "output": {"names": ["opacity"]}}],
                              "predict": {"images": "all"}}, check_files=False)
    view = probe_view(probe)
    assert view == ReportView(corner="model \\ test", models_label="probed model", trains=False,
                              notice=probe_notice(probe), models_section=probe_section,
                              rows_are="the probed model", cells_are="the model's AUC on every image")
    assert report_view(probe) == view and report_view(_config()) == ReportView()
    assert probe_notice(probe).startswith("This is a probe: models trained elsewhere, scored as they are on every "
                                          "image under each masking")
    write_text(run.config, dump_config(probe))
    write_json(run.job("mine", 0) / "probe.json", {"input": "1 x 32 x 32", "outputs": "opacity → 0"})
    write_report(run, view)
    sections = _sections(run.report.read_text())
    assert "<p>This is a probe: models trained elsewhere" in sections["verdict"]
    assert "What the evidence says" not in sections["verdict"]
    assert "Probed models" in sections["training"] and "Training curves" not in sections["training"]
    assert ">mine<" in sections["training"] and "1 x 32 x 32" in sections["training"]


def yaml_of(run: RunDir) -> dict:
    import yaml

    return yaml.safe_load(run.config.read_text())


def test_the_report_module_knows_no_pipeline_and_no_kind_of_audit():
    """report/html.py imports neither the pipeline nor anything that does; "probing" lives in probe_report."""
    html = (SRC / "report" / "html.py").read_text()
    template = (SRC / "report" / "templates" / "report.html").read_text()
    assert "probing" not in html and "probing" not in template and "pipeline import" not in html
    code = ("import sys, maskaudit.report.html, maskaudit.report.compare, maskaudit.probe_report\n"
            "print(sorted(m for m in sys.modules if m.startswith('maskaudit.pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_count_tables_keep_the_reports_columns():
    """count_table: kept first, then rejected per kind of reason, most first; split_count_table: per split."""
    from maskaudit.data.splits import Splits, split_count_table
    from maskaudit.data.store import count_table

    manifest = pd.DataFrame({"status": ["kept", "rejected", "kept", "rejected", "rejected"],
                             "reason": [None, "image file not found: a.png", "", "empty ROI (lungs)",
                                        "image file not found: b.png"]})
    assert count_table(manifest).to_dict("records") == [
        {"status": "kept", "reason": "", "rows": 2},
        {"status": "rejected", "reason": "image file not found", "rows": 2},
        {"status": "rejected", "reason": "empty ROI", "rows": 1}]
    kept = pd.DataFrame({"index": [0, 1, 2, 3], "patient_id": ["a", "a", "b", "c"], "x": [1, 0, 1, pd.NA]},
                        ).astype({"x": "Int8"})
    splits = Splits(test=np.array([3]), folds=[np.array([0, 1]), np.array([2])], method="m")
    table = split_count_table(kept, splits, ["x", "not there"])
    assert table.to_dict("records") == [
        {"split": "hold-out test", "images": 1, "patients": 1, "x +": "0 (0 %)"},
        {"split": "fold 0", "images": 2, "patients": 1, "x +": "1 (50 %)"},
        {"split": "fold 1", "images": 1, "patients": 1, "x +": "1 (100 %)"}]
