"""The browser's queries: a user's WHERE clause turned into one read-only SELECT over one
view, run with a time limit, and DuckDB values turned into JSON.

The WHERE text is hostile. It must stay a WHERE clause: `where_select` wraps it as
`SELECT * FROM <view> WHERE (\\n<text>\\n)` only after DuckDB's own tokenizer has found no
`;`, no comment and no `)` that closes a parenthesis the text did not open, and DuckDB's
own parser then has to see exactly that shape (one SELECT node: `*`, the view, a WHERE,
nothing else: no UNION, CTE, GROUP BY, ORDER, LIMIT). `catalog.check_read_only` checks
the statement that runs, and the catalog's connection refuses files, the network and
settings whatever the text says (read_text, COPY, ATTACH, INSTALL all fail there).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import threading
import uuid
from typing import Any

import duckdb

from ..catalog import check_read_only
from ..errors import CurationError

VIEWS = ("samples", "ledger")
MAX_WHERE_CHARS = 8192
DEFAULT_LIMIT, MAX_LIMIT = 60, 200
MAX_OFFSET = 1 << 40
QUERY_SECONDS = 20.0  # a query running longer is interrupted (a cross join of the whole run...)
_PARENS = {"(": 1, ")": -1}
_STAR_ONLY = {"class": "STAR", "type": "STAR", "relation_name": "", "exclude_list": [], "replace_list": [],
              "columns": False, "expr": None, "qualified_exclude_list": [], "rename_list": []}

_parser_lock = threading.Lock()
_parser: duckdb.DuckDBPyConnection | None = None


class QueryError(CurationError):
    """A WHERE clause or query parameter the browser refuses, or a query DuckDB failed:
    a 400 with this message."""


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:500]


def _tokens(text: str) -> list[tuple[str, str]]:
    """(token type name, token text) by DuckDB's tokenizer."""
    try:
        found = duckdb.tokenize(text)
    except Exception as exc:  # an unterminated string or quote
        raise QueryError(f"cannot read the WHERE clause: {first_line(exc)}") from None
    out = []
    for i, (pos, kind) in enumerate(found):
        end = found[i + 1][0] if i + 1 < len(found) else len(text)
        out.append((kind.name, text[pos:end].strip()))
    return out


def _check_tokens(where: str) -> None:
    depth = 0
    for kind, token in _tokens(where):
        if kind == "comment":
            raise QueryError("comments are not allowed in the WHERE clause")
        if kind == "operator":
            if ";" in token:
                raise QueryError("';' is not allowed: the WHERE clause is one expression")
            for ch in token:
                depth += _PARENS.get(ch, 0)
                if depth < 0:
                    raise QueryError("unbalanced ')': the WHERE clause is one expression")
    if depth != 0:
        raise QueryError("unbalanced '(': the WHERE clause is one expression")


def _parse_tree(sql: str) -> dict:
    """DuckDB's parse of one SELECT as JSON (json_serialize_sql parses, never runs).
    Its own connection: the catalog's is locked and busy with queries."""
    global _parser
    with _parser_lock:
        if _parser is None:
            _parser = duckdb.connect()
            _parser.execute("SET enable_external_access = false")
            _parser.execute("SET lock_configuration = true")
        text = _parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0]
    return json.loads(text)


def _only_a_where(tree: dict, view: str) -> bool:
    statements = tree.get("statements") or []
    if tree.get("error") or len(statements) != 1:
        return False
    node = statements[0].get("node") or {}
    source = node.get("from_table") or {}
    star = node.get("select_list") or []
    return (node.get("type") == "SELECT_NODE" and not node.get("modifiers") and not (node.get("cte_map") or {}).get("map")
            and len(star) == 1 and all(star[0].get(k) == v for k, v in _STAR_ONLY.items())
            and source.get("type") == "BASE_TABLE" and source.get("table_name") == view
            and not source.get("schema_name") and not source.get("catalog_name") and not source.get("alias")
            and source.get("sample") is None and source.get("at_clause") is None
            and not node.get("group_expressions") and not node.get("group_sets") and node.get("having") is None
            and node.get("qualify") is None and node.get("sample") is None and node.get("where_clause") is not None)


def where_select(where: str | None, view: str) -> str:
    """`SELECT * FROM view WHERE (where)`, checked (see the module docstring); an empty
    clause selects every row."""
    if view not in VIEWS:
        raise QueryError(f"unknown view {view!r}: one of {', '.join(VIEWS)}")
    where = (where or "").strip()
    if not where:
        return f"SELECT * FROM {view}"
    if len(where) > MAX_WHERE_CHARS:
        raise QueryError(f"the WHERE clause is longer than {MAX_WHERE_CHARS} characters")
    if "\x00" in where:
        raise QueryError("the WHERE clause holds a NUL character")
    _check_tokens(where)
    sql = f"SELECT * FROM {view} WHERE (\n{where}\n)"
    tree = _parse_tree(sql)
    if tree.get("error"):
        raise QueryError(f"query failed: {tree.get('error_message', 'cannot parse the WHERE clause')}")
    if not _only_a_where(tree, view):
        raise QueryError("query refused: the WHERE clause must be one expression over the view's rows")
    return check_read_only(sql)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def run(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None,
        seconds: float = QUERY_SECONDS) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of one statement, interrupted after `seconds`. The caller
    holds the connection's lock (a DuckDB connection runs one query at a time)."""
    timer = threading.Timer(seconds, con.interrupt)
    timer.start()
    try:
        cur = con.execute(check_read_only(sql), params or [])
        columns = [d[0] for d in cur.description]
        return columns, cur.fetchall()
    except duckdb.InterruptException:
        raise QueryError(f"query stopped after {seconds:g} s") from None
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {first_line(exc)}") from None
    finally:
        timer.cancel()


def jsonable(value: Any) -> Any:
    """A DuckDB value as plain JSON: lists, structs (dicts) and maps recursively, NaN and
    infinities as null, times as ISO text, bytes as {"bytes": n, "base64": ...} (the first
    4 KiB), anything else unknown as its text. Sidecar columns may be JSON text or Arrow
    lists/structs; both come out as they are."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return jsonable(float(value))
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return {"bytes": len(raw), "base64": base64.b64encode(raw[:4096]).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)  # numpy arrays
    if callable(tolist):
        return jsonable(tolist())
    return str(value)


def as_list(value: Any) -> list:
    """A column holding a list as JSON text or as a list (either sidecar encoding)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return list(value) if isinstance(value, (list, tuple)) else []


def as_object(value: Any) -> Any:
    """A column holding JSON (text, struct or list) as Python data; other text as is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return jsonable(value)


def paging(limit: str | None, offset: str | None) -> tuple[int, int]:
    def number(text, default, what, cap):
        if text in (None, ""):
            return default
        if not text.isdigit() or len(text) > 15:
            raise QueryError(f"{what} must be a whole number, not {text[:40]!r}")
        return min(int(text), cap)

    limit_n = number(limit, DEFAULT_LIMIT, "limit", MAX_LIMIT)
    return limit_n, number(offset, 0, "offset", MAX_OFFSET)
