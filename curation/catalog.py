"""DuckDB over a run's output: views `samples` (every sidecar row), `ledger` (every
input once), `shards` (one row per tar from the manifests) and, when the run merged
our crawl's ledgers (its run.json lists them), `crawl_ledger`. Usable from the CLI (`curate query`) and from Python:

    from curation.catalog import connect
    con = connect("shards/demo")
    con.sql("SELECT tier, count(*) FROM samples GROUP BY tier").show()

The connection is locked down once the views exist: it reads only the run's own
Parquet files (the sidecars, the ledger, the crawl ledgers it was made from, and the
run's `_work/annotated/` parts); every other file, network access, extension
installs and loads, and configuration changes (`SET`, `PRAGMA`, `RESET`) are refused
by DuckDB itself. `query` (what `curate query` runs) also accepts only one read
statement: SELECT (WITH, FROM, VALUES, TABLE, DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN of one.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import duckdb
import pandas as pd

from . import schemas
from .crawl import CRAWL_LEDGER_GLOB
from .errors import CurationError, InputError


def find_run_root(root: str | Path) -> Path:
    """Accept a `curate run` output folder or a `curate demo` folder (its curated/). An
    s3:// url is refused, naming the local stage folder a run to it works in."""
    from .publish import refuse_url

    refuse_url(root)
    root = Path(root)
    for candidate in (root, root / "curated"):
        if (candidate / "ledger.parquet").exists():
            return candidate
    if not root.exists():
        raise InputError(f"--root {root} does not exist")
    raise InputError(f"no ledger.parquet under {root} (nor {root / 'curated'}): is it the output of `curate run`?")


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join(f"'{_sql_path(p)}'" for p in paths) + "]"


def shards_frame(run_root: Path) -> pd.DataFrame:
    rows = []
    for manifest_path in sorted((run_root / "tiers").glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        for s in manifest["shards"]:
            rows.append({"tier": manifest["tier"], "shard": s["name"], "path": str(manifest_path.parent / s["name"]),
                         "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"],
                         "pipeline": manifest["pipeline"], "config_hash": manifest["config_hash"]})
    return pd.DataFrame(rows, columns=["tier", "shard", "path", "samples", "bytes", "sha256", "pipeline", "config_hash"])


def _crawl_ledgers(run_root: Path) -> list[Path]:
    """The crawl ledgers the run merged into its ledger, as its run.json recorded them
    (inputs.RawInput.crawl_ledgers: those of our crawl's folder given as --input; none
    for a glob, a single shard or s3://, whose shards' listings stood in for them).
    Only files named like a crawl ledger, and only those that still exist."""
    try:
        info = json.loads((run_root / "_work" / "run.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(info, dict):
        return []
    recorded = info.get("crawl_ledgers")
    if recorded is None and isinstance(info.get("input"), str) and Path(info["input"]).is_dir():
        # a run.json from before runs recorded them: those runs merged the input folder's
        recorded = [str(p) for p in Path(info["input"]).glob(CRAWL_LEDGER_GLOB)]
    if not isinstance(recorded, list):
        return []
    paths = [Path(p) for p in recorded if isinstance(p, str) and p]
    return sorted(p for p in paths if fnmatch.fnmatchcase(p.name, CRAWL_LEDGER_GLOB) and p.is_file())


# Set once the views exist, in this order; lock_configuration last, so nothing after it
# (a query, or Python code holding the connection) can turn any of it back on.
_LOCKDOWN = (
    "SET enable_external_access = false",      # no file, network or database outside the allowed list
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET python_enable_replacements = false",  # a query cannot read the caller's Python variables
    "SET lock_configuration = true",
)


def connect(root: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the run's views, locked down (see the module
    docstring): it can read the run's own Parquet and nothing else."""
    run_root = find_run_root(root)
    con = duckdb.connect()
    sidecars = sorted(p for p in (run_root / "tiers").glob("*/*.parquet") if p.is_file())
    ledger = run_root / "ledger.parquet"
    crawl = _crawl_ledgers(run_root)
    # Exact files, not folders: DuckDB lets a query write into an allowed directory.
    allowed = [*sidecars, ledger, *crawl]
    con.execute(f"SET allowed_paths = {_sql_list(allowed)}")
    annotated = run_root / "_work" / "annotated"
    if annotated.is_dir():  # the report joins the run's intermediate annotations (phash) by glob
        con.execute(f"SET allowed_directories = ['{_sql_path(annotated)}/']")
    if sidecars:
        con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet({_sql_list(sidecars)}, union_by_name=true)")
    else:
        con.register("_empty_samples", schemas.arrow_schema("sidecar").empty_table())
        con.execute("CREATE VIEW samples AS SELECT * FROM _empty_samples")
    con.execute(f"CREATE VIEW ledger AS SELECT * FROM read_parquet('{_sql_path(ledger)}')")
    con.register("_shards", shards_frame(run_root))
    con.execute("CREATE VIEW shards AS SELECT * FROM _shards")
    if crawl:
        con.execute(f"CREATE VIEW crawl_ledger AS SELECT * FROM read_parquet({_sql_list(crawl)}, union_by_name=true)")
    for statement in _LOCKDOWN:
        con.execute(statement)
    return con


READ_ONLY = "one read-only statement: SELECT (WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN"
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:\([^()'\"]*\)\s*)?(?:ANALY[SZ]E\s+)?(.*)$", re.IGNORECASE | re.DOTALL)


def check_read_only(sql: str) -> str:
    """The SQL of the one read statement in `sql`, or CurationError. Statement types
    come from DuckDB's own parser; EXPLAIN is allowed only around a SELECT (EXPLAIN
    ANALYZE runs what it explains)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise CurationError(f"query failed: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if len(statements) != 1:
        raise CurationError(f"query refused: expected {READ_ONLY}; got {len(statements)} statements")
    statement = statements[0]
    kind = statement.type
    if kind == duckdb.StatementType.EXPLAIN:
        match = _EXPLAIN.match(statement.query)
        try:
            inner = duckdb.extract_statements(match.group(1)) if match else []
        except duckdb.Error:
            inner = []
        if len(inner) != 1 or inner[0].type != duckdb.StatementType.SELECT:
            raise CurationError(f"query refused: EXPLAIN is allowed only of one SELECT; expected {READ_ONLY}")
    elif kind != duckdb.StatementType.SELECT:
        raise CurationError(f"query refused: {kind.name} statements are not allowed; expected {READ_ONLY}")
    return statement.query


def query(sql: str, root: str | Path) -> duckdb.DuckDBPyRelation:
    """Run one read statement over the run's views (what `curate query` does)."""
    statement = check_read_only(sql)
    con = connect(root)
    try:
        return con.sql(statement)
    except duckdb.Error as exc:
        raise CurationError(f"query failed: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
