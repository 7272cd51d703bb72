"""The report's aggregates, computed in DuckDB: only small results (bins, counts, a few
sampled rows) ever reach Python, whatever the number of rows.

`histogram` bins a numeric expression with SQL (one scan: values, range, counts per bin),
`histogram_2d` does the same on two axes, `top_values` counts a categorical one. Columns
whose storage may change (JSON text today, Arrow list/struct tomorrow) are read only
through `json_text`, which turns either into JSON text.
"""

from __future__ import annotations

import dataclasses
import math

import duckdb
import numpy as np


@dataclasses.dataclass
class Histogram:
    edges: np.ndarray                 # bins + 1 edges (in value space, also when binned on log10)
    counts: dict[str, np.ndarray]     # group -> counts per bin ("" when not grouped)
    log: bool = False

    @property
    def total(self) -> int:
        return int(sum(c.sum() for c in self.counts.values()))


def columns(con: duckdb.DuckDBPyConnection, view: str) -> dict[str, str]:
    """{column: DuckDB type} of a view."""
    return {name: str(kind) for name, kind, *_ in con.sql(f"DESCRIBE {view}").fetchall()}


def with_values(con: duckdb.DuckDBPyConnection, view: str, wanted: list[str]) -> set[str]:
    """Those of `wanted` that exist in `view` and hold at least one non-null value (one scan)."""
    present = [c for c in wanted if c in columns(con, view)]
    if not present:
        return set()
    counts = con.sql(f"SELECT {', '.join(f'count({quote(c)})' for c in present)} FROM {view}").fetchall()[0]
    return {c for c, n in zip(present, counts) if n}


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def json_text(column: str, kind: str) -> str:
    """SQL for `column` as JSON text, whether it is stored as JSON text (VARCHAR/JSON) or
    as an Arrow list/struct/map: the one place the report depends on that encoding."""
    col = quote(column)
    if kind.upper() in ("VARCHAR", "JSON"):
        return f"{col}::VARCHAR"
    return f"to_json({col})::VARCHAR"


def _finite(expr: str, log: bool) -> str:
    cond = f"({expr}) IS NOT NULL AND isfinite(({expr})::DOUBLE)"
    return cond + (f" AND ({expr}) > 0" if log else "")


def histogram(con: duckdb.DuckDBPyConnection, source: str, expr: str, bins: int = 40, by: str | None = None,
              lo: float | None = None, hi: float | None = None, log: bool = False, where: str = "true") -> Histogram | None:
    """Counts of `expr` over `source` (a view or a parenthesised query) in `bins` equal bins
    between lo and hi (default: the data's range; values outside are clipped into the end
    bins), per value of `by` when given. `log`: bins equal on log10 (values <= 0 left out).
    None when no row has a finite value. One scan: the values are computed once into a
    materialized CTE (a number and a group label per row, in DuckDB's memory), whose
    range then sets the bins."""
    value = f"log10(({expr})::DOUBLE)" if log else f"({expr})::DOUBLE"
    filt = f"({where}) AND {_finite(expr, log)}"
    given = [None if v is None else float(math.log10(v) if log else v) for v in (lo, hi)]
    bound = [f"{v!r}::DOUBLE" if v is not None else "NULL::DOUBLE" for v in given]
    group = f"coalesce(({by})::VARCHAR, 'null')" if by else "''"
    rows = con.sql(f"""
        WITH v AS MATERIALIZED (SELECT {group} AS g, {value} AS x FROM {source} WHERE {filt}),
             r AS (SELECT coalesce({bound[0]}, min(x)) AS lo, coalesce({bound[1]}, max(x)) AS hi FROM v)
        SELECT g, CASE WHEN r.hi > r.lo
                       THEN least(greatest(floor((x - r.lo) / ((r.hi - r.lo) / {bins})), 0), {bins - 1}) ELSE 0 END::INTEGER,
               count(*), any_value(r.lo), any_value(r.hi)
        FROM v, r GROUP BY g, 2""").fetchall()
    if not rows:
        return None
    lo, hi = rows[0][3], rows[0][4]
    if hi <= lo:  # one distinct value: one bin around it
        lo, hi, bins = lo - 0.5, lo + 0.5, 1
    counts: dict[str, np.ndarray] = {}
    for g, b, n, _, _ in rows:
        counts.setdefault(g, np.zeros(bins, dtype=np.int64))[b] += n
    edges = lo + (hi - lo) / bins * np.arange(bins + 1)
    return Histogram(10 ** edges if log else edges, dict(sorted(counts.items())), log)


def histogram_2d(con: duckdb.DuckDBPyConnection, source: str, x: str, y: str, bins: int = 32, log: bool = True,
                 where: str = "true") -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(x edges, y edges, counts[y, x]) of two expressions binned together in SQL (one scan)."""
    tx, ty = (f"log10(({e})::DOUBLE)" if log else f"({e})::DOUBLE" for e in (x, y))
    filt = f"({where}) AND {_finite(x, log)} AND {_finite(y, log)}"

    def cell(v: str, lo: str, hi: str) -> str:
        return f"CASE WHEN {hi} > {lo} THEN least(floor(({v} - {lo}) / (({hi} - {lo}) / {bins})), {bins - 1}) ELSE 0 END::INTEGER"

    rows = con.sql(f"""
        WITH v AS MATERIALIZED (SELECT {tx} AS x, {ty} AS y FROM {source} WHERE {filt}),
             r AS (SELECT min(x) AS xlo, max(x) AS xhi, min(y) AS ylo, max(y) AS yhi FROM v)
        SELECT {cell("x", "r.xlo", "r.xhi")}, {cell("y", "r.ylo", "r.yhi")}, count(*),
               any_value(r.xlo), any_value(r.xhi), any_value(r.ylo), any_value(r.yhi)
        FROM v, r GROUP BY 1, 2""").fetchall()
    if not rows:
        return None
    xlo, xhi, ylo, yhi = rows[0][3:]
    counts = np.zeros((bins, bins), dtype=np.int64)
    for bx, by_, k, *_ in rows:
        counts[by_, bx] += k
    if xhi <= xlo:
        xlo, xhi = xlo - 0.5, xlo + 0.5
    if yhi <= ylo:
        ylo, yhi = ylo - 0.5, ylo + 0.5
    ex, ey = xlo + (xhi - xlo) / bins * np.arange(bins + 1), ylo + (yhi - ylo) / bins * np.arange(bins + 1)
    return (10 ** ex, 10 ** ey, counts) if log else (ex, ey, counts)


def top_values(con: duckdb.DuckDBPyConnection, source: str, expr: str, limit: int = 15,
               where: str = "true") -> list[tuple[str, int]]:
    """The `limit` most frequent values of `expr` (null as 'unknown'), then 'other' for the rest."""
    rows = con.sql(f"""
        WITH c AS (SELECT coalesce(({expr})::VARCHAR, 'unknown') AS v, count(*) AS n FROM {source}
                   WHERE {where} GROUP BY ALL),
             r AS (SELECT v, n, row_number() OVER (ORDER BY n DESC, v) AS i FROM c)
        SELECT CASE WHEN i <= {int(limit)} THEN v ELSE 'other' END AS v, sum(n)::BIGINT, min(i) AS i
        FROM r GROUP BY 1 ORDER BY i""").fetchall()
    return [(v, int(n)) for v, n, _ in rows]
