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
@register; nothing else changes. An operator may also live in your own module (or an
installed package that names it under the "curation.ops" entry point group): decorate
it with curation.ops.register, and give new columns with their types in `outputs`
({"my_score": "float"}); the run adds them to its sidecar contract. Ray workers import
the operator's module by name, so it must be importable where they run: on a local Ray
the driver's working directory and installed packages are; a class defined in the
script you run (__main__) travels by value; on a cluster ship the module with the Ray
runtime env (py_modules). `curate ops` lists every registered operator.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import sys
import traceback
import types
import typing
from typing import Any, ClassVar, Literal, Union

import numpy as np
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
    # Ledger reasons this operator may give a sample it drops or fails (besides
    # `<name>_error`); curate report places them in the funnel at this operator.
    reasons: ClassVar[tuple[str, ...]] = ()

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

    @classmethod
    def input_files_identity(cls, params: "Operator.Params") -> str | None:
        """Override when the operator reads files beyond its options (a concept list,
        reference sets): a digest of their contents or listing. The run records it, and a
        run whose files changed is not resumed as the same run (runner._check_run_identity).
        It stays out of the recipe's hash, which must not depend on the machine's files."""
        return None

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
    # Columns this operator writes: names of columns of the sidecar contract
    # (curation/contracts/sidecar.schema.json), or a mapping {column: type} that may
    # also name new columns ("float", "int", "str", "bool"): a run adds those to its
    # sidecars, and their values are checked against the type on every batch.
    outputs: ClassVar[tuple[str, ...] | dict[str, Any]] = ()
    # Sample kinds it applies to; rows of other kinds pass through untouched.
    kinds: ClassVar[tuple[str, ...]] = ("image_text", "interleaved", "video")

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError

    @classmethod
    def declared_columns(cls) -> tuple[tuple[str, str], ...]:
        """The new columns this operator adds to the sidecar, as (column, JSON type);
        empty unless `outputs` is a mapping that names columns outside the contract."""
        if not isinstance(cls.outputs, dict):
            return ()
        from ..schemas import check_declared  # lazy: the contracts load only for operators that declare

        return check_declared(cls.outputs, f"operator {cls.name}")

    def _process_and_check(self, live: pd.DataFrame) -> pd.DataFrame:
        done = self.process(live)
        for column, json_type in self.declared_columns():
            if column in done.columns:  # object dtype: ints stay ints next to None
                done[column] = pd.Series([_declared_value(v, json_type, column, self.name) for v in done[column]],
                                         index=done.index, dtype=object)
        return done

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        live_mask = (batch["status"] == LIVE) & batch["kind"].isin(self.kinds)
        if not live_mask.any():
            return batch
        live = batch.loc[live_mask].copy()
        try:
            done = self._process_and_check(live)
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
            return self._process_and_check(row.copy())
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


def _declared_value(value: Any, json_type: str, column: str, op: str) -> Any:
    """A value an operator wrote to a declared column, as the plain Python value its
    type holds (NaN and NA are null); TypeError if it is not of that type (the row
    fails as `<op>_error`; on every row of a batch, the job stops: SystematicError)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return None
    if json_type == "boolean" and isinstance(value, (bool, np.bool_)):
        return bool(value)
    if not isinstance(value, (bool, np.bool_)):
        if json_type == "number" and isinstance(value, (int, float, np.integer, np.floating)):
            return float(value)
        if json_type == "integer" and isinstance(value, (int, np.integer)):
            return int(value)
        if json_type == "integer" and isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        if json_type == "string" and isinstance(value, str):
            return value
    raise TypeError(f"operator {op} wrote {_shown(value)} to column {column!r}, which it declares as {json_type}")


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
OPERATOR_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def register(cls: type[Operator]) -> type[Operator]:
    """Class decorator: make an operator available to pipelines by its `name`. Checks
    the declaration now, so a mistake fails where the class is defined."""
    name = getattr(cls, "name", None)
    if not (isinstance(cls, type) and issubclass(cls, (MapOp, GlobalOp))):
        raise ConfigError(f"register: {cls!r} is not a MapOp or GlobalOp subclass")
    if not isinstance(name, str) or not OPERATOR_NAME.match(name):
        raise ConfigError(f"register: {cls.__qualname__} needs a class attribute `name`: lowercase letters, digits "
                          f"and _, starting with a letter (got {name!r})")
    if not (dataclasses.is_dataclass(cls.Params) and isinstance(cls.Params, type)):
        raise ConfigError(f"register: {cls.__qualname__}.Params must be a dataclass")
    if issubclass(cls, MapOp):
        cls.declared_columns()  # raises ConfigError on a bad {column: type}
    elif isinstance(getattr(cls, "outputs", ()), dict):
        raise ConfigError(f"register: {name} is a global operator; it sets status, reason and dup_of only and "
                          "declares no columns")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        other = _REGISTRY[name]
        if (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
            raise RuntimeError(f"operator name {name!r} registered twice ({other.__module__}.{other.__qualname__} "
                               f"and {cls.__module__}.{cls.__qualname__})")
    # The same class defined again (a module re-run in a notebook) replaces the old one.
    _REGISTRY[name] = cls
    return cls


# Installed packages add operators by naming a module (or class) under this entry point
# group, e.g. in their pyproject.toml: [project.entry-points."curation.ops"] mine = "mypkg.ops"
PLUGIN_GROUP = "curation.ops"
_PLUGIN_ERRORS: dict[str, str] = {}
_plugins_loaded = False


def _load_plugins() -> None:
    """Import every "curation.ops" entry point once. One that fails to import is
    remembered (plugin_errors), not raised: a broken plugin must not stop recipes that
    do not use it, and the unknown-operator error of one that does names it."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            loaded = ep.load()
            if isinstance(loaded, type) and issubclass(loaded, (MapOp, GlobalOp)) and loaded.name not in _REGISTRY:
                register(loaded)
        except Exception as exc:
            _PLUGIN_ERRORS[f"{ep.name} = {ep.value}"] = describe_error(exc)


def plugin_errors() -> dict[str, str]:
    """Entry points of the "curation.ops" group that failed to import, with the error."""
    return dict(_PLUGIN_ERRORS)


def registry() -> dict[str, type[Operator]]:
    from . import _discover  # noqa: F401  (imports every operator module once)

    _load_plugins()
    return dict(_REGISTRY)


def describe_operator(cls: type[Operator]) -> dict[str, Any]:
    """What `curate ops` shows: kind, version, doc, options (name, type, default),
    resources, kinds, columns read and written."""
    hints = _param_hints(cls.Params)
    params = []
    for f in dataclasses.fields(cls.Params):
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        params.append({"name": f.name, "type": type_text(hints.get(f.name, Any)), "default": default,
                       "required": required})
    doc = cls.__dict__.get("__doc__") or ""  # its own, not a base class's
    if not doc.strip():  # the built-in model operators document themselves in their module
        doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    doc = inspect.cleandoc(doc)
    info: dict[str, Any] = {"name": cls.name, "kind": "map" if issubclass(cls, MapOp) else "global",
                            "version": cls.version, "module": cls.__module__, "doc": doc, "params": params,
                            "requires": list(cls.requires)}
    if issubclass(cls, MapOp):
        from .. import schemas

        props = schemas.load("sidecar")["properties"]
        declared = dict(cls.declared_columns())
        # With their JSON types: the contract's, or the operator's declaration; columns
        # that are not sidecar columns (an embedding) have none.
        info["outputs"] = {c: declared.get(c) or (schemas.contract_type(props[c]) if c in props else None)
                           for c in cls.provides(None)}
        info["kinds"] = list(cls.kinds)
        info["resources"] = dataclasses.asdict(cls.resources)
        info["fusable"] = cls.fusable
    return info


def type_text(tp: Any) -> str:
    """An option's annotation as a short Python type: int, float | None, list[str], 'a' | 'b'."""
    if tp is Any or tp is object:
        return "any"
    if tp is type(None) or tp is None:
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else type_text(a) for a in args)
        return f"{name}[{inner}]" if args else name
    return getattr(tp, "__name__", str(tp))
