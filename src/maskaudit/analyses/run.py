"""The analyses as stages of an audit (SPEC §6, §8): each reads the run directory and writes into it.

:data:`ANALYSES` is the registry: each :class:`Analysis` has its config section (the field of
:class:`maskaudit.config.AnalysesConfig` with its name), the function that runs it on a
:class:`maskaudit.context.Context`, the per-model parts it maps as jobs, and the evidence it gives
the verdict. The pipeline runs an analysis as a stage and skips it when its fingerprint has not
changed. The analyses that run trained models over many images (``explain``, ``sweep``) split into
one job per model (parts ``explanations`` and ``sweep predictions`` of the stage table), each job's
result kept in its job folder with its own fingerprint, so that a killed stage resumes job by job.

Tables go to ``analyses/<name>/`` (Parquet and CSV), figures to ``figures/``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from maskaudit.analyses.baseline import (
    IMAGE_MAX,
    METADATA,
    baseline_predictions,
    baseline_tables,
    metadata_columns,
    scale_predictions,
)
from maskaudit.analyses.embeddings import cosine_table, embed_images, tsne_figure, tsne_points
from maskaudit.analyses.evidence import run_evidence_flags
from maskaudit.analyses.explain import attribution_in_roi, attribution_panels, explain
from maskaudit.analyses.localize import (
    CELL_COLUMNS,
    CORRECTIONS,
    ROLES,
    cell_boxes,
    evidence_targets,
    explained_attribution,
    figure_name,
    grid_edges,
    localization_sentence,
    localize_figure,
    localize_section,
    localize_target,
    localized_cells,
    mean_positive_image,
    occlusion_predictions,
    summary_row,
)
from maskaudit.analyses.reader_selection import export_cases, select_cases
from maskaudit.analyses.sweep import sweep_aucs, sweep_figure, sweep_predictions, sweep_steps
from maskaudit.analyses.verdict import VERDICTS, class_verdict
from maskaudit.context import Context
from maskaudit.errors import MaskauditError
from maskaudit.loader import batches, resolve_device
from maskaudit.metrics import MAIN, prediction_sets
from maskaudit.predict import loaded_groups, probabilities, scorable_strategies
from maskaudit.progress import active
from maskaudit.report.figures import save_figure
from maskaudit.rundir import atomic_path, write_table
from maskaudit.seeds import derive_seed
from maskaudit.stages import Stage
from maskaudit.stats import mean_difference_test

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ helpers


# ------------------------------------------------------------------------------------------ baseline


def run_baseline(ctx: Context) -> dict:
    """The metadata baseline, and the scale factor as a predictor of its own (:mod:`maskaudit.analyses.baseline`)."""
    c = ctx.config
    out = ctx.run.analysis("baseline")
    store, splits = ctx.store, ctx.splits
    if c.predict.images == "all":
        return _no_baseline(out, {"status": "every image was scored (predict.images: all): no held-out images for a "
                                            "baseline"})
    train = {k: splits.train(k) for k in range(c.folds)}
    record = {}
    scale = scale_predictions(store.kept, store.labels, store.classes, train, splits.test)
    if len(scale):
        scale_aucs, scale_tests = baseline_tables(scale, ctx.predictions(), store.classes, ctx.plan.baseline_pairs,
                                                  c.analyses.level, predictor=IMAGE_MAX)
        write_table(out / "scale_predictions.parquet", scale)
        write_table(out / "scale_auc.parquet", scale_aucs, csv=True)
        write_table(out / "scale_tests.parquet", scale_tests, csv=True)
    else:
        record["scale"] = "the store has no image_max column (prepared before it was recorded): no scale factor"
        for name in ("scale_predictions", "scale_auc", "scale_tests"):
            (out / f"{name}.parquet").unlink(missing_ok=True)
            (out / f"{name}.csv").unlink(missing_ok=True)
    columns = metadata_columns(store.metadata_columns, c.analyses.baseline.columns)
    if not columns:
        return _no_baseline(out, {**record, "status": "this data has no metadata: no baseline"})
    predictions, fits = baseline_predictions(store.kept, store.labels, store.classes, columns, train, splits.test)
    aucs, tests = baseline_tables(predictions, ctx.predictions(), store.classes, ctx.plan.baseline_pairs,
                                  c.analyses.level)
    write_table(out / "predictions.parquet", predictions)
    write_table(out / "fits.parquet", fits, csv=True)
    write_table(out / "baseline_auc.parquet", aucs, csv=True)
    write_table(out / "baseline_tests.parquet", tests, csv=True)
    return {**record, "columns": columns}


def _no_baseline(out: Path, record: dict) -> dict:
    """Empty baseline tables (the report reads them as "no baseline") and the stage's ``record``."""
    for name in ("baseline_auc", "baseline_tests"):
        write_table(out / f"{name}.parquet", pd.DataFrame(), csv=True)
    return record


# ------------------------------------------------------------------------------------------ sweep


def run_sweep(ctx: Context) -> dict:
    c, plan = ctx.config, ctx.plan
    if not ctx.store.rois:
        return {"status": "this data has no ROI masks: no dilation sweep"}
    for strategy in plan.sweep_models:
        plan.require(strategy, "sweep.train_strategies")
    predictions = ctx.gather("sweep predictions", plan.sweep_jobs)
    by_fold, summary = sweep_aucs(predictions)
    out = ctx.run.analysis("sweep")
    write_table(out / "predictions.parquet", predictions)
    write_table(out / "sweep_by_fold.parquet", by_fold, csv=True)
    write_table(out / "sweep.parquet", summary, csv=True)
    for strategy in plan.sweep_models:
        save_figure(sweep_figure(summary, strategy, c.image_size), ctx.run.figures / f"sweep_{strategy}",
                    c.report.formats)
    return {"rows": len(predictions)}


def sweep_jobs(ctx: Context, jobs: Sequence[tuple[str, int]]) -> Iterator[tuple[tuple[str, int], pd.DataFrame]]:
    """The models' dilation sweeps on the hold-out images, (job, its table) as each group of models ends: the models
    are loaded as many at a time as fit (``predict.models``, :func:`maskaudit.predict.loaded_groups`), and each
    group reads the images once."""
    device = resolve_device(ctx.config.train.device)
    scored = ctx.scored_images()
    sweep_steps(ctx.config, ctx.store, len(scored), len(jobs))
    for group in loaded_groups(ctx, jobs, device, ctx.config.predict.models):
        tables = sweep_predictions(list(group.values()), list(group), ctx.store, scored, ctx.masking, ctx.config,
                                   device)
        yield from zip(group, tables, strict=True)


# ------------------------------------------------------------------------------------------ explain


def explain_pairs(ctx: Context) -> list[tuple[str, str]]:
    """The (train, test) pairs to explain (``analyses.explain.pairs``, else the plan's), each model checked to
    exist."""
    for train, _ in ctx.plan.explain_pairs:
        ctx.plan.require(train, "explain.pairs")
    return ctx.plan.explain_pairs


def explained_images(store, test: np.ndarray, seed: int, per_class: int) -> dict[str, np.ndarray]:
    """Per class, a seeded sample of at most ``per_class`` positive hold-out images (store indices, sorted)."""
    chosen = {}
    for k, name in enumerate(store.classes):
        positives = test[store.labels[test, k] == 1]
        rng = np.random.default_rng(derive_seed(seed, "explain", name))
        take = rng.choice(positives, size=min(per_class, len(positives)), replace=False) if len(positives) else []
        chosen[name] = np.sort(np.asarray(take, dtype=np.int64))
    return chosen


def _stack(ctx: Context, indices: np.ndarray, strategy: str, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images at ``indices`` as the model sees them under ``strategy``, and their ROI (or None)."""
    images, rois = [], []
    for batch in batches(ctx.store, indices, ctx.masking, ctx.config.predict.batch_size, device):
        images.append(batch.masked(strategy, ctx.masking))
        rois.append(batch.roi)
    roi = torch.cat(rois) if rois and rois[0] is not None else None
    return torch.cat(images), roi


def run_explain(ctx: Context) -> dict:
    c = ctx.config
    pairs = explain_pairs(ctx)
    table = ctx.gather("explanations", ctx.plan.explain_jobs)
    out = ctx.run.analysis("explain")
    write_table(out / "attribution.parquet", table, csv=True)
    summary = (table.groupby(["train_strategy", "test_strategy", "class"], sort=False)
               .agg(in_roi=("positive_in_roi", "mean"), roi_area=("roi_area", "mean"), n_images=("image_id", "count"))
               .reset_index())
    summary["ratio"] = summary["in_roi"] / summary["roi_area"]
    write_table(out / "attribution_in_roi.parquet", summary, csv=True)
    first = min(c.analyses.explain.folds)
    for train, test in pairs:
        arrays = np.load(ctx.run.job(train, first) / "explain.npz")
        rows = table[(table["train_strategy"] == train) & (table["test_strategy"] == test) & (table["fold"] == first)]
        for name, part in rows.groupby("class", sort=False):
            part = part.head(4)  # a readable panel: at most four images
            at = part["row"].to_numpy()
            captions = [f"{i}  p={p:.2f}" for i, p in zip(part["image_id"], part["probability"], strict=True)]
            rois = arrays["rois"][at] if "rois" in arrays else None
            fig = attribution_panels(arrays["images"][at].astype(np.float32), rois,
                                     arrays["attributions"][at].astype(np.float32), captions,
                                     f"{name}: {train}→{test} (fold {first}), {c.analyses.explain.method}")
            save_figure(fig, ctx.run.figures / f"explain_{train}_{test}_{name}", c.report.formats)
    return {"images": int(len(table)), "method": c.analyses.explain.method}


def run_explain_job(ctx: Context, strategy: str, fold: int) -> dict:
    """Attributions of one model for every pair it appears in, on each class's chosen positive images."""
    store, splits = ctx.store, ctx.splits
    c, e = ctx.config, ctx.config.analyses.explain
    device = resolve_device(c.train.device)
    model = ctx.model(strategy, fold, device)
    chosen = explained_images(store, ctx.scored_images(), c.seed, e.images_per_class)
    pairs = [p for p in explain_pairs(ctx) if p[0] == strategy]
    # the job's count, declared once: every pair's chosen images of every class (an upper bound: a probed model
    # may not predict a class)
    active().steps(len(pairs) * sum(len(v) for v in chosen.values()), "images explained", exact=False)
    frames, images_out, attributions_out, rois_out = [], [], [], []
    offset = 0
    for train, test in pairs:
        background = None
        if e.method != "partition":
            rng = np.random.default_rng(derive_seed(c.seed, "explain-background", fold))
            pool = splits.train(fold)
            background = _stack(ctx, np.sort(rng.choice(pool, min(e.background, len(pool)), replace=False)), test,
                                device)[0]
        for k, name in enumerate(store.classes):
            indices = chosen[name]
            if not len(indices):
                continue
            images, roi = _stack(ctx, indices, test, device)
            with torch.no_grad():
                probability = probabilities(model, images)[:, k].cpu().numpy()
            if np.isnan(probability).all():  # a probed model that does not predict this class
                continue
            attributions = explain(model, images, k, e.method, masker=e.masker, max_evals=e.max_evals,
                                   batch_size=e.batch_size, background=background,
                                   seed=derive_seed(c.seed, "explain", strategy, fold, name) % 2**32)
            roi_np = roi[:, 0].cpu().numpy() if roi is not None else None
            shares = (attribution_in_roi(attributions, roi_np) if roi_np is not None else
                      pd.DataFrame({"positive_in_roi": np.nan, "roi_area": np.nan, "ratio": np.nan},
                                   index=range(len(indices))))
            frames.append(pd.DataFrame({
                "train_strategy": train, "fold": fold, "test_strategy": test, "class": name,
                "image_id": store.kept["image_id"].to_numpy()[indices], "probability": probability,
                "row": np.arange(offset, offset + len(indices)),
            }).join(shares.reset_index(drop=True)))
            offset += len(indices)
            images_out.append(images.cpu().numpy().astype(np.float16))
            attributions_out.append(attributions.astype(np.float32))
            if roi_np is not None:
                rois_out.append(roi_np)
    job_dir = ctx.run.job(strategy, fold)
    arrays = {"images": np.concatenate(images_out), "attributions": np.concatenate(attributions_out)}
    if rois_out:
        arrays["rois"] = np.concatenate(rois_out)
    _save_npz(job_dir / "explain.npz", arrays)
    return ctx.write_job_output(strategy, fold, "explanations", pd.concat(frames, ignore_index=True))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


# ------------------------------------------------------------------------------------------ embeddings


def run_embed(ctx: Context) -> dict:
    c, e, plan = ctx.config, ctx.config.analyses.embed, ctx.plan
    if plan.embed_model is None:
        return {"status": "no probed model exposes its layers (embeddings need a python or torchxrayvision "
                          "model; TorchScript and ONNX models are sealed): no embeddings"}
    plan.require(plan.embed_model, "embed.train_strategy")
    store, splits = ctx.store, ctx.splits
    indices = splits.val(e.fold) if e.split == "val" else splits.test
    if e.max_images is not None and len(indices) > e.max_images:
        rng = np.random.default_rng(derive_seed(c.seed, "embed"))
        indices = np.sort(rng.choice(indices, e.max_images, replace=False))
    strategies = scorable_strategies(c, ctx.masking)
    if "full" not in strategies:
        strategies = ["full", *strategies]
    device = resolve_device(c.train.device)
    fold = plan.embed_fold
    model = ctx.model(plan.embed_model, fold, device)
    embeddings = embed_images(model, store, indices, strategies, ctx.masking, c, device)
    cosine = cosine_table(embeddings, store.labels[indices], store.classes)
    xy, perplexity = tsne_points(embeddings, e.perplexity, derive_seed(c.seed, "tsne") % 2**32)
    image_ids = store.kept["image_id"].to_numpy()[indices]
    points = pd.DataFrame({"strategy": np.repeat(strategies, len(indices)),
                           "image_id": np.tile(image_ids, len(strategies)), "x": xy[:, 0], "y": xy[:, 1]})
    out = ctx.run.analysis("embed")
    write_table(out / "cosine.parquet", cosine, csv=True)
    write_table(out / "tsne.parquet", points, csv=True)
    _save_npz(out / "embeddings.npz", {"image_id": image_ids.astype(str), **embeddings})
    title = (f"t-SNE of {plan.embed_model} model (fold {fold}) features, {len(indices)} {e.split} images, "
             f"perplexity {perplexity:g}")
    save_figure(tsne_figure(points, title), ctx.run.figures / "tsne", c.report.formats)
    return {"images": int(len(indices)), "perplexity": perplexity}


# ------------------------------------------------------------------------------------------ reader


def run_reader(ctx: Context) -> dict:
    c, store, fold = ctx.config, ctx.store, ctx.plan.reader_fold
    cases = select_cases(ctx.predictions(), ctx.plan.reader_pairs, store.classes, fold, c.analyses.reader.percentiles)
    out = ctx.run.analysis("reader")
    key = export_cases(cases, store, ctx.masking, c.seed, out)
    write_table(out / "selection.parquet", key, csv=True)
    return {"cases": int(len(key)), "fold": fold}


# ------------------------------------------------------------------------------------------ localize

#: The columns of ``analyses/localize/summary.parquet``: one row per localised (model, class, evidence).
SUMMARY_COLUMNS = ["model", "class", "role", "train_strategy", "test_strategy", "auc", "n_cells", "n_tested",
                   "n_significant", "regions", "sentence"]


def localize_cells(ctx: Context) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """The cells of evidence ``localize`` may read, per verdict model and role (:func:`localized_cells`)."""
    c, plan = ctx.config, ctx.plan
    return localized_cells(plan.evidence, list(c.analyses.localize.where), plan.models, c.eval_strategies,
                           best_inside=plan.reading.best_inside)


def localize_folds(ctx: Context) -> list[int]:
    """Whose fold's models localise (``analyses.localize.folds``, default every fold), each checked to exist."""
    folds, have = ctx.config.analyses.localize.folds, ctx.plan.model_folds
    if folds is None:
        return list(have)
    if any(k not in have for k in folds):
        raise MaskauditError(f"analyses.localize.folds={list(folds)}: this run's models are those of folds "
                             f"{', '.join(map(str, have))}")
    return list(folds)


def run_localize(ctx: Context) -> dict:
    """Occlusion maps of each class's evidence where it shows signal (:mod:`maskaudit.analyses.localize`)."""
    c, plan, loc = ctx.config, ctx.plan, ctx.config.analyses.localize
    out = ctx.run.analysis("localize")

    def write(cells: pd.DataFrame, summary: pd.DataFrame) -> None:
        write_table(out / "cells.parquet", cells, csv=True)
        write_table(out / "summary.parquet", summary, csv=True)

    nothing = pd.DataFrame(columns=CELL_COLUMNS), pd.DataFrame(columns=SUMMARY_COLUMNS)
    places = " or ".join(ROLES[role][1] for role in loc.where)
    if not ctx.store.rois or not loc.where:
        write(*nothing)
        return {"status": "this data has no ROI masks: nothing to localise" if not ctx.store.rois
                else "analyses.localize.where is empty: nothing localised"}
    grid_edges(ctx.store.image_size, loc.grid)  # a grid finer than the images: one line naming the key
    folds = localize_folds(ctx)
    matrix = pd.read_parquet(ctx.run.metrics / "auc_matrix.parquet")
    matrix = matrix[(matrix["dataset"] == MAIN) & (matrix["split"] == "test")]
    targets = evidence_targets(matrix, localize_cells(ctx), c.classes, c.analyses.verdict, plan.reading.best_inside)
    if not targets:
        write(*nothing)
        return {"status": f"no class shows signal {places}: nothing to localise"}
    models = [m for m in plan.models if any(t["train_strategy"] == m for t in targets)]
    scores = ctx.gather("occlusion predictions", [(m, k) for m in models for k in folds])
    boxes = cell_boxes(ctx.store.image_size, loc.grid)
    device = resolve_device(c.train.device)
    alpha, how = c.analyses.verdict.alpha, CORRECTIONS[loc.correction][1]
    tables, summary = [], []
    for target in targets:
        train, test, name = target["train_strategy"], target["test_strategy"], target["class"]
        part = scores[(scores["train_strategy"] == train) & (scores["test_strategy"] == test)
                      & (scores["class"] == name) & scores["fold"].isin(folds)]
        table = localize_target(part, target, boxes, c.analyses.level, alpha, loc.correction)
        attribution, note = explained_attribution(ctx.run, train, test, name, loc.grid)
        if attribution is not None:
            table["attribution_share"] = attribution[table["cell"].to_numpy()]
        summary.append(summary_row(target, table, localization_sentence(table, loc.correction, alpha, loc.grid)))
        tables.append(table)
        mean = mean_positive_image(ctx.store, ctx.scored_images(), name, ctx.masking, test, c.predict.batch_size,
                                   device)
        who = f"{target['model']}: " if target["model"] else ""
        models_of = f"mean of {len(folds)} folds' models" if len(folds) > 1 else f"fold {folds[0]}'s model"
        title = f"{who}{name}, {target['role']} evidence: {train}→{test}, {models_of}; {how}, α = {alpha:g}"
        save_figure(localize_figure(mean, table, loc.grid, attribution, note, title),
                    ctx.run.figures / figure_name(target), c.report.formats)
    write(pd.concat(tables, ignore_index=True), pd.DataFrame(summary, columns=SUMMARY_COLUMNS))
    return {"localized": [f"{t['model'] + ': ' if t['model'] else ''}{t['class']} ({t['role']})" for t in targets],
            "folds": folds}


def run_localize_job(ctx: Context, strategy: str, fold: int) -> dict:
    """One model's occlusion predictions on the scored images, under each test masking it is evidence on."""
    c = ctx.config
    tests = {t for roles in localize_cells(ctx).values() for cells in roles.values() for m, t in cells if m == strategy}
    tests = [t for t in c.eval_strategies if t in tests]
    device = resolve_device(c.train.device)
    model = ctx.model(strategy, fold, device)
    table = occlusion_predictions(model, ctx.store, ctx.scored_images(), ctx.masking, tests,
                                  c.analyses.localize.grid, c.predict.batch_size, device, strategy, fold,
                                  num_workers=c.train.num_workers)
    return ctx.write_job_output(strategy, fold, "occlusion predictions", table)


def localize_evidence(ctx: Context, predictions: pd.DataFrame, cells: set[tuple[str, str]],
                      full: tuple[str, str]) -> dict[str, dict]:
    """Per class: the sentence saying where its evidence lies, for the verdict model whose full cell is ``full``."""
    path = ctx.run.analysis("localize") / "summary.parquet"
    if not path.is_file():
        return {}
    summary = pd.read_parquet(path)
    key = next((k for k, evidence in ctx.plan.evidence.items() if evidence["full"][:1] == [full]), "")
    rows = summary[summary["model"] == key]
    return {name: {"sentence": " ".join(part["sentence"])} for name, part in rows.groupby("class", sort=False)}


# ------------------------------------------------------------------------------------------ verdict


def run_verdict(ctx: Context) -> dict:
    """One verdict per class (per model of the plan's evidence: a probe's each model), from the hold-out AUC matrix
    and the evidence the other analyses give (:attr:`Analysis.evidence`)."""
    c, plan = ctx.config, ctx.plan
    matrix = pd.read_parquet(ctx.run.metrics / "auc_matrix.parquet")
    matrix = matrix[(matrix["dataset"] == MAIN) & (matrix["split"] == "test")]
    predictions = ctx.predictions()
    flags = run_evidence_flags(ctx.run, c.analyses.verdict.evidence)  # where the evidence is weak
    path = ctx.run.metrics / "training.parquet"  # whether each model learnt each class (none in a probe)
    training = pd.read_parquet(path) if path.is_file() else None
    cells = {cell for evidence in plan.evidence.values() for candidates in evidence.values() for cell in candidates}
    givers = [a for a in ANALYSES.values() if a.evidence is not None and a.name in c.analyses.run]
    rows = []
    for model, evidence in plan.evidence.items():
        given = {a.verdict_input: a.evidence(ctx, predictions, cells, evidence["full"][0]) for a in givers}
        for name in c.classes:
            cells_of = matrix[matrix["class"] == name].set_index(["train_strategy", "test_strategy"])
            row = {"model": model, "class": name}
            scored = predictions[(predictions["class"] == name)
                                 & predictions["train_strategy"].isin({t for t, _ in evidence["full"]})]
            if len(scored) and scored["probability"].isna().all():
                row |= {"verdict": "not_predicted", "label": VERDICTS["not_predicted"][0],
                        "reading": f"The model {model} has no output for {name}: none of its outputs' names matches "
                                   "the class or its aliases (output.aliases), so nothing is guessed."}
            else:
                row |= class_verdict(cells_of, c.analyses.verdict, evidence_cells=evidence, words=plan.reading,
                                     flags=flags[flags["class"] == name],
                                     training=training[training["class"] == name] if training is not None else None,
                                     **{key: value.get(name) for key, value in given.items()})
            rows.append(row)
    table = pd.DataFrame(rows)
    if list(plan.evidence) == [""]:  # a full audit: one set of models, no model column
        table = table.drop(columns="model")
    write_table(ctx.run.analysis("verdict") / "verdict.parquet", table, csv=True)
    return {"verdicts": [f"{m + ': ' if m else ''}{k} {v}" for m, k, v in zip(
        table.get("model", [""] * len(table)), table["class"], table["verdict"], strict=True)]}


def baseline_evidence(ctx: Context, predictions: pd.DataFrame, cells: set[tuple[str, str]],
                      full: tuple[str, str]) -> dict[str, dict]:
    """Per class: the baseline's fold-mean AUC and CI, and DeLong's test of each of ``cells`` against it; with
    ``scale: before_masking``, the same of the scale factor under ``scale`` (:mod:`maskaudit.analyses.baseline`)."""
    out = ctx.run.analysis("baseline")
    evidence = _predictor_evidence(out / "predictions.parquet", out / "baseline_auc.parquet", METADATA, predictions,
                                   cells)
    if ctx.config.scale == "before_masking":
        scale = _predictor_evidence(out / "scale_predictions.parquet", out / "scale_auc.parquet", IMAGE_MAX,
                                    predictions, cells)
        for name, value in scale.items():
            evidence.setdefault(name, {"auc": math.nan, "ci_low": math.nan, "ci_high": math.nan, "tests": {}})
            evidence[name]["scale"] = value
    return evidence


def _predictor_evidence(predictions_path: Path, aucs_path: Path, predictor: str, predictions: pd.DataFrame,
                        cells: set[tuple[str, str]]) -> dict[str, dict]:
    """Per class: a baseline predictor's fold-mean AUC and CI, and DeLong's test of each of ``cells`` against it."""
    if not predictions_path.is_file():
        return {}
    aucs = pd.read_parquet(aucs_path)
    means = aucs[aucs["fold"] == "mean"].set_index("class")
    baseline = pd.read_parquet(predictions_path)
    evidence = {}
    for name, row in means.iterrows():
        base_sets = prediction_sets(baseline, name, predictor, predictor)
        tests = {}
        for train, test in cells:
            sets = prediction_sets(predictions, name, train, test)
            shared = [k for k in sets if k in base_sets]
            if shared:
                result = mean_difference_test([sets[k] for k in shared], [base_sets[k] for k in shared])
                tests[f"{train}→{test}"] = {"difference": result.difference, "p_value": result.p_value}
        evidence[name] = {"auc": row["auc"], "ci_low": row["ci_low"], "ci_high": row["ci_high"], "tests": tests}
    return evidence


def attribution_evidence(ctx: Context, predictions: pd.DataFrame, cells: set[tuple[str, str]],
                         full: tuple[str, str]) -> dict[str, dict]:
    """Per class: the share of positive attribution inside the ROI for the full-image cell's model on its images."""
    path = ctx.run.analysis("explain") / "attribution_in_roi.parquet"
    if not path.is_file():
        return {}
    table = pd.read_parquet(path)
    train, test = full
    chosen = table[(table["train_strategy"] == train) & (table["test_strategy"] == test)]
    return {row["class"]: {"in_roi": row["in_roi"], "roi_area": row["roi_area"], "ratio": row["ratio"]}
            for _, row in chosen.iterrows()}


# ------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Part:
    """A per-model share of an analysis, kept in each model's job folder, run one job per model or in groups.

    ``work(ctx, strategy, fold) -> dict`` writes ``jobs/<strategy>/fold_<k>/<output>.parquet`` (through
    :meth:`Context.write_job_output`); or, for a part whose models read the same images, ``group(ctx, jobs)``
    yields (job, its table) for several models at once, one read of the images for all of them, and the pipeline
    writes each table (:meth:`maskaudit.pipeline.Audit.map_groups`). ``reads`` are the config keys it reads beyond
    its analysis's section.
    """

    name: str
    output: str
    work: Callable[[Context, str, int], dict] | None = None
    group: Callable[[Context, Sequence[tuple[str, int]]], Iterator[tuple[tuple[str, int], pd.DataFrame]]] | None = None
    reads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.work is None) == (self.group is None):
            raise ValueError(f"part {self.name!r}: give it work or group, one of the two")


@dataclass(frozen=True)
class Analysis:
    """One analysis: its name (also its config section, ``analyses.<name>``), its row of the stage table, how it
    runs, what it gives the verdict.

    Attributes
    ----------
    run : callable
        ``run(ctx) -> dict``: the stage (the dict is its record in ``stages.json``).
    reads : tuple of str
        Config keys it reads beyond its own section (``report.formats`` for one that draws figures).
    after : tuple of str
        The stages whose outputs it reads (their fingerprints are part of its own).
    parts : tuple of Part
        Its per-model jobs (after the model part of the stage table).
    evidence : callable or None
        ``evidence(ctx, predictions, cells, full_cell) -> {class: dict}``: what it gives the verdict, passed to
        :func:`maskaudit.analyses.verdict.class_verdict` as ``verdict_input``.
    section : callable or None
        ``section(run, config) -> dict``: its part of the report, read from the run directory alone: ``intro``
        (plain text), ``tables`` (:class:`maskaudit.report.html.Table`), ``figures`` (data URIs). The study's
        analyses have sections of their own in the report's template; an added one shows this.
    """

    name: str
    title: str
    run: Callable[[Context], dict]
    reads: tuple[str, ...] = ()
    after: tuple[str, ...] = ("predict",)
    parts: tuple[Part, ...] = ()
    evidence: Callable[..., dict[str, dict]] | None = None
    verdict_input: str = ""
    section: Callable[..., dict] | None = None

    def stages(self) -> list[Stage]:
        """Its rows of the stage table: the stage, then each per-model part."""
        own = f"analyses.{self.name}"
        rows = [Stage(self.name, reads=(own, *self.reads), after=self.after,
                      jobs=self.parts[0].name if self.parts else None)]
        rows += [Stage(part.name, reads=(own, *part.reads), after=("model",), job=True, output=part.output)
                 for part in self.parts]
        return rows


#: Where every figure goes (``report.formats``), read by each analysis that draws one.
FIGURES = "report.formats"

#: Every analysis, in the order ``maskaudit run`` runs them (the verdict reads the others). The names are the
#: sections of :class:`maskaudit.config.AnalysesConfig` (``tests/test_extending.py`` checks both lists agree).
ANALYSES: dict[str, Analysis] = {a.name: a for a in (
    Analysis("baseline", "Metadata baseline and DeLong tests", run_baseline, reads=("analyses.level", "scale"),
             evidence=baseline_evidence, verdict_input="baseline"),
    Analysis("explain", "SHAP attributions", run_explain, reads=(FIGURES,),
             parts=(Part("explanations", "explain", run_explain_job, reads=("predict.images",)),),
             evidence=attribution_evidence, verdict_input="attribution"),
    Analysis("embed", "Embeddings: t-SNE and cosine similarity", run_embed, reads=(FIGURES,)),
    Analysis("sweep", "Dilation sweep", run_sweep, reads=(FIGURES,),
             parts=(Part("sweep predictions", "sweep", group=sweep_jobs, reads=("predict.images",)),)),
    Analysis("reader", "Reader-study sheet", run_reader),
    Analysis("localize", "Where the evidence lies: occlusion maps", run_localize,
             reads=("analyses.verdict.min_auc", "analyses.verdict.alpha", "analyses.level", FIGURES),
             after=("metrics", "explain"),
             parts=(Part("occlusion predictions", "localize", run_localize_job, reads=("predict.images",)),),
             evidence=localize_evidence, verdict_input="localization", section=localize_section),
    Analysis("verdict", "Verdict", run_verdict, reads=("analyses.run",),
             after=("metrics", "baseline", "explain", "localize")),
)}

#: Per-model part → its job function (the pipeline maps them as jobs), or its group function (in groups of models).
JOB_WORK = {part.name: part.work for a in ANALYSES.values() for part in a.parts if part.work is not None}
GROUP_WORK = {part.name: part.group for a in ANALYSES.values() for part in a.parts if part.group is not None}
