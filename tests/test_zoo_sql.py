"""`curate query` and the catalog are read-only and confined to the run's own Parquet;
`curate export llava` writes only under --out, whatever names a tier's data holds."""

import io
import json
import subprocess
import sys
import tarfile

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation.catalog import check_read_only, connect, query
from curation.errors import CurationError, InputError
from curation.tiers.export import export_llava


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def run_root(tmp_path):
    """A tiny output folder in the layout `curate run` writes: ledger, one tier with a
    tar + sidecar + manifest, intermediate annotations, and the raw folder's crawl ledger."""
    root, raw = tmp_path / "out", tmp_path / "raw"
    tier = root / "tiers" / "alignment"
    tier.mkdir(parents=True)
    (root / "_work" / "annotated").mkdir(parents=True)
    raw.mkdir()
    pd.DataFrame({"uid": ["u1", "u2", "u3"], "url": ["http://a/1", "http://a/2", "http://a/3"],
                  "stage": ["curate"] * 3, "status": ["kept", "dropped", "failed"],
                  "reason": [None, "duplicate_near", "decode_error"], "dup_of": [None, "u1", None],
                  "tier": ["alignment", None, None]}).to_parquet(root / "ledger.parquet")
    pd.DataFrame({"uid": ["u1"], "key": ["u1"], "kind": ["image_text"], "tier": ["alignment"], "text": ["a red circle"],
                  "media": [["jpg"]], "source_meta": [None]}).to_parquet(tier / "alignment-000000.parquet")
    _tar(tier / "alignment-000000.tar", [("u1.jpg", b"JPEG"), ("u1.txt", b"a red circle")])
    (tier / "manifest.json").write_text(json.dumps({"tier": "alignment", "pipeline": "t", "config_hash": "abc",
        "shards": [{"name": "alignment-000000.tar", "sidecar": "alignment-000000.parquet", "samples": 1,
                    "bytes": 3, "sha256": "x"}]}))
    pd.DataFrame({"uid": ["u1", "u2"], "phash": ["00ff", "00fe"]}).to_parquet(root / "_work" / "annotated" / "r0.parquet")
    pd.DataFrame({"uid": ["u4"], "status": ["dropped"], "reason": ["http_404"]}).to_parquet(raw / "crawl_ledger-image_text.parquet")
    (root / "_work" / "run.json").write_text(json.dumps({"input": str(raw)}))
    # files a query must never reach
    (tmp_path / "secret.csv").write_text("password\nhunter2\n")
    pd.DataFrame({"secret": ["hunter2"]}).to_parquet(tmp_path / "secret.parquet")
    return root


def refused(sql, root, *, match):
    with pytest.raises(CurationError, match=match) as info:
        query(sql, root).fetchall()
    assert "hunter2" not in str(info.value)


# --- writes, extensions, settings --------------------------------------------------------

@pytest.mark.parametrize("sql, kind", [
    ("COPY ledger TO '{tmp}/leak.csv'", "COPY"),
    ("COPY (SELECT * FROM samples) TO '{tmp}/leak.parquet' (FORMAT parquet)", "COPY"),
    ("ATTACH '{tmp}/leak.duckdb' AS leak", "ATTACH"),
    ("EXPORT DATABASE '{tmp}/leakdir'", "EXPORT"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("RESET lock_configuration", "SET"),
    ("CREATE TABLE leak AS SELECT * FROM ledger", "CREATE"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("CALL pragma_version()", "CALL"),
    ("PIVOT ledger ON status", "MULTI"),
])
def test_writing_and_configuring_statements_are_refused(run_root, tmp_path, sql, kind):
    refused(sql.format(tmp=tmp_path), run_root, match=f"query refused: {kind} statements are not allowed")
    assert not list(tmp_path.glob("leak*"))


@pytest.mark.parametrize("sql", [
    "SELECT 1; COPY ledger TO '{tmp}/leak.csv'",
    "SELECT 1; SELECT 2",
    ";;",
    "",
])
def test_exactly_one_statement(run_root, tmp_path, sql):
    refused(sql.format(tmp=tmp_path), run_root, match="query refused")
    assert not list(tmp_path.glob("leak*"))


def test_explain_only_of_a_select(run_root, tmp_path):
    refused(f"EXPLAIN ANALYZE COPY ledger TO '{tmp_path}/leak.csv'", run_root, match="EXPLAIN is allowed only of one SELECT")
    refused("EXPLAIN ANALYZE/**/CREATE TABLE leak AS SELECT 1", run_root, match="query refused")
    assert query("EXPLAIN SELECT count(*) FROM ledger", run_root).fetchall()
    assert not list(tmp_path.glob("leak*"))


# --- reading outside the run ---------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM read_csv('{tmp}/secret.csv')",
    "SELECT * FROM read_csv_auto('{tmp}/secret.csv')",
    "SELECT * FROM '{tmp}/secret.csv'",
    "SELECT * FROM read_parquet('{tmp}/secret.parquet')",
    "SELECT * FROM read_parquet('{root}/tiers/alignment/../../../secret.parquet')",
    "SELECT * FROM read_text('{root}/tiers/alignment/manifest.json')",   # the run's own, but not its Parquet
    "SELECT * FROM read_blob('{root}/tiers/alignment/alignment-000000.tar')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM glob('{root}/*')",
    "SELECT * FROM read_json_auto('/etc/os-release')",
    "SELECT * FROM sniff_csv('{tmp}/secret.csv')",
    "SELECT * FROM parquet_metadata('{tmp}/secret.parquet')",
    "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    "SELECT * FROM query('SELECT * FROM read_text(''/etc/passwd'')')",
])
def test_reads_outside_the_run_are_refused(run_root, tmp_path, sql):
    # DuckDB refuses at bind time (CurationError from query) or, for some table
    # functions, when rows are fetched (a duckdb.Error that `curate query` reports)
    with pytest.raises((CurationError, duckdb.Error), match="Permission Error") as info:
        query(sql.format(tmp=tmp_path, root=run_root), run_root).fetchall()
    assert "hunter2" not in str(info.value) and "root:" not in str(info.value)


def test_python_variables_are_not_tables(run_root):
    secret_frame = pd.DataFrame({"secret": ["hunter2"]})  # noqa: F841 - what a replacement scan would find
    refused("SELECT * FROM secret_frame", run_root, match="query failed")


def test_the_python_connection_is_locked_too(run_root, tmp_path):
    con = connect(run_root)
    for sql in (f"COPY ledger TO '{tmp_path}/leak.csv'", "SELECT * FROM read_text('/etc/passwd')",
                "SET enable_external_access = true", "SET allowed_paths = ['/etc/passwd']", "INSTALL httpfs",
                f"ATTACH '{tmp_path}/leak.duckdb'", "SET autoload_known_extensions = true"):
        with pytest.raises(duckdb.Error):
            con.execute(sql).fetchall()
    assert not list(tmp_path.glob("leak*"))


def test_check_read_only_accepts_reading_forms():
    for sql in ("SELECT 1", "WITH a AS (SELECT 1) SELECT * FROM a", "FROM ledger", "DESCRIBE samples", "SHOW TABLES",
                "SUMMARIZE ledger", "VALUES (1)", "-- a comment\nSELECT 1;", "EXPLAIN (FORMAT json) SELECT 1"):
        check_read_only(sql)


# --- what must keep working -----------------------------------------------------------

def test_readme_queries_and_views(run_root):
    con = connect(run_root.parent / "out")
    rows = con.sql("SELECT stage, status, reason, count(*) AS n FROM ledger GROUP BY ALL ORDER BY n DESC").fetchall()
    assert sum(r[3] for r in rows) == 3
    assert con.sql("SELECT tier, sum(samples) AS samples, sum(bytes) AS bytes FROM shards GROUP BY tier").fetchall() \
        == [("alignment", 1, 3)]
    assert sorted(query("SELECT reason, count(*) FROM ledger WHERE status <> 'kept' GROUP BY reason", run_root).fetchall()) \
        == [("decode_error", 1), ("duplicate_near", 1)]
    assert query("SELECT uid, url, dup_of FROM ledger WHERE reason = 'duplicate_near'", run_root).fetchall() \
        == [("u2", "http://a/2", "u1")]
    assert query("SELECT uid, text FROM samples", run_root).fetchall() == [("u1", "a red circle")]
    assert query("SELECT reason FROM crawl_ledger", run_root).fetchall() == [("http_404",)]
    assert {r[0] for r in query("DESCRIBE samples", run_root).fetchall()} >= {"uid", "tier", "text"}


def test_the_report_can_still_join_the_annotations(run_root):
    con = connect(run_root)  # what curation.report does
    annotated = run_root / "_work" / "annotated"
    con.execute(f"CREATE VIEW annotated AS SELECT a.uid, a.phash, l.reason, l.dup_of "
                f"FROM read_parquet('{annotated}/*.parquet', union_by_name=true) a JOIN ledger l USING (uid)")
    assert sorted(con.sql("SELECT uid, phash FROM annotated").fetchall()) == [("u1", "00ff"), ("u2", "00fe")]


def test_cli_refusal_and_output_formats(run_root, tmp_path):
    """Through the real `curate` command (one process for each: slow, so only here)."""
    def curate(*args):
        return subprocess.run([sys.executable, "-m", "curation.cli", "query", *args, "--root", str(run_root)],
                              capture_output=True, text=True, timeout=120)

    bad = curate(f"COPY ledger TO '{tmp_path}/leak.csv'")
    assert bad.returncode == 2 and bad.stderr.startswith("curate: error: query refused") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "leak.csv").exists()
    out = tmp_path / "q.parquet"
    good = curate("SELECT status, count(*) AS n FROM ledger GROUP BY status ORDER BY status", "--format", "parquet",
                  "--output", str(out))
    assert good.returncode == 0, good.stderr
    assert pq.read_table(out).to_pydict() == {"status": ["dropped", "failed", "kept"], "n": [1, 1, 1]}


# --- export confinement -----------------------------------------------------------------

def _hostile_tier(run_root):
    """A tier whose data names paths outside any output folder, next to good samples."""
    tier = run_root / "tiers" / "alignment"
    rows = [
        ("u1", "u1", "image_text", ["jpg"]),
        ("u5", "../../evil", "image_text", ["jpg"]),            # key climbs out
        ("u6", "/tmp/abs_evil", "image_text", ["jpg"]),         # absolute key
        ("u7", "k7", "interleaved", ["0.jpg", "../../../x.jpg"]),  # media name climbs out
        ("u8", "k8", "image_text", ["jp\u0000g"]),             # NUL in a media name
        ("u9", "k9", "video", ["../../clip.mp4"]),              # video member name climbs out
        ("u10", "k10", "video", ["mp4"]),
        ("u11", "k11", "image_text", []),                       # lists no media
    ]
    pd.DataFrame({"uid": [r[0] for r in rows], "key": [r[1] for r in rows], "kind": [r[2] for r in rows],
                  "media": [r[3] for r in rows], "text": ["a caption"] * len(rows),
                  "source_meta": ['{"qa": "not json ['] + [None] * (len(rows) - 1)}
                 ).to_parquet(tier / "alignment-000000.parquet")
    _tar(tier / "alignment-000000.tar", [
        ("u1.jpg", b"JPEG1"), ("../../evil.jpg", b"EVIL"), ("/tmp/abs_evil.jpg", b"EVIL"),
        ("k7.0.jpg", b"JPEG7"), ("k7.../../../x.jpg", b"EVIL"), ("k8.jpg", b"JPEG8"),
        ("k9.mp4", b"EVIL"), ("k10.mp4", b"MP4"), ("k11.jpg", b"JPEG11"), ("stray.jpg", b"EVIL")])
    manifest = json.loads((tier / "manifest.json").read_text())
    manifest["shards"].append({"name": "../../../../etc/passwd", "sidecar": "x.parquet", "samples": 0, "bytes": 0,
                               "sha256": ""})
    (tier / "manifest.json").write_text(json.dumps(manifest))


def test_export_skips_hostile_names_and_writes_only_under_out(run_root, tmp_path):
    _hostile_tier(run_root)
    out = tmp_path / "deep" / "er" / "llava"
    result = export_llava(run_root, "alignment", out)
    records = json.loads((out / "alignment.json").read_text())
    assert sorted(r["id"] for r in records) == ["u1", "u10"]
    assert (out / "images" / "alignment" / "u1.jpg").read_bytes() == b"JPEG1"
    assert (out / "videos" / "alignment" / "k10.mp4").read_bytes() == b"MP4"
    reasons = {s["key"]: s["reason"] for s in result["skipped"]}
    assert "unsafe key" in reasons["'../../evil'"] and "unsafe key" in reasons["'/tmp/abs_evil'"]
    assert "unsafe media name" in reasons["'k7'"] and "unsafe media name" in reasons["'k8'"]
    assert "\\x00" in reasons["'k8'"]  # shown escaped, never raw
    assert "unsafe media name" in reasons["'k9'"] and "no media listed" in reasons["'k11'"]
    assert "not in the sidecar" in reasons["'stray'"]
    assert any(s["key"] is None and "unsafe shard name" in s["reason"] for s in result["skipped"])
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - {p for p in run_root.rglob("*")}
    written -= {tmp_path / "secret.csv", tmp_path / "secret.parquet"} | set((tmp_path / "raw").rglob("*"))
    assert all(p.is_relative_to(out) for p in written), written
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "deep" / "evil.jpg").exists()
    assert not list(tmp_path.rglob("*evil*")) and not list(tmp_path.rglob("clip.mp4"))


def test_export_does_not_follow_a_planted_symlink(run_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "llava"
    (out / "images").mkdir(parents=True)
    (out / "images" / "alignment").symlink_to(elsewhere)
    result = export_llava(run_root, "alignment", out)
    assert result["records"] == 0 and "leaves" in result["skipped"][0]["reason"]
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("tier", ["../alignment", "/etc", "alignment/../../x", "a\x00b", ".."])
def test_export_tier_name_is_checked(run_root, tmp_path, tier):
    with pytest.raises(InputError, match="not a tier name"):
        export_llava(run_root, tier, tmp_path / "o")
    assert not (tmp_path / "o").exists()
