"""The stage table: each stage of an audit, the config keys it reads, and the stages it follows.

Every fingerprint of a run (a stage's, a job's, a job output's, a prepared store's) is made by
:meth:`Fingerprints.of` from these declarations alone: the values of the keys the part declares,
the fingerprints of the parts it follows, and the inputs that are not config (file stamps, the
job's name) that the kind of audit adds. A stage whose fingerprint is unchanged is skipped; a
changed key redoes exactly the stages that declare it and those after them.

A stage reads the config through a :class:`ConfigView` that lets it read only what it declares,
what the stages before it declare (a change there changes its fingerprint through theirs), and the
:data:`EXECUTION_KEYS` (how to run, never what comes out): reading anything else is an
:class:`UndeclaredRead`, a bug in the stage table caught by every test that runs the stage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

#: Keys that say how a stage runs, not what it makes: any stage may read them, no fingerprint holds them.
#: ``tracking`` (where the run is logged, :mod:`maskaudit.tracking`) is named with its one key as well, as a change of
#: a leaf is checked by its own name (``tests/test_stage_table.py``). ``ray`` likewise: which cluster runs the jobs
#: and what each reserves there (:class:`maskaudit.config.RayConfig`); ``local``: how many jobs run at once here.
EXECUTION_KEYS = frozenset({"workers", "executor", "train.num_workers", "train.device", "predict.batch_size",
                            "predict.models", "analyses.explain.batch_size", "local", "local.jobs", "tracking",
                            "tracking.mlflow", "ray", "ray.address", "ray.num_cpus", "ray.num_gpus", "ray.max_retries"})

#: A key that holds the whole config (the report shows config.yaml).
EVERYTHING = ""


@dataclass(frozen=True)
class Stage:
    """One part of the audit with a fingerprint.

    Attributes
    ----------
    name : str
        Its name in ``stages.json`` (a stage) or a sub-part's name (``store``, ``train job``, ...).
    reads : tuple of str
        Config keys it reads (dotted: ``analyses.explain``; a section includes its keys; ``""`` is everything).
    after : tuple of str
        The parts whose outputs it reads; their fingerprints are part of its own. An analysis that
        is not in ``analyses.run`` is left out.
    job : bool
        One per model (``strategy``, ``fold``): a training job, one model's predictions, its explanations.
    jobs : str or None
        The per-model part a stage runs (``train`` runs ``model``): the stage reads what its jobs read, and its
        fingerprint holds theirs (from the kind of audit's inputs).
    output : str
        A per-model part's table in its job folder: ``jobs/<strategy>/fold_<k>/<output>.parquet`` beside
        ``<output>.json`` (the fingerprint it was made with).
    """

    name: str
    reads: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    job: bool = False
    jobs: str | None = None
    output: str = ""


def digest(*parts: object) -> str:
    """A short stable hash of JSON-able ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class UndeclaredRead(AttributeError):
    """A stage read a config key the stage table does not declare for it (a bug in the table, not a user error)."""


def read_key(config: BaseModel, key: str) -> Any:
    """The JSON value of ``key`` (dotted) in ``config``; ``""`` is the whole config; execution keys left out."""
    value: Any = config
    for part in [p for p in key.split(".") if p]:
        value = getattr(value, part)
    prefix = f"{key}." if key else ""
    if isinstance(value, BaseModel):
        dumped = value.model_dump(mode="json")
        return _without(dumped, {k.removeprefix(prefix) for k in EXECUTION_KEYS if k.startswith(prefix)})
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return [v.model_dump(mode="json") for v in value]
    return json.loads(json.dumps(value, default=str))


def _without(dumped: dict, keys: Iterable[str]) -> dict:
    for key in keys:
        *path, last = key.split(".")
        here = dumped
        for part in path:
            here = here.get(part, {}) if isinstance(here, dict) else {}
        if isinstance(here, dict):
            here.pop(last, None)
    return dumped


class Fingerprints:
    """The fingerprints of one config under one stage table.

    Parameters
    ----------
    table : mapping of name → Stage
        The kind of audit's stages and sub-parts.
    config : AuditConfig
    inputs : callable, optional
        ``inputs(name, **job)``: what part ``name`` depends on that is not config (file stamps, the job's name,
        the fingerprints of its jobs); JSON-able.
    active : callable, optional
        ``active(name)``: whether part ``name`` takes part (an analysis not in ``analyses.run`` does not).
    """

    def __init__(self, table: Mapping[str, Stage], config: BaseModel,
                 inputs: Callable[..., object] | None = None, active: Callable[[str], bool] | None = None) -> None:
        self.table, self.config = table, config
        self.inputs = inputs or (lambda name, **job: None)
        self.active = active or (lambda name: True)

    def of(self, name: str, **job: object) -> str:
        """The fingerprint of part ``name`` (of one job, with ``strategy=``, ``fold=``)."""
        stage = self.table[name]
        values = {key: read_key(self.config, key) for key in stage.reads}
        before = {after: self.of(after, **self._job_of(after, job)) for after in stage.after if self.active(after)}
        return digest(name, values, before, self.inputs(name, **job))

    def _job_of(self, after: str, job: dict) -> dict:
        """What a part before this one is called with: the same job when it is a per-model part too."""
        return job if self.table[after].job else {}

    def readable(self, name: str) -> frozenset[str]:
        """The keys part ``name`` may read: its own, those of every part before it, and the execution keys."""
        keys: set[str] = set(EXECUTION_KEYS)
        todo, seen = [name], set()
        while todo:
            part = todo.pop()
            if part in seen:
                continue
            seen.add(part)
            keys.update(self.table[part].reads)
            todo.extend(self.table[part].after)
            if self.table[part].jobs:
                todo.append(self.table[part].jobs)
        return frozenset(keys)

    def downstream(self, names: Iterable[str]) -> set[str]:
        """``names`` and every part that follows one of them, directly or not."""
        found = set(names)
        grew = True
        while grew:
            grew = False
            for part in self.table.values():
                if part.name not in found and any(a in found for a in (*part.after, part.jobs)):
                    found.add(part.name)
                    grew = True
        return found


class ConfigView:
    """``config`` as a stage may read it: only the keys in ``allowed`` (a section allows its keys).

    Fields and the config's properties (evaluated through the view, so what they read is checked too) are
    read as on the config itself; anything else undeclared is an :class:`UndeclaredRead` naming the key.
    """

    def __init__(self, model: BaseModel, allowed: frozenset[str], stage: str, prefix: str = "") -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    @classmethod
    def of(cls, config: BaseModel, allowed: frozenset[str], stage: str) -> Any:
        """The view, or the config itself when everything is allowed."""
        return config if EVERYTHING in allowed else cls(config, allowed, stage)

    def _covers(self, path: str) -> bool:
        return any(path == key or path.startswith(f"{key}.") for key in self._allowed)

    def _inside(self, path: str) -> bool:
        return any(key.startswith(f"{path}.") for key in self._allowed)

    def __getattr__(self, name: str) -> Any:
        model = self._model
        path = f"{self._prefix}{name}"
        if name in type(model).model_fields:
            value = getattr(model, name)
            if self._covers(path):
                return value
            if self._inside(path) and isinstance(value, BaseModel):
                return ConfigView(value, self._allowed, self._stage, f"{path}.")
            raise UndeclaredRead(f"stage {self._stage!r} reads config key {path!r}, which the stage table does not "
                                 "declare for it or for a stage before it (maskaudit.stages)")
        attribute = getattr(type(model), name, None)
        if isinstance(attribute, property):
            return attribute.fget(self)
        if self._covers(self._prefix.removesuffix(".")):
            return getattr(model, name)
        raise UndeclaredRead(f"stage {self._stage!r} calls {path!r} on a part of the config it may read only in "
                             "part (maskaudit.stages)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the config is read-only")

    def __repr__(self) -> str:
        return f"ConfigView({self._stage!r}, {sorted(self._allowed)})"
