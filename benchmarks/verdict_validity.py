"""How often the verdict is right: audits of synthetic data whose truth is known, verdict against truth (issue 16).

Every run is one synthetic dataset (``cxr`` or ``fundus``) that carries every truth at once, one class per
truth (:data:`CLASSES`): the generator's classes are independent (their labels are drawn from streams of their
own, and a class's pixels change only where its own signal is), so one audit gives one verdict per truth.
The one class that changes a mask is ``shape`` (``cxr``: the enlarged heart is cut out of the lung mask;
``fundus``: the disc grows), and it changes it only as a function of its own label: for every other class the
mask change is label-independent noise (the marker still lies outside every ROI's box, the opacities inside the
lungs), so ``shape`` shares the dataset too. Two classes have no pixel signal and a metadata column that
follows their label (per image: ``projection``/``camera``; per patient: ``sex``).

The grid is kinds × strengths × dataset sizes × seeds (:data:`FULL`, :data:`QUICK`); each run is an audit at
a tiny size (small_cnn, the demo's training settings, 3 folds, the six strategies, analyses ``baseline`` and
``verdict`` only) in its own folder under ``--out``. A rerun skips what is done (the pipeline skips each stage
whose fingerprint is unchanged): after a change to the verdict's rules, rerunning recomputes the verdicts only.

Printed: the confusion matrix (rows the truth, columns the verdict, class-verdicts counted), each error's rate,
the accuracy per kind, strength and size, and the dangerous errors (truth ``outside`` or ``metadata``, verdict
``roi``: a shortcut or metadata model called sound), each with its reading. The matrix is also written to
``--out`` as ``confusion.csv`` and ``confusion.md``, the long table as ``verdicts.csv``.

Run: ``python benchmarks/verdict_validity.py [--quick] [--out DIR] [--kinds cxr fundus] [--seeds N]
[--workers N]``.

Cost (2 CPU cores, measured while three other jobs shared them): a run takes about 65 s of CPU at 80 patients
(``cxr``) and 95 s at 160 (``fundus``). ``--quick`` (2 runs) took 229 s of wall time contended, about 2.5 min
uncontended. The full grid (36 runs: 2 kinds × 3 strengths × 2 sizes × 3 seeds) is about 50 min of CPU: about
50 min with ``--workers 1`` uncontended, 25–30 min with ``--workers 2`` (one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
try:
    import maskaudit  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

# ----------------------------------------------------------------------------- truth → expected verdict

#: The truth planted in a class → the verdict that is right for it. The one table to change when the rules do.
EXPECTED: dict[str, str] = {
    "roi": "roi",  # signal inside the ROI only
    "outside": "outside",  # a marker outside every ROI's box
    "global": "everywhere",  # a scanner-like change of the whole image
    "shape": "shape",  # the ROI's outline (enlarged heart / optic disc)
    "none": "none",  # labels are noise
    "metadata": "metadata",  # no pixel signal; a metadata column follows the label
}
#: Verdicts that decline to say where the signal lies (counted as not right, and also shown apart).
DECLINED: tuple[str, ...] = ("undertrained", "undetermined")
#: (truth, verdict) pairs that call a shortcut or a metadata model sound.
DANGEROUS: frozenset[tuple[str, str]] = frozenset({("outside", "roi"), ("metadata", "roi")})

# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Grid:
    kinds: tuple[str, ...]
    strengths: tuple[str, ...]
    sizes: tuple[int, ...]  # n_patients
    seeds: tuple[int, ...]

    def runs(self) -> list[Run]:
        return [Run(k, s, n, seed) for k in self.kinds for s in self.strengths for n in self.sizes
                for seed in self.seeds]


#: Strength name → (the planted pixel signal's ``strength``, the metadata column's ``strength``).
STRENGTHS: dict[str, tuple[float, float]] = {"faint": (0.3, 0.4), "weak": (0.5, 0.6), "strong": (1.0, 0.9)}
FULL = Grid(kinds=("cxr", "fundus"), strengths=("faint", "weak", "strong"), sizes=(80, 160), seeds=(1, 2, 3))
QUICK = Grid(kinds=("cxr",), strengths=("strong",), sizes=(80,), seeds=(1, 2))

#: Class name → (truth, generator signal, metadata column that follows it or None); ``{meta}``: the kind's
#: per-image column.
CLASSES: dict[str, tuple[str, str, str | None]] = {
    "c_roi": ("roi", "roi", None),
    "c_outside": ("outside", "outside", None),
    "c_global": ("global", "global", None),
    "c_shape": ("shape", "shape", None),
    "c_none": ("none", "none", None),
    "c_meta_image": ("metadata", "none", "{meta}"),
    "c_meta_patient": ("metadata", "none", "sex"),
}
IMAGE_COLUMN = {"cxr": "projection", "fundus": "camera"}

#: Changes to the demo's training settings. ``monitor: val_auc``: early stopping and the kept weights follow the mean
#: validation AUC, not the summed validation loss (the study's): in a run of seven classes, three of them with no
#: pixel signal, the summed loss rises as soon as those three are overfit, and stops models before they learn the
#: others (issue 16's part 2), an artefact of packing the truths into one dataset, not of the verdict.
#: ``--monitor val_loss`` measures the study's rule instead.
TRAIN: dict = {"monitor": "val_auc"}

#: The analyses each run does: those the verdict reads, and it (each kept where the installed maskaudit has it; the
#: slow ones, explain, embed, sweep, reader and localize, are left out).
ANALYSES_RUN = ("baseline", "scale", "verdict")

STRATEGIES = ["full", "no_roi", "no_roi_bbox", "only_roi", "only_roi_bbox", "roi_shape"]
IMAGE_SIZE = 64
FOLDS = 3


@dataclass(frozen=True)
class Run:
    kind: str
    strength: str
    n_patients: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.strength}-n{self.n_patients}-seed{self.seed}"


def run_config(run: Run, epochs: int | None = None, monitor: str | None = None) -> dict:
    """The audit config of ``run``: the kind's demo config (its training settings), with this run's data."""
    from maskaudit.config import ANALYSES

    demo = yaml.safe_load(resources.files("maskaudit").joinpath("configs", f"demo-{run.kind}.yaml").read_text())
    signal_strength, meta_strength = STRENGTHS[run.strength]
    classes, metadata = {}, {}
    for name, (_truth, signal, column) in CLASSES.items():
        classes[name] = {"signal": signal, "strength": signal_strength if signal != "none" else 1.0,
                         "prevalence": 0.4}
        if column is not None:
            metadata[column.format(meta=IMAGE_COLUMN[run.kind])] = {"correlates_with": name,
                                                                     "strength": meta_strength}
    train = {**demo["train"], **TRAIN, **({"monitor": monitor} if monitor else {})}
    if epochs is not None:
        train.update(epochs=epochs, patience=min(train["patience"], epochs))
    return {
        "data": {**demo["data"], "n_patients": run.n_patients, "classes": classes, "metadata": metadata},
        "image_size": IMAGE_SIZE,
        "strategies": STRATEGIES,
        "folds": FOLDS,
        "test_fraction": 0.2,
        "seed": run.seed,
        "model": demo["model"],
        "train": train,
        "predict": demo.get("predict", {}),
        "workers": 1,
        "analyses": {"run": [name for name in ANALYSES_RUN if name in ANALYSES]},
        "report": {"title": f"verdict validity: {run.name}"},
    }


# ----------------------------------------------------------------------------- running the audits


def audit_one(run: Run, out: Path, epochs: int | None, threads: int, monitor: str | None = None) -> dict:
    """Audit ``run`` in ``out / run.name`` (every stage but the report; done stages are skipped) → its verdicts."""
    os.environ.setdefault("MASKAUDIT_PROGRESS", "off")
    import torch

    from maskaudit.config import ANALYSES, config_from_dict
    from maskaudit.kinds import create_audit
    from maskaudit.lock import python_command, run_lock

    torch.set_num_threads(threads)
    where = out / run.name
    start = time.perf_counter()
    audit = create_audit(where, config_from_dict(run_config(run, epochs, monitor), origin=run.name))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    audit.run.log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(audit.run.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    with run_lock(where, python_command("verdict_validity")):
        for stage in audit.FLOW:
            if stage == "report":
                continue
            if stage in audit.config.analyses.run:
                audit.analyse(stage)
            elif stage not in ANALYSES:
                getattr(audit, stage)()
    handler.close()
    root.removeHandler(handler)
    table = pd.read_parquet(audit.run.analysis("verdict") / "verdict.parquet")
    seconds = time.perf_counter() - start
    timing = where / "benchmark.json"
    if seconds > 30 or not timing.is_file():  # a rerun that skipped everything keeps the first run's time
        timing.write_text(json.dumps({"seconds": round(seconds, 1)}))
    keep = [c for c in table.columns
            if c in ("class", "verdict", "reading") or c.endswith(("_cell", "_auc", "_ci_low", "_ci_high"))]
    rows = table[keep].to_dict("records")
    for row in rows:
        row.update(run=run.name, kind=run.kind, strength=run.strength, n_patients=run.n_patients, seed=run.seed)
    return {"run": run.name, "rows": rows, "seconds": json.loads(timing.read_text())["seconds"],
            "wall": round(seconds, 1)}


def _audit_star(args: tuple) -> dict:
    run = args[0]
    try:
        return audit_one(*args)
    except Exception as exc:  # one broken run is reported, the others still count
        return {"run": run.name, "error": f"{type(exc).__name__}: {exc}", "rows": []}


def audit_all(runs: list[Run], out: Path, workers: int, epochs: int | None, threads: int,
              monitor: str | None = None) -> list[dict]:
    """Every run, ``workers`` at a time; one line per finished run."""
    calls = [(run, out, epochs, threads, monitor) for run in runs]
    results = []

    def note(result: dict) -> None:
        results.append(result)
        what = result.get("error") or f"{result['wall']:.0f} s (first computed in {result['seconds']:.0f} s)"
        print(f"[{len(results)}/{len(runs)}] {result['run']}: {what}", flush=True)

    if workers <= 1:
        for call in calls:
            note(_audit_star(call))
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(_audit_star, calls):
                note(result)
    return results


# ----------------------------------------------------------------------------- the tables


def verdict_table(rows: Iterable[dict]) -> pd.DataFrame:
    """The long table: one row per run and class, with its ``truth``, ``expected`` verdict and ``correct``."""
    table = pd.DataFrame(list(rows))
    if table.empty:
        return pd.DataFrame(columns=["run", "class", "truth", "expected", "verdict", "correct"])
    table["truth"] = table["class"].map(lambda name: CLASSES[name][0])
    table["expected"] = table["truth"].map(EXPECTED)
    table["correct"] = table["verdict"] == table["expected"]
    return table


def verdict_columns(seen: Iterable[str]) -> list[str]:
    """The matrix's columns: every expected verdict (in :data:`EXPECTED`'s order), then the other states seen, in
    the order the verdict module lists them, then states it does not know (sorted)."""
    from maskaudit.analyses.verdict import VERDICTS

    columns = list(dict.fromkeys(EXPECTED.values()))
    seen = set(seen) - set(columns)
    columns += [v for v in VERDICTS if v in seen]
    return columns + sorted(seen - set(columns))


def confusion(table: pd.DataFrame) -> pd.DataFrame:
    """Counts of class-verdicts: rows the truth (:data:`EXPECTED`'s order), columns :func:`verdict_columns`."""
    matrix = pd.crosstab(table["truth"], table["verdict"]) if len(table) else pd.DataFrame()
    matrix = matrix.reindex(index=list(EXPECTED), columns=verdict_columns(table["verdict"]), fill_value=0)
    matrix.index.name, matrix.columns.name = "truth", "verdict"
    return matrix.fillna(0).astype(int)


def error_rates(matrix: pd.DataFrame) -> list[tuple[str, str, int, int]]:
    """Every off-diagonal cell with a count: (truth, verdict, count, the truth's row total), largest rate first."""
    out = []
    for truth, row in matrix.iterrows():
        total = int(row.sum())
        for verdict, count in row.items():
            if count and verdict != EXPECTED[truth]:
                out.append((truth, verdict, int(count), total))
    return sorted(out, key=lambda e: (-e[2] / e[3], e[0], e[1]))


def accuracy_by(table: pd.DataFrame, column: str) -> list[tuple[str, int, int]]:
    """(value, correct, total) of ``column``'s each value."""
    return [(str(value), int(group["correct"].sum()), len(group))
            for value, group in table.groupby(column, sort=True)]


def dangerous(table: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The dangerous class-verdicts, and how many class-verdicts could have been one (truth outside or metadata)."""
    exposed = table[table["truth"].isin({t for t, _ in DANGEROUS})]
    hits = exposed[[(t, v) in DANGEROUS for t, v in zip(exposed["truth"], exposed["verdict"], strict=True)]]
    return hits, len(exposed)


def _pct(n: int, total: int) -> str:
    return f"{n / total:.0%}" if total else "n/a"


def markdown(matrix: pd.DataFrame) -> str:
    """The matrix as a Markdown table, the expected cell of each row in bold, a row total at the end."""
    head = "| truth ↓ / verdict → | " + " | ".join(matrix.columns) + " | total |"
    lines = [head, "|" + "---|" * (len(matrix.columns) + 2)]
    for truth, row in matrix.iterrows():
        cells = [f"**{n}**" if verdict == EXPECTED[truth] else str(n) for verdict, n in row.items()]
        lines.append(f"| {truth} | " + " | ".join(cells) + f" | {int(row.sum())} |")
    return "\n".join(lines) + "\n"


def evidence_text(row: pd.Series) -> str:
    """The cells a verdict read (``inside only_roi→only_roi 0.71 [0.55, 0.86]``, ...), else its reading."""
    parts = []
    for name in ("full", "inside", "outside", "shape", "baseline"):
        auc, low, high = (row.get(f"{name}_{key}", math.nan) for key in ("auc", "ci_low", "ci_high"))
        if isinstance(auc, float) and not math.isnan(auc):
            cell = row.get(f"{name}_cell", "") if name != "baseline" else "metadata"
            parts.append(f"{name} {cell} {auc:.2f} [{low:.2f}, {high:.2f}]")
    return "; ".join(parts) or str(row.get("reading", ""))


def summary(table: pd.DataFrame) -> list[str]:
    """The printed summary; its last line is ``dangerous errors: <n> of <runs>``."""
    matrix = confusion(table)
    hits, exposed = dangerous(table)
    lines = ["Counts are class-verdicts: one per class of each run (rows: truth; columns: verdict).",
             f"Dangerous error: truth {' or '.join(sorted({t for t, _ in DANGEROUS}))}, verdict "
             f"{' or '.join(sorted({v for _, v in DANGEROUS}))}; its <runs> are the class-verdicts whose truth is "
             "outside or metadata.", "", matrix.to_string(), ""]
    correct = int(table["correct"].sum()) if len(table) else 0
    lines.append(f"right: {correct} of {len(table)} ({_pct(correct, len(table))})")
    declined = int(table["verdict"].isin(DECLINED).sum()) if len(table) else 0
    if declined:
        claims = len(table) - declined
        lines.append(f"declined ({' / '.join(DECLINED)}): {declined}; right among the other verdicts: "
                     f"{correct} of {claims} ({_pct(correct, claims)})")
    lines.append("errors (share of the truth's row):")
    for truth, verdict, count, total in error_rates(matrix) or []:
        lines.append(f"  {truth} → {verdict}: {count} of {total} ({_pct(count, total)})")
    if not error_rates(matrix):
        lines.append("  none")
    for column in ("kind", "strength", "n_patients"):
        if column in table:
            parts = [f"{value} {c}/{n} ({_pct(c, n)})" for value, c, n in accuracy_by(table, column)]
            lines.append(f"accuracy per {column.replace('n_patients', 'size (patients)')}: " + ", ".join(parts))
    if len(hits):
        lines.append("dangerous cells:")
        for _, row in hits.iterrows():
            lines.append(f"  {row.get('run', '?')} {row['class']} (truth {row['truth']}) → {row['verdict']}: "
                         f"{evidence_text(row)}")
    lines.append(f"dangerous (truth outside/metadata → roi): {len(hits)} of {exposed} ({_pct(len(hits), exposed)})")
    lines.append(f"dangerous errors: {len(hits)} of {exposed}")
    return lines


def write_tables(table: pd.DataFrame, out: Path) -> None:
    matrix = confusion(table)
    matrix.to_csv(out / "confusion.csv")
    (out / "confusion.md").write_text(markdown(matrix))
    table.to_csv(out / "verdicts.csv", index=False)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"the quick grid {QUICK}")
    parser.add_argument("--out", type=Path, help="folder of the runs and tables (default: a new temporary folder)")
    parser.add_argument("--kinds", nargs="+", choices=["cxr", "fundus"])
    parser.add_argument("--strengths", nargs="+", choices=list(STRENGTHS))
    parser.add_argument("--sizes", nargs="+", type=int, help="n_patients of each dataset")
    parser.add_argument("--seeds", type=int, help="seeds 1..N")
    parser.add_argument("--workers", type=int, default=1, help="audits run at once (each in its own process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per audit")
    parser.add_argument("--epochs", type=int, help="override the demo's epochs (development only)")
    parser.add_argument("--monitor", choices=["val_loss", "val_auc"],
                        help=f"what early stopping follows (default {TRAIN['monitor']}; val_loss: the study's)")
    args = parser.parse_args(argv)

    grid = QUICK if args.quick else FULL
    grid = replace(grid, kinds=tuple(args.kinds or grid.kinds), strengths=tuple(args.strengths or grid.strengths),
                   sizes=tuple(args.sizes or grid.sizes),
                   seeds=tuple(range(1, args.seeds + 1)) if args.seeds else grid.seeds)
    out = args.out or Path(tempfile.mkdtemp(prefix="verdict_validity-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = grid.runs()
    print(f"verdict validity: {len(runs)} runs ({grid}) in {out}; {len(CLASSES)} classes per run: "
          + ", ".join(f"{name} ({truth})" for name, (truth, _, _) in CLASSES.items())
          + f"; {IMAGE_SIZE} px, {FOLDS} folds, the demo's training with monitor "
          f"{args.monitor or TRAIN['monitor']}", flush=True)
    start = time.perf_counter()
    results = audit_all(runs, out, args.workers, args.epochs, args.threads, args.monitor)
    elapsed = time.perf_counter() - start
    failed = [r for r in results if "error" in r]
    table = verdict_table(row for r in results for row in r["rows"])
    write_tables(table, out)
    done = [r for r in results if "error" not in r]
    first = sum(r["seconds"] for r in done)
    print(f"\n{len(done)} runs in {elapsed:.0f} s (computed first in {first:.0f} s, "
          f"{first / max(len(done), 1):.0f} s a run); tables in {out}")
    for r in failed:
        print(f"FAILED {r['run']}: {r['error']}")
    print("\n".join(summary(table)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
