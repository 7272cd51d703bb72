"""The operator interface.

Two kinds of operator, both configured from pipeline YAML (`- op: NAME` plus params):

* MapOp: runs inside Ray Data actors on batches (a pandas DataFrame). Built once per
  actor, so models load once. It sees only the rows still alive (status == "kept")
  of the kinds it declares,
  annotates columns, and rejects rows with `self.drop` / `self.fail` instead of removing
  them, so every sample reaches the ledger. If `process` raises on a batch, the batch is
  retried row by row and only the offending rows are marked failed; the same error on
  every row of a batch stops the job instead (SystematicError).
* GlobalOp: needs the whole run at once (dedup, top-fraction thresholds). Runs in stage
  B as SQL over an out-of-core DuckDB table after every MapOp has finished.

Adding an operator is a new module in curation/ops/ with a class decorated by
@register; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import traceback
import types
import typing
from typing import Any, ClassVar, Literal, Union

import pandas as pd

from ..errors import ConfigError, CurationError

LIVE = "kept"
_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def describe_error(exc: BaseException) -> str:
    """`Type: message` for the ledger, with memory addresses removed so the same bad
    input always gives the same ledger entry (runs stay reproducible)."""
    message = _ADDRESS.sub(r"<\1>", str(exc))
    return f"{type(exc).__name__}: {message}"


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one actor of a MapOp needs. On CPU-only nodes keep num_cpus fractional, so
    that every stage's pool fits on a small machine beside the others."""

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
    # Columns that must exist before this operator runs: written by an earlier operator
    # or by the reader (curation.rawshards.READ_COLUMNS). config.parse checks them.
    requires: ClassVar[tuple[str, ...]] = ()

    @dataclasses.dataclass
    class Params:
        pass

    def __init__(self, params: "Operator.Params"):
        self.params = params

    @classmethod
    def provides(cls, params: "Operator.Params | None") -> tuple[str, ...]:
        """Columns this operator writes with these params (default: `outputs`). With
        None: every column it can write under some params (for error hints)."""
        return tuple(getattr(cls, "outputs", ()))

    @classmethod
    def required(cls, params: "Operator.Params") -> tuple[str, ...]:
        """Columns this operator needs with these params (default: `requires`)."""
        return tuple(cls.requires)

    @classmethod
    def parse_params(cls, raw: dict[str, Any], where: str, written: dict[str, Any] | None = None) -> "Operator.Params":
        """Options from YAML -> Params. Every option is checked against its annotation
        (str, bool, int, float, list[...], tuple[...], dict[...], X | None, Literal[...]).
        `written`: options as the recipe spells them (before ${VAR} expansion); error
        messages quote those, never an environment variable's value."""
        written = written or {}
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = set(raw) - set(fields)
        if unknown:
            raise ConfigError(f"{where} ({cls.name}): unknown option(s) {sorted(map(str, unknown))}; "
                              f"known: {sorted(fields) or 'none'}")
        hints = _param_hints(cls.Params)
        values = {}
        for key, value in raw.items():
            expected = hints.get(key, Any)
            ok, value = _conform(value, expected)
            if not ok:
                shown = written.get(key, raw[key])
                raise ConfigError(f"{where} ({cls.name}): option '{key}' must be {_expected(expected)}, "
                                  f"got {_shown(shown)}")
            values[key] = value
        try:
            params = cls.Params(**values)
        except TypeError as exc:
            raise ConfigError(f"{where} ({cls.name}): {exc}") from None
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


# Option type checks (Operator.parse_params) --------------------------------------
_YAML_TYPE = {str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list",
              tuple: "a list", dict: "a mapping", type(None): "null"}


def _param_hints(params_cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(params_cls)
    except Exception:  # an annotation that does not evaluate: check what can be read
        basic = {"str": str, "bool": bool, "int": int, "float": float, "list": list, "dict": dict}
        return {f.name: basic.get(f.type, Any) if isinstance(f.type, str) else f.type
                for f in dataclasses.fields(params_cls)}


def _conform(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value): whether a YAML value fits the annotation, and the value to keep
    (YAML lists become tuples for tuple options; nothing else is converted)."""
    if tp is Any or tp is object:
        return True, value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, conformed = _conform(value, arg)
            if ok:
                return True, conformed
        return False, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if tp is type(None) or tp is None:
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and not (isinstance(value, float) and math.isnan(value))), value
    if tp is str:
        return isinstance(value, str), value
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return False, value
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = []
        for item, item_tp in zip(value, item_types):
            ok, item = _conform(item, item_tp)
            if not ok:
                return False, value
            items.append(item)
        return True, (tuple(items) if (tp is tuple or origin is tuple) else items)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            return False, value
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in value.items():
            ok_k, k = _conform(k, key_tp)
            ok_v, v = _conform(v, val_tp)
            if not (ok_k and ok_v):
                return False, value
            out[k] = v
        return True, out
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value  # an annotation we do not know how to check


def _expected(tp: Any) -> str:
    """An annotation in the words of a YAML author."""
    if tp is Any or tp is object:
        return "any value"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_expected(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple) and args and not (origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)):
        inner = _expected(args[0])
        return "a list" if inner == "any value" else f"a list of {_plural(inner)}"
    if origin is tuple:
        return f"a list of {len(args)} items ({', '.join(_expected(a) for a in args)})"
    if origin is dict and len(args) == 2:
        return f"a mapping of {_plural(_expected(args[0]))} to {_plural(_expected(args[1]))}"
    if origin is not None:
        tp = origin
    return _YAML_TYPE.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(phrase: str) -> str:
    for article in ("an ", "a "):
        if phrase.startswith(article):
            return phrase[len(article):] + "s"
    return phrase


def _shown(value: Any) -> str:
    """A value as it appeared in the recipe: repr, shortened, with its YAML type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = _YAML_TYPE.get(type(value), type(value).__name__)
    return f"{text} ({kind})"


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
            self._check_systematic(done)
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

    # A batch of at least this many rows that all raise the same error is a bug or a
    # config error, not bad data: stop the job once instead of failing millions of rows.
    SYSTEMATIC_MIN_ROWS: ClassVar[int] = 8

    def _check_systematic(self, done: pd.DataFrame) -> None:
        own = done["reason"] == f"{self.name}_error"
        if len(done) >= self.SYSTEMATIC_MIN_ROWS and own.all() and done["error"].map(error_signature).nunique() == 1:
            raise SystematicError(f"operator {self.name} raised the same error on all {len(done)} rows of a batch "
                                  f"(a bug or a configuration error, not bad data): {done['error'].iloc[0]}")


def error_signature(error: str) -> str:
    """What makes two row errors 'the same': the exception type and where it was raised,
    not the message (which often quotes the row's own value)."""
    where = error.rsplit(" (at ", 1)[1] if " (at " in error else ""
    return f"{error.split(':', 1)[0]}@{where}"


class SystematicError(CurationError):
    """The same failure on every row: stop the job with one clear error."""


class GlobalOp(Operator):
    """Needs the whole run at once (dedup, top-fraction thresholds). Runs in stage B
    (curation/decide.py) over DuckDB table `samples`, one row per input without media,
    out of core; it updates status / reason / dup_of of live rows with SQL, through
    `ctx.drop`, and may run parallel tasks with `ctx.map_tasks`."""

    def decide(self, ctx) -> None:
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
