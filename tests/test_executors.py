"""The Ray executor runs the same job functions as the local one, with the same results."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_pipeline import TINY
from typer.testing import CliRunner

from maskaudit.cli import app

ray = pytest.importorskip("ray", reason="the Ray executor needs `pip install maskaudit[ray]`")


@pytest.mark.slow
def test_ray_grid_equals_local_grid(tmp_path: Path):
    config = {**TINY, "strategies": ["full", "only_roi"]}
    results = {}
    for executor in ("local", "ray"):
        path = tmp_path / f"{executor}.yaml"
        path.write_text(yaml.safe_dump({**config, "executor": executor}))
        out = tmp_path / executor
        result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        results[executor] = pd.read_parquet(out / "predictions.parquet")
    ray.shutdown()
    local, remote = results["local"], results["ray"]
    keys = ["split", "train_strategy", "fold", "test_strategy", "image_id", "class"]
    pd.testing.assert_frame_equal(local[keys], remote[keys])
    # Ray workers may run torch with another thread count: equal up to float summation order
    assert (local["probability"] - remote["probability"]).abs().max() < 1e-3
