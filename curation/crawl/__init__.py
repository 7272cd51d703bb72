"""Crawl: url lists -> raw shards (tar + parquet per shard) and a crawl ledger."""
