"""`curate report`: one self-contained HTML file about a run (plots and thumbnails are
embedded as data: URIs; the page loads nothing else and runs no script).

Sections: the ledger funnel (inputs -> each step of the pipeline -> kept, per reason, in
pipeline order), tiers (samples by kind, bytes, the stages' mixture), the token bill per
training stage, distributions (CLIP score with the recipe's thresholds, resolution,
aspect ratio, caption words, OCR text length, language, NSFW score, video duration,
near-duplicate distances; each only where its column holds values), thumbnails of
seeded random kept samples per tier and dropped or failed samples per reason, the
run's per-stage time and throughput (summary.json), and training loss curves.

Bounded on a run of any size: every aggregate is computed in DuckDB (SQL binning, GROUP
BY; a histogram holds its values, a number and a group label per row, in a DuckDB
materialized CTE), so what reaches Python is bins and counts, never a table of
samples. Per tier and per reason only PER_GROUP sampled rows are fetched (thumbs.py: at
most one tier shard per tier and MAX_RAW_SHARDS raw shards are read, by offset where
they are plain tars). What grows with something else than the number of bins: the
token bill without a plan.json costs each distinct (tier, kind, width, height, images,
frames) once in Python up to MAX_BILL_GROUPS of them, then a seeded sample of
BILL_SAMPLE rows per tier and kind instead, and parses `source_meta` of the samples that
carry question/answer pairs (streamed in Arrow batches); a plan.json is read whole;
loss curves read at most MAX_LOSS_LINES lines per training run. On 2 cores a synthetic
run of 1M ledger rows and 700k sidecar rows takes 10-13 CPU seconds, about 4 of them
fixed (mostly matplotlib), against 0.2 s to count its rows (bench/bench_report.py).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..catalog import connect, find_run_root  # noqa: E402
from ..fsutil import atomic_write_text  # noqa: E402
from . import sql, thumbs  # noqa: E402

STATUS_COLOURS = {"kept": "#2e7d32", "dropped": "#f9a825", "failed": "#c62828", "inputs": "#607d8b"}
DPI = 80
MAX_LOSS_LINES = 1_000_000
MAX_LOSS_POINTS = 2000
MAX_FUNNEL_BARS = 60  # more reasons than this: one bar per step in the plot (the table lists them all)


# ----------------------------------------------------------------- small pieces
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _t(label) -> str:
    """A label from data (tier, reason, language, ...) as plain text: a `$` would start mathtext."""
    return str(label).replace("$", r"\$")


def _img(name: str, b64png: str, alt: str) -> str:
    return (f"<img class='plot' data-plot='{html.escape(name)}' alt='{html.escape(alt)}' "
            f"src='data:image/png;base64,{b64png}'>")


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class Recipe:
    """The recorded recipe (run.json `recipe`: PipelineConfig.describe()), read as data."""

    def __init__(self, record: dict | None):
        self.record = record if isinstance(record, dict) else {}
        ops = self.record.get("ops")
        self.ops = [o for o in ops if isinstance(o, dict) and isinstance(o.get("op"), str)] if isinstance(ops, list) else []
        seed = self.record.get("seed")
        self.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0

    def param(self, op: str, key: str):
        return next((o.get(key) for o in self.ops if o["op"] == op), None)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------- funnel
def inputs_only(con) -> str:
    """SQL condition for the ledger rows that are inputs: not the samples a run derived
    from them (video clips, with parent_uid), which the funnel and totals count apart."""
    columns = {r[0] for r in con.sql("DESCRIBE ledger").fetchall()}
    return "parent_uid IS NULL" if "parent_uid" in columns else "true"


def funnel(con, recipe: Recipe) -> list[dict]:
    """One row per (step, status, reason) in pipeline order, with what remains after it:
    crawl, then what reading and media checks refused (and reasons no operator declares),
    each map operator, routing, uid conflicts, each global operator, unrouted, kept."""
    from ..ops.base import GlobalOp, registry

    counts = con.sql("SELECT stage, status, coalesce(reason, '') AS reason, count(*) FROM ledger "
                     f"WHERE {inputs_only(con)} GROUP BY ALL ORDER BY 4 DESC, 3").fetchall()
    known = registry()
    owner: dict[str, str] = {}
    # Without a recorded recipe (run.json deleted), every registered operator, in no known order.
    names = [o["op"] for o in recipe.ops] or list(known)
    map_ops = [n for n in names if not issubclass(known.get(n, object), GlobalOp)]
    global_ops = [n for n in names if n not in map_ops]
    fixed = {"routing": "routing_error", "uid conflicts": "duplicate_uid", "unrouted": "unrouted"}
    order = ["read and media checks", *map_ops, "routing", "uid conflicts", *global_ops, "unrouted"]
    for name in map_ops + global_ops:
        cls = known.get(name)
        for reason in (*getattr(cls, "reasons", ()), f"{name}_error"):
            owner.setdefault(reason, name)
    for step, reason in fixed.items():
        owner.setdefault(reason, step)
    total = sum(n for *_, n in counts)
    rows = []
    for stage, status, reason, n in counts:
        if status == "kept":
            continue
        # a reason with a variable part (decontaminate's contaminated:<set>) is declared as "contaminated:*"
        step = "crawl" if stage == "crawl" else owner.get(reason) or owner.get(reason.split(":", 1)[0] + ":*",
                                                                           "read and media checks")
        rows.append({"step": step, "status": status, "reason": reason or "(none)", "samples": int(n)})
    rank = {s: i for i, s in enumerate(["crawl", *order])}
    rows.sort(key=lambda r: (rank.get(r["step"], len(rank)), -r["samples"], r["reason"]))
    remaining = total
    for r in rows:
        remaining -= r["samples"]
        r["remaining"] = remaining
    return [{"step": "inputs", "status": "inputs", "reason": "", "samples": total, "remaining": total}, *rows,
            {"step": "kept", "status": "kept", "reason": "", "samples": remaining, "remaining": remaining}]


def _funnel_plot_rows(rows: list[dict]) -> list[dict]:
    """The funnel's rows for the plot: past MAX_FUNNEL_BARS, each step's reasons in one bar."""
    if len(rows) <= MAX_FUNNEL_BARS:
        return rows
    merged: list[dict] = []
    for r in rows:
        last = merged[-1] if merged else None
        if last is not None and last["step"] == r["step"] and r["step"] not in ("inputs", "kept"):
            last.update(samples=last["samples"] + r["samples"], remaining=r["remaining"], reasons=last["reasons"] + 1,
                        reason=f"{last['reasons'] + 1} reasons")
            if r["status"] == "failed":
                last["status"] = "failed"
        else:
            merged.append({**r, "reasons": 1})
    return merged


def _funnel_section(rows: list[dict]) -> str:
    table_rows = rows
    rows = _funnel_plot_rows(rows)
    labels = [_t(r["step"] if r["step"] in ("inputs", "kept") else f"{r['step']}: {r['reason']}") for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [max(r["samples"], 0.8) for r in rows], color=[STATUS_COLOURS.get(r["status"], "#9e9e9e") for r in rows])
    ax.plot([r["remaining"] for r in rows], y, color="#37474f", marker="o", ms=3, lw=1, label="remaining after step")
    for yi, r in zip(y, rows):
        ax.text(r["samples"], yi, f" {r['samples']:,}", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("samples (log scale)")
    ax.set_title("Every input, step by step in pipeline order: removed per reason, and what remains")
    ax.legend(fontsize=7, loc="lower right")
    total = rows[0]["samples"] or 1
    table = _table(["step", "reason", "status", "samples", "% of inputs", "remaining"],
                   [[r["step"], r["reason"], r["status"], r["samples"], 100.0 * r["samples"] / total, r["remaining"]]
                    for r in table_rows], "funnel")
    return _img("funnel", _png(fig), "ledger funnel") + table


# ----------------------------------------------------------------- tiers and tokens
def _tiers_section(con, bill: dict | None) -> str:
    by_kind = con.sql("SELECT tier, kind, count(*) FROM samples GROUP BY ALL ORDER BY 1, 2").fetchall()
    sizes = con.sql("SELECT tier, sum(samples)::BIGINT, sum(bytes) / 1e6, count(*) FROM shards "
                    "GROUP BY tier ORDER BY tier").fetchall()
    if not sizes:
        return "<p>No tier holds a sample.</p>"
    tiers = [_t(r[0]) for r in sizes]
    kinds = sorted({k for _, k, _ in by_kind})
    panels = 3 if bill and bill["stages"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2))
    bottom = [0] * len(tiers)
    for kind in kinds:
        vals = [next((n for t, k, n in by_kind if t == tier and k == kind), 0) for tier, *_ in sizes]
        axes[0].bar(tiers, vals, bottom=bottom, label=_t(kind))
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[0].set_title("samples per tier, by kind")
    axes[0].legend(fontsize=7)
    axes[1].bar(tiers, [r[2] for r in sizes], color="#6a1b9a")
    axes[1].set_title("MB per tier")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=25, labelsize=7)
    if panels == 3:
        ax = axes[2]
        names = [_t(s["name"]) for s in bill["stages"]]
        all_tiers = sorted({m["tier"] for s in bill["stages"] for m in s["mix"]})
        left = [0.0] * len(names)
        for tier in all_tiers:
            share = []
            for s in bill["stages"]:
                n = sum(m["samples"] for m in s["mix"] if m["tier"] == tier)
                share.append(n / max(s["totals"]["samples"], 1))
            ax.barh(names, share, left=left, label=_t(tier))
            left = [a + b for a, b in zip(left, share)]
        ax.set_xlim(0, 1)
        ax.set_title("stage mixture (share of samples)")
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
        ax.tick_params(axis="y", labelsize=7)
    table = _table(["tier", "samples", "MB", "shards"], [list(r) for r in sizes], "tiers")
    return _img("tiers", _png(fig), "tier sizes and mixture") + table


def token_bill(con, run_root: Path, recipe: Recipe, config_hash: str | None) -> dict | None:
    """The token bill `curate plan` prints: from plan.json when it belongs to this run,
    else computed here from per-tier aggregates (exact for `all`; other strategies take
    their share of the tier's totals, marked estimated)."""
    plan = _read_json(run_root / "plan.json")
    if isinstance(plan, dict) and plan.get("config_hash") == config_hash and isinstance(plan.get("stages"), list):
        return {"source": "plan.json", "stages": plan["stages"]}
    stages = recipe.record.get("stages")
    if not isinstance(stages, list) or not stages:
        return None
    from ..tiers.plan import BALANCED, balanced_count, strategy_count

    per_tier, sampled = tier_token_totals(con, recipe.seed)
    out = []
    for stage in stages:
        if not isinstance(stage, dict) or not isinstance(stage.get("mix"), list):
            continue
        mix = []
        for entry in stage["mix"]:
            tier, strategy = entry.get("tier"), entry.get("strategy", "all")
            t = per_tier.get(tier, {"samples": 0, "images": 0, "frames": 0, "visual_tokens": 0, "text_tokens": 0})
            if str(strategy).startswith(BALANCED):  # counted over the tier's concepts, as curate plan does
                chosen = balanced_count(con, tier, strategy, f"{recipe.seed}/{stage.get('name')}/{tier}")
            else:
                chosen = strategy_count(t["samples"], strategy)
            share = chosen / t["samples"] if t["samples"] else 0.0
            mix.append({"tier": tier, "strategy": strategy, "samples": chosen, "estimated": strategy != "all",
                        **{k: round(t[k] * share) for k in ("images", "frames", "visual_tokens", "text_tokens")}})
        totals = {k: sum(m[k] for m in mix) for k in ("samples", "images", "frames", "visual_tokens", "text_tokens")}
        out.append({"name": stage.get("name"), "mix": mix, "totals": totals})
    return {"source": "computed", "stages": out, "visual_sampled": sampled}


MAX_BILL_GROUPS = 20_000   # distinct sample shapes costed one by one; past this, a sample
BILL_SAMPLE = 5_000        # seeded samples per (tier, kind) costed when there are more shapes


def tier_token_totals(con, seed: int = 0) -> tuple[dict[str, dict[str, int]], bool]:
    """Per tier: samples, images, frames, visual and text tokens, with the token rules of
    curate plan (tokens.visual_tokens, plan.sample_text_tokens), and whether the visual
    side was estimated. Each distinct (tier, kind, width, height, images, frames) is costed
    once; with more than MAX_BILL_GROUPS of them (many image sizes), images, frames and
    visual tokens per (tier, kind) are scaled up from BILL_SAMPLE seeded samples of it.
    Samples and text tokens are always exact."""
    from ..tiers.plan import sample_text_tokens
    from ..tokens import CHARS_PER_TEXT_TOKEN, visual_tokens

    cols = sql.columns(con, "samples")
    counts = [sql.quote(c) if c in cols else "NULL" for c in ("num_images", "num_frames")]
    shape = "tier, kind, width, height, " + ", ".join(counts)
    text = f"sum(ceil(length(coalesce(text, '')) / {CHARS_PER_TEXT_TOKEN!r}))::BIGINT"
    zero = {"samples": 0, "images": 0, "frames": 0, "visual_tokens": 0, "text_tokens": 0}
    totals: dict[str, dict[str, int]] = {}
    shapes = con.sql(f"SELECT count(*) FROM (SELECT DISTINCT {shape} FROM samples)").fetchall()[0][0]
    sampled = shapes > MAX_BILL_GROUPS
    if not sampled:
        costed = con.sql(f"SELECT {shape}, count(*), {text} FROM samples GROUP BY ALL").fetchall()
        scale = {}
    else:
        strata = con.sql(f"SELECT tier, kind, count(*), {text} FROM samples GROUP BY ALL").fetchall()
        for tier, kind, n, text_tok in strata:
            t = totals.setdefault(tier, dict(zero))
            t["samples"] += n
            t["text_tokens"] += int(text_tok or 0)
        costed = con.execute(f"""
            SELECT {shape}, 1, 0 FROM samples
            QUALIFY row_number() OVER (PARTITION BY tier, kind ORDER BY hash(uid, $seed)) <= {BILL_SAMPLE}""",
                             {"seed": seed}).fetchall()
        drawn: dict[tuple, int] = {}
        for tier, kind, *_ in costed:
            drawn[(tier, kind)] = drawn.get((tier, kind), 0) + 1
        scale = {(tier, kind): n / drawn[(tier, kind)] for tier, kind, n, _ in strata}
    visual: dict[str, list[float]] = {}
    for tier, kind, w, h, ni, nf, n, text_tok in costed:
        images, frames, vis = visual_tokens(kind, w or 0, h or 0, ni, nf)
        weight = n * scale.get((tier, kind), 1)
        acc = visual.setdefault(tier, [0.0, 0.0, 0.0])
        acc[0] += images * weight
        acc[1] += frames * weight
        acc[2] += vis * weight
        if not sampled:
            t = totals.setdefault(tier, dict(zero))
            t["samples"] += n
            t["text_tokens"] += int(text_tok or 0)
    for tier, (images, frames, vis) in visual.items():
        totals[tier].update(images=round(images), frames=round(frames), visual_tokens=round(vis))
    if "source_meta" in cols:  # question/answer pairs: parsed only where the metadata has some
        meta = sql.json_text("source_meta", cols["source_meta"])
        reader = con.sql(f"SELECT tier, {meta} AS m FROM samples WHERE {meta} LIKE '%\"qa\"%'").to_arrow_reader(65536)
        for batch in reader:
            for tier, m in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                totals[tier]["text_tokens"] += sample_text_tokens(None, m)
    return totals, sampled


def _bill_section(bill: dict) -> str:
    rows = []
    for st in bill["stages"]:
        for m in st["mix"]:
            mark = " (est.)" if m.get("estimated") else ""
            rows.append([st["name"], m["tier"], m["strategy"] + mark, m["samples"], m["images"], m["frames"],
                         m["visual_tokens"], m["text_tokens"]])
        t = st["totals"]
        rows.append([st["name"], "= total", "", t["samples"], t["images"], t["frames"], t["visual_tokens"], t["text_tokens"]])
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(bill["stages"]) + 1.2))
    names = [_t(s["name"]) for s in bill["stages"]]
    vis = [s["totals"]["visual_tokens"] for s in bill["stages"]]
    txt = [s["totals"]["text_tokens"] for s in bill["stages"]]
    ax.barh(names, vis, label="visual tokens", color="#1565c0")
    ax.barh(names, txt, left=vis, label="text tokens", color="#ef6c00")
    ax.set_xlabel("tokens")
    ax.set_title("token bill per training stage")
    ax.legend(fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    note = ("from plan.json (curate plan)" if bill["source"] == "plan.json" else
            "computed from the sidecars for the recorded recipe's stages; strategies other than `all` "
            "take their share of the tier's totals (est.); `curate plan` gives the exact selection"
            + (f". Images, frames and visual tokens are scaled up from {BILL_SAMPLE:,} seeded samples per tier "
               "and kind (the run has too many image sizes to cost each)" if bill.get("visual_sampled") else ""))
    return (_img("token_bill", _png(fig), "token bill") + f"<p class='note'>{html.escape(note)}</p>"
            + _table(["stage", "tier", "strategy", "samples", "images", "frames", "visual tokens", "text tokens"],
                     rows, "bill"))


# ----------------------------------------------------------------- distributions
def _hist_plot(name: str, h: sql.Histogram, title: str, xlabel: str, lines: list[tuple[float, str]] = (),
               logy: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(4.6, 2.9))
    widths = h.edges[1:] - h.edges[:-1]
    bottom = None
    for group, counts in h.counts.items():
        ax.bar(h.edges[:-1], counts, width=widths, align="edge", alpha=0.85, bottom=bottom,
               label=_t(f"{group} ({int(counts.sum()):,})") if group else None)
        bottom = counts if bottom is None else bottom + counts
    for x, label in lines:
        ax.axvline(x, color="#b71c1c", ls="--", lw=1.2, label=label)
    if h.log:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))  # 1/4, 1/2, 1, 2, 4 ...
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel="samples")
    if len(h.counts) > 1 or lines:
        ax.legend(fontsize=6)
    return _img(name, _png(fig), title)


def _clip_thresholds(recipe: Recipe, con) -> list[tuple[float, str]]:
    lines = []
    ms = recipe.param("clip_score", "min_score")
    if _number(ms) is not None:
        lines.append((float(ms), f"min_score {float(ms):.3f}"))
    elif ms == "calibrated":  # the threshold lives with the model; else the ledger bounds it from below
        found = _calibrated_min_score(recipe.param("clip_score", "model"))
        low = con.sql("SELECT max(clip_score) FROM ledger WHERE reason = 'clip_score_low'").fetchall()[0][0]
        if found is not None:
            lines.append((found, f"calibrated min_score {found:.3f}"))
        elif low is not None:
            lines.append((float(low), f"calibrated (>= {float(low):.3f}, the highest dropped)"))
    cut = con.sql("SELECT max(clip_score) FROM ledger WHERE reason = 'clip_score_rank'").fetchall()[0][0]
    if cut is not None:
        frac = recipe.param("clip_top_fraction", "fraction")
        lines.append((float(cut), f"top {frac} cut" if frac is not None else "rank cut"))
    return lines


def _calibrated_min_score(model) -> float | None:
    """min_score from the calibration file of a `curate train-filter` model folder."""
    from ..clipfilter import CALIBRATION_FILE

    if not isinstance(model, str):
        return None
    folder = Path(os.path.expandvars(model).removeprefix("local-dir:"))
    calib = _read_json(folder / CALIBRATION_FILE) if folder.is_dir() else None
    value = _number(calib.get("min_score")) if isinstance(calib, dict) else None
    return value if value is not None and -1 <= value <= 1 else None


def distributions(con, recipe: Recipe) -> list[str]:
    """The distribution plots that have data, each an <img>."""
    out = []
    ledger_cols = sql.with_values(con, "ledger", ["clip_score"])
    if "clip_score" in ledger_cols:
        outcome = ("CASE WHEN status = 'kept' THEN 'kept' WHEN reason IN ('clip_score_low', 'clip_score_rank') "
                   "THEN 'dropped: ' || reason ELSE 'removed by another step' END")
        h = sql.histogram(con, "ledger", "clip_score", 40, by=outcome)
        if h:
            out.append(_hist_plot("clip_score", h, "CLIP score of every scored input", "image-caption similarity",
                                  _clip_thresholds(recipe, con)))
    have = sql.with_values(con, "samples", ["width", "height", "text", "ocr_text", "language", "nsfw", "duration"])
    if {"width", "height"} <= have:
        grid = sql.histogram_2d(con, "samples", "width", "height", 28, log=True, where="width > 0 AND height > 0")
        if grid:
            ex, ey, counts = grid
            fig, ax = plt.subplots(figsize=(4.6, 3.4))
            norm = matplotlib.colors.LogNorm(vmin=1) if counts.max() > 0 else None
            mesh = ax.pcolormesh(ex, ey, counts, cmap="viridis", norm=norm)
            ax.set(xscale="log", yscale="log", xlabel="width (px)", ylabel="height (px)", title="resolution of kept samples")
            fig.colorbar(mesh, ax=ax, label="samples")
            out.append(_img("resolution", _png(fig), "resolution"))
        h = sql.histogram(con, "samples", "width::DOUBLE / height", 40, log=True, where="width > 0 AND height > 0")
        if h:
            r = _number(recipe.param("image_quality", "max_aspect_ratio"))
            lines = [(1 / r, f"1/{r:g}"), (r, f"max_aspect_ratio {r:g}")] if r else []
            out.append(_hist_plot("aspect_ratio", h, "aspect ratio of kept samples", "width / height (log)", lines))
    if "text" in have:
        words = "len(string_split(trim(text), ' '))"  # words between spaces: a regex split costs 10x
        h = sql.histogram(con, "samples", words, 40, by="kind", where="trim(coalesce(text, '')) <> ''")
        if h:
            lines = [(float(v), f"{k} {v:g}") for k in ("min_words", "max_words")
                     if (v := _number(recipe.param("caption_length", k))) is not None and v <= h.edges[-1] * 1.5]
            out.append(_hist_plot("caption_words", h, "caption length of kept samples", "words (split on spaces)", lines))
    if "ocr_text" in have:
        h = sql.histogram(con, "samples", "length(ocr_text)", 40, where="ocr_text IS NOT NULL")
        if h:
            out.append(_hist_plot("ocr_length", h, "OCR text length of kept samples", "characters read", logy=True))
    if "language" in have:
        top = sql.top_values(con, "samples", "language", 15, where="language IS NOT NULL")
        if top:
            fig, ax = plt.subplots(figsize=(4.6, 2.9))
            ax.bar([_t(v) for v, _ in top], [n for _, n in top], color="#5d4037")
            ax.set(title="language of kept samples", ylabel="samples")
            ax.tick_params(axis="x", rotation=45, labelsize=7)
            out.append(_img("language", _png(fig), "language"))
    if "nsfw" in have:
        h = sql.histogram(con, "samples", "nsfw", 40, lo=0.0, hi=1.0)
        if h:
            t = _number(recipe.param("nsfw", "threshold"))
            lines = [(t, f"threshold {t:g}")] if t is not None else []
            out.append(_hist_plot("nsfw", h, "NSFW score of kept samples", "score", lines, logy=True))
    if "duration" in have:
        h = sql.histogram(con, "samples", "duration", 30, where="kind = 'video'")
        if h:
            lines = [(float(v), f"{k} {v:g}") for k in ("min_duration", "max_duration")
                     if (v := _number(recipe.param("video_quality", k))) is not None and v <= h.edges[-1] * 1.5]
            out.append(_hist_plot("video_duration", h, "duration of kept videos", "seconds", lines))
    near = _near_dup_histogram(con)
    if near:
        t = _number(recipe.param("near_dedup", "max_hamming"))
        out.append(_hist_plot("near_duplicates", near, "near duplicates removed", "phash bits from the kept representative",
                              [(t, f"max_hamming {t:g}")] if t is not None else []))
    return out


def _near_dup_histogram(con) -> sql.Histogram | None:
    if not con.sql("SELECT count(*) FROM duckdb_views() WHERE view_name = 'annotated'").fetchall()[0][0]:
        return None
    return sql.histogram(con, """(
        SELECT bit_count(xor(('0x' || d.phash)::UBIGINT, ('0x' || k.phash)::UBIGINT)) AS bits
        FROM annotated d JOIN annotated k ON d.dup_of = k.uid WHERE d.reason = 'duplicate_near')""",
                         "bits", 33, lo=-0.5, hi=32.5)


# ----------------------------------------------------------------- thumbnails
def _tiles_html(group_attr: str, title: str, tiles: list[thumbs.Tile]) -> str:
    cells = []
    for t in tiles:
        pic = (f"<img class='thumb' alt='{html.escape(t.uid)}' src='data:image/jpeg;base64,"
               f"{base64.b64encode(t.jpeg).decode()}'>" if t.jpeg else
               f"<div class='nopic'>{html.escape(t.note or 'no picture')}</div>")
        note = (f"<small class='{'alert' if t.alert else ''}'>{html.escape(t.note)}</small>"
                if t.jpeg and t.note else "")
        cells.append(f"<figure class='tile' title='{html.escape(t.uid)}'>{pic}<figcaption>{html.escape(t.caption)}"
                     f"{note}</figcaption></figure>")
    return (f"<div class='thumbs' {group_attr}><h3>{html.escape(title)}</h3>"
            f"<div class='grid'>{''.join(cells)}</div></div>")


def _kept_section(kept: dict[str, list[thumbs.Tile]]) -> str:
    return "".join(_tiles_html(f"data-tier='{html.escape(t)}'", f"tier {t}", tiles) for t, tiles in kept.items())


def _dropped_section(dropped: dict[tuple[str, str], list[thumbs.Tile]], funnel_rows: list[dict]) -> str:
    """Per reason, in the funnel's (pipeline) order."""
    parts = []
    for r in funnel_rows:
        group = (r["status"], "" if r["reason"] == "(none)" else r["reason"])
        tiles = dropped.get(group)
        if tiles and r["step"] not in ("inputs", "kept"):
            parts.append(_tiles_html(f"data-status='{html.escape(group[0])}' data-reason='{html.escape(group[1])}'",
                                     f"{r['step']}: {r['reason']} ({r['status']}, {r['samples']:,} samples)", tiles))
    return "".join(parts)


# ----------------------------------------------------------------- run and training
def _throughput_section(summary: dict) -> str:
    stages = summary.get("stages") if isinstance(summary.get("stages"), dict) else {}
    rows = []
    for name, st in stages.items():
        if not isinstance(st, dict):
            continue
        secs, n, raw = _number(st.get("seconds")), _number(st.get("samples")), _number(st.get("raw_bytes_read"))
        rate = n / secs if n is not None and secs else None
        mbs = raw / 1e6 / secs if raw is not None and secs else None
        rows.append([name, secs, None if n is None else int(n), rate, mbs])
    if not rows:
        return "<p>summary.json records no stages.</p>"
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
    names = [_t(r[0]) for r in rows]
    axes[0].bar(names, [r[1] or 0 for r in rows], color="#455a64")
    axes[0].set_title("seconds per stage")
    axes[1].bar(names, [r[3] or 0 for r in rows], color="#00838f")
    axes[1].set_title("samples per second")
    extra = [["startup", _number(summary.get("startup_seconds")), None, None, None],
             ["whole run", _number(summary.get("seconds")), _number(summary.get("raw_samples")), None, None]]
    return (_img("throughput", _png(fig), "per-stage throughput")
            + _table(["stage", "seconds", "samples", "samples/s", "raw MB/s"], rows + extra, "throughput")
            + "<p class='note'>This invocation only: a resumed run shows the work it redid.</p>")


def training_runs(run_root: Path, extra: list[Path]) -> list[Path]:
    """Trainer output folders (loss.jsonl) to plot: those given, and those within two
    levels of the run's parent folder whose checkpoint names this run's plan.json."""
    found = [Path(p) for p in extra if (Path(p) / "loss.jsonl").is_file()]
    plan = (run_root / "plan.json").resolve()
    for log in sorted([*run_root.parent.glob("*/loss.jsonl"), *run_root.parent.glob("*/*/loss.jsonl")]):
        state = _read_json(log.parent / "checkpoint" / "state.json")
        if isinstance(state, dict) and isinstance(state.get("plan"), str) and Path(state["plan"]).resolve() == plan:
            if log.parent.resolve() not in {p.resolve() for p in found}:
                found.append(log.parent)
    return found


def _loss_points(log: Path) -> tuple[list[float], list[float]]:
    steps, losses = [], []
    with open(log, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if i >= MAX_LOSS_LINES:
                break
            try:
                row = json.loads(line)
                s, v = _number(row.get("step")), _number(row.get("loss"))
            except (ValueError, AttributeError, RecursionError):
                continue
            if s is not None and v is not None:
                steps.append(s)
                losses.append(v)
    if len(steps) > MAX_LOSS_POINTS:  # bucket means: the curve's shape, not every step
        k = math.ceil(len(steps) / MAX_LOSS_POINTS)
        steps = [sum(steps[i:i + k]) / len(steps[i:i + k]) for i in range(0, len(steps), k)]
        losses = [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, len(losses), k)]
    return steps, losses


def _training_section(runs: list[Path]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    plotted = 0
    for run in runs:
        steps, losses = _loss_points(run / "loss.jsonl")
        if not steps:
            continue
        state = _read_json(run / "checkpoint" / "state.json") or {}
        label = " ".join(str(state[k]) for k in ("arch", "size", "stage") if isinstance(state, dict) and k in state) or run.name
        ax.plot(steps, losses, lw=1, label=_t(label))
        plotted += 1
    if not plotted:
        plt.close(fig)
        return ""
    ax.set(xlabel="step", ylabel="answer-token loss", title="training loss")
    ax.legend(fontsize=7)
    return _img("training_loss", _png(fig), "training loss")


# ----------------------------------------------------------------- the page
CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
img.plot{max-width:100%;display:block;margin:.5em 0}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}.note{font-size:12px;color:#555}
.dists{display:flex;flex-wrap:wrap;gap:8px}.dists img.plot{max-width:49%}
.grid{display:flex;flex-wrap:wrap;gap:6px}.tile{width:140px;margin:0;font-size:11px}
.tile img,.nopic{width:128px;height:128px;object-fit:contain;background:#eee;display:flex;align-items:center;
justify-content:center;text-align:center;font-size:10px;color:#666}
figcaption{overflow-wrap:anywhere;display:-webkit-box;-webkit-line-clamp:4;-webkit-box-orient:vertical;overflow:hidden}
figcaption small{display:block;color:#777}figcaption small.alert{color:#a00}nav a{margin-right:1em}"""


def _section(sid: str, title: str, body: str) -> str:
    return f"<section id='{sid}' data-section='{sid}'><h2>{html.escape(title)}</h2>{body}</section>"


def write_report(root: str | Path, out: str | Path | None = None, train_runs: list[str | Path] = ()) -> Path:
    """Write the report (default: report.html in the run folder) and return its path."""
    run_root = find_run_root(root)
    con = connect(run_root)
    annotated = run_root / "_work" / "annotated"
    if any(annotated.glob("*/*.parquet")):
        # phash lives in the intermediate annotations; the final reason and dup_of in the ledger.
        path = str(annotated).replace("'", "''")
        con.execute(f"CREATE VIEW annotated AS SELECT a.uid, a.phash, l.reason, l.dup_of "
                    f"FROM read_parquet('{path}/*/*.parquet', union_by_name=true) a JOIN ledger l USING (uid)")
    summary = _read_json(run_root / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    run = _read_json(run_root / "_work" / "run.json")
    recipe = Recipe(run.get("recipe") if isinstance(run, dict) else None)

    rows = funnel(con, recipe)
    bill = token_bill(con, run_root, recipe, summary.get("config_hash"))
    kept = thumbs.kept_tiles(con, run_root, recipe.seed)
    dropped = thumbs.dropped_tiles(con, run_root, recipe.seed)
    runs = training_runs(run_root, [Path(p) for p in train_runs])

    sections = [
        ("funnel", "Funnel: every input, step by step", _funnel_section(rows)),
        ("tiers", "Tiers and mixture", _tiers_section(con, bill)),
    ]
    if bill:
        sections.append(("token_bill", "Token bill per training stage", _bill_section(bill)))
    dists = distributions(con, recipe)
    if dists:
        sections.append(("distributions", "Distributions", f"<div class='dists'>{''.join(dists)}</div>"))
    sections.append(("kept_samples", "Kept samples (seeded random, per tier)", _kept_section(kept) or "<p>none</p>"))
    if dropped:
        sections.append(("dropped_samples", "Dropped and failed samples (seeded random, per reason)",
                         _dropped_section(dropped, rows)))
    sections.append(("throughput", "Run time and throughput per stage", _throughput_section(summary)))
    training = _training_section(runs)
    if training:
        sections.append(("training", "Training loss", training))

    inputs = inputs_only(con)
    totals = {status: n for status, n in con.sql(f"SELECT status, count(*) FROM ledger WHERE {inputs} "
                                                  "GROUP BY status").fetchall()}
    derived = dict(con.sql(f"SELECT status, count(*) FROM ledger WHERE NOT ({inputs}) GROUP BY status").fetchall())
    ledger_rows = sum(totals.values())
    name = summary.get("pipeline") or recipe.record.get("name") or run_root.name
    head = (f"<h1>Curation report: {html.escape(str(name))}</h1>"
            f"<p>config {html.escape(str(summary.get('config_hash', '?')))} &middot; {ledger_rows} inputs = "
            + " + ".join(f"{totals[s]} {s}" for s in ("kept", "dropped", "failed") if s in totals)
            + (f" &middot; {sum(derived.values())} samples derived from them (video clips): "
               + ", ".join(f"{n} {s}" for s, n in sorted(derived.items())) if derived else "")
            + (f" &middot; {summary['seconds']} s" if _number(summary.get("seconds")) is not None else "")
            + "".join(f" &middot; {k.replace('_at', '')} {html.escape(summary[k])}" for k in ("started_at", "finished_at")
                      if isinstance(summary.get(k), str)) + "</p>"
            + "<nav>" + "".join(f"<a href='#{sid}'>{html.escape(title.split(':')[0])}</a>" for sid, title, _ in sections)
            + "</nav>")
    body = "".join(_section(sid, title, content) for sid, title, content in sections)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>curation report</title>"
            f"<style>{CSS}</style></head><body>{head}{body}</body></html>")
    path = Path(out) if out is not None else run_root / "report.html"
    atomic_write_text(path, page)
    return path
