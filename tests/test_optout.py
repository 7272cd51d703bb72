"""Opt-out evidence: robots.txt (RFC 9309), TDMRep (tdmrep.json and the tdm-reservation
header), ai.txt; what each crawled sample records; `curate recheck-optout` rewriting only
the tier shards that lose samples. Every request goes to servers started here on
127.0.0.1."""

from __future__ import annotations

import json
import os
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pyarrow.parquet as pq
import pytest

from curation import schemas
from curation.cli import main
from curation.crawl.fetch import FetchPolicy, fetch
from curation.crawl.media import crawl_media
from curation.crawl.optout import OptOutPolicy, evaluate, matches, most_specific, parse_robots, record_from_text
from curation.crawl.recheck import recheck_optout
from curation.demo.server import serve
from curation.tiers.verify import verify
from curation.tiers.writer import write_manifest, write_shard

from .servers import jpeg_bytes

LOOPBACK = ("127.0.0.1/32",)
ROBOTS = """# comments and unknown lines are ignored
User-agent: otherbot
Disallow: /

User-agent: *
Disallow: /

User-agent: Curation-VLM
Disallow: /private/
Allow: /private/ok$
Disallow: /*.png$
"""
AI_TXT = "User-Agent: *\nDisallow: *.gif\n"
TDMREP = json.dumps([{"location": "/reserved/*", "tdm-reservation": 1, "tdm-policy": "https://example.com/policy.json"},
                     {"location": "/reserved/free/*", "tdm-reservation": 0}])


class Signals(BaseHTTPRequestHandler):
    """Serves its class-level `files` (path -> (status, body, headers)); jpegs elsewhere."""

    protocol_version = "HTTP/1.1"
    files: dict = {}
    hits: Counter = Counter()

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        Signals.hits[path] += 1
        if path in Signals.files:
            status, body, headers = Signals.files[path]
        elif path.endswith((".jpg", ".png", ".gif", "/ok")):
            status, body, headers = 200, jpeg_bytes(len(path)), []
        else:
            status, body, headers = 404, b"no", []
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def site():
    Signals.hits = Counter()
    Signals.files = {"/robots.txt": (200, ROBOTS.encode(), []), "/ai.txt": (200, AI_TXT.encode(), []),
                     "/.well-known/tdmrep.json": (200, TDMREP.encode(), []),
                     "/tdm-header.jpg": (200, jpeg_bytes(3), [("tdm-reservation", "1")])}
    with serve(Signals) as base:
        yield base


# --------------------------------------------------------------------------- rules
def test_robots_groups_and_precedence():
    ours = parse_robots(ROBOTS, "curation-vlm")
    assert ("/private/", False) in ours and ("/", False) not in ours  # our group only, not *
    assert most_specific(ours, "/private/x.jpg") == ("/private/", False)
    assert most_specific(ours, "/private/ok") == ("/private/ok$", True)  # longer pattern wins
    assert most_specific(ours, "/private/ok/more") == ("/private/", False)  # $ anchors
    assert most_specific(ours, "/a/b.png") == ("/*.png$", False)
    assert most_specific(ours, "/public.jpg") is None
    assert parse_robots(ROBOTS, "someone-else") == [("/", False)]  # the * group
    assert most_specific([("/a", False), ("/a", True)], "/a/x") == ("/a", True)  # a tie: allow
    assert parse_robots("User-agent: *\nDisallow:\n", "curation-vlm") == []  # empty disallow: nothing
    assert not matches("/" + "*a" * 300 + "b", "/" + "a" * 8000)  # no catastrophic backtracking


def test_ai_txt_and_tdmrep_evaluation():
    ai = record_from_text("http://h:80/ai.txt", AI_TXT)
    assert evaluate("ai_txt", ai, "http://h/x/anim.gif", "curation-vlm")["outcome"] == "refused"
    assert evaluate("ai_txt", ai, "http://h/x/photo.jpg", "curation-vlm")["outcome"] == "allowed"
    tdm = record_from_text("http://h:80/.well-known/tdmrep.json", TDMREP)
    refused = evaluate("tdmrep", tdm, "http://h/reserved/a.jpg", "curation-vlm")
    assert refused["outcome"] == "refused" and "tdm-policy https://example.com/policy.json" in refused["rule"]
    assert evaluate("tdmrep", tdm, "http://h/reserved/free/a.jpg", "curation-vlm")["outcome"] == "allowed"
    bad = evaluate("tdmrep", record_from_text("u", '{"not": "a list"}'), "http://h/a.jpg", "curation-vlm")
    assert bad["outcome"] == "invalid"  # malformed: reserves nothing, and says so
    assert evaluate("robots", record_from_text("u", None), "http://h/a", "curation-vlm")["outcome"] == "absent"


# --------------------------------------------------------------------------- fetch
def test_fetch_honours_each_signal_and_fetches_host_files_once(site):
    policy = FetchPolicy(allowed_networks=LOOPBACK, retries=0)
    cases = {"/public.jpg": ("kept", None), "/private/a.jpg": ("dropped", "opt_out:robots"),
             "/a.png": ("dropped", "opt_out:robots"), "/anim.gif": ("dropped", "opt_out:ai_txt"),
             "/reserved/a.jpg": ("dropped", "opt_out:tdm"), "/tdm-header.jpg": ("dropped", "opt_out:tdm"),
             "/reserved/free/b.jpg": ("kept", None)}
    for path, expected in cases.items():
        o = fetch(site + path, "image", policy)
        assert (o.status, o.reason) == expected, path
        assert o.evidence and o.evidence[0]["signal"] == "robots" and o.evidence[0]["fetched_at"]
        if expected[0] == "kept":
            assert [e["signal"] for e in o.evidence] == ["robots", "tdmrep", "ai_txt", "tdm_header", "x_robots_tag"]
            assert {e["outcome"] for e in o.evidence} == {"allowed"}
        else:
            assert o.evidence[-1]["outcome"] == "refused" and o.evidence[-1]["rule"] in o.error
    assert Signals.hits["/robots.txt"] == Signals.hits["/ai.txt"] == Signals.hits["/.well-known/tdmrep.json"] == 1
    assert Signals.hits["/private/a.jpg"] == 0  # refused before any request
    off = FetchPolicy(allowed_networks=LOOPBACK, retries=0, optout=OptOutPolicy(robots=False, tdmrep=False, ai_txt=False,
                                                                                 tdm_header=False))
    assert fetch(site + "/private/a.jpg", "image", off).status == "kept"
    assert fetch(site + "/tdm-header.jpg", "image", off).status == "kept"
    assert Signals.hits["/robots.txt"] == 1


def test_missing_robots_allows_unreachable_disallows(site):
    Signals.files = {"/robots.txt": (404, b"", [])}
    o = fetch(site + "/private/a.jpg", "image", FetchPolicy(allowed_networks=LOOPBACK, retries=0))
    assert o.status == "kept" and o.evidence[0]["outcome"] == "absent"
    Signals.files = {"/robots.txt": (503, b"busy", [])}
    o = fetch(site + "/public.jpg", "image", FetchPolicy(allowed_networks=LOOPBACK, retries=1, backoff=0.01))
    assert (o.status, o.reason, o.transient) == ("failed", "http_error", True)  # asked again by the next crawl run
    assert "disallow all" in o.error and Signals.hits["/public.jpg"] == 0
    assert Signals.hits["/robots.txt"] == 1 + 2  # the 404 once; the 503 and the fetch policy's retry, then cached


def test_signal_files_go_through_the_fetch_policy(site):
    Signals.files = {"/robots.txt": (302, b"", [("Location", "http://10.255.255.1/robots.txt")])}
    o = fetch(site + "/public.jpg", "image", FetchPolicy(allowed_networks=LOOPBACK, retries=0))
    assert o.status == "kept" and o.evidence[0]["outcome"] == "not_checked"  # the private hop was refused
    Signals.files = {"/robots.txt": (200, b"User-agent: *\n" + b"Disallow: /x\n" * 60000, [])}  # > 512 KiB
    o = fetch(site + "/x.jpg", "image", FetchPolicy(allowed_networks=LOOPBACK, retries=0))
    assert o.evidence[0]["outcome"] == "invalid"
    o = fetch(site.replace("127.0.0.1", "localhost") + "/a.jpg", "image", FetchPolicy(retries=0))
    assert (o.status, o.reason) == ("dropped", "private_address") and Signals.hits["/a.jpg"] == 0


# --------------------------------------------------------------------------- crawl
def test_crawl_records_evidence_and_drops_by_rule(site, tmp_path):
    """Documents and videos (no img2dataset: fast): the crawl ledger's typed evidence column."""
    docs = [{"doc_id": "ok", "items": [{"type": "image", "url": f"{site}/public.jpg"}]},
            {"doc_id": "refused", "items": [{"type": "image", "url": f"{site}/private/a.jpg"}]}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    ledger_path = tmp_path / "raw" / "crawl_ledger-interleaved.parquet"
    crawl_media("interleaved", tmp_path / "docs.jsonl", tmp_path / "raw", allowed_networks=LOOPBACK, retries=0)
    ledger = pq.read_table(ledger_path)
    assert ledger.schema.field("optout_evidence").type == schemas.arrow_schema("ledger").field("optout_evidence").type
    ok, refused = ledger.to_pylist()
    assert ok["status"] == "kept" and [(e["signal"], e["outcome"]) for e in ok["optout_evidence"]] == [
        ("robots", "allowed"), ("tdmrep", "allowed"), ("ai_txt", "allowed"), ("tdm_header", "allowed"),
        ("x_robots_tag", "allowed")]
    assert all(e["fetched_at"] is not None and e["http_status"] == 200 for e in ok["optout_evidence"])
    assert (refused["reason"], refused["optout_evidence"][-1]["rule"]) == ("missing_images", "Disallow: /private/")
    assert "opt_out:robots" in refused["error"]
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{ledger_path}'), unnest(optout_evidence) AS e "
                   "WHERE e.unnest.outcome = 'refused'").fetchall()[0][0]
    assert n == 1
    videos = tmp_path / "videos.jsonl"
    videos.write_text("".join(json.dumps({"url": site + p}) + "\n" for p in ("/private/v.mp4", "/anim.gif", "/tdm-header.jpg")))
    ledger = crawl_media("video", videos, tmp_path / "raw", allowed_networks=LOOPBACK, retries=0)
    assert ledger["reason"].tolist() == ["opt_out:robots", "opt_out:ai_txt", "opt_out:tdm"]
    assert Signals.hits["/robots.txt"] == 2  # once per crawl (a round keeps its hosts' records)
    assert Signals.hits["/private/a.jpg"] == Signals.hits["/private/v.mp4"] == 0


def test_image_text_listing_evidence_from_the_rounds_host_records(site, tmp_path):
    """img2dataset's listing has no room for evidence: a kept row's comes from the host
    records its round stored (shared by the workers: the policy pickles with the store);
    a refused row's travels in the error message."""
    import pickle

    import pandas as pd

    from curation.crawl.fetch import encode_outcome
    from curation.crawl.image_text import read_img2dataset_shard
    from curation.crawl.optout import HostSignals, round_store

    store = round_store(tmp_path / "_rounds" / "image_text" / "r000")
    policy = pickle.loads(pickle.dumps(FetchPolicy(allowed_networks=LOOPBACK, retries=0, signals=HostSignals(store))))
    kept, refused = fetch(site + "/public.jpg", "image", policy), fetch(site + "/anim.gif", "image", policy)
    assert kept.status == "kept" and refused.reason == "opt_out:ai_txt"
    pd.DataFrame({"uid": ["a" * 16, "b" * 16], "key": ["0", "1"], "status": ["success", "failed_to_download"],
                  "error_message": [None, encode_outcome(refused)], "url": [site + "/public.jpg", site + "/anim.gif"]}
                 ).to_parquet(tmp_path / "image_text-r000-00000.parquet")
    rows = read_img2dataset_shard(tmp_path / "image_text-r000-00000.parquet").to_dict(orient="records")
    assert [(e["signal"], e["outcome"]) for e in rows[0]["optout_evidence"]] == [
        ("robots", "allowed"), ("tdmrep", "allowed"), ("ai_txt", "allowed")]
    assert rows[0]["optout_evidence"][0]["fetched_at"] == kept.evidence[0]["fetched_at"]
    assert (rows[1]["reason"], rows[1]["optout_evidence"][-1]["rule"]) == ("opt_out:ai_txt", "Disallow: *.gif")
    assert Signals.hits["/robots.txt"] == 1


# --------------------------------------------------------------------------- recheck
UIDS = [f"{i:016x}" for i in range(1, 7)]


def _evidence(url: str) -> list[dict]:
    return [{"signal": "robots", "outcome": "absent", "rule": None, "target": url, "source": "x/robots.txt",
             "fetched_at": "2026-12-01T00:00:00+00:00", "http_status": 404}]


def _finished_run(tmp_path: Path, base: str) -> Path:
    """A finished run by hand (no Ray): tiers a (2 shards) and b (1 shard), a crawl ledger
    with evidence, a ledger with one dropped row, run.json naming the crawl ledger."""
    root, raw = tmp_path / "run", tmp_path / "raw"
    raw.mkdir()
    layout = {UIDS[0]: ("a", "a-000000.tar", "/img/1.jpg"), UIDS[1]: ("a", "a-000000.tar", "/keep/2.jpg"),
              UIDS[2]: ("a", "a-000001.tar", "/img/3.jpg"), UIDS[3]: ("a", "a-000001.tar", "/img/4.jpg"),
              UIDS[4]: ("b", "b-000000.tar", "/keep/5.jpg")}
    cfg = SimpleNamespace(name="hand", config_hash="0" * 16, version="1", seed=0)
    for tier in ("a", "b"):
        (root / "tiers" / tier).mkdir(parents=True)
        entries = []
        for shard in sorted({s for t, s, _ in layout.values() if t == tier}):
            uids = [u for u, (t, s, _) in layout.items() if s == shard]
            rows = [{"uid": u, "key": u, "kind": "image_text", "source": "hand", "width": 96, "height": 72,
                     "sha256": "0" * 64, "url": base + layout[u][2], "text": f"caption {u}",
                     "tier": tier, "shard": shard, "status": "kept", "pipeline": "hand", "config_hash": "0" * 16,
                     "op_versions": {}} for u in uids]
            media = [[("jpg", jpeg_bytes(int(u, 16)))] for u in uids]
            embeddings = [b"\x00\x3c" * 4 for _ in uids]  # float16 1.0 x 4
            entries.append(write_shard(root / "tiers" / tier / shard, rows, media, embeddings))
        write_manifest(root / "tiers" / tier, tier, cfg, entries)
    ledger = [{"uid": u, "source": "hand", "url": base + p, "stage": "curate", "status": "kept", "tier": t, "shard": s}
              for u, (t, s, p) in layout.items()]
    ledger.append({"uid": UIDS[5], "source": "hand", "url": base + "/x.jpg", "stage": "curate", "status": "dropped",
                   "reason": "too_small"})
    pq.write_table(schemas.to_table("ledger", ledger), root / "ledger.parquet")
    crawl = [{"uid": r["uid"], "source": "hand", "url": r["url"], "stage": "crawl", "status": "kept", "tier": "raw",
              "shard": "r.tar", "optout_evidence": _evidence(r["url"])} for r in ledger]
    pq.write_table(schemas.to_table("ledger", crawl), raw / "crawl_ledger-image_text.parquet")
    (root / "_work").mkdir()
    (root / "_work" / "run.json").write_text(json.dumps({"crawl_ledgers": [str(raw / "crawl_ledger-image_text.parquet")]}))
    (root / "summary.json").write_text(json.dumps({"curate": {"kept": 5, "dropped": 1}, "tiers": {}}))
    (root / "_SUCCESS").write_text("")
    return root


def _snapshot(root: Path) -> dict:
    tiers = root / "tiers"
    return {p.relative_to(tiers): (p.read_bytes(), p.stat().st_mtime_ns) for p in tiers.rglob("*") if p.is_file()}


def test_recheck_with_rules_rewrites_only_shards_that_lose_samples(tmp_path, capsys):
    base = "http://127.0.0.1:9"
    root = _finished_run(tmp_path, base)
    os.utime(root / "tiers" / "a" / "a-000001.tar", ns=(1, 1))  # an mtime that a rewrite would change
    before = _snapshot(root)
    rules = tmp_path / "rules.yaml"
    rules.write_text(f'hosts:\n  "{base}":\n    robots: "User-agent: *\\nDisallow: /img/\\n"\n'
                     f'  "http://other.example":\n    robots: null\n')
    assert main(["recheck-optout", "--root", str(root), "--rules", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "3 removed" in out and "opt_out_recheck:robots" in out
    after = _snapshot(root)
    # a-000001 lost both samples: gone; a-000000 lost one: rewritten; tier b untouched, to the byte and mtime
    assert not (root / "tiers" / "a" / "a-000001.tar").exists()
    assert {k: v for k, v in after.items() if k.parts[0] == "b" and k.name != "README.md"} == \
        {k: v for k, v in before.items() if k.parts[0] == "b" and k.name != "README.md"}
    assert after[Path("a/a-000000.tar")][0] != before[Path("a/a-000000.tar")][0]
    assert pq.read_table(root / "tiers" / "a" / "a-000000.parquet").column("uid").to_pylist() == [UIDS[1]]
    import numpy as np

    assert np.load(root / "tiers" / "a" / "a-000000.clip.npy").shape[0] == 1
    # reproducible: the tar a run writing only the remaining sample writes
    rows = pq.read_table(root / "tiers" / "a" / "a-000000.parquet").to_pylist()
    write_shard(tmp_path / "fresh.tar", rows, [[("jpg", jpeg_bytes(int(UIDS[1], 16)))]])
    assert (tmp_path / "fresh.tar").read_bytes() == after[Path("a/a-000000.tar")][0]
    checked, problems = verify(root)
    assert problems == [] and checked == 2
    ledger = {r["uid"]: r for r in pq.read_table(root / "ledger.parquet").to_pylist()}
    assert len(ledger) == 6 and Counter(r["status"] for r in ledger.values()) == {"kept": 2, "dropped": 4}
    assert (ledger[UIDS[0]]["reason"], ledger[UIDS[0]]["tier"]) == ("opt_out_recheck:robots", None)
    assert ledger[UIDS[0]]["error"] == f"{base}/robots.txt: Disallow: /img/"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["curate"] == {"kept": 2, "dropped": 4} and summary["tiers"]["a"]["samples"] == 1
    assert summary["optout_rechecks"][0]["removed"] == 3
    # run again: nothing left to remove, nothing rewritten
    snap = _snapshot(root)
    assert recheck_optout(root, rules_path=rules)["removed"] == 0 and _snapshot(root) == snap
    assert json.loads((root / "summary.json").read_text()) == summary


def test_recheck_refetch_and_hostile_rules(site, tmp_path, capsys):
    root = _finished_run(tmp_path, site)
    Signals.files = {"/ai.txt": (200, b"User-agent: curation-vlm\nDisallow: /keep/\n", [])}
    result = recheck_optout(root, refetch=True, policy=FetchPolicy(allowed_networks=LOOPBACK, retries=0))
    assert result["removed"] == 2 and result["reasons"] == {"opt_out_recheck:ai_txt": 2}
    assert sorted(result["shards_rewritten"]) == ["a/a-000000.tar", "b/b-000000.tar"]
    assert Signals.hits["/ai.txt"] == 1 and not any(p.startswith("/keep/") for p in Signals.hits)
    assert verify(root)[1] == []
    bad = tmp_path / "bad.yaml"
    for text in ("!!python/object/apply:os.system ['true']", "hosts: [1]", "hosts: {'http://h': {robotz: x}}"):
        bad.write_text(text)
        assert main(["recheck-optout", "--root", str(root), "--rules", str(bad)]) == 2
        # a line of its own: the test server's thread may also write to stderr (a client that gave up)
        err = capsys.readouterr().err.splitlines()
        assert any(line.startswith("curate: error: --rules") for line in err), (text, err)
