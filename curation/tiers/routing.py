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


def check_rules(rules: tuple[TierRule, ...], extra_columns: dict[str, str] | None = None) -> None:
    """Fail fast, before any work, on a rule DuckDB cannot bind (typo, bad SQL)."""
    cols = {name: pd.Series(dtype="object") for name in schemas.columns("sidecar")}
    for name in ("width", "height", "num_bytes"):
        cols[name] = pd.Series(dtype="Int64")
    for name in ("clip_score", "nsfw"):
        cols[name] = pd.Series(dtype="float64")
    con = _connect(pd.DataFrame(cols))
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
