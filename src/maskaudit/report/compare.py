"""Two runs side by side: hold-out AUC matrices, their difference, and verdicts (``maskaudit report --compare``).

Like the report, it reads the two run directories alone (their ``config.yaml``, metrics and verdict tables):
no prepared store, no pipeline, and the data the runs were made from may have moved.
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from maskaudit import __version__
from maskaudit.analyses.verdict import VERDICTS
from maskaudit.errors import MaskauditError
from maskaudit.probe_report import report_view
from maskaudit.report.figures import auc_colour, difference_colour
from maskaudit.report.html import ReportView, _environment, matrix_models, run_config
from maskaudit.report.parts import Table, _cell, fmt_auc
from maskaudit.rundir import RunDir, write_text


def _load(root: Path) -> dict:
    run = RunDir(root)
    if not run.config.is_file():
        raise MaskauditError(f"{root} is not a run directory: no config.yaml")
    matrix_path = run.metrics / "auc_matrix.parquet"
    if not matrix_path.is_file():
        raise MaskauditError(f"{root} has no {matrix_path.relative_to(root)}; run `maskaudit metrics --out {root}`")
    verdict_path = run.analysis("verdict") / "verdict.parquet"
    config = run_config(run)
    return {
        "root": root.resolve(),
        "config": config,
        "view": report_view(config),
        "matrix": pd.read_parquet(matrix_path),
        "verdict": pd.read_parquet(verdict_path) if verdict_path.is_file() else None,
    }


def _grid(matrix: pd.DataFrame, name: str, column: str) -> pd.DataFrame:
    part = matrix[(matrix["class"] == name) & (matrix["split"] == "test") & (matrix["dataset"] == "main")]
    return part.pivot(index="train_strategy", columns="test_strategy", values=column)


def _matrix_table(caption: str, rows: list[str], cols: list[str], value, colour, title,
                  corner: str = ReportView.corner) -> Table:
    table = Table(caption, [corner, *cols], corner=True)
    for r in rows:
        cells = [_cell(r, left=True)]
        for c in cols:
            v = value(r, c)
            background, text = colour(v)
            cells.append(_cell("n/a" if np.isnan(v) else f"{v:+.3f}" if colour is difference_colour else f"{v:.3f}",
                               title=title(r, c), style=f"background:{background};color:{text}"))
        table.rows.append(cells)
    return table


def compare_runs(run_a: Path, run_b: Path, out: Path) -> Path:
    """Write ``compare.html``: two runs' hold-out AUC matrices and verdicts, differences highlighted.

    Parameters
    ----------
    run_a, run_b : Path
        Run directories with a metrics stage (``metrics/auc_matrix.parquet``).
    out : Path
        A folder (``compare.html`` is written in it) or a file name ending in ``.html``.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    MaskauditError
        When a run lacks its configuration or metrics, or the runs share no class.
    """
    a, b = _load(Path(run_a)), _load(Path(run_b))
    classes = [c for c in a["config"].classes if c in b["config"].classes]
    if not classes:
        raise MaskauditError(f"the runs share no class: {a['config'].classes} against {b['config'].classes}")
    rows = [s for s in matrix_models(a["matrix"]) if s in matrix_models(b["matrix"])]
    cols = [s for s in a["config"].eval_strategies if s in b["config"].eval_strategies]
    corner = a["view"].corner if a["view"].corner == b["view"].corner else ReportView.corner
    sections = []
    for name in classes:
        means = [_grid(r["matrix"], name, "auc_mean").reindex(index=rows, columns=cols) for r in (a, b)]
        lows = [_grid(r["matrix"], name, "ci_low").reindex(index=rows, columns=cols) for r in (a, b)]
        highs = [_grid(r["matrix"], name, "ci_high").reindex(index=rows, columns=cols) for r in (a, b)]

        def ci(k: int, r: str, c: str, means=means, lows=lows, highs=highs) -> str:
            return fmt_auc(means[k].at[r, c], lows[k].at[r, c], highs[k].at[r, c]) or "n/a"

        tables = [
            _matrix_table(f"A: {name}", rows, cols, lambda r, c, k=k, m=means: float(m[k].at[r, c]), auc_colour,
                          lambda r, c, k=k, ci=ci: f"{r}→{c}: AUC {ci(k, r, c)}", corner) for k in (0, 1)
        ]
        tables.append(_matrix_table(
            f"B − A: {name}", rows, cols, lambda r, c, m=means: float(m[1].at[r, c] - m[0].at[r, c]),
            difference_colour, lambda r, c, ci=ci: f"{r}→{c}: A {ci(0, r, c)}, B {ci(1, r, c)}", corner))
        tables[1].caption = f"B: {name}"
        sections.append({"name": name, "tables": tables})
    verdicts = []
    for name in classes:
        row = {"class": name}
        for key, r in (("a", a), ("b", b)):
            v = r["verdict"]
            hit = v[v["class"] == name] if v is not None else None
            if hit is None or hit.empty:
                row[key] = ("not run", "#ffffff")
            else:
                verdict = str(hit["verdict"].iloc[0])
                row[key] = (str(hit["label"].iloc[0]), VERDICTS.get(verdict, ("", "#ffffff"))[1])
                row[f"{key}_key"] = verdict
        row["differs"] = row.get("a_key") != row.get("b_key")
        verdicts.append(row)
    only = {k: sorted(set(r["config"].classes) - set(classes)) for k, r in (("A", a), ("B", b))}
    html = _environment().get_template("compare.html").render(
        title="maskaudit: two runs compared", a=a["root"], b=b["root"], sections=sections, verdicts=verdicts,
        only=only, created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), version=__version__,
        python=platform.python_version(), strategies=rows, tests=cols,
    )
    out = Path(out)
    target = out if out.suffix == ".html" else out / "compare.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text(target, html)
    return target
