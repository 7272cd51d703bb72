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


def check_rules(rules: tuple[TierRule, ...], columns: set[str]) -> None:
    """Fail fast, before any work, on a rule DuckDB cannot bind (typo, bad SQL, or a
    column that no configured operator produces)."""
    props = schemas.load("sidecar")["properties"]

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


def route(live: pd.DataFrame, rules: tuple[TierRule, ...]) -> pd.Series:
    """Tier name (or None) per row of `live`, indexed like `live`."""
    if live.empty:
        return pd.Series([], dtype=object)
    frame = live.drop(columns=[c for c in live.columns if c.startswith("_") or c == "image_bytes"])
    try:
        result = _connect(frame).execute(_case_sql(rules)).fetch_df()
    except duckdb.Error as exc:
        raise ConfigError(f"tier routing failed: {str(exc).splitlines()[0]}") from None
    tiers = dict(zip(result["uid"], result["tier"]))
    return live["uid"].map(tiers)
