"""Build training data for vision-language models.

Data flows one way: url lists --crawl--> raw shards --curate (Ray Data)--> ledger +
tier shards --> trainer. See README.md for the commands and DESIGN notes.
"""

__version__ = "0.1.0"
