"""The ``maskaudit`` command: the whole audit (``run``, ``demo``) and each of its stages alone.

A thin layer over :class:`maskaudit.pipeline.Audit`: it parses arguments, sets up logging
into the run directory, and turns a :class:`MaskauditError` into one line and exit code 1
(:func:`maskaudit.cli_common.user_errors`); any other exception keeps its traceback.

Every command that writes into a run directory holds its lock (:mod:`maskaudit.lock`) while it
runs, so a second writer on the same directory stops at once with one line naming the first;
``status``, ``check`` and ``report --compare`` only read and never take it.

It answers ``--help`` at once: at import it loads only typer, rich, stdlib, pydantic and yaml
(:mod:`maskaudit.config`, for the analyses' names in the help), :mod:`maskaudit.cli_common`,
:mod:`maskaudit.errors`, :mod:`maskaudit.lock` and :mod:`maskaudit.reader.cli`; the pipeline
(torch, pandas, matplotlib, ...) is imported inside the commands that need it
(``tests/test_cli_fast.py``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from maskaudit.cli_common import setup_logging, user_errors, writer_lock  # light (stdlib, typer, rich)
from maskaudit.config import ANALYSES  # light (pydantic, yaml): the analyses' names for the help
from maskaudit.errors import MaskauditError
from maskaudit.reader.cli import reader_app

if TYPE_CHECKING:
    from maskaudit.config import AuditConfig
    from maskaudit.pipeline import Audit


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Audit whether an image classifier relies on the region of interest or on shortcuts outside it.",
)

Out = Annotated[Path, typer.Option("--out", "-o", help="run directory (created if needed)")]
OptionalConfig = Annotated[
    Path | None, typer.Option("--config", "-c", help="config YAML; default: the run directory's config.yaml")
]
Force = Annotated[bool, typer.Option("--force", help="redo the stage even if it is up to date")]


@contextlib.contextmanager
def _audit(out: Path, config: Path | None, check_files: bool = True) -> Iterator[Audit]:
    """A stage command's audit (the kind its config asks for), opened and used under the run directory's writer
    lock."""
    from maskaudit.kinds import open_audit

    if config is None and not (out / "config.yaml").is_file():
        open_audit(out, None, check_files)  # says the run directory holds no config; creates nothing
    with writer_lock(out):
        audit = open_audit(out, config, check_files)
        setup_logging(audit.run.log)
        yield audit


def _run_all(out: Path, settings: AuditConfig) -> None:
    """Every stage of ``settings``' kind of audit into ``out``, under its writer lock; then the report's path."""
    from maskaudit.kinds import create_audit

    with writer_lock(out):
        audit = create_audit(out, settings)
        setup_logging(audit.run.log)
        report = audit.run_all()
    typer.echo(f"report: {report}")


@app.command()
@user_errors
def run(config: Annotated[Path, typer.Argument(help="config YAML")], out: Out) -> None:
    """The whole audit: prepare, split, train, predict, metrics, analyses, report."""
    from maskaudit.config import load_config

    settings = load_config(config)
    if settings.kind == "probe":
        raise MaskauditError(f"{config} names models to probe (`model.source` / `models`): use `maskaudit probe`")
    _run_all(out, settings)


@app.command()
@user_errors
def probe(config: Annotated[Path, typer.Argument(help="config YAML with `model: {source: ...}` or `models: [...]`")],
          out: Out) -> None:
    """Audit models trained elsewhere as they are: every masking, analyses, verdict and report; no training."""
    from maskaudit.config import load_config

    settings = load_config(config)
    if settings.kind != "probe":
        raise MaskauditError(f"{config} names no model to probe: add `model: {{source: python|torchscript|onnx|"
                             "torchxrayvision, ...}}` (README, \"Audit your own model\"), or use `maskaudit run`")
    _run_all(out, settings)


def demo_config(kind: str) -> dict:
    """The built-in demo config (synthetic data with known truth) as a mapping."""
    import yaml

    name = f"demo-{kind}.yaml"
    text = resources.files("maskaudit").joinpath("configs", name).read_text()
    return yaml.safe_load(text)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/demo"),
    kind: Annotated[str, typer.Option(help="cxr (chest X-ray-like) or fundus")] = "cxr",
) -> None:
    """The whole audit on built-in synthetic images whose truth is known, then the report's path."""
    if kind not in ("cxr", "fundus"):
        raise MaskauditError(f"--kind must be cxr or fundus, got {kind!r}")
    from maskaudit.config import config_from_dict

    _run_all(out, config_from_dict(demo_config(kind), origin=f"built-in demo-{kind}.yaml"))


@app.command()
@user_errors
def check(
    config: Annotated[Path, typer.Argument(help="config YAML")],
    json_file: Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON to this file")]
    = None,
) -> None:
    """Check the config's data before training: every row read as `prepare` would (file headers only).

    Per dataset: rows kept and rejected, by reason and per group; positives per class and split.

    Then warnings, and errors (exit status 1): what would make `maskaudit run` fail or its numbers mean little.
    """
    from maskaudit.config import load_config
    from maskaudit.data.check import check_config, print_checks
    from maskaudit.rundir import write_json

    settings = load_config(config)
    setup_logging(None)  # a source's own notes (e.g. reading a large table) on the console
    checks = check_config(settings)
    print_checks(checks)
    if json_file is not None:
        write_json(json_file, {"ok": all(c.ok for c in checks), "datasets": [c.to_dict() for c in checks]})
    if not all(c.ok for c in checks):
        raise typer.Exit(code=1)


@app.command()
@user_errors
def prepare(out: Out, config: OptionalConfig = None, force: Force = False) -> None:
    """Decode, resize with padding and store every image, mask and distance map once."""
    with _audit(out, config) as audit:
        audit.prepare(force)


@app.command()
@user_errors
def split(out: Out, config: OptionalConfig = None, force: Force = False) -> None:
    """Patient-grouped hold-out test set and cross-validation folds (splits.json)."""
    with _audit(out, config) as audit:
        audit.split(force)


@app.command()
@user_errors
def train(
    out: Out,
    config: OptionalConfig = None,
    strategy: Annotated[list[str] | None, typer.Option(help="only this training strategy (repeatable)")] = None,
    fold: Annotated[list[int] | None, typer.Option(help="only this fold (repeatable)")] = None,
    force: Force = False,
) -> None:
    """Train the grid of jobs (training strategy x fold), or a part of it."""
    with _audit(out, config) as audit:
        only = None
        if strategy or fold:
            unknown = [s for s in strategy or [] if s not in audit.config.strategies]
            if unknown:
                raise MaskauditError(f"--strategy {unknown[0]} is not in the config's strategies")
            only = [(s, k) for s, k in audit.jobs if (not strategy or s in strategy) and (not fold or k in fold)]
        audit.train(only=only, force=force)


@app.command()
@user_errors
def predict(out: Out, config: OptionalConfig = None, force: Force = False) -> None:
    """Every model on the hold-out set under every test strategy → predictions.parquet."""
    with _audit(out, config) as audit:
        audit.predict(force)


@app.command()
@user_errors
def metrics(out: Out, config: OptionalConfig = None, force: Force = False) -> None:
    """AUC per fold and fold-mean matrices per class, with heatmaps."""
    with _audit(out, config) as audit:
        audit.metrics(force)


@app.command()
@user_errors
def analyse(
    out: Out,
    name: Annotated[list[str] | None, typer.Argument(
        help=f"analyses to run: {', '.join(ANALYSES)}; default: those of `analyses.run`")] = None,
    config: OptionalConfig = None,
    force: Force = False,
) -> None:
    """The analyses (metadata baseline, SHAP, embeddings, dilation sweep, reader selection, verdict)."""
    with _audit(out, config) as audit:
        for each in name or [a for a in ANALYSES if a in audit.config.analyses.run]:
            audit.analyse(each, force)


@app.command()
@user_errors
def report(
    out: Out,
    config: OptionalConfig = None,
    force: Force = False,
    compare: Annotated[tuple[Path, Path] | None, typer.Option(
        "--compare", metavar="RUN_A RUN_B",
        help="instead: put two runs' AUC matrices and verdicts side by side in OUT/compare.html "
             "(or OUT, when it ends in .html)")] = None,
    model_card: Annotated[bool, typer.Option(
        "--model-card", help="also write model_card.md and model_card.json: the verdicts and the numbers they "
                             "rest on, worded for a model card's \"Bias, Risks, and Limitations\" and "
                             "\"Evaluation\"")] = False,
) -> None:
    """Write the self-contained report.html (or, with --compare, compare.html of two runs)."""
    if compare:
        from maskaudit.report.compare import compare_runs

        setup_logging(None)
        typer.echo(f"comparison: {compare_runs(compare[0], compare[1], out)}")
        return
    with _audit(out, config, check_files=False) as audit:  # the report reads the run directory alone
        if model_card:
            from maskaudit.model_card import require_verdicts, write_model_card
            from maskaudit.tracking import track_run

            require_verdicts(audit.run)  # before anything is written
        audit.report(force)
        if model_card:
            card, _ = write_model_card(audit.run)
            track_run(audit)  # the card too, when `tracking` is set
    typer.echo(f"report: {audit.run.report}")
    if model_card:
        typer.echo(f"model card: {card} (and {card.with_suffix('.json').name})")


@app.command()
@user_errors
def status(run_dir: Annotated[Path, typer.Argument(help="run directory")]) -> None:
    """Where a run stands: the stages and jobs done, and what is left to do (reads only: never waits for a lock)."""
    from maskaudit.runstatus import show_status

    show_status(run_dir)


app.add_typer(reader_app, name="reader", help="Blinded reader study: create it, serve it to readers, analyse "
              "their answers.")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="maskaudit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
