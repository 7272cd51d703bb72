"""Measure the curation against what the demo corpus planted (corpus/truth.parquet,
corpus/truth_videos.parquet).

The demo knows which captions are mismatched, so it can say how well the CLIP filter
catches them: precision (of the samples the filter dropped, how many were mismatches)
and recall (of the mismatches the filter saw, how many it dropped), plus the ROC AUC of
the raw score separating true captions from mismatched ones. It knows which urls each
opt-out signal must refuse (optout_quality), and where each video's hard cuts are and
which clips video_clips must make of it (clip_counts).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..clipfilter import roc_auc
from ..crawl.optout import refusal
from .corpus import OPTOUT_PLANTS


def labelled_scores(demo_out: str | Path) -> pd.DataFrame:
    """Ledger rows of the image-text samples the CLIP operator scored, with the
    planted category of each (matched by the url's path on the demo server)."""
    demo_out = Path(demo_out)
    ledger = pd.read_parquet(demo_out / "curated" / "ledger.parquet")
    truth = pd.read_parquet(demo_out / "corpus" / "truth.parquet")
    scored = ledger[ledger["clip_score"].notna()].copy()
    scored["path"] = scored["url"].str.replace(r"^https?://[^/]+/", "", regex=True)
    return scored.merge(truth, on="path", how="inner")


# Reasons of the global operators that run after decontaminate in the bundled recipes:
# a sample with one of them (or kept) was live when decontaminate judged it.
_AFTER_DECONTAMINATE = ("duplicate_exact", "duplicate_near", "duplicate_semantic", "unrouted")


def decontamination_quality(corpus: str | Path, curated: str | Path) -> dict:
    """How `decontaminate` did on the planted evaluation copies (corpus/truth.parquet's
    eval_* rows) of one curated run: per copy form, how many reached it and how many it
    caught with the right reference item (recall); how many clean image_text samples it
    flagged (false-positive rate); and precision over everything it flagged."""
    ledger = pd.read_parquet(Path(curated) / "ledger.parquet")
    truth = pd.read_parquet(Path(corpus) / "truth.parquet")
    if "eval_item" not in truth.columns or "contaminated_by" not in ledger.columns:
        return {}
    ledger = ledger[ledger["url"].notna()].copy()
    ledger["path"] = ledger["url"].str.replace(r"^https?://[^/]+/", "", regex=True)
    rows = ledger.merge(truth, on="path", how="inner")
    reason = rows["reason"].fillna("")
    judged = rows[(rows["status"] == "kept") | reason.str.startswith("contaminated:") | reason.isin(_AFTER_DECONTAMINATE)]
    flagged = judged["reason"].fillna("").str.startswith("contaminated:")
    planted = judged["planted"].str.startswith("eval_")
    right = flagged & (judged["contaminated_by"] == "shapes_bench/" + judged["eval_item"].fillna(""))
    forms = {}
    for form, group in judged[planted].groupby("planted"):
        forms[form] = {"reached": len(group), "caught": int(right[group.index].sum()),
                       "recall": round(float(right[group.index].mean()), 4)}
    clean = judged[~planted]
    return {"forms": forms, "copies_reached": int(planted.sum()), "caught": int((right & planted).sum()),
            "recall": round(float((right & planted).sum() / max(1, int(planted.sum()))), 4),
            "clean_judged": len(clean), "clean_flagged": int(flagged[clean.index].sum()),
            "false_positive_rate": round(float(flagged[clean.index].sum() / max(1, len(clean))), 4),
            "precision": round(float((right & planted).sum() / max(1, int(flagged.sum()))), 4)}


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


def _url_path(urls: pd.Series) -> pd.Series:
    return urls.str.replace(r"^https?://[^/]+/", "", regex=True)


def optout_outcomes(demo_out: str | Path) -> pd.DataFrame:
    """Every crawl-ledger row of the demo (image_text, documents, videos) with its planted
    category (image urls; None elsewhere) and `refused_by`: the signal of the evidence
    entry that refused it (None: nothing refused it)."""
    raw = Path(demo_out) / "raw"
    ledger = pd.concat([pd.read_parquet(p) for p in sorted(raw.glob("crawl_ledger-*.parquet"))], ignore_index=True)
    truth = pd.read_parquet(Path(demo_out) / "corpus" / "truth.parquet")[["path", "planted"]]
    ledger["path"] = _url_path(ledger["url"].fillna(""))
    rows = ledger.merge(truth, on="path", how="left")
    rows["refused_by"] = [(refusal(list(ev)) or {}).get("signal") if ev is not None else None
                          for ev in rows["optout_evidence"]]
    return rows


def optout_quality(demo_out: str | Path) -> dict:
    """Per planted signal: how many urls were planted and how many that signal refused with
    its reason; and how many other rows any opt-out refused (a document counts when one of
    its images was)."""
    rows = optout_outcomes(demo_out)
    signals = {}
    for planted, (_, signal, reason) in OPTOUT_PLANTS.items():
        group = rows[rows["planted"] == planted]
        right = (group["refused_by"] == signal) & (group["reason"] == reason)
        signals[signal] = {"planted": len(group), "refused": int(right.sum())}
    others = rows[~rows["planted"].isin(list(OPTOUT_PLANTS)) & rows["refused_by"].notna()]
    return {"signals": signals, "others_refused": len(others)}


def clip_counts(corpus: str | Path, ledger: pd.DataFrame) -> pd.DataFrame:
    """Per demo video (truth_videos.parquet): the clips a video_clips run made of it
    (`ledger`: a run's ledger rows, or stage A's rows: url, uid, parent_uid, clip_start,
    clip_end, status, reason) against the clips planted: expected, made, and whether the
    parent ended `split_into_clips`."""
    truth = pd.read_parquet(Path(corpus) / "truth_videos.parquet")
    ledger = ledger.assign(path=_url_path(ledger["url"].fillna("")))
    parents = ledger[ledger["parent_uid"].isna()].drop_duplicates("path").set_index("path")
    clips = ledger[ledger["parent_uid"].notna()]
    out = []
    for video in truth.itertuples():
        parent = parents.loc[video.path] if video.path in parents.index else None
        made = clips[clips["parent_uid"] == parent["uid"]].sort_values("clip_start") if parent is not None else clips[:0]
        out.append({"path": video.path, "planted": video.planted, "expected": len(video.clip_starts),
                    "made": len(made), "parent_reason": None if parent is None else parent["reason"],
                    "bounds": [(float(a), float(b)) for a, b in zip(made["clip_start"], made["clip_end"])],
                    "expected_bounds": [(float(a), float(b)) for a, b in zip(video.clip_starts, video.clip_ends)]})
    return pd.DataFrame(out)
