"""Route samples to tiers with SQL predicates over sidecar columns, run by DuckDB.

Rules are tried in order; a sample goes to the first tier whose predicate holds. The
predicates run on an in-memory table with external access switched off, so a rule can
read columns but not files.
"""

from __future__ import annotations

import duckdb
import pandas as pd
import pyarrow as pa

from .. import schemas
from ..config import TierRule
from ..errors import ConfigError


def _table(frame: pd.DataFrame, declared: schemas.Declared = ()) -> pa.Table:
    """The rows as Arrow with the sidecar contract's types (lists, structs, maps, JSON),
    so a predicate sees the columns exactly as a query of the written sidecars does."""
    contract = schemas.arrow_schema("sidecar", declared)
    arrays, fields = [], []
    for col in frame.columns:
        values = frame[col]
        if col in contract.names:
            field = contract.field(col)
            values = [schemas.py_value(v, field.type) for v in values]
            arrays.append(pa.array(values, type=field.type))
        else:
            arrays.append(pa.array(values, from_pandas=True))
            field = pa.field(col, arrays[-1].type)
        fields.append(field)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _connect(frame: pd.DataFrame | pa.Table, declared: schemas.Declared = ()) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.register("samples", frame if isinstance(frame, pa.Table) else _table(frame, declared))
    con.execute("SET enable_external_access = false")
    return con


def _case_sql(rules: tuple[TierRule, ...]) -> str:
    whens = " ".join(f"WHEN ({r.where}) THEN '{r.name}'" for r in rules)
    return f"SELECT uid, CASE {whens} ELSE NULL END AS tier FROM samples"


def check_rules(rules: tuple[TierRule, ...], columns: set[str], declared: schemas.Declared = ()) -> None:
    """Fail fast, before any work, on a rule DuckDB cannot bind (typo, bad SQL, or a
    column that no configured operator produces); `declared`: the run's own columns."""
    contract = schemas.arrow_schema("sidecar", declared)
    con = _connect(pa.schema([contract.field(c) if c in contract.names else pa.field(c, pa.string())
                              for c in sorted(columns)]).empty_table())
    for rule in rules:
        try:
            con.execute(f"SELECT count(*) FROM samples WHERE ({rule.where})").fetchall()
        except duckdb.Error as exc:
            raise ConfigError(f"tier '{rule.name}': bad 'where' predicate {rule.where!r}: {str(exc).splitlines()[0]}") from None


def _route(frame: pa.Table, rules: tuple[TierRule, ...]) -> list:
    return _connect(frame).execute(_case_sql(rules).replace("SELECT uid, ", "SELECT ")).fetchnumpy()["tier"].tolist()


def route_rows(live: pd.DataFrame, rules: tuple[TierRule, ...], declared: schemas.Declared = ()) -> tuple[pd.Series, pd.Series]:
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
    frame = _table(live.drop(columns=[c for c in live.columns if c.startswith("_") or c == "image_bytes"]), declared)
    try:
        tiers[:] = _route(frame, rules)
        return tiers, errors
    except duckdb.Error:
        pass
    for pos, idx in enumerate(live.index):
        try:
            tiers[idx] = _route(frame.slice(pos, 1), rules)[0]
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
