"""Where a class's evidence lies in the image: occlusion on a grid, each cell tested (issue 16, part 1).

Methods
-------
*Which evidence.* For each class, the cells of the AUC matrix that the verdict reads as evidence
outside the ROI (``outside``: ``no_roi_bbox→no_roi_bbox``, else the next the run has,
:mod:`maskaudit.analyses.verdict`) and, when ``analyses.localize.where`` asks, inside it
(``inside``), chosen as the verdict chooses them. A class is localised where that cell shows
signal by the verdict's rule (CI lower bound above 0.5 and AUC at least ``analyses.verdict.min_auc``):
there is evidence to find, and the question is where.

*Which model and images.* The model of that cell (its training strategy; a probe: the probed model),
each fold's model (``analyses.localize.folds``, default every fold), on the images it was scored on
(the hold-out set) under the cell's test masking: the images and the masking that gave the verdict
its evidence.

*What is occluded.* The image, at the run's image size (the prepared store's pixels, after resizing
and padding: the coordinates of every table), is cut into a ``grid`` × ``grid`` grid of cells (edges at
the rounded multiples of size / grid). Each cell in turn is hidden on top of the test masking: its
pixels are filled as the masking fills removed pixels (``fill``: zero, the dataset's mean, or the
same seeded noise, so that a pixel the masking already removed stays exactly as it was).

*Which cells.* A cell that the test masking hides in most images (at least half of its pixels removed
in more than half of the images) is not tested: hiding it again changes nothing that the model was
shown. For ``outside`` that leaves the cells off the ROI's bounding box (``no_roi_bbox``); for
``inside`` (``only_roi``) only the ROI's cells.

*Which test.* Per cell, the drop of the fold-mean AUC when the cell is hidden (unoccluded minus
occluded) and DeLong's paired test of the two fold means on the same images
(:func:`maskaudit.stats.mean_difference`: the joint DeLong covariance of the 2K predictors, so the
correlation between the folds' models and between each image's two scores is accounted for), with
its normal confidence interval at ``analyses.level``.

*Which correction, and why.* The cells of one class's cell of evidence are one family of tests, corrected
by Holm's step-down method (default; ``correction: bh`` for Benjamini–Hochberg). The claim a
significant cell makes is about that region ("the signal is in the top-left corner"), so the error to
bound is naming any region wrongly: the family-wise error, which Holm bounds under any dependence
between the tests. The cells' tests are strongly dependent (the same images, the same models), and
Benjamini–Hochberg's false discovery rate needs positive dependence to hold. Holm's loss of power
matters little for what this is for: a shortcut hidden by one cell moves the AUC far. A cell is
significant when its adjusted p-value is below ``analyses.verdict.alpha`` and hiding it lowers the AUC.

*Beside it.* When ``explain`` explained the same (model, test masking) pair, the mean share of each
cell in the positive attribution of the class's explained positives, on the same grid (read from the
explain jobs' maps; said to be absent otherwise).

*Wording.* The verdict's reading gets one sentence per localised cell of evidence: the regions (the
grid's corners, edges and centre in thirds of the image) of the significant cells, ordered by their
largest drop, with the AUC before and after hiding the most telling cell of each, and how many cells
were tested and found significant under which correction. "Most of" the signal when the significant
cells' drops add up to at least half of the AUC's excess over chance, else "part of"; when no cell
alone is significant, the sentence says so: the signal is spread out, or redundant (in several places
at once, so that hiding one leaves the others).

*Cost.* Each batch of the images is read once; under each test masking every image is scored once
as it is and once per cell the masking leaves at least partly visible, in batches of
``predict.batch_size`` (an image whose cell is wholly hidden already is unchanged by hiding it: its
score is the unoccluded one, not computed again).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from maskaudit.analyses.verdict import shows_signal
from maskaudit.data.store import Store
from maskaudit.errors import MaskauditError
from maskaudit.loader import Batch, batches
from maskaudit.masking import bounding_box
from maskaudit.predict import probabilities
from maskaudit.progress import active
from maskaudit.report.figures import plt
from maskaudit.report.parts import fmt_auc, frame_table, inline_image
from maskaudit.stats import benjamini_hochberg, delong_covariance, holm, mean_difference, z_critical
from maskaudit.strategies import STRATEGIES, MaskSpec

#: The corrections over a class's cells (``analyses.localize.correction``): name → (function, how it is written).
CORRECTIONS = {"holm": (holm, "Holm"), "bh": (benjamini_hochberg, "Benjamini–Hochberg")}

#: A cell is hidden in an image when at least this share of its pixels is removed by the test masking, and left
#: untested when it is hidden in more than this share of the images.
MOSTLY = 0.5

#: A drop of the AUC below this is not worth naming a place for.
NEGLIGIBLE = 0.005

#: The region of a cell, by the third of the image its centre falls in: (row third, column third) → words.
REGIONS = {(0, 0): "top-left corner", (0, 1): "top edge", (0, 2): "top-right corner",
           (1, 0): "left edge", (1, 1): "centre", (1, 2): "right edge",
           (2, 0): "bottom-left corner", (2, 1): "bottom edge", (2, 2): "bottom-right corner"}

#: The roles localised (``analyses.localize.where``) and how the sentence names their evidence.
ROLES = {"outside": ("outside signal", "outside the ROI"), "inside": ("inside signal", "inside the ROI")}

#: The per-cell table's columns (``analyses/localize/cells.parquet``).
CELL_COLUMNS = ["model", "class", "role", "train_strategy", "test_strategy", "cell", "row", "col", "region",
                "y0", "y1", "x0", "x1", "hidden_share", "tested", "auc", "auc_occluded", "drop", "drop_ci_low",
                "drop_ci_high", "p", "p_adjusted", "significant", "n_images", "n_folds", "attribution_share",
                "reason"]


# ------------------------------------------------------------------------------------------ the grid


def grid_edges(size: int, grid: int) -> np.ndarray:
    """The ``grid + 1`` pixel edges of the cells along one side: the rounded multiples of ``size / grid``.

    Raises
    ------
    MaskauditError
        When the grid has more cells along a side than the image has pixels.

    Examples
    --------
    >>> grid_edges(10, 4).tolist()
    [0, 3, 5, 8, 10]
    """
    if not 1 <= grid <= size:
        raise MaskauditError(f"analyses.localize.grid={grid}: the images are {size} pixels wide; a grid needs "
                             f"1 to {size} cells along a side")
    return np.floor(np.arange(grid + 1) * size / grid + 0.5).astype(np.int64)


def cell_boxes(size: int, grid: int) -> pd.DataFrame:
    """Each cell's pixel box in image coordinates: ``cell`` (``row * grid + col``), ``row``, ``col``, ``y0``,
    ``y1``, ``x0``, ``x1`` (half-open: rows ``y0 … y1 - 1``), and its ``region`` (:data:`REGIONS`)."""
    edges = grid_edges(size, grid)
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return pd.DataFrame({"cell": rows * grid + cols, "row": rows, "col": cols,
                         "region": [region_of(r, c, grid) for r, c in zip(rows, cols, strict=True)],
                         "y0": edges[rows], "y1": edges[rows + 1], "x0": edges[cols], "x1": edges[cols + 1]})


def cell_index(size: int, grid: int) -> np.ndarray:
    """The cell (``row * grid + col``) of every pixel: int64 array of shape (size, size)."""
    edges = grid_edges(size, grid)
    of = np.searchsorted(edges, np.arange(size), side="right") - 1
    return of[:, None] * grid + of[None, :]


def region_of(row: int, col: int, grid: int) -> str:
    """Where a cell lies, in words: the third of the image its centre falls in, down and across (:data:`REGIONS`)."""
    def third(k: int) -> int:
        return min(2, int(3 * (k + 0.5) / grid))

    return REGIONS[third(row), third(col)]


def hidden_fraction(keep: torch.Tensor, index: torch.Tensor, n_cells: int) -> torch.Tensor:
    """The share of each cell's pixels that the masking removes, per image.

    Parameters
    ----------
    keep : bool tensor of shape (B, 1, S, S)
        The pixels the test masking keeps.
    index : int64 tensor of shape (S, S)
        :func:`cell_index`, on ``keep``'s device.
    n_cells : int

    Returns
    -------
    float tensor of shape (B, n_cells)
    """
    flat = index.reshape(-1)
    removed = (~keep).reshape(keep.shape[0], -1).float()
    sums = torch.zeros(keep.shape[0], n_cells, device=keep.device).index_add_(1, flat, removed)
    sizes = torch.bincount(flat, minlength=n_cells).float()
    return sums / sizes


def kept_pixels(roi: torch.Tensor, strategy: str) -> torch.Tensor:
    """The pixels a test masking keeps (bool (B, 1, S, S)): all of them for ``full`` (and ``roi_shape``, which
    replaces the image)."""
    entry = STRATEGIES[strategy]
    if entry.keep is None:
        return torch.ones_like(roi, dtype=torch.bool)
    return entry.keep(roi, bounding_box)


def filled(batch: Batch, spec: MaskSpec) -> torch.Tensor:
    """Every pixel of the batch as the masking fills a removed one (zero, the mean, the image's seeded noise)."""
    return replace(batch, roi=torch.zeros_like(batch.roi)).masked("only_roi", spec)


def occlude(masked: torch.Tensor, fill: torch.Tensor, index: torch.Tensor, images: torch.Tensor,
            cells: torch.Tensor) -> torch.Tensor:
    """Image ``images[j]`` of ``masked`` with cell ``cells[j]`` filled from ``fill``: (n, C, S, S) for n pairs."""
    hide = (index.unsqueeze(0) == cells.view(-1, 1, 1)).unsqueeze(1)
    return torch.where(hide, fill[images], masked[images])


# ------------------------------------------------------------------------------------------ one model's scores


def occlusion_predictions(model: torch.nn.Module, store: Store, indices: np.ndarray, spec: MaskSpec,
                          test_strategies: list[str], grid: int, batch_size: int, device: torch.device,
                          train_strategy: str, fold: int, num_workers: int = 0) -> pd.DataFrame:
    """The model's probabilities on ``indices`` under each test masking, as they are and with each cell hidden.

    Each batch of images is read once; under each test masking the images are scored as they are, then every
    (image, cell) pair whose cell the masking leaves at least partly visible, ``batch_size`` pairs at a time. A
    pair whose cell is wholly hidden already keeps the unoccluded score (hiding it changes no pixel).

    Returns
    -------
    DataFrame
        One row per (test strategy, cell, image, class): ``train_strategy``, ``fold``, ``test_strategy``,
        ``cell`` (-1: nothing hidden), ``image_id``, ``class``, ``label``, ``probability`` (float32) and
        ``hidden`` (float32: the share of the cell's pixels the test masking removes in that image; NaN for -1).
    """
    size, n_cells = store.image_size, grid * grid
    index = torch.from_numpy(cell_index(size, grid)).to(device)
    n, k = len(indices), len(store.classes)
    base = {t: np.zeros((n, k), np.float32) for t in test_strategies}
    occluded = {t: np.zeros((n, n_cells, k), np.float32) for t in test_strategies}
    hidden = {t: np.zeros((n, n_cells), np.float32) for t in test_strategies}
    model.eval()
    shown = active()
    shown.steps(n * len(test_strategies), "images", note=f"{n_cells} cells each, under {', '.join(test_strategies)}")
    start = 0
    with torch.no_grad():
        for batch in batches(store, indices, spec, batch_size, device, num_workers=num_workers):
            b = len(batch.index)
            rows = slice(start, start + b)
            fill = filled(batch, spec)
            for test in test_strategies:
                masked = batch.masked(test, spec)
                share = hidden_fraction(kept_pixels(batch.roi, test), index, n_cells)
                scores = probabilities(model, masked)
                out = scores.unsqueeze(1).repeat(1, n_cells, 1)  # a wholly hidden cell: the unoccluded score
                images, cells = torch.nonzero(share < 1.0, as_tuple=True)
                for at in range(0, len(images), batch_size):
                    i, c = images[at:at + batch_size], cells[at:at + batch_size]
                    out[i, c] = probabilities(model, occlude(masked, fill, index, i, c))
                base[test][rows] = scores.cpu().numpy()
                occluded[test][rows] = out.cpu().numpy()
                hidden[test][rows] = share.cpu().numpy()
                shown.step(b)
            start += b
    image_ids = store.kept["image_id"].to_numpy()[indices]
    frames = []
    for test in test_strategies:
        cell = np.concatenate([np.full(n, -1), np.repeat(np.arange(n_cells), n)])
        share = np.concatenate([np.full(n, np.nan, np.float32), hidden[test].T.reshape(-1)])
        for j, name in enumerate(store.classes):
            probability = np.concatenate([base[test][:, j], occluded[test][:, :, j].T.reshape(-1)])
            frames.append(pd.DataFrame({
                "train_strategy": train_strategy, "fold": fold, "test_strategy": test, "cell": cell,
                "image_id": np.tile(image_ids, n_cells + 1), "class": name,
                "label": np.tile(store.labels[indices, j], n_cells + 1), "probability": probability,
                "hidden": share,
            }))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------ which evidence


def localized_cells(evidence: dict[str, dict[str, list[tuple[str, str]]]], where: list[str], models: list[str],
                    test_strategies: list[str], best_inside: bool = False) -> dict[str, dict[str, list]]:
    """Per verdict model (``""``: a full audit) and role of ``where``, the cells of evidence that may be localised.

    The verdict reads the first candidate of a role that the run has (a probe: the better of its ``inside``
    candidates, ``best_inside``); these are the run's candidates it can choose: the first, or every one of
    them for a probe's ``inside``. Which of them shows signal for a class is the AUC matrix's to say
    (:func:`chosen_cell`).
    """
    out = {}
    for key, roles in evidence.items():
        out[key] = {}
        for role in where:
            have = [(t, s) for t, s in roles.get(role, []) if t in models and s in test_strategies]
            out[key][role] = have if role == "inside" and best_inside else have[:1]
    return out


def chosen_cell(cells: pd.DataFrame, candidates: list[tuple[str, str]], best: bool = False) -> pd.Series | None:
    """The matrix row the verdict reads among ``candidates``: the first with an AUC, or (``best``) the one with the
    highest CI lower bound. ``cells``: one class's hold-out AUC matrix indexed by (train, test) strategy."""
    found = [cells.loc[cell] for cell in candidates if cell in cells.index and not math.isnan(cells.loc[cell,
                                                                                                     "auc_mean"])]
    if not found:
        return None
    return max(found, key=lambda r: r["ci_low"] if not math.isnan(r["ci_low"]) else -math.inf) if best else found[0]


def evidence_targets(matrix: pd.DataFrame, cells: dict[str, dict[str, list]], classes: list[str], rules,
                     best_inside: bool = False) -> list[dict]:
    """The (model, class, role, cell) to localise: each role's chosen cell (:func:`chosen_cell`) where it shows
    signal by the verdict's rule (:func:`maskaudit.analyses.verdict.shows_signal`)."""
    targets = []
    for key, roles in cells.items():
        for name in classes:
            of_class = matrix[matrix["class"] == name].set_index(["train_strategy", "test_strategy"])
            for role, candidates in roles.items():
                row = chosen_cell(of_class, candidates, best=best_inside and role == "inside")
                if row is not None and shows_signal(float(row["auc_mean"]), float(row["ci_low"]), rules):
                    train, test = row.name
                    targets.append({"model": key, "class": name, "role": role, "train_strategy": train,
                                    "test_strategy": test, "auc_matrix": float(row["auc_mean"])})
    return targets


# ------------------------------------------------------------------------------------------ the tests


def cell_tests(labels: np.ndarray, base: np.ndarray, occluded: np.ndarray, hidden: np.ndarray,
               level: float = 0.95) -> pd.DataFrame:
    """Each cell's AUC drop, its CI and DeLong's paired test of the fold means (unoccluded against occluded).

    Parameters
    ----------
    labels : array of shape (n_images,)
        0/1 (NaN: not labelled, left out).
    base : array of shape (n_folds, n_images)
        Each fold's model's probabilities on the images as they are.
    occluded : array of shape (n_folds, n_cells, n_images)
        The same with each cell hidden.
    hidden : array of shape (n_images, n_cells)
        The share of each cell's pixels the test masking removes in each image.
    level : float
        Confidence level of the drop's interval.

    Returns
    -------
    DataFrame
        One row per cell, in cell order: ``cell``, ``hidden_share`` (the share of images in which the masking
        removes at least :data:`MOSTLY` of the cell), ``tested`` (False when that share is above :data:`MOSTLY`),
        ``auc``, ``auc_occluded``, ``drop`` (``auc - auc_occluded``), ``drop_ci_low``, ``drop_ci_high``, ``p``,
        ``n_images``, ``reason`` (why a cell has no test).
    """
    base, occluded = np.atleast_2d(base), np.asarray(occluded, float)
    if occluded.ndim != 3 or occluded.shape[0] != base.shape[0] or occluded.shape[2] != base.shape[1]:
        raise ValueError(f"occluded must be (n_folds, n_cells, n_images) = ({base.shape[0]}, *, {base.shape[1]}); "
                         f"got {occluded.shape}")
    if hidden.shape != (base.shape[1], occluded.shape[1]):
        raise ValueError(f"hidden must be (n_images, n_cells) = ({base.shape[1]}, {occluded.shape[1]}); "
                         f"got {hidden.shape}")
    z = z_critical(level)
    shares = (hidden >= MOSTLY).mean(axis=0) if len(hidden) else np.zeros(occluded.shape[1])
    rows = []
    for c in range(occluded.shape[1]):
        row = {"cell": c, "hidden_share": float(shares[c]), "tested": bool(shares[c] <= MOSTLY)}
        if not row["tested"]:
            rows.append({**row, "reason": f"the test masking hides it in {shares[c]:.0%} of the images"})
            continue
        test = mean_difference(labels, base, occluded[:, c])
        half = z * _difference_se(labels, base, occluded[:, c], test)
        rows.append({**row, "auc": test.auc_a, "auc_occluded": test.auc_b, "drop": test.difference,
                     "drop_ci_low": test.difference - half, "drop_ci_high": test.difference + half,
                     "p": test.p_value, "n_images": test.n_images, "reason": test.reason})
    columns = ["cell", "hidden_share", "tested", "auc", "auc_occluded", "drop", "drop_ci_low", "drop_ci_high", "p",
               "n_images", "reason"]
    return pd.DataFrame(rows, columns=columns).astype({"n_images": "float"})


def _difference_se(labels: np.ndarray, a: np.ndarray, b: np.ndarray, test) -> float:
    """The standard error of ``test.difference`` (``mean AUC(a) - mean AUC(b)``): from its z where that is defined
    and non-zero, else from the joint DeLong covariance (a difference of exactly 0)."""
    if test.reason:
        return math.nan
    if test.z != 0:
        return abs(test.difference / test.z)
    known = ~np.isnan(labels)
    _, covariance = delong_covariance(labels[known], np.vstack([a[:, known], b[:, known]]))
    weights = np.concatenate([np.full(len(a), 1 / len(a)), np.full(len(b), -1 / len(b))])
    return math.sqrt(max(0.0, float(weights @ covariance @ weights)))


def adjust(p_values: np.ndarray, correction: str) -> np.ndarray:
    """``p_values`` adjusted by ``correction`` (:data:`CORRECTIONS`); NaN stays NaN."""
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; known: {', '.join(CORRECTIONS)}")
    return CORRECTIONS[correction][0](p_values)


def _by_cell(part: pd.DataFrame, column: str, n_cells: int) -> np.ndarray:
    """``column`` of one fold's rows sorted by (cell, image), as (1 + n_cells, n_images): row 0 unoccluded."""
    return part[column].to_numpy().reshape(n_cells + 1, -1)


def localize_target(scores: pd.DataFrame, target: dict, boxes: pd.DataFrame, level: float, alpha: float,
                    correction: str) -> pd.DataFrame:
    """One target's per-cell table (:data:`CELL_COLUMNS` but ``attribution_share``) from its models' occlusion
    predictions (:func:`occlusion_predictions`, every fold's, of one class and test masking)."""
    n_cells = len(boxes)
    folds = sorted(scores["fold"].unique())
    base, occluded, labels, hidden, ids = [], [], None, None, None
    for fold in folds:
        part = scores[scores["fold"] == fold].sort_values(["cell", "image_id"], kind="mergesort")
        cells = part["cell"].to_numpy()
        if len(part) % (n_cells + 1) or not (cells.reshape(n_cells + 1, -1) == np.arange(-1, n_cells)[:, None]).all():
            raise MaskauditError(f"{target['train_strategy']} fold {fold}: its occlusion predictions do not hold "
                                 f"the {n_cells} cells of this grid; run `maskaudit analyse localize --force`")
        fold_ids = _by_cell(part, "image_id", n_cells)[0]
        if ids is None:
            ids, labels = fold_ids, _by_cell(part, "label", n_cells)[0].astype(float)
            hidden = _by_cell(part, "hidden", n_cells)[1:].T
        elif not np.array_equal(ids, fold_ids):
            raise MaskauditError(f"{target['train_strategy']}: its folds' occlusion predictions score different "
                                 "images; run `maskaudit analyse localize --force`")
        scored = _by_cell(part, "probability", n_cells).astype(float)
        base.append(scored[0])
        occluded.append(scored[1:])
    tests = cell_tests(labels, np.stack(base), np.stack(occluded), hidden.astype(float), level)
    tests["p_adjusted"] = adjust(tests["p"].to_numpy(float), correction)
    tests["significant"] = (tests["p_adjusted"] < alpha) & (tests["drop"] > 0)
    table = boxes.merge(tests, on="cell")
    for key in ("model", "class", "role", "train_strategy", "test_strategy"):
        table[key] = target[key]
    table["n_folds"] = len(folds)
    table["attribution_share"] = np.nan
    return table[CELL_COLUMNS]


# ------------------------------------------------------------------------------------------ the sentence


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _pixels(row: pd.Series) -> str:
    return f"pixel rows {int(row['y0'])}–{int(row['y1']) - 1}, columns {int(row['x0'])}–{int(row['x1']) - 1}"


def localization_sentence(table: pd.DataFrame, correction: str, alpha: float, grid: int) -> str:
    """What one target's per-cell table says, in one sentence (module docstring, *Wording*)."""
    first = table.iloc[0]
    signal, place = ROLES[first["role"]]
    cell_name = f"{first['train_strategy']}→{first['test_strategy']}"
    tested = table[table["tested"] & table["p"].notna()]
    how = f"{CORRECTIONS[correction][1]}, α = {alpha:g}"
    if tested.empty:
        return (f"No cell of the {grid}×{grid} grid {place} could be hidden on its own: the test masking hides "
                "each one in most images.")
    auc = float(tested["auc"].iloc[0])
    significant = tested[tested["significant"]].sort_values("drop", ascending=False)
    if significant.empty:
        top = tested.sort_values("drop", ascending=False).iloc[0]
        lead = (f"No single cell {place} is significant on its own (none of the {len(tested)} cells of the "
                f"{grid}×{grid} grid tested; {how}): the {signal} is spread out or redundant (in several places at "
                "once)")
        if top["drop"] < NEGLIGIBLE:
            return f"{lead}; hiding any one cell lowers the AUC ({auc:.2f}) by less than {NEGLIGIBLE:g}."
        return (f"{lead}; the largest drop, {top['drop']:.2f} [{top['drop_ci_low']:.2f}, {top['drop_ci_high']:.2f}], "
                f"is at the image's {top['region']}.")
    best = significant.drop_duplicates("region")  # each region's most telling cell, largest drop first
    excess = auc - 0.5
    share = float(significant["drop"].sum()) / excess if excess > 0 else 0.0
    quantity = "Most" if share >= 0.5 else "Part"
    regions = _join(list(best["region"]))
    if len(best) == 1:
        top = best.iloc[0]
        effect = (f"hiding one cell there ({_pixels(top)}) takes {cell_name} from AUC {auc:.2f} to "
                  f"{top['auc_occluded']:.2f}")
    else:
        after = " or ".join(f"{r['auc_occluded']:.2f} ({r['region']})" for _, r in best.iterrows())
        effect = f"hiding one cell takes {cell_name} from AUC {auc:.2f} to {after}"
    n = len(significant)
    counted = f"{n} of the {len(tested)} cells tested {'is' if n == 1 else 'are'} significant ({how})"
    return f"{quantity} of the {signal} is in the image's {regions}: {effect}; {counted}."


# ------------------------------------------------------------------------------------------ beside it


def attribution_grid(attributions: np.ndarray, grid: int) -> np.ndarray:
    """Each cell's mean share of the positive attribution over images (``(n, S, S)`` maps → ``(grid * grid,)``);
    images without positive attribution are left out (NaN everywhere when none has any)."""
    attributions = np.asarray(attributions, dtype=float)
    if attributions.ndim != 3 or attributions.shape[1] != attributions.shape[2]:
        raise ValueError(f"attributions must be (n, S, S); got {attributions.shape}")
    index = cell_index(attributions.shape[1], grid).reshape(-1)
    positive = np.clip(attributions, 0.0, None).reshape(len(attributions), -1)
    totals = positive.sum(axis=1)
    shares = [np.bincount(index, weights=p, minlength=grid * grid) / t for p, t in zip(positive, totals, strict=True)
              if t > 0]
    return np.mean(shares, axis=0) if shares else np.full(grid * grid, np.nan)


def explained_attribution(run, train: str, test: str, name: str, grid: int) -> tuple[np.ndarray | None, str]:
    """The attribution share per cell of ``explain``'s maps of (train, test) for class ``name`` (every explained
    fold), or None and why there is none."""
    path = run.analysis("explain") / "attribution.parquet"
    if not path.is_file():
        return None, "no explain maps (explain did not run)"
    table = pd.read_parquet(path)
    rows = table[(table["train_strategy"] == train) & (table["test_strategy"] == test) & (table["class"] == name)]
    if rows.empty:
        return None, f"no explain maps of {train}→{test} for {name} (analyses.explain.pairs)"
    maps = []
    for fold, part in rows.groupby("fold"):
        arrays = np.load(Path(run.job(train, int(fold))) / "explain.npz")
        maps.append(arrays["attributions"][part["row"].to_numpy()])
    stacked = np.concatenate(maps)
    return attribution_grid(stacked, grid), f"mean over {len(stacked)} explained positives"


# ------------------------------------------------------------------------------------------ the figure


def localize_figure(mean_image: np.ndarray, table: pd.DataFrame, grid: int, attribution: np.ndarray | None,
                    attribution_note: str, title: str):
    """The mean positive image under the test masking with each cell's AUC drop over it (significant cells
    outlined, untested ones hatched) and, beside it, the attribution share per cell (or why there is none).

    Parameters
    ----------
    mean_image : array of shape (C, S, S)
        In [0, 1]; gray (C = 1) or RGB (C = 3).
    table : DataFrame
        One target's rows of :data:`CELL_COLUMNS`.
    """
    from matplotlib.patches import Rectangle

    size = mean_image.shape[-1]
    shown = mean_image[0] if mean_image.shape[0] == 1 else np.moveaxis(mean_image, 0, -1)
    fig, axes = plt.subplots(1, 2, figsize=(7.4, 3.6), dpi=150)
    extent = (0, size, size, 0)
    drops = np.full(grid * grid, np.nan)
    drops[table["cell"].to_numpy()] = table["drop"].to_numpy(float)
    limit = max(0.1, float(np.nanmax(np.abs(drops)))) if np.isfinite(drops).any() else 0.1  # small drops: pale
    ax = axes[0]
    ax.imshow(shown, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    overlay = ax.imshow(drops.reshape(grid, grid), cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.6, extent=extent,
                        interpolation="nearest")
    for _, r in table.iterrows():
        box = (r["x0"], r["y0"]), r["x1"] - r["x0"], r["y1"] - r["y0"]
        if not r["tested"]:
            ax.add_patch(Rectangle(*box, fill=False, hatch="///", edgecolor="#9e9e9e", linewidth=0))
        elif r["significant"]:
            ax.add_patch(Rectangle(*box, fill=False, edgecolor="#ffd700", linewidth=1.8))
            ax.text(r["x0"] + (r["x1"] - r["x0"]) / 2, r["y0"] + (r["y1"] - r["y0"]) / 2, f"{r['drop']:.2f}",
                    ha="center", va="center", fontsize=6, color="black")
    cbar = fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("AUC drop when hidden", fontsize=7)
    cbar.ax.tick_params(labelsize=6)
    ax.set_title("AUC drop per cell (outlined: significant; hatched: not tested)", fontsize=7)
    ax = axes[1]
    ax.imshow(shown, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    if attribution is not None and np.isfinite(attribution).any():
        heat = ax.imshow(attribution.reshape(grid, grid), cmap="Reds", vmin=0, alpha=0.6, extent=extent,
                         interpolation="nearest")
        cbar = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.03)
        cbar.set_label("share of positive attribution", fontsize=7)
        cbar.ax.tick_params(labelsize=6)
        ax.set_title(f"SHAP attribution per cell ({attribution_note})", fontsize=7)
    else:
        ax.set_title("SHAP attribution per cell", fontsize=7)
        ax.text(size / 2, size / 2, attribution_note, ha="center", va="center", fontsize=7, wrap=True,
                bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    for ax in axes:
        ax.set_xticks(grid_edges(size, grid)[::2])
        ax.set_yticks(grid_edges(size, grid)[::2])
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def mean_positive_image(store: Store, indices: np.ndarray, name: str, spec: MaskSpec, test: str, batch_size: int,
                        device: torch.device) -> np.ndarray:
    """The mean of the class's positive images among ``indices`` under test masking ``test``: (C, S, S)."""
    k = store.classes.index(name)
    positives = indices[store.labels[indices, k] == 1]
    total = np.zeros((store.channels, store.image_size, store.image_size))
    for batch in batches(store, positives, spec, batch_size, device):
        total += batch.masked(test, spec).sum(dim=0).cpu().numpy()
    return total / max(1, len(positives))


# ------------------------------------------------------------------------------------------ the report


def localize_section(run, config) -> dict:
    """The report's part: what was done, one sentence per localised class, the top cells, the figures."""

    loc = config.analyses.localize
    out = run.analysis("localize")
    how = CORRECTIONS[loc.correction][1]
    intro = (f"Where the evidence lies: for each class whose evidence {' and '.join(ROLES[r][1] for r in loc.where)} "
             f"shows signal, each cell of a {loc.grid}×{loc.grid} grid of the hold-out images was hidden in turn "
             "(filled as the masking fills) and the model of that evidence scored them again. A cell's number is the "
             "drop of the fold-mean AUC, with DeLong's paired test, corrected over the class's cells by "
             f"{how}; cells the test masking hides in most images are not tested (hatched). Coordinates are pixels "
             f"of the {config.image_size}-pixel prepared images." if loc.where else "Nothing to localise "
             "(analyses.localize.where is empty).")
    summary_path, cells_path = out / "summary.parquet", out / "cells.parquet"
    if not summary_path.is_file():
        return {"intro": intro, "tables": [], "figures": []}
    summary, cells = pd.read_parquet(summary_path), pd.read_parquet(cells_path)
    tables = []
    if len(summary):
        tables.append(frame_table(summary, "where each class's evidence lies", {
            **({"model": lambda r: str(r["model"])} if (summary["model"] != "").any() else {}),
            "class": lambda r: str(r["class"]), "evidence": lambda r: f"{r['role']}: {r['train_strategy']}→"
                                                                      f"{r['test_strategy']}",
            "reading": lambda r: str(r["sentence"]),
        }))
        tested = cells[cells["tested"] & cells["p"].notna()]
        keys = ["model", "class", "role", "train_strategy", "test_strategy"]
        top = (tested.sort_values(["p_adjusted", "drop"], ascending=[True, False]).groupby(keys, sort=False)
               .head(loc.top))
        table = frame_table(top, f"the {loc.top} cells of each class with the smallest adjusted p-value "
                                 f"({how}); ✓ significant at α = {config.analyses.verdict.alpha:g}", {
            "class": lambda r: str(r["class"]), "train → test": lambda r: f"{r['train_strategy']} → "
                                                                          f"{r['test_strategy']}",
            "region": lambda r: str(r["region"]), "cell (row, col)": lambda r: f"{int(r['row'])}, {int(r['col'])}",
            "pixels (y, x)": lambda r: f"{int(r['y0'])}–{int(r['y1']) - 1}, {int(r['x0'])}–{int(r['x1']) - 1}",
            "AUC → hidden": lambda r: f"{r['auc']:.3f} → {r['auc_occluded']:.3f}",
            "drop [CI]": lambda r: fmt_auc(r["drop"], r["drop_ci_low"], r["drop_ci_high"]),
            "p adjusted": lambda r: f"{r['p_adjusted']:.2g}", "": lambda r: "✓" if r["significant"] else "",
        })
        tables.append(table)
    figures = [inline_image(run.figures / f"{figure_name(r)}.png", "chart") for _, r in summary.iterrows()]
    return {"intro": intro, "tables": tables, "figures": [f for f in figures if f]}


def figure_name(target) -> str:
    """The figure file of one target (without suffix): ``localize_<train>_<test>_<class>``."""
    return f"localize_{target['train_strategy']}_{target['test_strategy']}_{target['class']}"


def summary_row(target: dict, table: pd.DataFrame, sentence: str) -> dict:
    tested = table[table["tested"] & table["p"].notna()]
    return {**{k: target[k] for k in ("model", "class", "role", "train_strategy", "test_strategy")},
            "auc": float(tested["auc"].iloc[0]) if len(tested) else math.nan,
            "n_cells": len(table), "n_tested": len(tested), "n_significant": int(table["significant"].sum()),
            "regions": ", ".join(dict.fromkeys(table.loc[table["significant"]].sort_values(
                "drop", ascending=False)["region"])),
            "sentence": sentence}

