"""The report's aggregates, computed in DuckDB: only small results (bins, counts, a few
sampled rows) ever reach Python, whatever the number of rows.

`histogram` bins a numeric expression with SQL (two scans: range, then counts per bin),
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
    None when no row has a finite value."""
    value = f"log10(({expr})::DOUBLE)" if log else f"({expr})::DOUBLE"
    filt = f"({where}) AND {_finite(expr, log)}"
    if lo is None or hi is None:
        dlo, dhi, n = con.sql(f"SELECT min({value}), max({value}), count(*) FROM {source} WHERE {filt}").fetchall()[0]
        if not n:
            return None
        lo = dlo if lo is None else (math.log10(lo) if log else lo)
        hi = dhi if hi is None else (math.log10(hi) if log else hi)
    elif log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi <= lo:  # one distinct value: one bin around it
        lo, hi, bins = lo - 0.5, lo + 0.5, 1
    width = (hi - lo) / bins
    group = f"coalesce(({by})::VARCHAR, 'null')" if by else "''"
    rows = con.sql(f"""
        SELECT {group} AS g, least(greatest(floor(({value} - {lo!r}) / {width!r}), 0), {bins - 1})::INTEGER AS b,
               count(*) AS n
        FROM {source} WHERE {filt} GROUP BY ALL""").fetchall()
    if not rows:
        return None
    counts: dict[str, np.ndarray] = {}
    for g, b, n in rows:
        counts.setdefault(g, np.zeros(bins, dtype=np.int64))[b] += n
    edges = lo + width * np.arange(bins + 1)
    return Histogram(10 ** edges if log else edges, dict(sorted(counts.items())), log)


def histogram_2d(con: duckdb.DuckDBPyConnection, source: str, x: str, y: str, bins: int = 32, log: bool = True,
                 where: str = "true") -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(x edges, y edges, counts[y, x]) of two expressions binned together in SQL."""
    tx, ty = (f"log10(({e})::DOUBLE)" if log else f"({e})::DOUBLE" for e in (x, y))
    filt = f"({where}) AND {_finite(x, log)} AND {_finite(y, log)}"
    xlo, xhi, ylo, yhi, n = con.sql(f"SELECT min({tx}), max({tx}), min({ty}), max({ty}), count(*) "
                                    f"FROM {source} WHERE {filt}").fetchall()[0]
    if not n:
        return None
    if xhi <= xlo:
        xlo, xhi = xlo - 0.5, xlo + 0.5
    if yhi <= ylo:
        ylo, yhi = ylo - 0.5, ylo + 0.5
    wx, wy = (xhi - xlo) / bins, (yhi - ylo) / bins
    counts = np.zeros((bins, bins), dtype=np.int64)
    for bx, by_, k in con.sql(f"""
            SELECT least(floor(({tx} - {xlo!r}) / {wx!r}), {bins - 1})::INTEGER,
                   least(floor(({ty} - {ylo!r}) / {wy!r}), {bins - 1})::INTEGER, count(*)
            FROM {source} WHERE {filt} GROUP BY ALL""").fetchall():
        counts[by_, bx] += k
    ex, ey = xlo + wx * np.arange(bins + 1), ylo + wy * np.arange(bins + 1)
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
