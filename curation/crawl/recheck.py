"""`curate recheck-optout`: apply opt-outs published after a run to its finished tiers.

Each kept sample's evidence (the crawl ledger's `optout_evidence`: which urls were
checked against which signals) is judged again, either against a rules file or against
what the hosts publish now (`--refetch`, through the same fetch policy as the crawl).
A sample that a signal now refuses leaves its tier: only the shards that lose samples
are rewritten (tar, sidecar, embeddings, manifest entry; reproducibly, each file
atomically), the others are not touched. Its ledger row becomes dropped, reason
`opt_out_recheck:<signal>`, error naming the file and rule, so inputs = kept + dropped +
failed still holds. Running it again after a crash finishes the job (every step is
idempotent: a shard already without the sample is left as it is).

Rules file (YAML or JSON, read with yaml.safe_load), per host (scheme://host[:port]):

    hosts:
      "https://example.com":
        robots: |              # robots.txt text; null: no file (allows everything)
          User-agent: *
          Disallow: /photos/
        tdmrep: [{location: "/photos/*", tdm-reservation: 1}]   # tdmrep.json: a list, or its text
        ai_txt: "User-Agent: *\\nDisallow: *.jpg"

A signal the file does not give for a host keeps the crawl's evidence for it. With
`--refetch`, a host whose robots.txt is unreachable now keeps its samples (a transient
error must not delete data; they are listed as unreachable in the result).
"""

from __future__ import annotations

import io
import json
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .. import schemas
from ..catalog import _crawl_ledgers, find_run_root
from ..decide import sql_list, sql_str, summary_rows
from ..errors import InputError
from ..fsutil import atomic_write_bytes, atomic_write_parquet, atomic_write_text
from ..tiers.card import write_card
from ..tiers.writer import embeddings_path, shard_entry
from ..wds import tar_bytes
from .fetch import USER_AGENT_TOKEN, FetchPolicy
from .optout import HOST_SIGNALS, HostSignals, SIGNAL_PATHS, evaluate, origin, record_from_text

MAX_RULES_BYTES = 4 << 20


def load_rules(path: str | Path) -> dict[str, dict[str, dict]]:
    """origin -> signal -> host record, from a rules file (hostile input: size-capped, safe YAML)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size > MAX_RULES_BYTES:
        raise InputError(f"--rules {path}: not a file of at most {MAX_RULES_BYTES} bytes")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"--rules {path}: not YAML/JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), dict):
        raise InputError(f"--rules {path}: expected a mapping with `hosts:` (scheme://host -> signals)")
    out: dict[str, dict[str, dict]] = {}
    for host, signals in doc["hosts"].items():
        if not isinstance(host, str) or "://" not in host or not isinstance(signals, dict):
            raise InputError(f"--rules {path}: host {host!r} must be scheme://host[:port] with a mapping of signals")
        unknown = set(signals) - set(HOST_SIGNALS)
        if unknown:
            raise InputError(f"--rules {path}: {host}: unknown signals {sorted(unknown)} (known: {list(HOST_SIGNALS)})")
        key = origin(host)
        records = {}
        for signal, value in signals.items():
            if signal == "tdmrep" and isinstance(value, list):
                value = json.dumps(value)
            if value is not None and not isinstance(value, str):
                raise InputError(f"--rules {path}: {host}.{signal} must be text (or a list for tdmrep), or null")
            records[signal] = record_from_text(key + SIGNAL_PATHS[signal], value)
        out[key] = records
    return out


def kept_evidence(run_root: Path) -> list[dict]:
    """Kept samples: uid, url, tier, shard, and the crawl's evidence (None: the run's
    input was not our crawl, or a crawl from before evidence was recorded)."""
    con = duckdb.connect()
    ledger = f"read_parquet({sql_str(str(run_root / 'ledger.parquet'))})"
    crawls = [p for p in _crawl_ledgers(run_root) if "optout_evidence" in pq.read_schema(p).names]
    if crawls:
        rows = con.execute(f"""SELECT l.uid, l.url, l.tier, l.shard, c.optout_evidence
            FROM {ledger} l LEFT JOIN (SELECT uid, optout_evidence FROM read_parquet({sql_list(crawls)}, union_by_name = true)
                                       WHERE status = 'kept') c USING (uid)
            WHERE l.status = 'kept' ORDER BY l.uid""").fetchall()
    else:
        rows = con.execute(f"SELECT uid, url, tier, shard, NULL FROM {ledger} WHERE status = 'kept' ORDER BY uid").fetchall()
    return [{"uid": u, "url": url, "tier": t, "shard": s, "evidence": ev} for u, url, t, s, ev in rows]


def _targets(sample: dict) -> list[str]:
    targets = sorted({e["target"] for e in sample["evidence"] or [] if e.get("target")})
    return targets or ([sample["url"]] if isinstance(sample["url"], str) and "://" in sample["url"] else [])


def new_refusal(sample: dict, rules: dict | None, signals: HostSignals | None, policy: FetchPolicy | None,
                unreachable: set) -> dict | None:
    """The entry that refuses this sample now, if any."""
    for target in _targets(sample):
        if rules is not None:
            entries = [evaluate(s, rec, target, USER_AGENT_TOKEN) for s, rec in rules.get(origin(target), {}).items()]
        else:
            entries = signals.check(target, policy)
        for e in entries:
            if e["outcome"] == "refused":
                return e
            if e["outcome"] == "unreachable" and e["signal"] == "robots":
                unreachable.add(sample["uid"])
    return None


def _read_samples(tar_path: Path) -> dict[str, list[tuple[str, bytes]]]:
    """A tier tar's members by sample key, in tar order (keys are uids: no dots)."""
    out: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(tar_path, mode="r:") as tar:
        for m in tar:
            if m.isfile():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, []).append((ext, tar.extractfile(m).read()))
    return out


def rewrite_shard(tier_dir: Path, name: str, drop_uids: set[str]) -> dict | None:
    """The shard without `drop_uids`: tar, embeddings, then sidecar (the writer's order);
    returns its manifest entry, or None when no sample is left (its files are removed)."""
    tar_path = tier_dir / name
    sidecar_path = tar_path.with_suffix(".parquet")
    table = pq.read_table(sidecar_path)
    keep = [u not in drop_uids for u in table.column("uid").to_pylist()]
    if all(keep):
        return shard_entry(tar_path)  # already rewritten (a resumed recheck)
    if not any(keep):
        for p in (tar_path, embeddings_path(tar_path), sidecar_path):
            p.unlink(missing_ok=True)
        return None
    members = _read_samples(tar_path)
    kept = table.filter(pa.array(keep))
    atomic_write_bytes(tar_path, tar_bytes((k, members[k]) for k in kept.column("key").to_pylist()))
    if embeddings_path(tar_path).exists():
        matrix = np.load(embeddings_path(tar_path), allow_pickle=False)
        buf = io.BytesIO()
        np.save(buf, matrix[np.array(keep)], allow_pickle=False)
        atomic_write_bytes(embeddings_path(tar_path), buf.getvalue())
    atomic_write_parquet(kept, sidecar_path)
    return shard_entry(tar_path)


def update_ledger(run_root: Path, removed: dict[str, dict]) -> int:
    """Removed samples' rows become dropped (reason opt_out_recheck:<signal>); rows stay
    one per uid, so the identity holds. Returns the rows written."""
    path = run_root / "ledger.parquet"
    con = duckdb.connect()
    con.register("_removed", pa.table({"uid": list(removed), "new_reason": [r["reason"] for r in removed.values()],
                                       "new_error": [r["error"] for r in removed.values()]}))
    before = con.execute(f"SELECT count(*) FROM read_parquet({sql_str(str(path))})").fetchone()[0]
    cols = []
    for c in schemas.columns("ledger"):
        if c == "status":
            cols.append("CASE WHEN r.uid IS NULL THEN l.status ELSE 'dropped' END AS status")
        elif c in ("reason", "error"):
            cols.append(f"CASE WHEN r.uid IS NULL THEN l.{c} ELSE r.new_{c} END AS {c}")
        elif c in ("tier", "shard"):
            cols.append(f"CASE WHEN r.uid IS NULL THEN l.{c} END AS {c}")
        else:
            cols.append(f'l."{c}"')
    schema = schemas.arrow_schema("ledger")
    table = con.execute(f"""SELECT {', '.join(cols)} FROM read_parquet({sql_str(str(path))}) l
                            LEFT JOIN _removed r ON l.uid = r.uid AND l.status = 'kept'
                            ORDER BY l.uid, l.stage""").to_arrow_table()
    table = table.select(schema.names).cast(schema)
    if len(table) != before:
        raise RuntimeError(f"ledger rewrite gave {len(table)} rows for {before}")
    schemas.validate_rows("ledger", schemas.plain_rows("ledger", [r for r in table.to_pylist() if r["uid"] in removed]))
    atomic_write_parquet(table, path)
    return len(table)


def recheck_optout(root: str | Path, rules_path: str | Path | None = None, refetch: bool = False,
                   policy: FetchPolicy | None = None) -> dict:
    """Re-judge every kept sample; rebuild the shards that lose samples; update the
    ledger, manifests, cards and summary. Returns what changed."""
    if (rules_path is None) == (not refetch):
        raise InputError("give exactly one of --rules FILE or --refetch")
    run_root = find_run_root(root)
    if not (run_root / "_SUCCESS").exists():
        raise InputError(f"{run_root}: not a finished run (no _SUCCESS)")
    rules = load_rules(rules_path) if rules_path is not None else None
    policy = policy or FetchPolicy()
    signals = HostSignals() if refetch else None
    removed: dict[str, dict] = {}
    by_shard: dict[tuple[str, str], set[str]] = {}
    unreachable: set = set()
    samples = kept_evidence(run_root)
    for sample in samples:
        hit = new_refusal(sample, rules, signals, policy, unreachable)
        if hit is not None:
            removed[sample["uid"]] = {"reason": f"opt_out_recheck:{hit['signal']}",
                                      "error": f"{hit['source']}: {hit['rule']}"[:2000]}
            by_shard.setdefault((sample["tier"], sample["shard"]), set()).add(sample["uid"])
    rewritten = []
    for tier in sorted({t for t, _ in by_shard}):
        tier_dir = run_root / "tiers" / tier
        manifest = json.loads((tier_dir / "manifest.json").read_text())
        entries = {e["name"]: e for e in manifest["shards"]}
        for (t, name), uids in sorted(by_shard.items()):
            if t != tier:
                continue
            entry = rewrite_shard(tier_dir, name, uids)
            work_entry = run_root / "_work" / "entries" / f"{name.removesuffix('.tar')}.json"
            if entry is None:
                entries.pop(name, None)
                work_entry.unlink(missing_ok=True)
            else:
                entries[name] = entry
                if work_entry.exists():
                    atomic_write_text(work_entry, json.dumps(entry, sort_keys=True) + "\n")
            rewritten.append(f"{tier}/{name}")
        manifest["shards"] = sorted(entries.values(), key=lambda e: e["name"])
        manifest["num_samples"] = sum(e["samples"] for e in manifest["shards"])
        manifest["num_bytes"] = sum(e["bytes"] for e in manifest["shards"])
        schemas.validate_document("manifest", manifest)
        atomic_write_text(tier_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        write_card(tier_dir, manifest)
    if removed:
        update_ledger(run_root, removed)
    result = {"checked": len(samples), "removed": len(removed), "shards_rewritten": rewritten,
              "reasons": {r: sum(1 for v in removed.values() if v["reason"] == r)
                          for r in sorted({v["reason"] for v in removed.values()})},
              "robots_unreachable_kept": len(unreachable - set(removed)),
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "mode": "refetch" if refetch else f"rules {Path(rules_path).name}"}
    _update_summary(run_root, result)
    return result


def _update_summary(run_root: Path, result: dict) -> None:
    """summary.json after a recheck: counts from the ledger and manifests. The rows that
    rechecks moved and the summary does not count yet (this one's, or a crashed one's)
    move from kept to dropped in stage B's counts."""
    path = run_root / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    ledger = sql_str(str(run_root / "ledger.parquet"))
    rows, moved = duckdb.connect().execute(f"""SELECT count(*), count(*) FILTER (WHERE reason LIKE 'opt_out_recheck:%')
                                               FROM read_parquet({ledger})""").fetchone()
    counted = sum(r.get("removed", 0) for r in summary.get("optout_rechecks", []))
    if moved == counted:
        return
    summary["ledger_rows"] = rows
    summary["by_stage_status_reason"] = summary_rows([run_root / "ledger.parquet"])
    for tier_dir in sorted(p for p in (run_root / "tiers").iterdir() if (p / "manifest.json").exists()):
        m = json.loads((tier_dir / "manifest.json").read_text())
        summary.setdefault("tiers", {})[tier_dir.name] = {"samples": m["num_samples"], "shards": len(m["shards"]),
                                                          "bytes": m["num_bytes"]}
    if isinstance(summary.get("curate"), dict):  # stage B's counts, with the rechecks' moves
        summary["curate"]["kept"] = summary["curate"].get("kept", 0) - (moved - counted)
        summary["curate"]["dropped"] = summary["curate"].get("dropped", 0) + (moved - counted)
    summary.setdefault("optout_rechecks", []).append(
        {**{k: result[k] for k in ("at", "mode", "reasons")}, "removed": moved - counted})
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
