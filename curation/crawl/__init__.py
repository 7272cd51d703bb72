"""Crawl: url lists -> raw shards (tar + parquet per shard) and a crawl ledger.

Kept import-light: `curate run` needs only these names, not img2dataset."""

CRAWL_LEDGER = "crawl_ledger.parquet"
