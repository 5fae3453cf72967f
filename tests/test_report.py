"""The HTML report: every section in a real browser (headless Chromium), the comparison of two runs, its size."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from browser import CHROMIUM, LAUNCH_ARGS, playwright_api
from typer.testing import CliRunner

from maskaudit.cli import app
from maskaudit.report.parts import inline_image

SECTIONS = ("verdict", "auc", "splits", "baseline", "explain", "embed", "sweep", "reader", "localize", "training",
            "data", "config", "software", "stages")


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny audit with every analysis (a gradient explainer, so it is quick), run through the CLI."""
    from test_pipeline import TINY

    root = tmp_path_factory.mktemp("report")
    config = {**TINY, "analyses": {"explain": {"method": "deep", "background": 4, "images_per_class": 1},
                                   "sweep": {"spreads": [0, 100]}, "reader": {"percentiles": [25, 75]}},
              "report": {"title": "tiny report", "formats": ["png", "svg"]}}
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    _cli("run", str(path), "--out", str(root / "run"))
    return root / "run"


def _open_in_chromium(page_path: Path, screenshot: Path) -> dict:
    """Load ``page_path`` in headless Chromium; collect console errors, requests and image sizes."""
    sync_api = playwright_api()  # CI: chromium and playwright must be there; elsewhere a missing one skips
    found: dict = {"errors": [], "requests": []}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: m.type == "error" and found["errors"].append(m.text))
            page.on("pageerror", lambda e: found["errors"].append(str(e)))
            page.on("request", lambda r: found["requests"].append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
            found["sections"] = page.evaluate(
                "Array.from(document.querySelectorAll('section')).map(s => [s.id, s.innerText.trim().length])")
            found["images"] = page.evaluate(
                "Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
            found["text"] = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return found


def test_report_in_headless_chromium(tiny_run: Path, tmp_path: Path):
    """Every section rendered, no console errors, no broken images, no request other than file:/data:."""
    html = (tiny_run / "report.html").read_text()
    assert 'http-equiv="Content-Security-Policy"' in html
    assert (tiny_run / "figures" / "training_curves.png").is_file()
    assert (tiny_run / "figures" / "training_curves.svg").is_file()  # report.formats
    screenshot = tmp_path / "report.png"
    found = _open_in_chromium(tiny_run / "report.html", screenshot)
    sections = dict(found["sections"])
    assert list(sections) == list(SECTIONS)
    assert all(length > 40 for length in sections.values()), sections
    assert found["errors"] == []
    assert found["images"] and all(ok for _, ok in found["images"]), [a for a, ok in found["images"] if not ok]
    assert [u for u in found["requests"] if not u.startswith(("data:", "file:"))] == []
    kinds = {alt.split(" ")[0] for alt, _ in found["images"]}
    assert {"AUC", "SHAP", "t-SNE", "dilation", "reader", "training"} <= kinds
    text = found["text"]
    assert "this data has no metadata" in text  # a skipped analysis says why
    assert "[" in text and "hold-out" in text and "validation" in text
    assert screenshot.stat().st_size > 10_000
    shutil.copy(screenshot, "/tmp/report_screenshot.png")


def test_compare_two_runs(tiny_run: Path, tmp_path: Path):
    """--compare writes one self-contained compare.html; a verdict that differs is marked."""
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    verdict = other / "analyses" / "verdict" / "verdict.parquet"
    table = pd.read_parquet(verdict)
    table.loc[0, "verdict"], table.loc[0, "label"] = "metadata", "explained by metadata"
    table.to_parquet(verdict)
    output = _cli("report", "--compare", str(tiny_run), str(other), "--out", str(tmp_path / "cmp"))
    page = tmp_path / "cmp" / "compare.html"
    assert str(page) in output
    html = page.read_text()
    assert html.count('class="differs"') == 1 and "explained by metadata" in html and "B − A" in html
    found = _open_in_chromium(page, tmp_path / "compare.png")
    assert found["errors"] == [] and [u for u in found["requests"] if not u.startswith(("data:", "file:"))] == []
    assert [s for s, _ in found["sections"]] == ["verdicts", "matrices"]
    bad = CliRunner().invoke(app, ["report", "--compare", str(tiny_run), str(tmp_path / "nothing"),
                                   "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "not a run directory" in bad.output


def test_stages_not_run_are_named():
    """A stage missing from stages.json reads "not run"; an analysis left out of analyses.run says so."""
    from test_pipeline import TINY

    from maskaudit.config import config_from_dict
    from maskaudit.report.html import stage_rows

    config = config_from_dict({**TINY, "analyses": {"run": ["baseline"]}})
    rows = {r["name"]: r for r in stage_rows({"prepare": {"finished": "now", "seconds": 1.0, "kept": 3}}, config)}
    assert rows["prepare"]["note"] == "kept: 3" and not rows["prepare"]["missing"]
    assert rows["train"]["note"] == "not run" and rows["baseline"]["note"] == "not run"
    assert rows["explain"]["note"] == "not in analyses.run"
    assert rows["report"]["note"] == "this page"


def test_padchest_size_stays_under_20_mb(tmp_path: Path):
    """Estimate the report of PadChest's configuration from its largest parts, inlined as the report does.

    5 classes x 5 strategies (25 SHAP panels of 8 images at 512 px), 75 reader thumbnails, 5 heatmaps,
    and the tables. Images are smooth noise plus grain: harder to compress than X-rays.
    """
    from maskaudit.analyses.explain import attribution_panels
    from maskaudit.report.figures import save_figure

    rng = np.random.default_rng(0)
    size, n = 512, 8
    coarse = rng.random((n, 1, 16, 16))
    smooth = np.kron(coarse, np.ones((size // 16, size // 16)))
    images = np.clip(0.7 * smooth + 0.3 * rng.random((n, 1, size, size)), 0, 1).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    rois = np.broadcast_to((((yy - 256) / 180) ** 2 + ((xx - 180) / 90) ** 2) < 1, (n, size, size))
    attributions = np.kron(rng.normal(size=(n, 8, 8)), np.ones((size // 8, size // 8))).astype(np.float32)
    fig = attribution_panels(images, rois, attributions, [f"img{k} p=0.9" for k in range(n)], "class: full→full")
    (panel,) = save_figure(fig, tmp_path / "panel")
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray((images[0, 0] * 255).astype(np.uint8)).save(tmp_path / "thumb.png")
    one_panel = len(inline_image(panel, "panel"))
    one_thumb = len(inline_image(tmp_path / "thumb.png", "thumbnail"))
    heatmap_and_charts = 10 * 150_000  # 5 heatmaps, t-SNE, sweep, training curves: < 70 kB each in the demo
    tables = 1_000_000  # 5 classes x 25 cells x (hold-out, validation, DeLong) rows, generously
    estimate = 25 * one_panel + 75 * one_thumb + heatmap_and_charts + tables
    print(f"PadChest-size estimate: {estimate / 1e6:.1f} MB (panel {one_panel / 1e3:.0f} kB, "
          f"thumbnail {one_thumb / 1e3:.0f} kB)")
    assert estimate < 20e6


# ------------------------------------------------------------------------------------------ a run in progress


def _sections(html: str) -> dict[str, str]:
    """Each section's HTML by id."""
    import re

    return dict(re.findall(r'<section id="([a-z]+)">(.*?)</section>', html, flags=re.S))


def test_report_of_a_run_in_progress(tmp_path: Path):
    """Only config.yaml, then after prepare, then after split: every section is there, rendered or "not yet"."""
    from test_pipeline import TINY

    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump({**TINY, "analyses": {"run": ["baseline", "verdict"]}}))
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(config, out / "config.yaml")
    _cli("report", "--out", str(out))  # nothing but the config
    html = (out / "report.html").read_text()
    assert list(_sections(html)) == [s for s in SECTIONS if s != "localize"]  # not in analyses.run
    assert f"not prepared yet: `maskaudit prepare --out {out}`" in _sections(html)["data"]

    _cli("prepare", "--out", str(out))
    _cli("report", "--out", str(out))
    after_prepare = (out / "report.html").read_text()
    sections = _sections(after_prepare)
    assert list(sections) == [s for s in SECTIONS if s != "localize"]
    assert "Rows kept and rejected" in sections["data"] and "not prepared yet" not in sections["data"]
    assert f"not run yet: `maskaudit split --out {out}`" in sections["data"]
    run_metrics = (f"not run yet: `maskaudit split --out {out}`, then `maskaudit train --out {out}`, "
                   f"`maskaudit predict --out {out}`, `maskaudit metrics --out {out}`")
    for name in ("auc", "splits"):
        assert run_metrics in sections[name], name
    assert f"`maskaudit metrics --out {out}`, `maskaudit analyse verdict --out {out}`" in sections["verdict"]
    assert f"`maskaudit analyse baseline --out {out}`" in sections["baseline"]
    assert "not in analyses.run" in sections["explain"]  # left out, not pending
    assert f"`maskaudit train --out {out}`" in sections["training"]

    _cli("split", "--out", str(out))
    _cli("report", "--out", str(out))  # the report's config is unchanged, yet it follows the run
    sections = _sections((out / "report.html").read_text())
    assert "hold-out test" in sections["data"] and "fold 1" in sections["data"]
    assert f"not run yet: `maskaudit train --out {out}`, then `maskaudit predict --out {out}`" in sections["auc"]
    assert f"`maskaudit split --out {out}`" not in sections["auc"]
    assert f"not run yet: `maskaudit train --out {out}` (no job has a training history)" in sections["training"]
    stamp = (out / "report.html").stat().st_mtime_ns
    _cli("report", "--out", str(out))
    assert (out / "report.html").stat().st_mtime_ns == stamp  # nothing changed: not redone


@pytest.fixture(scope="module")
def few_negatives_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished run whose hold-out set has few negatives: the class is common (prevalence 0.7)."""
    from test_pipeline import TINY

    root = tmp_path_factory.mktemp("few")
    data = {**TINY["data"], "classes": {"opacity": {"signal": "roi", "prevalence": 0.7}}}
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data": data, "analyses": {"run": ["verdict"]}}))
    _cli("run", str(path), "--out", str(root / "run"))
    return root / "run"


def test_a_small_hold_out_class_is_flagged_beside_the_number_and_in_the_verdict(few_negatives_run: Path):
    import re

    out = few_negatives_run
    matrix = pd.read_parquet(out / "metrics" / "auc_matrix.parquet")
    holdout = matrix[(matrix["split"] == "test") & (matrix["class"] == "opacity")]
    n_neg = int(holdout["n_neg"].max())
    assert n_neg < 10, "the forced class should have few hold-out negatives"
    flag = f"{n_neg} negative{'s' if n_neg != 1 else ''} in the hold-out set (fewer than 10)"
    verdict = pd.read_csv(out / "analyses" / "verdict" / "verdict.csv").set_index("class")
    assert flag in verdict.loc["opacity", "reading"]  # written by the verdict stage itself
    html = (out / "report.html").read_text()
    sections = _sections(html)
    # next to the number: the full→full cell of the hold-out matrix is marked, the reason on hover
    cell = re.search(r'<td title="full→full: AUC [^"]*"[^>]*>[0-9.]+<span class="weak-mark"> ⚠</span></td>',
                     sections["auc"])
    assert cell and flag in cell.group(0)
    assert re.search("<li>⚠ Few images: [^<]*" + re.escape(flag), sections["auc"])  # and listed under the table
    reading = re.search(r'<th class="l">opacity</th>.*?<td class="r">(.*?)</td>', sections["verdict"], flags=re.S)
    assert reading and re.search('<span class="weak">⚠ Few images: [^<]*' + re.escape(flag), reading.group(1))


def test_report_of_a_run_whose_data_has_moved(cxr_dir: Path, tmp_path: Path):
    """The report reads the run directory alone: it renders after the labels CSV (and images) are gone."""
    data = tmp_path / "data"
    table = pd.read_csv(cxr_dir / "labels.csv").head(24)
    for column in ("image", "mask"):
        for name in table[column]:
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(cxr_dir / name, data / name)
    table.to_csv(data / "labels.csv", index=False)
    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump({"data": {"source": "folder", "labels_csv": str(data / "labels.csv"),
                                               "patient_column": "patient_id", "classes": ["covid"]},
                                      "image_size": 32, "workers": 1}))
    out = tmp_path / "run"
    _cli("prepare", "--out", str(out), "--config", str(config))
    shutil.rmtree(data)  # the data moved away
    _cli("report", "--out", str(out))
    assert "Rows kept and rejected" in (out / "report.html").read_text()
    result = CliRunner().invoke(app, ["split", "--out", str(out)])  # a stage that needs the data still says so
    assert result.exit_code == 1 and "data.labels_csv: labels CSV not found" in result.output
