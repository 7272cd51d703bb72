"""`curate browse`: a local web app over a run's output. Filter samples and ledger rows
with a SQL WHERE clause (DuckDB over the locked catalog), see thumbnails with captions,
OCR text and scores, open a sample to see every column and its media, served straight
out of the tar shards by offset. See server.py (the API and its rules), query.py (the
WHERE clause), tarindex.py (media by offset)."""

from .server import Browser, make_server, serve

__all__ = ["Browser", "make_server", "serve"]
