"""DuckDB over a run's output: views `samples` (every sidecar row), `ledger` (every
input once), `shards` (one row per tar from the manifests) and, when the raw folder
is known, `crawl_ledger`. Usable from the CLI (`curate query`) and from Python:

    from curation.catalog import connect
    con = connect("shards/demo")
    con.sql("SELECT tier, count(*) FROM samples GROUP BY tier").show()
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd

from . import schemas
from .crawl import CRAWL_LEDGER_GLOB
from .errors import CurationError, InputError


def find_run_root(root: str | Path) -> Path:
    """Accept a `curate run` output folder or a `curate demo` folder (its curated/)."""
    root = Path(root)
    for candidate in (root, root / "curated"):
        if (candidate / "ledger.parquet").exists():
            return candidate
    if not root.exists():
        raise InputError(f"--root {root} does not exist")
    raise InputError(f"no ledger.parquet under {root} (nor {root / 'curated'}): is it the output of `curate run`?")


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def shards_frame(run_root: Path) -> pd.DataFrame:
    rows = []
    for manifest_path in sorted((run_root / "tiers").glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        for s in manifest["shards"]:
            rows.append({"tier": manifest["tier"], "shard": s["name"], "path": str(manifest_path.parent / s["name"]),
                         "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"],
                         "pipeline": manifest["pipeline"], "config_hash": manifest["config_hash"]})
    return pd.DataFrame(rows, columns=["tier", "shard", "path", "samples", "bytes", "sha256", "pipeline", "config_hash"])


def connect(root: str | Path) -> duckdb.DuckDBPyConnection:
    run_root = find_run_root(root)
    con = duckdb.connect()
    sidecars = sorted((run_root / "tiers").glob("*/*.parquet"))
    if sidecars:
        con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{_sql_path(run_root / 'tiers')}/*/*.parquet', union_by_name=true)")
    else:
        empty = schemas.arrow_schema("sidecar").empty_table()
        con.register("_empty_samples", empty)
        con.execute("CREATE VIEW samples AS SELECT * FROM _empty_samples")
    con.execute(f"CREATE VIEW ledger AS SELECT * FROM read_parquet('{_sql_path(run_root / 'ledger.parquet')}')")
    con.register("_shards", shards_frame(run_root))
    con.execute("CREATE VIEW shards AS SELECT * FROM _shards")
    run_info = run_root / "_work" / "run.json"
    if run_info.exists():
        raw_dir = Path(json.loads(run_info.read_text())["input"])
        if any(raw_dir.glob(CRAWL_LEDGER_GLOB)):
            con.execute(f"CREATE VIEW crawl_ledger AS SELECT * FROM read_parquet('{_sql_path(raw_dir)}/{CRAWL_LEDGER_GLOB}')")
    return con


def query(sql: str, root: str | Path) -> duckdb.DuckDBPyRelation:
    con = connect(root)
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise CurationError(f"query failed: {str(exc).splitlines()[0]}") from None
