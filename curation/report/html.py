"""Render report.html (plots embedded as PNG) from a run's ledger, sidecars and manifests."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..catalog import connect, find_run_root  # noqa: E402
from ..fsutil import atomic_write_text  # noqa: E402

STATUS_COLOURS = {"kept": "#2e7d32", "dropped": "#f9a825", "failed": "#c62828"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _outcomes(con):
    rows = con.sql("SELECT stage, status, coalesce(reason, 'kept') AS reason, count(*) AS n "
                   "FROM ledger GROUP BY ALL ORDER BY n").fetchall()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
    labels = [f"{stage}: {reason}" for stage, _, reason, _ in rows]
    ax.barh(labels, [n for *_, n in rows], color=[STATUS_COLOURS[s] for _, s, _, _ in rows])
    for i, (*_, n) in enumerate(rows):
        ax.text(n, i, f" {n}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("samples (log scale)")
    ax.set_title("Every input, by where it ended and why")
    return _png(fig)


def _tiers(con):
    rows = con.sql("SELECT tier, sum(samples), sum(bytes) / 1e6, count(*) FROM shards GROUP BY tier ORDER BY tier").fetchall()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    names = [r[0] for r in rows]
    axes[0].bar(names, [r[1] for r in rows], color="#1565c0")
    axes[0].set_title("samples per tier")
    axes[1].bar(names, [r[2] for r in rows], color="#6a1b9a")
    axes[1].set_title("MB per tier")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    return _png(fig)


def _distributions(con):
    kept = con.sql("SELECT width, height, len(string_split(coalesce(text, ''), ' ')) AS words, tier FROM samples").df()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for tier, part in kept.groupby("tier"):
        axes[0].scatter(part["width"], part["height"], s=6, alpha=0.5, label=tier)
        axes[1].hist(part["words"], bins=range(0, 45), alpha=0.6, label=tier)
    axes[0].set_xlabel("width")
    axes[0].set_ylabel("height")
    axes[0].set_title("kept image sizes")
    axes[1].set_xlabel("caption words")
    axes[1].set_title("kept caption lengths")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    return _png(fig)


def _text_and_language(con):
    """Share of kept images with OCR text per tier, and kept samples per language (when
    the pipeline ran those operators)."""
    cols = {r[0] for r in con.sql("DESCRIBE samples").fetchall()}
    if not {"ocr_text", "language"} & cols:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    if "ocr_text" in cols:
        rows = con.sql("SELECT tier, avg(CASE WHEN length(coalesce(ocr_text, '')) >= 3 THEN 1 ELSE 0 END) "
                       "FROM samples WHERE kind <> 'video' GROUP BY tier ORDER BY tier").fetchall()
        axes[0].bar([r[0] for r in rows], [r[1] for r in rows], color="#00838f")
        axes[0].set_ylim(0, 1)
        axes[0].set_title("share of images with OCR text")
        axes[0].tick_params(axis="x", rotation=20)
    if "language" in cols:
        rows = con.sql("SELECT coalesce(language, 'unknown'), count(*) FROM samples GROUP BY 1 ORDER BY 2 DESC LIMIT 12").fetchall()
        axes[1].bar([r[0] for r in rows], [r[1] for r in rows], color="#5d4037")
        axes[1].set_title("kept samples by language")
    return _png(fig)


def _clip_scores(con):
    """CLIP score distribution of every scored sample, by outcome: what the filter
    kept, what it dropped, and what later operators dropped."""
    cols = {r[0] for r in con.sql("DESCRIBE ledger").fetchall()}
    if "clip_score" not in cols:
        return None
    rows = con.sql("""SELECT CASE WHEN status = 'kept' THEN 'kept'
                                  WHEN reason = 'clip_score_low' THEN 'dropped: clip_score_low'
                                  WHEN reason = 'clip_score_rank' THEN 'dropped: clip_score_rank'
                                  ELSE 'dropped later (dedup, ...)' END AS outcome, clip_score
                       FROM ledger WHERE clip_score IS NOT NULL""").df()
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    bins = np.linspace(rows["clip_score"].min(), rows["clip_score"].max(), 40)
    for outcome, part in rows.groupby("outcome"):
        ax.hist(part["clip_score"], bins=bins, alpha=0.6, label=f"{outcome} ({len(part)})")
    ax.set_xlabel("CLIP image-caption similarity")
    ax.set_ylabel("samples")
    ax.set_title("CLIP scores by outcome")
    ax.legend(fontsize=7)
    return _png(fig)


def _near_dup_distances(con):
    rows = con.sql("""
        SELECT bit_count(xor(('0x' || d.phash)::UBIGINT, ('0x' || k.phash)::UBIGINT)) AS bits
        FROM annotated d JOIN annotated k ON d.dup_of = k.uid
        WHERE d.reason = 'duplicate_near'""").fetchall() if _has_annotated(con) else []
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.hist([r[0] for r in rows], bins=range(0, 34), color="#ef6c00")
    ax.set_xlabel("phash bits from the kept representative")
    ax.set_title("near duplicates removed")
    return _png(fig)


def _has_annotated(con) -> bool:
    return bool(con.sql("SELECT count(*) FROM duckdb_views() WHERE view_name = 'annotated'").fetchall()[0][0])


def write_report(root: str | Path) -> Path:
    """Write report.html into the run folder and return its path."""
    run_root = find_run_root(root)
    con = connect(run_root)
    annotated = run_root / "_work" / "annotated"
    if any(annotated.glob("*/*.parquet")):
        # phash lives in the intermediate annotations; the final reason and dup_of in the ledger.
        con.execute(f"CREATE VIEW annotated AS SELECT a.uid, a.phash, l.reason, l.dup_of "
                    f"FROM read_parquet('{annotated}/*/*.parquet', union_by_name=true) a JOIN ledger l USING (uid)")
    summary = json.loads((run_root / "summary.json").read_text())
    totals = con.sql("SELECT status, count(*) FROM ledger GROUP BY status ORDER BY status").fetchall()
    sections = [
        ("Outcomes", _outcomes(con)),
        ("Tiers", _tiers(con)),
        ("Kept samples", _distributions(con)),
        ("CLIP scores", _clip_scores(con)),
        ("Text in images and languages", _text_and_language(con)),
        ("Near-duplicate distances", _near_dup_distances(con)),
    ]
    body = "".join(f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{img}'>" for t, img in sections if img)
    head = (f"<h1>Curation report: {html.escape(summary['pipeline'])}</h1>"
            f"<p>config {summary['config_hash']} &middot; {summary['ledger_rows']} inputs = "
            + " + ".join(f"{n} {html.escape(s)}" for s, n in totals)
            + f" &middot; {summary['seconds']} s</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>curation report</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}img{max-width:100%}</style>"
            f"</head><body>{head}{body}</body></html>")
    path = run_root / "report.html"
    atomic_write_text(path, page)
    return path
