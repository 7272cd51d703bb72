"""The operator interface.

Two kinds of operator, both configured from pipeline YAML (`- op: NAME` plus params):

* MapOp: runs inside Ray Data actors on batches (a pandas DataFrame). Built once per
  actor, so models load once. It sees only the rows still alive (status == "kept")
  of the kinds it declares,
  annotates columns, and rejects rows with `self.drop` / `self.fail` instead of removing
  them, so every sample reaches the ledger. If `process` raises on a batch, the batch is
  retried row by row and only the offending rows are marked failed.
* GlobalOp: needs the whole run at once (dedup, top-fraction thresholds). Runs on the
  driver over the annotated table after every MapOp has finished.

Adding an operator is a new module in curation/ops/ with a class decorated by
@register; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import re
import traceback
from typing import Any, ClassVar

import pandas as pd

from ..errors import ConfigError

LIVE = "kept"
_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def describe_error(exc: BaseException) -> str:
    """`Type: message` for the ledger, with memory addresses removed so the same bad
    input always gives the same ledger entry (runs stay reproducible)."""
    message = _ADDRESS.sub(r"<\1>", str(exc))
    return f"{type(exc).__name__}: {message}"


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one actor of a MapOp needs. On CPU-only nodes keep num_cpus fractional so
    the Ray Data read tasks are never starved (a 2-CPU pool that takes every CPU hangs)."""

    num_cpus: float = 0.5
    num_gpus: float = 0.0
    batch_size: int = 64
    concurrency: int | None = None  # actors in the pool; None sizes it from the cluster

    def with_overrides(self, overrides: dict[str, Any], where: str) -> "Resources":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"{where}: unknown resources key(s) {sorted(unknown)}; known: {sorted(known)}")
        for key, value in overrides.items():
            integer = key in ("batch_size", "concurrency")
            ok = (value is None and key == "concurrency") or (
                not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
                and (value >= 1 if integer else value >= 0))
            if not ok:
                kind = "an integer >= 1" if integer else "a number >= 0"
                raise ConfigError(f"{where}: resources.{key} must be {kind}, got {value!r}")
        return dataclasses.replace(self, **overrides)


class Operator:
    name: ClassVar[str]
    version: ClassVar[str] = "1"

    @dataclasses.dataclass
    class Params:
        pass

    def __init__(self, params: "Operator.Params"):
        self.params = params

    @classmethod
    def parse_params(cls, raw: dict[str, Any], where: str) -> "Operator.Params":
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = set(raw) - set(fields)
        if unknown:
            raise ConfigError(f"{where} ({cls.name}): unknown option(s) {sorted(unknown)}; known: {sorted(fields) or 'none'}")
        try:
            params = cls.Params(**raw)
        except TypeError as exc:
            raise ConfigError(f"{where} ({cls.name}): {exc}") from None
        for f in fields.values():
            value = getattr(params, f.name)
            if f.type in (int, "int") and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{where} ({cls.name}): option '{f.name}' must be an integer, got {value!r}")
            if f.type in (float, "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{where} ({cls.name}): option '{f.name}' must be a number, got {value!r}")
        cls.check_params(params, where)
        return params

    @classmethod
    def check_params(cls, params: "Operator.Params", where: str) -> None:
        """Override to reject out-of-range values with a ConfigError."""

    # Status helpers shared by every operator -------------------------------------
    @staticmethod
    def drop(batch: pd.DataFrame, mask, reason: str) -> None:
        mask = pd.Series(mask, index=batch.index) & (batch["status"] == LIVE)
        batch.loc[mask, "status"] = "dropped"
        batch.loc[mask, "reason"] = reason

    @staticmethod
    def fail(batch: pd.DataFrame, index, reason: str, error: str) -> None:
        batch.loc[index, "status"] = "failed"
        batch.loc[index, "reason"] = reason
        batch.loc[index, "error"] = error


class MapOp(Operator):
    resources: ClassVar[Resources] = Resources()
    # Cheap CPU operators that are fusable share one actor stage, so decoded images
    # pass between them in memory instead of through the object store.
    fusable: ClassVar[bool] = True
    # Columns this operator writes (must be declared in schemas/sidecar.schema.json).
    outputs: ClassVar[tuple[str, ...]] = ()
    # Sample kinds it applies to; rows of other kinds pass through untouched.
    kinds: ClassVar[tuple[str, ...]] = ("image_text", "interleaved", "video")

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        live_mask = (batch["status"] == LIVE) & batch["kind"].isin(self.kinds)
        if not live_mask.any():
            return batch
        live = batch.loc[live_mask].copy()
        try:
            done = self.process(live)
        except Exception:  # isolate the bad rows instead of failing the whole batch
            done = pd.concat([self._process_one(live.loc[[i]]) for i in live.index])
        for col in done.columns:
            if col not in batch.columns:
                batch[col] = None
            batch[col] = batch[col].astype(object)
            batch.loc[done.index, col] = done[col].astype(object)
        return batch

    def _process_one(self, row: pd.DataFrame) -> pd.DataFrame:
        try:
            return self.process(row.copy())
        except Exception as exc:
            row = row.copy()
            last = traceback.extract_tb(exc.__traceback__)[-1]
            self.fail(row, row.index, f"{self.name}_error", f"{describe_error(exc)} (at {last.name}:{last.lineno})")
            return row


class GlobalOp(Operator):
    def apply(self, table: pd.DataFrame) -> pd.DataFrame:
        """Return the table with status/reason (and dup_of etc.) updated for live rows."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Operator]] = {}


def register(cls: type[Operator]) -> type[Operator]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"operator name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Operator]]:
    from . import _discover  # noqa: F401  (imports every operator module once)

    return dict(_REGISTRY)
