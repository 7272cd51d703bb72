"""Run img2dataset with our fetch policy.

img2dataset keeps doing what it is good at (reading the url list in shards,
distributing them over processes or a Ray cluster, writing tar + parquet +
_stats.json per shard); only the fetch of each url goes through
curation.crawl.fetch, so image_text obeys the same policy as every other kind:
guarded addresses on every redirect, transient-only retries, size and pixel caps,
opt-outs.

How: img2dataset.main builds a `Downloader` and pickles it to every worker. We hand
it a subclass that carries the policy as instance state and, in the worker, swaps
img2dataset's per-url fetch function for ours before downloading a shard.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json

import os
import sys

# albumentations (imported by img2dataset) checks the web for a newer version at import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import img2dataset  # noqa: F401  (loads img2dataset.main)
import img2dataset.downloader as i2d_downloader

# img2dataset/__init__.py re-exports a *function* called main, shadowing the module.
i2d_main = sys.modules["img2dataset.main"]

from .fetch import ERROR_PREFIX, FetchPolicy, Outcome, decode_error, encode_outcome, fetch  # noqa: F401


def _fetch_for_img2dataset(row, timeout, user_agent_token, disallowed_header_directives, *, policy: FetchPolicy):
    """Drop-in for img2dataset.downloader.download_image: (key, stream | None, error)."""
    key, url = row
    outcome = fetch(url, "image", policy)
    if outcome.status == "kept":
        return key, io.BytesIO(outcome.data), None
    return key, None, encode_outcome(outcome)


class PolicyDownloader(i2d_downloader.Downloader):
    policy_for_new: FetchPolicy | None = None  # set by policy_downloads() in the driver

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = PolicyDownloader.policy_for_new  # pickled to the workers with the instance

    def download_shard(self, row):
        i2d_downloader.download_image = functools.partial(_fetch_for_img2dataset, policy=self.policy)
        return super().download_shard(row)


@contextlib.contextmanager
def policy_downloads(policy: FetchPolicy):
    """Within this block, img2dataset.download fetches through `policy`."""
    original = i2d_main.Downloader
    PolicyDownloader.policy_for_new = policy
    i2d_main.Downloader = PolicyDownloader
    try:
        yield
    finally:
        i2d_main.Downloader = original
        PolicyDownloader.policy_for_new = None
