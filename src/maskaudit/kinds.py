"""The kinds of audit, by the config's discriminator: the full audit, and the probe of models trained elsewhere.

:func:`open_audit` and :func:`create_audit` are how commands get an audit: the class whose
``KIND`` is the config's :attr:`~maskaudit.config.AuditConfig.kind`.
"""

from __future__ import annotations

from pathlib import Path

from maskaudit.config import AuditConfig, load_config
from maskaudit.errors import MaskauditError
from maskaudit.pipeline import Audit
from maskaudit.probe_audit import ProbeAudit
from maskaudit.rundir import RunDir

#: Every kind of audit by its name.
KINDS: dict[str, type[Audit]] = {kind.KIND: kind for kind in (Audit, ProbeAudit)}


def audit_class(config: AuditConfig) -> type[Audit]:
    """The class that audits ``config``."""
    return KINDS[config.kind]


def create_audit(out: Path, config: AuditConfig) -> Audit:
    """Start or continue a run in ``out`` with ``config``."""
    return audit_class(config).create(out, config)


def open_audit(out: Path, config_path: Path | None = None, check_files: bool = True) -> Audit:
    """A stage command's audit: the given config file's, or the one the run directory holds.

    ``check_files=False``: the config's data and model files need not exist (the report and the status read the
    run directory alone, so they work on a run whose data has moved)."""
    if config_path is not None:
        return create_audit(out, load_config(config_path, check_files))
    run = RunDir(out)
    if not run.config.is_file():
        raise MaskauditError(f"{run.root} holds no config.yaml; pass a config file or use `maskaudit run`")
    config = load_config(run.config, check_files)
    return audit_class(config)(run, config)
