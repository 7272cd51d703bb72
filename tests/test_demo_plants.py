"""What the small demo plants for issue 15, measured on the session's demo (`demo_out`):
opt-out signals its server publishes (robots.txt, tdmrep.json, ai.txt, the tdm-reservation
and X-Robots-Tag headers) refuse exactly the urls planted for each, `curate
recheck-optout` on its output drops exactly what a new rule refuses, and the
video_clips recipe cuts its multi-scene videos at the planted cuts (stages A and B
without Ray: the recipe's operators, stage B's decisions and the final ledger)."""

import json
import shutil
from collections import Counter

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation import annotate, config, decide
from curation.crawl.recheck import recheck_optout
from curation.demo.corpus import OPTOUT_DECOYS, OPTOUT_PLANTS, ROBOTS_TXT, VIDEO_CLIPS_LIMITS, CorpusPlan
from curation.demo.truth import clip_counts, optout_outcomes
from curation.tiers.verify import verify

from .test_video_clips import Acks

# The rule each signal names when it refuses a planted url (corpus.py's files and headers).
RULES = {"robots": "Disallow: /files/optout/robots/",
         "tdmrep": "location /files/optout/tdm/*: tdm-reservation 1, tdm-policy https://example.org/demo-tdm-policy.json",
         "ai_txt": "Disallow: *.jpeg", "tdm_header": "tdm-reservation: 1", "x_robots_tag": "X-Robots-Tag: noai"}
HOST_FILES = {"robots": "/robots.txt", "tdmrep": "/.well-known/tdmrep.json", "ai_txt": "/ai.txt"}


@pytest.fixture(scope="module")
def crawl_rows(demo_out):
    return optout_outcomes(demo_out)


def test_each_planted_optout_is_refused_by_its_own_signal_and_nothing_else_is(demo_out, crawl_rows):
    rows = crawl_rows
    for planted, (_, signal, reason) in OPTOUT_PLANTS.items():
        group = rows[rows["planted"] == planted]
        assert len(group) == CorpusPlan.small().optout, planted
        assert (group["status"] == "dropped").all() and (group["reason"] == reason).all(), planted
        assert (group["refused_by"] == signal).all(), (planted, group["refused_by"].tolist())
        for error, evidence in zip(group["error"], group["optout_evidence"]):
            refused = evidence[-1]  # the first refusal settles it: it is the last entry
            assert (refused["signal"], refused["outcome"], refused["rule"]) == (signal, "refused", RULES[signal])
            assert error.endswith(RULES[signal]) and refused["fetched_at"] is not None
            if signal in HOST_FILES:  # the host file that refused it, named in the error
                assert refused["source"].endswith(HOST_FILES[signal]) and error.startswith(refused["source"])
    others = rows[~rows["planted"].isin(list(OPTOUT_PLANTS))]
    assert others["refused_by"].isna().all() and not others["reason"].fillna("").str.startswith("opt_out").any()
    assert not others["error"].fillna("").str.contains("opt_out").any()  # no document lost an image to one
    decoys = rows[rows["planted"] == "optout_decoy"]
    assert len(decoys) == len(OPTOUT_DECOYS) * CorpusPlan.small().optout_decoys and (decoys["status"] == "kept").all()
    # the run's ledger carries the crawl's refusals, and its summary counts them
    ledger = pd.read_parquet(demo_out / "curated" / "ledger.parquet")
    refused = ledger[ledger["reason"].fillna("").str.startswith("opt_out")]
    assert sorted(refused["uid"]) == sorted(rows.loc[rows["planted"].isin(list(OPTOUT_PLANTS)), "uid"])
    assert (refused["stage"] == "crawl").all()
    summary = json.loads((demo_out / "curated" / "summary.json").read_text())
    counted = {r["reason"]: r["count"] for r in summary["by_stage_status_reason"] if r["reason"].startswith("opt_out")}
    per_signal = CorpusPlan.small().optout
    assert counted == {r: n * per_signal for r, n in Counter(reason for _, _, reason in OPTOUT_PLANTS.values()).items()}


def test_allowed_samples_record_which_signals_were_checked_and_when(crawl_rows):
    kept = crawl_rows[crawl_rows["status"] == "kept"]
    assert len(kept) > 100
    for source, evidence in zip(kept["source"], kept["optout_evidence"]):
        signals = [e["signal"] for e in evidence]
        # img2dataset's listing keeps the host files' entries; documents and videos the headers' too
        expected = ["robots", "tdmrep", "ai_txt"] + ([] if source == "urls" else ["tdm_header", "x_robots_tag"])
        assert signals[:len(expected)] == expected and set(signals) == set(expected), (source, signals)
        assert {e["outcome"] for e in evidence} == {"allowed"}
        assert all(e["fetched_at"] and e["http_status"] == 200 for e in evidence)
        robots = evidence[0]
        assert robots["source"].endswith("/robots.txt") and robots["target"].startswith(robots["source"][:-len("robots.txt")])
    # the decoys: the rule that let each through is on record
    decoys = crawl_rows[crawl_rows["planted"] == "optout_decoy"]
    rules = {e["rule"] for ev in decoys["optout_evidence"] for e in ev}
    assert "Allow: /files/optout/robots/public/" in rules
    assert "location /files/optout/tdm/free/*: tdm-reservation 0" in rules


def test_recheck_optout_on_the_demo_drops_exactly_what_a_new_rule_refuses(demo_out, tmp_path):
    """tests/test_optout.py covers the rebuild on its own data; here, the demo's run with
    one more Disallow for our crawler."""
    root = tmp_path / "curated"
    shutil.copytree(demo_out / "curated", root, ignore=shutil.ignore_patterns("_work"))
    (root / "_work").mkdir()
    shutil.copy(demo_out / "curated" / "_work" / "run.json", root / "_work" / "run.json")  # names the crawl ledgers
    ledger = pd.read_parquet(root / "ledger.parquet")
    host = ledger["url"].dropna().iloc[0].split("/files/")[0]
    kept = ledger[ledger["status"] == "kept"]
    newly = kept[kept["url"].fillna("").str.startswith(host + "/files/scene/0001")]
    assert 3 <= len(newly) and newly["shard"].nunique() < kept["shard"].nunique()
    tiers = root / "tiers"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tiers.glob("*/*.tar")}
    rules = tmp_path / "rules.yaml"
    rules.write_text(json.dumps({"hosts": {host: {"robots": ROBOTS_TXT + "Disallow: /files/scene/0001\n"}}}))
    result = recheck_optout(root, rules_path=rules)
    assert result["removed"] == len(newly) and result["reasons"] == {"opt_out_recheck:robots": len(newly)}
    losing = {f"{t}/{s}" for t, s in zip(newly["tier"], newly["shard"])}
    assert set(result["shards_rewritten"]) | set(result.get("shards_removed", [])) == losing
    for path, (data, mtime) in before.items():
        if f"{path.parent.name}/{path.name}" not in losing:
            assert (path.read_bytes(), path.stat().st_mtime_ns) == (data, mtime), path
    after = pd.read_parquet(root / "ledger.parquet").set_index("uid")
    assert len(after) == len(ledger)
    assert set(after.index[after["reason"] == "opt_out_recheck:robots"]) == set(newly["uid"])
    assert after.loc[newly["uid"], "error"].str.endswith("/robots.txt: Disallow: /files/scene/0001").all()
    assert verify(root)[1] == []


def test_video_clips_recipe_cuts_the_demo_videos_at_their_planted_cuts(demo_out, tmp_path):
    cfg = config.load("video_clips")
    (clips_op,) = [s for s in cfg.map_ops if s.name == "video_clips"]
    assert {k: getattr(clips_op.params, k) for k in VIDEO_CLIPS_LIMITS} == VIDEO_CLIPS_LIMITS  # what the truth assumes
    shards = sorted((demo_out / "raw").glob("video-*.tar"))
    annotated = tmp_path / "annotated"
    acks = []
    for table in annotate.read_raw_shards({"path": [str(p) for p in shards], "source": ["videos"] * len(shards)}):
        for stage in annotate.fuse(cfg.map_ops):
            table = annotate.StageActor(stage, cfg.declared_columns)(table.to_pandas())
        acks.append(annotate.write_parts(table, str(annotated), cfg.tiers, cfg.seed, cfg.declared_columns))
    counts = {p.name: pq.read_table(p.with_suffix(".parquet")).num_rows for p in shards}
    annotate._collect(Acks(acks), counts, annotated, bar=type("B", (), {"update": lambda *_: None})())
    parts = [part for p in shards for part in annotate.committed_parts(annotated, p)]
    decision = decide.decide(cfg, parts, [p.name for p in shards], tmp_path / "work", binary_columns=annotate.BINARY_COLUMNS)
    ledger_path = tmp_path / "ledger.parquet"
    decide.finalize_ledger(decision.ledger, [demo_out / "raw" / "crawl_ledger-video.parquet"], ledger_path)
    ledger = pd.read_parquet(ledger_path)
    bounds = pq.read_table(decision.sidecars, columns=["uid", "clip_start", "clip_end"]).to_pandas()  # the tiers' rows

    made = clip_counts(demo_out / "corpus", ledger.merge(bounds, on="uid", how="left"))
    plan = CorpusPlan.small()
    assert Counter(made["planted"]) == {"one_scene": plan.videos, "multi_scene": plan.multi_scene_videos}
    # hard cuts: every planted clip, exactly, each bound within one frame (8 fps)
    assert (made["made"] == made["expected"]).all(), made[["path", "expected", "made"]]
    for got, want in zip(made["bounds"], made["expected_bounds"]):
        assert all(abs(a - x) <= 0.125 and abs(b - y) <= 0.125 for (a, b), (x, y) in zip(got, want)), (got, want)
    multi = made["planted"] == "multi_scene"
    assert (made.loc[multi, "parent_reason"] == "split_into_clips").all() and made.loc[~multi, "parent_reason"].isna().all()
    # each clip: its own uid and ledger row, kept, naming its parent; inputs still = the crawl's rows
    clips = ledger[ledger["parent_uid"].notna()]
    assert len(clips) == made["expected"].sum() and clips["uid"].is_unique and (clips["status"] == "kept").all()
    assert set(clips["parent_uid"]) == set(ledger.loc[ledger["reason"] == "split_into_clips", "uid"])
    inputs = ledger[ledger["parent_uid"].isna()]
    assert len(inputs) == len(pd.read_parquet(demo_out / "raw" / "crawl_ledger-video.parquet"))
    assert dict(Counter(inputs["status"])) == {"kept": plan.videos, "dropped": plan.multi_scene_videos}
    assert {s["tier"]: s["samples"] for s in decision.shards} == {"video_clips": len(clips), "video_whole": plan.videos}
