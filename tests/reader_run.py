"""A small run directory with a reader selection, built without training (shared by the reader-study tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from maskaudit.analyses.run import run_reader
from maskaudit.config import config_from_dict
from maskaudit.pipeline import Audit


def make_run(root: Path) -> Path:
    """TINY's data prepared and split, random predictions of every (model, fold) on the hold-out, the selection."""
    from test_pipeline import TINY

    config = {**TINY, "analyses": {"run": ["reader"], "reader": {"percentiles": [25, 75]}}}
    audit = Audit.create(root, config_from_dict(config))
    audit.prepare()
    audit.split()
    ctx = audit.context("reader")
    store, splits = ctx.store, ctx.splits
    ids = store.kept.set_index("index").loc[splits.test, "image_id"].astype(str).to_numpy()
    labels = store.labels[splits.test]
    rng = np.random.default_rng(0)
    rows = []
    for model in audit.config.strategies:
        for fold in range(audit.config.folds):
            for test in audit.config.strategies:
                for k, name in enumerate(store.classes):
                    probs = np.clip(0.5 * labels[:, k] + rng.uniform(0, 0.6, len(ids)), 0, 1)
                    rows.append(pd.DataFrame({"dataset": "main", "split": "test", "train_strategy": model,
                                              "fold": fold, "test_strategy": test, "image_id": ids, "class": name,
                                              "label": labels[:, k], "probability": probs}))
    pd.concat(rows, ignore_index=True).to_parquet(audit.run.predictions, index=False)
    run_reader(ctx)
    return root
