"""``maskaudit reader create | serve | analyse``: run a blinded reader study on a run's selected images.

``create`` and ``analyse`` write into the run directory, so they hold its writer lock
(:mod:`maskaudit.lock`); ``serve`` does not: it may run for weeks beside other commands, and
the answers it saves go to the study's SQLite database, which has locking of its own.

Like :mod:`maskaudit.cli`, which adds this group, it imports only light modules at the top
(:mod:`maskaudit.cli_common`: the one-line user errors, logging, the writer lock); the study,
its web app (fastapi, uvicorn) and the pipeline are imported inside the commands.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from maskaudit.cli_common import setup_logging, user_errors, writer_lock

reader_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Blinded reader study of the run's selected images (create, serve, analyse).")

RunArg = Annotated[Path, typer.Argument(help="run directory")]
log = logging.getLogger(__name__)


@reader_app.command()
@user_errors
def create(
    run_dir: RunArg,
    readers: Annotated[str, typer.Option("--readers", help="comma-separated reader names, e.g. alice,bob")],
    cases: Annotated[Path | None, typer.Option(
        "--cases", help="instead of the run's selection: a CSV with path, strategy, image_id, label_<class>")] = None,
    base_url: Annotated[str, typer.Option(
        "--base-url", help="address the readers will open (as `serve` will listen)")] = "http://127.0.0.1:8000",
) -> None:
    """Create the study (or add readers to it): print each reader's personal link once, and the admin's."""
    from maskaudit.reader.study import create_study, parse_readers, study_paths

    with writer_lock(run_dir):
        setup_logging(study_paths(run_dir).run.log)
        links = create_study(run_dir, parse_readers(readers), cases, base_url)
    for name, link in links.items():
        typer.echo(f"{name}\t{link}")
    typer.echo(f"(also written to {study_paths(run_dir).links}, readable by you only; the study keeps only "
               "hashes, so these links cannot be shown again)")


@reader_app.command()
@user_errors
def serve(
    run_dir: RunArg,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8000,
    session_days: Annotated[float, typer.Option("--session-days", min=0.01,
                                                help="how long a reader stays logged in (then: open the link again)")]
    = 7.0,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", help="the address in the readers' links when it is not --host:--port (e.g. behind an https "
                           "proxy): forms are accepted from it and from --host:--port only")] = None,
) -> None:
    """Start the web app readers answer in (Ctrl+C stops it; answers are saved as they are given)."""
    import uvicorn

    from maskaudit.reader.app import create_app, origins_for
    from maskaudit.reader.study import study_paths

    setup_logging(study_paths(run_dir).run.log)
    origins = origins_for(host, port, base_url)
    app = create_app(run_dir, session_days, origins)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: readers' links travel in clear over http; put it behind https", host)
    log.info("reader study on http://%s:%d (admin: the admin link printed by `reader create`); forms accepted "
             "from %s", host, port, ", ".join(origins))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@reader_app.command()
@user_errors
def analyse(run_dir: RunArg) -> None:
    """Score the answers against the labels, readers' agreement and the models; update the report."""
    from maskaudit.kinds import open_audit
    from maskaudit.reader.analyse import analyse_study
    from maskaudit.reader.study import study_paths

    with writer_lock(run_dir):
        setup_logging(study_paths(run_dir).run.log)
        written = analyse_study(run_dir)
        for path in written.values():
            typer.echo(f"{path.with_suffix('.csv')}")
        if study_paths(run_dir).run.config.is_file():
            audit = open_audit(run_dir, check_files=False)
            audit.report(force=True)
            typer.echo(f"report: {audit.run.report}")
