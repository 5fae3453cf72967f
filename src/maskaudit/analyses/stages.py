"""The analyses as stages of an audit (SPEC §6, §8): each reads the run directory and writes into it.

Every analysis is a function ``run_<name>(audit) -> dict`` (the dict is recorded in
``stages.json``), called by :meth:`maskaudit.pipeline.Audit.analyse`, which skips it when its
fingerprint has not changed. The analyses that run trained models over many images (``explain``,
``sweep``) split into one job per trained model, ``run_<name>_job(run_root, strategy, fold)``,
mapped by the run's executor like training, each job's result kept in its job folder with its own
fingerprint so that a killed stage resumes job by job.

Tables go to ``analyses/<name>/`` (Parquet and CSV), figures to ``figures/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from maskaudit.errors import MaskauditError
from maskaudit.executors import make_executor
from maskaudit.loader import batches, resolve_device
from maskaudit.metrics import MAIN, prediction_sets
from maskaudit.predict import job_model, probabilities, scored_images
from maskaudit.progress import active
from maskaudit.report.figures import save_figure
from maskaudit.rundir import write_table
from maskaudit.seeds import derive_seed
from maskaudit.stats import mean_difference_test

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ helpers


def _predictions(audit) -> pd.DataFrame:
    if not audit.run.predictions.is_file():
        raise MaskauditError(f"no {audit.run.predictions}; run `maskaudit predict` first")
    return pd.read_parquet(audit.run.predictions)


def _require_trained(audit, strategy: str, stage: str) -> None:
    models = audit.config.train_strategies
    if strategy not in models:
        what = "probed models" if audit.config.probing else "strategies"
        raise MaskauditError(f"analyses.{stage}: {strategy!r} is not one of this run's {what} ({', '.join(models)})")


def _gather(audit, name: str, jobs: list[tuple[str, int]], job_fn) -> pd.DataFrame:
    """Run the stage's jobs whose results are missing or stale, then concatenate every job's table."""
    todo = [(s, k) for s, k in jobs
            if not audit.job_output_current(s, k, name, audit.analysis_job_fingerprint(name, s, k))]
    log.info("%s: %d of %d jobs to run", name, len(todo), len(jobs))
    make_executor(audit.config).map(job_fn, [(str(audit.run.root), s, k) for s, k in todo])
    return pd.concat([pd.read_parquet(audit.run.job(s, k) / f"{name}.parquet") for s, k in jobs], ignore_index=True)


def _finish_job(audit, strategy: str, fold: int, name: str, table: pd.DataFrame) -> dict:
    return audit.write_job_output(strategy, fold, name, table, audit.analysis_job_fingerprint(name, strategy, fold))


# ------------------------------------------------------------------------------------------ baseline


def run_baseline(audit) -> dict:
    from maskaudit.analyses.baseline import baseline_predictions, baseline_tables, metadata_columns

    c = audit.config
    out = audit.run.analysis("baseline")
    store = audit.store()
    splits = audit.splits(store)
    columns = metadata_columns(store.metadata_columns, c.analyses.baseline.columns)
    skipped = ("every image was scored (predict.images: all): no held-out images for a baseline"
               if c.predict.images == "all" else "this data has no metadata: no baseline" if not columns else "")
    if skipped:
        for name in ("baseline_auc", "baseline_tests"):
            write_table(out / f"{name}.parquet", pd.DataFrame(), csv=True)
        return {"status": skipped}
    train = {k: splits.train(k) for k in range(c.folds)}
    predictions, fits = baseline_predictions(store.kept, store.labels, store.classes, columns, train, splits.test)
    aucs, tests = baseline_tables(predictions, _predictions(audit), store.classes, c.baseline_pairs,
                                  c.analyses.level)
    write_table(out / "predictions.parquet", predictions)
    write_table(out / "fits.parquet", fits, csv=True)
    write_table(out / "baseline_auc.parquet", aucs, csv=True)
    write_table(out / "baseline_tests.parquet", tests, csv=True)
    return {"columns": columns}


# ------------------------------------------------------------------------------------------ sweep


def run_sweep(audit) -> dict:
    from maskaudit.analyses.sweep import sweep_aucs, sweep_figure

    c = audit.config
    if not audit.store().rois:
        return {"status": "this data has no ROI masks: no dilation sweep"}
    for strategy in c.sweep_models:
        _require_trained(audit, strategy, "sweep")
    jobs = [(s, k) for s in c.sweep_models for k in c.model_folds]
    predictions = _gather(audit, "sweep", jobs, run_sweep_job)
    by_fold, summary = sweep_aucs(predictions)
    out = audit.run.analysis("sweep")
    write_table(out / "predictions.parquet", predictions)
    write_table(out / "sweep_by_fold.parquet", by_fold, csv=True)
    write_table(out / "sweep.parquet", summary, csv=True)
    for strategy in c.sweep_models:
        save_figure(sweep_figure(summary, strategy, c.image_size), audit.run.figures / f"sweep_{strategy}",
                    c.report.formats)
    return {"rows": len(predictions)}


def run_sweep_job(run_root: str, strategy: str, fold: int) -> dict:
    """One model's dilation sweep on the hold-out images, kept in its job folder."""
    from maskaudit.analyses.sweep import sweep_predictions
    from maskaudit.pipeline import open_job

    audit, store, splits = open_job(run_root)
    device = resolve_device(audit.config.train.device)
    model = job_model(audit.config, store, audit.run, strategy, fold, device)
    indices = scored_images(audit.config, store, splits)
    table = sweep_predictions(model, store, indices, audit.config, strategy, fold, device)
    return _finish_job(audit, strategy, fold, "sweep", table)


# ------------------------------------------------------------------------------------------ explain


def explain_pairs(audit) -> list[tuple[str, str]]:
    """The (train, test) pairs to explain (:attr:`AuditConfig.explain_pairs`), each model checked to be trained."""
    pairs = audit.config.explain_pairs
    for train, _ in pairs:
        _require_trained(audit, train, "explain.pairs")
    return pairs


def explained_images(store, test: np.ndarray, seed: int, per_class: int) -> dict[str, np.ndarray]:
    """Per class, a seeded sample of at most ``per_class`` positive hold-out images (store indices, sorted)."""
    chosen = {}
    for k, name in enumerate(store.classes):
        positives = test[store.labels[test, k] == 1]
        rng = np.random.default_rng(derive_seed(seed, "explain", name))
        take = rng.choice(positives, size=min(per_class, len(positives)), replace=False) if len(positives) else []
        chosen[name] = np.sort(np.asarray(take, dtype=np.int64))
    return chosen


def _stack(store, indices: np.ndarray, strategy: str, config, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images at ``indices`` as the model sees them under ``strategy``, and their ROI (or None)."""
    images, rois = [], []
    for batch in batches(store, indices, config, config.predict.batch_size, device):
        images.append(batch.masked(strategy, config, store))
        rois.append(batch.roi)
    roi = torch.cat(rois) if rois and rois[0] is not None else None
    return torch.cat(images), roi


def run_explain(audit) -> dict:
    from maskaudit.analyses.explain import attribution_panels

    c = audit.config
    pairs = explain_pairs(audit)
    jobs = sorted({(train, k) for train, _ in pairs for k in c.analyses.explain.folds},
                  key=lambda j: (c.train_strategies.index(j[0]), j[1]))
    table = _gather(audit, "explain", jobs, run_explain_job)
    out = audit.run.analysis("explain")
    write_table(out / "attribution.parquet", table, csv=True)
    summary = (table.groupby(["train_strategy", "test_strategy", "class"], sort=False)
               .agg(in_roi=("positive_in_roi", "mean"), roi_area=("roi_area", "mean"), n_images=("image_id", "count"))
               .reset_index())
    summary["ratio"] = summary["in_roi"] / summary["roi_area"]
    write_table(out / "attribution_in_roi.parquet", summary, csv=True)
    first = min(c.analyses.explain.folds)
    for train, test in pairs:
        arrays = np.load(audit.run.job(train, first) / "explain.npz")
        rows = table[(table["train_strategy"] == train) & (table["test_strategy"] == test) & (table["fold"] == first)]
        for name, part in rows.groupby("class", sort=False):
            part = part.head(4)  # a readable panel: at most four images
            at = part["row"].to_numpy()
            captions = [f"{i}  p={p:.2f}" for i, p in zip(part["image_id"], part["probability"], strict=True)]
            rois = arrays["rois"][at] if "rois" in arrays else None
            fig = attribution_panels(arrays["images"][at].astype(np.float32), rois,
                                     arrays["attributions"][at].astype(np.float32), captions,
                                     f"{name}: {train}→{test} (fold {first}), {c.analyses.explain.method}")
            save_figure(fig, audit.run.figures / f"explain_{train}_{test}_{name}", c.report.formats)
    return {"images": int(len(table)), "method": c.analyses.explain.method}


def run_explain_job(run_root: str, strategy: str, fold: int) -> dict:
    """Attributions of one model for every pair it appears in, on each class's chosen positive images."""
    from maskaudit.analyses.explain import attribution_in_roi, explain
    from maskaudit.pipeline import open_job

    audit, store, splits = open_job(run_root)
    c, e = audit.config, audit.config.analyses.explain
    device = resolve_device(c.train.device)
    model = job_model(c, store, audit.run, strategy, fold, device)
    chosen = explained_images(store, scored_images(c, store, splits), c.seed, e.images_per_class)
    pairs = [p for p in explain_pairs(audit) if p[0] == strategy]
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
            background = _stack(store, np.sort(rng.choice(pool, min(e.background, len(pool)), replace=False)), test,
                                c, device)[0]
        for k, name in enumerate(store.classes):
            indices = chosen[name]
            if not len(indices):
                continue
            images, roi = _stack(store, indices, test, c, device)
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
    job_dir = audit.run.job(strategy, fold)
    arrays = {"images": np.concatenate(images_out), "attributions": np.concatenate(attributions_out)}
    if rois_out:
        arrays["rois"] = np.concatenate(rois_out)
    _save_npz(job_dir / "explain.npz", arrays)
    return _finish_job(audit, strategy, fold, "explain", pd.concat(frames, ignore_index=True))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from maskaudit.rundir import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


# ------------------------------------------------------------------------------------------ embeddings


def run_embed(audit) -> dict:
    from maskaudit.analyses.embeddings import cosine_table, embed_images, tsne_figure, tsne_points
    from maskaudit.predict import scorable_strategies

    c, e = audit.config, audit.config.analyses.embed
    if c.embed_model is None:
        return {"status": "no probed model exposes its layers (embeddings need a python or torchxrayvision "
                          "model; TorchScript and ONNX models are sealed): no embeddings"}
    _require_trained(audit, c.embed_model, "embed.train_strategy")
    store = audit.store()
    splits = audit.splits(store)
    indices = splits.val(e.fold) if e.split == "val" else splits.test
    if e.max_images is not None and len(indices) > e.max_images:
        rng = np.random.default_rng(derive_seed(c.seed, "embed"))
        indices = np.sort(rng.choice(indices, e.max_images, replace=False))
    strategies = scorable_strategies(c, store)
    if "full" not in strategies:
        strategies = ["full", *strategies]
    device = resolve_device(c.train.device)
    fold = c.model_folds[0] if c.probing else e.fold
    model = job_model(c, store, audit.run, c.embed_model, fold, device)
    embeddings = embed_images(model, store, indices, strategies, c, device)
    cosine = cosine_table(embeddings, store.labels[indices], store.classes)
    xy, perplexity = tsne_points(embeddings, e.perplexity, derive_seed(c.seed, "tsne") % 2**32)
    image_ids = store.kept["image_id"].to_numpy()[indices]
    points = pd.DataFrame({"strategy": np.repeat(strategies, len(indices)),
                           "image_id": np.tile(image_ids, len(strategies)), "x": xy[:, 0], "y": xy[:, 1]})
    out = audit.run.analysis("embed")
    write_table(out / "cosine.parquet", cosine, csv=True)
    write_table(out / "tsne.parquet", points, csv=True)
    _save_npz(out / "embeddings.npz", {"image_id": image_ids.astype(str), **embeddings})
    title = (f"t-SNE of {c.embed_model} model (fold {fold}) features, {len(indices)} {e.split} images, "
             f"perplexity {perplexity:g}")
    save_figure(tsne_figure(points, title), audit.run.figures / "tsne", c.report.formats)
    return {"images": int(len(indices)), "perplexity": perplexity}


# ------------------------------------------------------------------------------------------ reader


def run_reader(audit) -> dict:
    from maskaudit.analyses.reader_selection import export_cases, reader_pairs, select_cases, study_fold

    c = audit.config
    store = audit.store()
    fold = study_fold(c)
    cases = select_cases(_predictions(audit), reader_pairs(c), store.classes, fold, c.analyses.reader.percentiles)
    out = audit.run.analysis("reader")
    key = export_cases(cases, store, c, out)
    write_table(out / "selection.parquet", key, csv=True)
    return {"cases": int(len(key)), "fold": fold}


# ------------------------------------------------------------------------------------------ verdict


def run_verdict(audit) -> dict:
    """One verdict per class (a probe: per probed model and class), from the hold-out AUC matrix."""
    from maskaudit.analyses.evidence import run_evidence_flags
    from maskaudit.analyses.verdict import EVIDENCE, VERDICTS, class_verdict, probe_evidence

    c = audit.config
    matrix = pd.read_parquet(audit.run.metrics / "auc_matrix.parquet")
    matrix = matrix[(matrix["dataset"] == MAIN) & (matrix["split"] == "test")]
    predictions = _predictions(audit)
    models = {m: probe_evidence(m) for m in c.train_strategies} if c.probing else {"": EVIDENCE}
    cells = {cell for evidence in models.values() for candidates in evidence.values() for cell in candidates}
    baseline = _baseline_evidence(audit, predictions, cells)
    flags = run_evidence_flags(audit.run, c.analyses.verdict.evidence)  # where the evidence is weak
    rows = []
    for model, evidence in models.items():
        attribution = _attribution_evidence(audit, *evidence["full"][0])
        for name in c.classes:
            cells = matrix[matrix["class"] == name].set_index(["train_strategy", "test_strategy"])
            row = {"model": model, "class": name}
            if c.probing and predictions.loc[(predictions["train_strategy"] == model)
                                             & (predictions["class"] == name), "probability"].isna().all():
                row |= {"verdict": "not_predicted", "label": VERDICTS["not_predicted"][0],
                        "reading": f"The model {model} has no output for {name}: none of its outputs' names matches "
                                   "the class or its aliases (output.aliases), so nothing is guessed."}
            else:
                row |= class_verdict(cells, c.analyses.verdict, baseline.get(name), attribution.get(name),
                                     evidence if c.probing else None, flags=flags[flags["class"] == name])
            rows.append(row)
    table = pd.DataFrame(rows)
    if not c.probing:
        table = table.drop(columns="model")
    write_table(audit.run.analysis("verdict") / "verdict.parquet", table, csv=True)
    return {"verdicts": [f"{m + ': ' if m else ''}{k} {v}" for m, k, v in zip(
        table.get("model", [""] * len(table)), table["class"], table["verdict"], strict=True)]}


def _baseline_evidence(audit, predictions: pd.DataFrame, cells: set[tuple[str, str]]) -> dict[str, dict]:
    """Per class: the baseline's fold-mean AUC and CI, and DeLong's test of each of ``cells`` against it."""
    from maskaudit.analyses.baseline import METADATA

    out = audit.run.analysis("baseline")
    if "baseline" not in audit.config.analyses.run or not (out / "predictions.parquet").is_file():
        return {}
    aucs = pd.read_parquet(out / "baseline_auc.parquet")
    means = aucs[aucs["fold"] == "mean"].set_index("class")
    baseline = pd.read_parquet(out / "predictions.parquet")
    evidence = {}
    for name, row in means.iterrows():
        base_sets = prediction_sets(baseline, name, METADATA, METADATA)
        tests = {}
        for train, test in cells:
            sets = prediction_sets(predictions, name, train, test)
            shared = [k for k in sets if k in base_sets]
            if shared:
                result = mean_difference_test([sets[k] for k in shared], [base_sets[k] for k in shared])
                tests[f"{train}→{test}"] = {"difference": result.difference, "p_value": result.p_value}
        evidence[name] = {"auc": row["auc"], "ci_low": row["ci_low"], "ci_high": row["ci_high"], "tests": tests}
    return evidence


def _attribution_evidence(audit, train: str, test: str) -> dict[str, dict]:
    """Per class: the share of positive attribution inside the ROI for the model ``train`` on ``test`` images."""
    path = audit.run.analysis("explain") / "attribution_in_roi.parquet"
    if "explain" not in audit.config.analyses.run or not path.is_file():
        return {}
    table = pd.read_parquet(path)
    chosen = table[(table["train_strategy"] == train) & (table["test_strategy"] == test)]
    return {row["class"]: {"in_roi": row["in_roi"], "roi_area": row["roi_area"], "ratio": row["ratio"]}
            for _, row in chosen.iterrows()}


ANALYSIS_FUNCTIONS = {"baseline": run_baseline, "explain": run_explain, "embed": run_embed, "sweep": run_sweep,
                      "reader": run_reader, "verdict": run_verdict}
