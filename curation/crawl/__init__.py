"""Crawl: url lists -> raw shards (tar + parquet per shard) and a crawl ledger per kind.

Kept import-light: `curate run` needs only these names, not img2dataset."""

KINDS = ("image_text", "interleaved", "video")
CRAWL_LEDGER_GLOB = "crawl_ledger-*.parquet"


def ledger_name(kind: str) -> str:
    return f"crawl_ledger-{kind}.parquet"
