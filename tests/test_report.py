"""curate report: the page of the session's demo run opened in headless Chromium (every
section and plot present, every image decoded, thumbnails per tier and per reason, no
console error), its funnel and token bill checked against the ledger and `curate plan`,
and the SQL helpers on tiny tables."""

from __future__ import annotations

import ast
import inspect
import json
import math
import re

import duckdb
import numpy as np
import pandas as pd
import pytest

from curation.inputs import raw_shards_at_hand

from curation.report import html as report
from curation.report import sql, thumbs
from tests.chromium import chromium_page

# ------------------------------------------------------------------ SQL helpers


@pytest.fixture()
def con():
    c = duckdb.connect()
    c.execute("CREATE TABLE t (x DOUBLE, g VARCHAR)")
    c.execute("INSERT INTO t VALUES (0, 'a'), (1, 'a'), (2, 'b'), (3, 'b'), (4, 'a'), (4, 'b'), (10, 'a'), "
              "(NULL, 'a'), ('nan', 'b'), ('inf', 'a'), (-1e9, NULL)")
    return c


def test_histogram_bins_in_sql(con):
    h = sql.histogram(con, "t", "x", bins=5, lo=0, hi=10, where="x >= 0")
    assert h.edges.tolist() == [0, 2, 4, 6, 8, 10]
    assert h.counts[""].tolist() == [2, 2, 2, 0, 1]  # 10 is the last edge: the last bin holds it
    assert h.total == 7  # null, NaN and inf are no values

    grouped = sql.histogram(con, "t", "x", bins=5, lo=0, hi=10, by="g")
    assert grouped.counts["a"].tolist() == [2, 0, 1, 0, 1] and grouped.counts["b"].tolist() == [0, 2, 1, 0, 0]
    assert grouped.counts["null"].tolist() == [1, 0, 0, 0, 0]  # below lo: clipped into the first bin

    ranged = sql.histogram(con, "t", "x", bins=4, where="x >= 0")  # the data's own range, 0..10
    assert ranged.edges[0] == 0 and ranged.edges[-1] == 10 and ranged.counts[""].tolist() == [3, 3, 0, 1]

    logged = sql.histogram(con, "(SELECT unnest([1, 10, 100, 1000, 0, -5]) AS v)", "v", bins=3, log=True)
    assert np.allclose(logged.edges, [1, 10, 100, 1000]) and logged.counts[""].tolist() == [1, 1, 2]

    one = sql.histogram(con, "t", "x", bins=10, where="x = 4")
    assert one.counts[""].tolist() == [2] and one.edges[0] < 4 < one.edges[1]
    assert sql.histogram(con, "t", "x", where="x > 100") is None


def test_2d_histogram_top_values_and_columns(con):
    ex, ey, counts = sql.histogram_2d(con, "t", "x + 1", "x + 1", bins=2, log=False, where="x BETWEEN 0 AND 4")
    assert counts.sum() == 6 and counts[0, 0] == 2 and counts[1, 1] == 4 and counts[0, 1] == counts[1, 0] == 0
    assert ex.tolist() == ey.tolist() == [1, 3, 5]
    assert sql.top_values(con, "t", "g", limit=1) == [("a", 6), ("other", 5)]
    assert sql.top_values(con, "t", "g") == [("a", 6), ("b", 4), ("unknown", 1)]
    assert sql.with_values(con, "t", ["x", "g", "missing"]) == {"x", "g"}


def test_json_text_reads_either_encoding():
    c = duckdb.connect()
    c.execute("""CREATE TABLE j AS SELECT '{"qa": [{"q": "x", "a": "y"}]}' AS text_col,
                 {'qa': [{'q': 'x', 'a': 'y'}]} AS struct_col, '{"qa": 1}'::JSON AS json_col""")
    kinds = sql.columns(c, "j")
    got = [json.loads(c.sql(f"SELECT {sql.json_text(col, kinds[col])} FROM j").fetchall()[0][0])
           for col in ("text_col", "struct_col", "json_col")]
    assert got == [{"qa": [{"q": "x", "a": "y"}]}] * 2 + [{"qa": 1}]


# ------------------------------------------------------------------ operators, raw shards, training runs


def _literal_reasons(module) -> set[str]:
    """Reason strings an operator module passes to drop/fail (and dedup's helper)."""
    found = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and re.fullmatch(r"[a-z][a-z0-9_]*", arg.value):
                    if name in ("drop", "fail") or arg.value.startswith("duplicate_"):
                        found.add(arg.value)
    return found


def test_every_reason_an_operator_gives_is_declared():
    """The funnel places a reason at the operator that declares it: a new drop reason
    must be declared, or it would be counted under 'read and media checks'."""
    from curation.ops.base import registry

    ops = registry()
    # The package's operators (other tests register operators of their own in this process)
    for module in {inspect.getmodule(cls) for cls in ops.values() if cls.__module__.startswith("curation.")}:
        declared = {r for cls in ops.values() if inspect.getmodule(cls) is module for r in cls.reasons}
        names = {cls.name for cls in ops.values() if inspect.getmodule(cls) is module}
        undeclared = {r for r in _literal_reasons(module) - declared if r not in {f"{n}_error" for n in names}}
        assert not undeclared, f"{module.__name__}: reasons not in any operator's `reasons`: {undeclared}"


def test_raw_shards_at_hand_only_when_they_are_the_recorded_ones(tmp_path):
    run = tmp_path / "run"
    (run / "_work").mkdir(parents=True)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.tar").write_bytes(b"\0" * 1024)
    (raw / "b.tar").write_bytes(b"\0" * 2048)
    # input_options as the runner records them: the format found ("tar"), not the CLI's name
    (run / "_work" / "run.json").write_text(json.dumps({"input": str(raw), "raw_shards": {"a.tar": 1024, "b.tar": 99},
                                                        "input_options": {"format": "tar", "image_column": None}}))
    refs, source, note = raw_shards_at_hand(run)
    assert set(refs) == {"a.tar"} and source == "raw" and note == ""  # b.tar changed size: another shard now
    (run / "_work" / "run.json").write_text(json.dumps({"input": str(tmp_path / "gone"), "raw_shards": {"a.tar": 1024}}))
    assert raw_shards_at_hand(run)[:2] == ({}, "")
    (run / "_work" / "run.json").write_text(json.dumps({"input": "s3://bucket/raw/", "raw_shards": {}}))
    refs, _, note = raw_shards_at_hand(run)
    assert refs == {} and "object store" in note  # never the network from a report or a page


def test_training_runs_are_found_by_their_plan(tmp_path):
    run = tmp_path / "out" / "curated"
    run.mkdir(parents=True)
    for name, plan in (("mine", run / "plan.json"), ("other", tmp_path / "elsewhere" / "plan.json")):
        folder = tmp_path / "out" / "train" / name
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "loss.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        (folder / "checkpoint" / "state.json").write_text(json.dumps({"plan": str(plan)}))
    given = tmp_path / "given"
    given.mkdir()
    steps = "".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 5001))
    (given / "loss.jsonl").write_text("not json\n" + steps)
    found = report.training_runs(run, [given, tmp_path / "no-such-run"])
    assert found == [given, tmp_path / "out" / "train" / "mine"]
    steps, losses = report._loss_points(given / "loss.jsonl")
    assert len(steps) <= report.MAX_LOSS_POINTS and steps[0] == 2 and losses[0] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


# ------------------------------------------------------------------ the demo run's report

PLOTS = {"funnel", "tiers", "token_bill", "clip_score", "resolution", "aspect_ratio", "caption_words", "ocr_length",
         "language", "nsfw", "video_duration", "near_duplicates", "throughput", "training_loss"}
SECTIONS = ["funnel", "tiers", "token_bill", "distributions", "kept_samples", "dropped_samples", "throughput", "training"]


@pytest.fixture(scope="module")
def demo_report(demo_out, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    train = folder / "train"
    (train / "checkpoint").mkdir(parents=True)
    (train / "loss.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 * math.exp(-s / 40) + 0.4}) + "\n"
                                              for s in range(1, 201)))
    (train / "checkpoint" / "state.json").write_text(json.dumps({"arch": "llava", "size": "tiny", "stage": "stage1"}))
    return report.write_report(demo_out, out=folder / "report.html", train_runs=[train])


def test_the_report_opens_in_chromium_with_every_plot_and_thumbnail(demo_out, demo_report):
    run_root = demo_out / "curated"
    ledger = pd.read_parquet(run_root / "ledger.parquet", columns=["status", "reason", "raw_shard"])
    tiers = {m.parent.name for m in (run_root / "tiers").glob("*/manifest.json")
             if json.loads(m.read_text())["num_samples"]}
    with chromium_page() as page:
        page.goto(demo_report.as_uri())
        page.wait_for_load_state("load")
        assert page.eval_on_selector_all("section", "els => els.map(e => e.id)") == SECTIONS
        plots = page.eval_on_selector_all("img.plot", "els => els.map(e => e.dataset.plot)")
        assert sorted(plots) == sorted(PLOTS)
        undecoded = page.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
                                  ".map(i => i.dataset.plot || i.alt)")
        assert undecoded == [] and page.evaluate("document.images.length") > len(PLOTS) + len(tiers)
        for tier in tiers:  # kept thumbnails out of each tier's tars
            assert page.locator(f".thumbs[data-tier='{tier}'] img.thumb").count() >= 1, tier
        groups = page.eval_on_selector_all(".thumbs[data-reason]", "els => els.map(e => [e.dataset.status, e.dataset.reason, "
                                           "e.querySelectorAll('img.thumb').length, e.querySelectorAll('.tile').length])")
        shown = {(s, r): (imgs, tiles) for s, r, imgs, tiles in groups}
        dropped = ledger[ledger.status != "kept"]
        expected = set(zip(dropped.status, dropped.reason.fillna("")))
        assert set(shown) == expected  # every reason has its tiles
        assert all(0 < tiles <= thumbs.PER_GROUP for _, tiles in shown.values())
        # Dropped by a filter (not broken): their raw media decode and are shown.
        for reason in ("too_small", "duplicate_exact", "duplicate_near", "clip_score_low", "caption_too_short"):
            if ("dropped", reason) in shown:
                assert shown[("dropped", reason)][0] >= 1, reason
        assert page.console_errors == []
    assert demo_report.stat().st_size < 3_000_000


def test_the_funnel_follows_the_pipeline_and_adds_up(demo_out):
    from curation.catalog import connect

    run_root = demo_out / "curated"
    recipe = report.Recipe(json.loads((run_root / "_work" / "run.json").read_text())["recipe"])
    rows = report.funnel(connect(run_root), recipe)
    ledger = pd.read_parquet(run_root / "ledger.parquet", columns=["status", "reason", "stage"])
    assert rows[0]["samples"] == len(ledger) and rows[-1]["samples"] == (ledger.status == "kept").sum()
    assert sum(r["samples"] for r in rows[1:-1]) == (ledger.status != "kept").sum()
    remaining = [r["remaining"] for r in rows]
    assert remaining == sorted(remaining, reverse=True)
    step = {r["reason"]: r["step"] for r in rows[1:-1]}
    assert step["clip_score_low"] == "clip_score" and step["duplicate_near"] == "near_dedup"
    assert all(step[r] == "crawl" for r in ledger[ledger.stage == "crawl"].reason.dropna())
    order = [r["step"] for r in rows]
    ops = [o["op"] for o in recipe.ops]
    assert [s for s in dict.fromkeys(order) if s in ops] == [o for o in ops if o in order]  # pipeline order


def test_the_bill_is_curate_plans_and_the_clip_line_is_the_threshold(demo_out, monkeypatch):
    from curation import config
    from curation.catalog import connect
    from curation.tiers.plan import make_plan

    run_root = demo_out / "curated"
    con = connect(run_root)
    recipe = report.Recipe(json.loads((run_root / "_work" / "run.json").read_text())["recipe"])
    computed = report.token_bill(con, run_root, recipe, config_hash=None)  # None: never plan.json, always computed
    assert computed["source"] == "computed"
    exact = make_plan(config.for_output(run_root, None), run_root)
    keys = ("samples", "images", "frames", "visual_tokens", "text_tokens")
    for got, want in zip(computed["stages"], exact["stages"], strict=True):
        for g, w in zip(got["mix"], want["mix"], strict=True):
            assert g["samples"] == w["samples"]
            if w["strategy"] == "all":
                assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, (got["name"], g["tier"])
    exact_totals, sampled = report.tier_token_totals(con)
    assert not sampled
    monkeypatch.setattr(report, "MAX_BILL_GROUPS", 0)  # the path of a run with too many image sizes
    monkeypatch.setattr(report, "BILL_SAMPLE", 10**6)  # ... drawing every sample: the same totals
    assert report.tier_token_totals(con) == (exact_totals, True)
    monkeypatch.setattr(report, "BILL_SAMPLE", 5)
    estimated, _ = report.tier_token_totals(con)
    for tier, t in exact_totals.items():
        assert {k: estimated[tier][k] for k in ("samples", "text_tokens")} == {k: t[k] for k in ("samples", "text_tokens")}
        assert t["visual_tokens"] / 3 <= estimated[tier]["visual_tokens"] <= t["visual_tokens"] * 3
    (line, label), *_ = report._clip_thresholds(recipe, con)
    low, kept = con.sql("SELECT max(clip_score) FILTER (reason = 'clip_score_low'), "
                        "min(clip_score) FILTER (status = 'kept') FROM ledger").fetchall()[0]
    assert "calibrated" in label and low < line <= kept


def test_labels_from_data_are_never_mathtext():
    """A tier, reason or language holding `$` is drawn as text (mathtext would raise)."""
    h = sql.Histogram(np.array([0.0, 1.0, 2.0]), {"$\\frac{$": np.array([1, 2]), "a$b$^": np.array([0, 1])})
    assert report._hist_plot("x", h, "t", "x").startswith("<img class='plot'")
    rows = [{"step": "inputs", "status": "inputs", "reason": "", "samples": 3, "remaining": 3},
            {"step": "$op", "status": "dropped", "reason": "$\\sqrt{$", "samples": 1, "remaining": 2},
            {"step": "kept", "status": "kept", "reason": "", "samples": 2, "remaining": 2}]
    assert "data-plot='funnel'" in report._funnel_section(rows)


def test_a_funnel_of_many_reasons_plots_one_bar_per_step_and_tables_them_all():
    rows, left = [{"step": "inputs", "status": "inputs", "reason": "", "samples": 100, "remaining": 100}], 100
    for i in range(report.MAX_FUNNEL_BARS + 10):
        left -= 1
        rows.append({"step": "crawl" if i < 50 else "clip_score", "status": "dropped", "reason": f"http_{i}",
                     "samples": 1, "remaining": left})
    rows.append({"step": "kept", "status": "kept", "reason": "", "samples": left, "remaining": left})
    bars = report._funnel_plot_rows(rows)
    assert [(b["step"], b["reason"], b["samples"], b["remaining"]) for b in bars] == [
        ("inputs", "", 100, 100), ("crawl", "50 reasons", 50, 50), ("clip_score", "20 reasons", 20, 30), ("kept", "", 30, 30)]
    assert report._funnel_section(rows).count("<tr>") == len(rows) + 1  # header + every reason


def _jpeg(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path, members, gzip=False):
    import io
    import tarfile

    with tarfile.open(path, "w:gz" if gzip else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:  # a symlink: never read
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_thumbnails_of_hostile_samples_by_offset_and_streamed(tmp_path, monkeypatch):
    import io

    from PIL import Image

    bomb = io.BytesIO()  # 42 MP in 5 KB: over the pixel cap; and garbage named .jpg
    Image.new("1", (6500, 6500)).save(bomb, format="PNG")
    bomb = bomb.getvalue()
    members = [("a.jpg", _jpeg()), ("a.txt", "a red\nsquare ".encode() * 1000),
               ("d.0.jpg", _jpeg((20, 60))), ("d.1.png", bomb), ("d.txt", b"doc"),
               ("bomb.png", bomb), ("junk.jpg", b"<html>not an image</html>"), ("link.jpg", None),
               ("big.jpg", _jpeg())]
    plain, packed = tmp_path / "s.tar", tmp_path / "s.tar.gz"
    _write_tar(plain, members)
    _write_tar(packed, members, gzip=True)
    keys = {"a", "d", "bomb", "junk", "link", "big", "absent"}
    monkeypatch.setattr(thumbs, "MAX_MEMBER_BYTES", len(_jpeg()) - 1)  # big.jpg (and a.jpg) over the cap
    by_offset = thumbs._indexed_samples(plain, keys)
    assert set(by_offset) == {"a", "d", "bomb", "junk", "big"}  # no symlink, nothing for an absent key
    assert by_offset["a"][0]["jpg"] is None and len(by_offset["a"][0]["txt"]) == 4096  # over the cap; text cut
    assert thumbs.picture(*by_offset["big"]) == (None, "not shown: over 0 MiB")
    monkeypatch.setattr(thumbs, "MAX_MEMBER_BYTES", 64 << 20)
    by_offset = thumbs._indexed_samples(plain, keys)
    from curation.inputs import as_shard

    streamed = thumbs._raw_samples(as_shard(packed), keys, "test")  # gzip: no offsets, read_shard instead
    assert set(streamed) == set(by_offset)
    for found in (by_offset, streamed):
        jpeg, note = thumbs.picture(*found["a"])
        assert Image.open(io.BytesIO(jpeg)).size == (40, 30) and note == ""
        assert thumbs._text_of(found["a"][0]).startswith("a red\nsquare")
        jpeg, note = thumbs.picture(*found["d"])  # the document's first image, and how many it has
        assert Image.open(io.BytesIO(jpeg)).size == (20, 60) and note == "document, 2 images"
        assert thumbs.picture(*found["bomb"]) == (None, "not shown: too_many_pixels")
        assert thumbs.picture(*found["junk"])[0] is None and thumbs.picture(*found["junk"])[1].startswith("not shown")
