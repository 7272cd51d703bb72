"""The small demo, end to end through the real CLI: every url accounted for, planted
problems caught, and the tiers readable by webdataset, HF datasets and DuckDB."""

import hashlib
import json
import tarfile

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation import schemas
from curation.catalog import connect

from curation.rawshards import count_samples

from .conftest import curate
from .rawgen import write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_root(demo_out):
    return demo_out / "curated"


@pytest.fixture(scope="module")
def outcomes(demo_out, run_root):
    """Ledger joined to the corpus's planted truth (url list row -> truth row)."""
    urls = pd.read_parquet(demo_out / "urls.parquet")
    truth = pd.read_parquet(demo_out / "corpus" / "truth.parquet")
    urls["planted"] = truth["planted"].values
    ledger = pd.read_parquet(run_root / "ledger.parquet")
    return ledger.merge(urls[["url", "planted"]], on="url", how="left")


def test_every_url_is_in_the_ledger_exactly_once(demo_out, run_root):
    ledger = pd.read_parquet(run_root / "ledger.parquet")
    n_inputs = (len(pd.read_parquet(demo_out / "urls.parquet")) + len(pd.read_parquet(demo_out / "videos.parquet"))
                + sum(1 for _ in open(demo_out / "documents.jsonl")))
    assert len(ledger) == n_inputs and ledger["uid"].is_unique
    assert set(ledger["source"]) == {"urls", "documents", "videos"}
    assert set(ledger["status"]) == {"kept", "dropped", "failed"}
    schemas.validate_rows("ledger", schemas.records(ledger, "ledger"))
    summary = json.loads((run_root / "summary.json").read_text())
    assert sum(summary["curate"].values()) == summary["raw_samples"] == (ledger["stage"] == "curate").sum()


@pytest.mark.parametrize("planted, status, reasons", [
    ("missing", "failed", {"http_error"}),
    ("truncated", "failed", {"decode_error"}),
    ("random_bytes", "dropped", {"not_image"}),  # caught by the crawl's header check
    ("html", "dropped", {"not_image"}),
    ("huge", "dropped", {"too_many_pixels"}),
    ("tiny", "dropped", {"too_small"}),
    ("elongated", "dropped", {"bad_aspect_ratio"}),
    ("short_caption", "dropped", {"no_caption", "caption_too_short"}),
])
def test_planted_problems_end_as_expected(outcomes, planted, status, reasons):
    rows = outcomes[outcomes["planted"] == planted]
    assert len(rows) > 0
    assert (rows["status"] == status).all(), rows[["status", "reason"]].value_counts()
    assert set(rows["reason"]) <= reasons
    if status == "failed":
        assert rows["error"].notna().all()


def test_duplicates_removed_and_originals_kept(outcomes):
    copies = outcomes[outcomes["planted"].isin(["exact_dup", "near_dup"])]
    scenes = outcomes[outcomes["planted"] == "scene"]
    # Each copy group keeps exactly one member: the copy or its original, not both.
    n_dup_drops = outcomes["reason"].isin(["duplicate_exact", "duplicate_near"]).sum()
    assert n_dup_drops >= 0.95 * len(copies)
    # A scene is kept, or lost to its own planted copy (exact_dedup keeps the larger image,
    # then the lower uid, so an original can be the one dropped); anything else is rare.
    lost_to_copy = scenes["reason"].isin(["duplicate_exact", "duplicate_near"])
    assert ((scenes["status"] == "kept") | lost_to_copy).mean() > 0.95
    assert lost_to_copy.sum() <= len(copies)
    dup_of = outcomes.loc[outcomes["reason"] == "duplicate_exact", "dup_of"]
    assert dup_of.isin(outcomes.loc[outcomes["status"] == "kept", "uid"]).all()


IMAGE_TIERS = ("alignment", "captioned_detail", "ocr_rich")


def test_ocr_routes_the_signs(outcomes, run_root):
    signs = outcomes[(outcomes["planted"] == "text_sign") & (outcomes["status"] == "kept")]
    assert len(signs) > 0 and (signs["tier"] == "ocr_rich").mean() >= 0.9  # OCR read the words
    in_tier = outcomes[outcomes["tier"] == "ocr_rich"]
    assert (in_tier["planted"] == "text_sign").mean() >= 0.75
    side = pq.read_table(sorted((run_root / "tiers" / "ocr_rich").glob("*.parquet"))[0]).to_pandas()
    assert side["ocr_text"].str.len().min() >= 3 and side["ocr_model"].str.startswith("rapidocr-").all()
    assert (side["language"] == "en").mean() > 0.9


def tier_tars(run_root, tiers=None):
    return sorted(t for t in (run_root / "tiers").glob("*/*.tar") if tiers is None or t.parent.name in tiers)


def test_manifests_match_files(run_root):
    for manifest_path in (run_root / "tiers").glob("*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        schemas.validate_document("manifest", manifest)
        for s in manifest["shards"]:
            data = (manifest_path.parent / s["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
            side = pq.read_table(manifest_path.parent / s["sidecar"])
            assert side.num_rows == s["samples"]


def test_sidecar_has_the_tar_samples_in_tar_order(run_root):
    for tar_path in tier_tars(run_root):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
        keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
        side = pq.read_table(tar_path.with_suffix(".parquet")).to_pandas()
        assert keys == side["key"].tolist()
        for key, media in zip(side["key"], side["media"]):
            assert {n.split(".", 1)[1] for n in names if n.startswith(key + ".")} == {*media, "txt", "json"}
        assert (side["shard"] == tar_path.name).all() and (side["tier"] == tar_path.parent.name).all()


def test_webdataset_reads_the_tiers(run_root):
    import webdataset as wds

    tars = tier_tars(run_root, IMAGE_TIERS)
    ds = wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    n = 0
    for key, img, txt, meta in ds:
        assert img.size == (meta["width"], meta["height"])
        assert txt == meta["text"] and meta["uid"] == key and meta["status"] == "kept"
        n += 1
    assert n == sum(pq.ParquetFile(t.with_suffix(".parquet")).metadata.num_rows for t in tars)


def test_hf_datasets_reads_a_tier(run_root, tmp_path):
    from datasets import load_dataset

    tier = run_root / "tiers" / "alignment"
    manifest = json.loads((tier / "manifest.json").read_text())
    # By the tier folder, as README says: its card declares the columns. The bare webdataset
    # builder infers them from the first 5 samples, and fails when an optional list
    # (ocr_boxes) is empty in those and filled later (the small demo's alignment tier). A
    # cache of its own: the shared one can answer with another demo's tier of the same name.
    ds = load_dataset(str(tier), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == manifest["num_samples"]
    row = ds[0]
    assert row["jpg"].size[0] > 0 and row["json"]["tier"] == tier.name and isinstance(row["txt"], str)


def scalar(con, sql):
    return con.sql(sql).fetchall()[0][0]


def test_duckdb_views(run_root):
    con = connect(run_root)
    kept = scalar(con, "SELECT count(*) FROM ledger WHERE status = 'kept'")
    assert scalar(con, "SELECT count(*) FROM samples") == kept
    by_tier = dict(con.sql("SELECT tier, sum(samples) FROM shards GROUP BY tier").fetchall())
    assert by_tier == dict(con.sql("SELECT tier, count(*) FROM samples GROUP BY tier").fetchall())
    # the sidecars are plain parquet: DuckDB reads them without the catalog too
    direct = scalar(duckdb, f"SELECT count(*) FROM read_parquet('{run_root}/tiers/*/*.parquet')")
    assert direct == kept


def test_query_cli_formats(run_root, tmp_path):
    sql = "SELECT status, count(*) AS n FROM ledger GROUP BY status ORDER BY status"
    table = curate("query", sql, "--root", run_root).stdout
    assert "kept" in table and "dropped" in table
    csv = curate("query", sql, "--root", run_root, "--format", "csv").stdout.splitlines()
    assert csv[0] == "status,n" and len(csv) == 4
    lines = [json.loads(x) for x in curate("query", sql, "--root", run_root, "--format", "json").stdout.split("\n") if x]
    assert {r["status"] for r in lines} == {"kept", "dropped", "failed"}
    out = tmp_path / "q.parquet"
    curate("query", sql, "--root", run_root, "--format", "parquet", "--output", out)
    assert pq.read_table(out).num_rows == 3
    bad = curate("query", "SELECT nope FROM samples", "--root", run_root, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr


def test_documents_and_videos_reach_their_tiers(run_root):
    import av

    docs = pq.read_table(run_root / "tiers" / "documents" / "documents-000000.parquet").to_pandas()
    assert len(docs) >= 3 and (docs["kind"] == "interleaved").all()
    with tarfile.open(run_root / "tiers" / "documents" / "documents-000000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    for row in docs.itertuples():
        doc = row.doc
        members = [it["member"] for it in doc["items"] if it["type"] == "image"]
        assert members == [f"{i}.jpg" for i in range(row.num_images)]  # ordered, one per image
        for m in members:
            assert files[f"{row.key}.{m}"][:2] == b"\xff\xd8"
    videos = pq.read_table(run_root / "tiers" / "video" / "video-000000.parquet").to_pandas()
    assert len(videos) >= 2 and (videos["duration"] > 1).all() and (videos["codec"] == "h264").all()
    with tarfile.open(run_root / "tiers" / "video" / "video-000000.tar") as tar:
        clip = tar.extractfile(f"{videos['key'][0]}.mp4").read()
    import io

    with av.open(io.BytesIO(clip)) as container:
        assert sum(1 for _ in container.decode(video=0)) == videos["num_frames"][0]


def test_verify_passes_then_names_a_flipped_byte(run_root, tmp_path):
    import shutil

    ok = curate("verify", "--root", run_root)
    assert ok.stdout.startswith("OK:")
    copy = tmp_path / "copy"
    shutil.copytree(run_root, copy, ignore=shutil.ignore_patterns("_work"))
    victim = sorted((copy / "tiers" / "alignment").glob("*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    (copy / "tiers" / "alignment" / "stray.tar").write_bytes(b"")
    bad = curate("verify", "--root", copy, check=False)
    assert bad.returncode == 1
    assert f"MISMATCH alignment/{victim.name}: sha256 differs" in bad.stdout
    assert "MISMATCH alignment/stray.tar: not listed in manifest.json" in bad.stdout


def test_demo_writes_a_report_with_plots(run_root):
    page = (run_root / "report.html").read_text()  # opened in Chromium by tests/test_report.py
    for section in ("funnel", "tiers", "token_bill", "distributions", "kept_samples", "dropped_samples", "throughput"):
        assert f"id='{section}'" in page, section
    assert "data-plot='clip_score'" in page and "data-plot='language'" in page and "data-plot='ocr_length'" in page
    total = len(pd.read_parquet(run_root / "ledger.parquet"))
    assert f"{total} inputs" in page


def test_rerun_is_a_no_op(demo_out, run_root):
    before = {p: p.stat().st_mtime_ns for p in tier_tars(run_root)}
    proc = curate("run", "pipelines/demo.yaml", "--input", demo_out / "raw", "--out", run_root)
    assert "ledger:" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in tier_tars(run_root)} == before


def test_a_corrupt_shard_costs_only_its_samples_and_a_missing_input_is_one_line(demo_out, tmp_path):
    missing = curate("run", "pipelines/demo.yaml", "--input", tmp_path / "nope", "--out", tmp_path / "o", check=False)
    assert missing.returncode == 2 and "input folder not found" in missing.stderr and "Traceback" not in missing.stderr
    raw = tmp_path / "raw"
    raw.mkdir()
    good = sorted((demo_out / "raw").glob("image_text-*.tar"))[0]
    (raw / good.name).write_bytes(good.read_bytes())
    (raw / "99999.tar").write_bytes(good.read_bytes()[:1500] + b"\x00garbage" * 50)
    recipe = write_recipe(tmp_path / "cheap.yaml")
    curate("run", recipe, "--input", raw, "--out", tmp_path / "o")
    ledger = pd.read_parquet(tmp_path / "o" / "ledger.parquet")
    bad = ledger[ledger["raw_shard"] == "99999.tar"]
    assert len(bad) >= 1 and set(bad["status"]) == {"failed"}
    assert set(bad["reason"]) <= {"truncated_member", "unreadable_shard"}
    assert (ledger["raw_shard"] == good.name).sum() == count_samples(good) > 0


def test_query_failing_at_execution_is_one_line(run_root, tmp_path):
    proc = curate("query", "SELECT CAST(uid AS INTEGER) FROM ledger", "--root", run_root, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "query failed" in proc.stderr
    proc = curate("query", "SELECT 1", "--root", run_root, "--format", "csv", "--output", tmp_path / "no" / "x.csv",
                  check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot write" in proc.stderr


def test_an_empty_raw_shard_is_fine(demo_out, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    first = sorted((demo_out / "raw").glob("image_text-*.tar"))[0]
    (raw / first.name).write_bytes(first.read_bytes())
    with tarfile.open(raw / "zz-empty.tar", "w"):
        pass
    # the cheap recipe: what is tried is the empty shard, not the models (the demo recipe cost ~100 s here)
    curate("run", write_recipe(tmp_path / "cheap.yaml"), "--input", raw, "--out", tmp_path / "o")
    assert (tmp_path / "o" / "_SUCCESS").exists()
    ledger = pd.read_parquet(tmp_path / "o" / "ledger.parquet")
    assert set(ledger["raw_shard"]) == {first.name} and len(ledger) > 0  # the empty shard holds no sample


def test_overlapping_raw_shards_cost_only_the_second_copies(demo_out, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    first = sorted((demo_out / "raw").glob("image_text-*.tar"))[0]
    for name in ("a.tar", "b.tar"):
        (raw / name).write_bytes(first.read_bytes())
    recipe = write_recipe(tmp_path / "cheap.yaml")
    curate("run", recipe, "--input", raw, "--out", tmp_path / "o")
    ledger = pd.read_parquet(tmp_path / "o" / "ledger.parquet")
    second = ledger[ledger["raw_shard"] == "b.tar"]
    assert len(second) == (ledger["raw_shard"] == "a.tar").sum() > 0
    assert set(second["reason"]) == {"duplicate_uid"} and second["error"].str.contains("also claimed by a.tar").all()


def test_a_demo_folder_of_another_corpus_build_is_refused_not_mixed(tmp_path):
    from curation.demo import corpus
    from curation.demo.run import run_demo
    from curation.errors import InputError

    old = {**corpus.build_params(plan=corpus.CorpusPlan.small()), "version": "6"}
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "corpus.json").write_text(json.dumps({"params": old}))
    (tmp_path / "raw").mkdir()  # its crawl of that older corpus
    with pytest.raises(InputError, match="another corpus build .*version 6.*raw"):
        run_demo(tmp_path, small=True, log=lambda m: None)
    assert json.loads((tmp_path / "corpus" / "corpus.json").read_text())["params"] == old  # nothing rebuilt
