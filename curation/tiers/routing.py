"""Route samples to tiers with SQL predicates over sidecar columns, run by DuckDB.

Rules are tried in order; a sample goes to the first tier whose predicate holds. The
predicates run on an in-memory table with external access switched off, so a rule can
read columns but not files.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from .. import schemas
from ..config import TierRule
from ..errors import ConfigError


def _connect(frame: pd.DataFrame) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.register("samples", frame)
    con.execute("SET enable_external_access = false")
    return con


def _case_sql(rules: tuple[TierRule, ...]) -> str:
    whens = " ".join(f"WHEN ({r.where}) THEN '{r.name}'" for r in rules)
    return f"SELECT uid, CASE {whens} ELSE NULL END AS tier FROM samples"


_DTYPES = {"integer": "Int64", "number": "float64"}


def check_rules(rules: tuple[TierRule, ...], columns: set[str], declared: schemas.Declared = ()) -> None:
    """Fail fast, before any work, on a rule DuckDB cannot bind (typo, bad SQL, or a
    column that no configured operator produces); `declared`: the run's own columns."""
    props = schemas.load("sidecar", declared)["properties"]

    def dtype(name: str) -> str:
        types = props.get(name, {}).get("type", "string")
        types = types if isinstance(types, list) else [types]
        return next((_DTYPES[t] for t in types if t in _DTYPES), "object")

    con = _connect(pd.DataFrame({name: pd.Series(dtype=dtype(name)) for name in sorted(columns)}))
    for rule in rules:
        try:
            con.execute(f"SELECT count(*) FROM samples WHERE ({rule.where})").fetchall()
        except duckdb.Error as exc:
            raise ConfigError(f"tier '{rule.name}': bad 'where' predicate {rule.where!r}: {str(exc).splitlines()[0]}") from None


def _route(frame: pd.DataFrame, rules: tuple[TierRule, ...]) -> list:
    return _connect(frame).execute(_case_sql(rules).replace("SELECT uid, ", "SELECT ")).fetchnumpy()["tier"].tolist()


def route_rows(live: pd.DataFrame, rules: tuple[TierRule, ...]) -> tuple[pd.Series, pd.Series]:
    """(tier or None, routing error or None) per row of `live`, indexed like `live`.
    A predicate that fails on some rows (a cast of a bad value, say) fails those rows
    only; failing on every row of a batch with one error is a recipe bug and stops the
    job (SystematicError)."""
    from ..ops.base import MapOp, SystematicError, describe_error

    SYSTEMATIC_MIN_ROWS = MapOp.SYSTEMATIC_MIN_ROWS

    tiers = pd.Series([None] * len(live), index=live.index, dtype=object)
    errors = pd.Series([None] * len(live), index=live.index, dtype=object)
    if live.empty:
        return tiers, errors
    frame = live.drop(columns=[c for c in live.columns if c.startswith("_") or c == "image_bytes"]).reset_index(drop=True)
    try:
        tiers[:] = _route(frame, rules)
        return tiers, errors
    except duckdb.Error:
        pass
    for pos, idx in enumerate(live.index):
        try:
            tiers[idx] = _route(frame.iloc[[pos]], rules)[0]
        except duckdb.Error as exc:
            errors[idx] = f"tier predicate failed: {describe_error(exc).splitlines()[0]}"[:300]
    kinds = errors.dropna().map(lambda e: e.split(":", 2)[1].strip())  # the DuckDB error class, not the quoted value
    if errors.notna().all() and kinds.nunique() == 1 and len(errors) >= SYSTEMATIC_MIN_ROWS:
        raise SystematicError(f"tier routing failed on every row of a batch of {len(errors)} (a recipe error): {errors.iloc[0]}")
    return tiers, errors


def route(live: pd.DataFrame, rules: tuple[TierRule, ...]) -> pd.Series:
    """Tier name (or None) per row of `live`, indexed like `live`; raises ConfigError
    if a predicate cannot run."""
    tiers, errors = route_rows(live, rules)
    if errors.notna().any():
        raise ConfigError(f"tier routing failed: {errors.dropna().iloc[0]}")
    return tiers
