"""The run's report: one self-contained HTML file (figures inlined, no network requests)."""

from __future__ import annotations

import base64
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from maskaudit import __version__
from maskaudit.analyses.verdict import VERDICTS
from maskaudit.rundir import read_json, write_text

if TYPE_CHECKING:
    from maskaudit.pipeline import Audit


def _png_data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(value: object) -> str:
    """Floats with three decimals, missing values empty, anything else as it is."""
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.3f}"
    return str(value)


def data_tables(audit: Audit) -> dict[str, pd.DataFrame]:
    """Counts kept/rejected by reason, and per split: images, patients, positives per class."""
    store = audit.store()
    stores = {"main": store}
    for name, (_, ext_store) in (audit.external_stores().items() if audit.config.external else []):
        stores[name] = ext_store
    reasons = pd.concat([  # one line per kind of reason; every row with its own reason is in manifest.parquet
        s.counts().rename(columns={"count": "rows"}).assign(dataset=name) for name, s in stores.items()
    ], ignore_index=True)
    reasons["reason"] = reasons["reason"].replace("", "—")
    tables = {"counts": reasons}
    if audit.run.splits.is_file():
        splits = audit.splits(store)
        parts = {"hold-out test": splits.test}
        parts.update({f"fold {k}": idx for k, idx in enumerate(splits.folds)})
        rows = []
        kept = store.kept.set_index("index")
        for name, idx in parts.items():
            row = {"split": name, "images": len(idx), "patients": kept.loc[idx, "patient_id"].nunique()}
            for k, cls in enumerate(store.classes):
                row[f"{cls} +"] = int(np.nansum(store.labels[idx, k]))
            rows.append(row)
        tables["splits"] = pd.DataFrame(rows)
    return tables


def _table(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def analysis_sections(audit: Audit) -> list[dict]:
    """Each analysis's figures (inlined) and main table, or why it is absent."""
    run, config = audit.run, audit.config
    figures = {
        "baseline": [],
        "explain": [run.figures / f"explain_full_full_{name}.png" for name in config.classes],
        "embed": [run.figures / "tsne.png"],
        "sweep": [run.figures / f"sweep_{s}.png" for s in config.analyses.sweep.train_strategies],
        "reader": [],
    }
    tables = {
        "baseline": (run.analysis("baseline") / "baseline_auc.parquet", "metadata baseline AUC per fold and mean"),
        "explain": (run.analysis("explain") / "attribution_in_roi.parquet",
                    "share of positive attribution inside the ROI (in_roi), the ROI's share of the image, ratio"),
        "embed": (run.analysis("embed") / "cosine.parquet", "cosine similarity of full and masked embeddings"),
        "sweep": (run.analysis("sweep") / "sweep.parquet", "AUC against the ROI's spread, mean ± std over folds"),
        "reader": (run.analysis("reader") / "selection.parquet", "reader-study cases (the key to the blinded files)"),
    }
    stages = read_json(run.stages) if run.stages.is_file() else {}
    sections = []
    for name, (path, caption) in tables.items():
        record = stages.get(name, {})
        sections.append({
            "name": name,
            "status": ("not in analyses.run" if name not in config.analyses.run else
                       record.get("status", "") if record else "not run"),
            "figures": [uri for uri in map(_png_data_uri, figures[name]) if uri],
            "table": _table(path) if record else None,
            "caption": caption,
        })
    return sections


def write_report(audit: Audit) -> dict:
    from maskaudit.pipeline import STAGES

    run, config = audit.run, audit.config
    env = Environment(loader=PackageLoader("maskaudit", "report/templates"),
                      autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = _fmt
    matrix_path = run.metrics / "auc_matrix.parquet"
    matrix = pd.read_parquet(matrix_path) if matrix_path.is_file() else None
    classes = []
    for name in config.classes:
        entry = {"name": name, "heatmap": _png_data_uri(run.figures / f"auc_{name}.png"), "tables": {}}
        if matrix is not None:
            from maskaudit.metrics import MAIN, matrix_of

            panels = [(MAIN, "test", "hold-out test"), (MAIN, "val", "validation folds")]
            panels += [(ext.name, "external", f"external: {ext.name}") for ext in config.external]
            for dataset, split, caption in panels:
                mean = matrix_of(matrix, name, split, config.strategies, config.eval_strategies, dataset=dataset)
                if mean.notna().any().any():
                    entry["tables"][caption] = mean
        classes.append(entry)
    stages = read_json(run.stages) if run.stages.is_file() else {}
    html = env.get_template("report.html").render(
        verdicts=_table(run.analysis("verdict") / "verdict.parquet"),
        verdict_colours={k: colour for k, (_, colour) in VERDICTS.items()},
        analyses=analysis_sections(audit),
        title=config.report.title,
        run=run.root.resolve(),
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        python=platform.python_version(),
        classes=classes,
        data=data_tables(audit),
        stages=stages,
        stage_names=STAGES,
        config_yaml=run.config.read_text(),
    )
    write_text(run.report, html)
    return {"bytes": len(html)}
