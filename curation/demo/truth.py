"""Measure the curation against what the demo corpus planted (corpus/truth.parquet).

The demo knows which captions are mismatched, so it can say how well the CLIP filter
catches them: precision (of the samples the filter dropped, how many were mismatches)
and recall (of the mismatches the filter saw, how many it dropped), plus the ROC AUC of
the raw score separating true captions from mismatched ones.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..clipfilter import roc_auc


def labelled_scores(demo_out: str | Path) -> pd.DataFrame:
    """Ledger rows of the image-text samples the CLIP operator scored, with the
    planted category of each (matched by the url's path on the demo server)."""
    demo_out = Path(demo_out)
    ledger = pd.read_parquet(demo_out / "curated" / "ledger.parquet")
    truth = pd.read_parquet(demo_out / "corpus" / "truth.parquet")
    scored = ledger[ledger["clip_score"].notna()].copy()
    scored["path"] = scored["url"].str.replace(r"^https?://[^/]+/", "", regex=True)
    return scored.merge(truth, on="path", how="inner")


def clip_filter_quality(demo_out: str | Path) -> dict:
    rows = labelled_scores(demo_out)
    if rows.empty:
        return {}
    bad = rows["planted"] == "mismatch"
    flagged = rows["reason"] == "clip_score_low"
    true_caps = rows["planted"].isin(["scene", "text_sign"])
    hits = int((flagged & bad).sum())
    return {
        "scored": len(rows), "mismatched": int(bad.sum()), "flagged": int(flagged.sum()),
        "precision": round(hits / max(1, int(flagged.sum())), 4),
        "recall": round(hits / max(1, int(bad.sum())), 4),
        "base_rate": round(float(bad.mean()), 4),  # a random filter's precision
        "auc": round(roc_auc(rows.loc[true_caps, "clip_score"].to_numpy(), rows.loc[bad, "clip_score"].to_numpy()), 4)
        if bad.any() and true_caps.any() else None,
    }
