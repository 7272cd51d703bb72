"""Crawl: url lists -> raw shards (tar + parquet per shard) and a crawl ledger per kind.

Kept import-light: `curate run` needs only these names, not img2dataset."""

from ..kinds import names

KINDS = names()  # curation.kinds: each kind says how it is crawled
CRAWL_LEDGER_GLOB = "crawl_ledger-*.parquet"


def ledger_name(kind: str) -> str:
    return f"crawl_ledger-{kind}.parquet"
