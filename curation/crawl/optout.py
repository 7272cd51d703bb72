"""Opt-out signals a host publishes, and the evidence each crawled sample keeps of them.

Per host (scheme + host + port), fetched once per crawl through the fetch policy itself
(address guard on every hop, redirects, timeouts, retries) under a 512 KiB cap:

* `robots` - /robots.txt, RFC 9309: the group for our product token
  (fetch.USER_AGENT_TOKEN, case-insensitive), else the `*` group; `allow`/`disallow`
  patterns with `*` and `$`; the longest matching pattern wins, `allow` on a tie.
  A 4xx (404: no file) allows everything; a 5xx or no answer at all (timeout, reset)
  is "unreachable" and, as RFC 9309 section 2.3.1.4 says, disallows everything: the
  sample fails with the robots fetch's reason, transiently, so the next crawl run
  asks again.
* `tdmrep` - /.well-known/tdmrep.json, W3C TDMRep: a JSON list of
  `{"location": pattern, "tdm-reservation": 0|1, "tdm-policy": url}`; the longest
  matching location wins (robots.txt pattern syntax). A missing, unreachable or
  malformed file reserves nothing (recorded as absent/unreachable/invalid).
* `ai_txt` - /ai.txt, Spawning's robots.txt-like format (`User-Agent`, `Allow`,
  `Disallow: *.jpg`); read like robots.txt, a pattern without a leading `/` matches
  anywhere in the path. Missing or unreachable: allowed.

Per response, in fetch.py: `tdm_header` (`tdm-reservation: 1`) and `x_robots_tag`.

Refusals are dropped as `opt_out:<signal>` with the matched rule as the error. Each
checked signal becomes one evidence entry (signal, outcome, rule, target url, source
file, fetched_at, http_status); a sample's entries are the ledger's `optout_evidence`.
Host records are kept on disk when a store folder is given, so a crawl's other
processes (img2dataset's workers) and `curate recheck-optout` read the same record.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit


SIGNAL_PATHS = {"robots": "/robots.txt", "tdmrep": "/.well-known/tdmrep.json", "ai_txt": "/ai.txt"}
HOST_SIGNALS = tuple(SIGNAL_PATHS)
RESPONSE_SIGNALS = ("tdm_header", "x_robots_tag")
SIGNAL_BYTES = 512 * 1024  # RFC 9309 2.5: parse at least 500 KiB
MAX_LINES = 5_000  # per file: every rule is tried on every url of the host


@dataclass(frozen=True)
class OptOutPolicy:
    """Which signals the crawl honours (each on by default: a refused sample costs less than
    a sample its owner reserved)."""

    robots: bool = True
    tdmrep: bool = True
    ai_txt: bool = True
    tdm_header: bool = True

    def host_signals(self) -> tuple[str, ...]:
        return tuple(s for s in HOST_SIGNALS if getattr(self, s))


# --------------------------------------------------------------------------- rules
def matches(pattern: str, target: str) -> bool:
    """RFC 9309 matching: `*` is any run of characters, a final `$` anchors the end, else
    the pattern is a prefix. Wildcard matching that backtracks only to the last `*`
    (at most len(pattern) x len(target) steps: a hostile pattern cannot blow up)."""
    anchored = pattern.endswith("$")
    pattern = pattern[:-1] if anchored else pattern + "*"
    p = t = 0
    star, mark = -1, 0
    while t < len(target):
        if p < len(pattern) and pattern[p] == "*":
            star, mark, p = p, t, p + 1
        elif p < len(pattern) and pattern[p] == target[t]:
            p, t = p + 1, t + 1
        elif star >= 0:
            mark += 1
            p, t = star + 1, mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _target(url: str) -> str:
    from .fetch import _request_target  # the path + query exactly as the request sends it

    return _request_target(urlsplit(url))


def _normalise(pattern: str) -> str:
    from urllib.parse import quote

    return quote(pattern, safe="/%:@!$&'()*+,;=-._~?")


@functools.lru_cache(maxsize=64)  # a host's file is read once, not once per url
def parse_robots(text: str, token: str, anywhere: bool = False) -> list[tuple[str, bool]]:
    """The (pattern, allow) rules that apply to `token`: its own groups merged, else the
    `*` groups. `anywhere`: a pattern without a leading / matches anywhere (ai.txt)."""
    groups: list[tuple[set[str], list[tuple[str, bool]]]] = []
    agents: set[str] | None = None
    for raw in text.splitlines()[:MAX_LINES]:
        line = raw.split("#", 1)[0].strip()
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("user-agent", "useragent"):
            if agents is None or groups[-1][1]:  # a new group starts after rules
                agents = set()
                groups.append((agents, []))
            agents.add(value.lower())
        elif key in ("allow", "disallow") and agents is not None:
            if not value:
                continue  # "Disallow:" alone disallows nothing
            if not value.startswith("/") and not value.startswith("*"):
                if not anywhere:
                    continue
                value = "*" + value
            groups[-1][1].append((_normalise(value), key == "allow"))
    token = token.lower()
    ours = [r for a, rules in groups if token in a for r in rules]
    if any(token in a for a, _ in groups):
        return ours
    return [r for a, rules in groups if "*" in a for r in rules]


def most_specific(rules: list[tuple[str, bool]], target: str) -> tuple[str, bool] | None:
    """RFC 9309 2.2.2: the longest matching pattern; allow wins a tie."""
    best = None
    for pattern, allow in rules:
        if matches(pattern, target) and (
                best is None or len(pattern) > len(best[0]) or (len(pattern) == len(best[0]) and allow)):
            best = (pattern, allow)
    return best


@functools.lru_cache(maxsize=64)
def parse_tdmrep(text: str) -> tuple[dict, ...]:
    """tdmrep.json's rules ({location, reserved, policy}); raises ValueError when malformed."""
    doc = json.loads(text)
    if not isinstance(doc, list):
        raise ValueError("tdmrep.json is not a JSON list")
    rules = []
    for entry in doc[:MAX_LINES]:
        if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
            raise ValueError("a tdmrep.json entry has no string location")
        reserved = entry.get("tdm-reservation")
        if reserved not in (0, 1, "0", "1"):
            raise ValueError(f"tdm-reservation must be 0 or 1, not {reserved!r}")
        policy = entry.get("tdm-policy")
        rules.append({"location": _normalise(entry["location"]), "reserved": int(reserved) == 1,
                      "policy": policy if isinstance(policy, str) else None})
    return tuple(rules)


def evaluate(signal: str, record: dict, url: str, token: str) -> dict:
    """One evidence entry: what the host's `signal` record says about `url`."""
    entry = {"signal": signal, "outcome": record["state"], "rule": None, "target": url, "source": record["url"],
             "fetched_at": record.get("fetched_at"), "http_status": record.get("http_status")}
    if record["state"] != "present":
        if record["state"] == "unreachable" and signal == "robots":
            entry["rule"] = "robots.txt unreachable: disallow all (RFC 9309 2.3.1.4)"
        return entry
    target = _target(url)
    if signal == "tdmrep":
        try:
            rules = parse_tdmrep(record["text"])
        except ValueError as exc:
            return {**entry, "outcome": "invalid", "rule": str(exc)[:200]}
        match = most_specific([(r["location"], not r["reserved"]) for r in rules], target)
        if match and not match[1]:
            policy = next((r["policy"] for r in rules if r["location"] == match[0] and r["reserved"]), None)
            return {**entry, "outcome": "refused",
                    "rule": f"location {match[0]}: tdm-reservation 1" + (f", tdm-policy {policy}" if policy else "")}
        return {**entry, "outcome": "allowed", "rule": f"location {match[0]}: tdm-reservation 0" if match else None}
    if target == "/robots.txt" and signal == "robots":
        return {**entry, "outcome": "allowed", "rule": "/robots.txt is always allowed"}
    match = most_specific(parse_robots(record["text"], token, anywhere=signal == "ai_txt"), target)
    if match is None:
        return {**entry, "outcome": "allowed"}
    return {**entry, "outcome": "allowed" if match[1] else "refused",
            "rule": f"{'Allow' if match[1] else 'Disallow'}: {match[0]}"}


def refusal(entries: list[dict]) -> dict | None:
    """The first entry that keeps a sample out: refused (any signal), or robots unreachable."""
    for e in entries:
        if e["outcome"] == "refused" or (e["signal"] == "robots" and e["outcome"] == "unreachable"):
            return e
    return None


def refusal_reason(entry: dict) -> str:
    return f"opt_out:{'tdm' if entry['signal'] in ('tdmrep', 'tdm_header') else entry['signal']}"


# --------------------------------------------------------------------------- host records
def origin(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{host}:{port}"


# Fetch failures that the sample's own fetch reports the same way: no verdict from them.
NOT_CHECKED = ("private_address", "bad_url", "dns_error")


class HostSignals:
    """Per-host signal records, fetched once through a fetch policy and cached (in memory,
    and in `store` when given). Thread-safe; pickles to an empty cache over the same store."""

    def __init__(self, store: str | Path | None = None, fetch_missing: bool = True):
        self.store = str(store) if store else None
        self.fetch_missing = fetch_missing
        self._records: dict[str, dict] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"store": self.store, "fetch_missing": self.fetch_missing}

    def __setstate__(self, state):
        self.__init__(state["store"], state["fetch_missing"])

    def _path(self, key: str) -> Path:
        return Path(self.store) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def record(self, url: str, signal: str, policy) -> dict:
        key = f"{origin(url)} {signal}"
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._records:
                return self._records[key]
            rec = None
            if self.store and self._path(key).exists():
                rec = json.loads(self._path(key).read_text())
            if rec is None:
                if not self.fetch_missing:
                    rec = {"url": origin(url) + SIGNAL_PATHS[signal], "state": "not_recorded"}
                else:
                    rec = fetch_record(origin(url) + SIGNAL_PATHS[signal], policy)
                    if self.store:
                        self._write(key, rec)
            self._records[key] = rec
            return rec

    def _write(self, key: str, rec: dict) -> None:
        """Atomically, under a name of its own: img2dataset's worker processes may write
        the same host's record at once (either copy is a whole record)."""
        Path(self.store).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.store, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(rec))
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def check(self, url: str, policy) -> list[dict]:
        """Evidence entries for `url` under every host signal `policy.optout` turns on."""
        from .fetch import USER_AGENT_TOKEN

        entries = []
        for s in policy.optout.host_signals():  # robots first; the first refusal settles it
            entries.append(evaluate(s, self.record(url, s, policy), url, USER_AGENT_TOKEN))
            if refusal(entries):
                break
        return entries


def fetch_record(url: str, policy) -> dict:
    """Fetch one signal file under `policy` (its guard, redirects, timeouts, retries), with
    host signals off (no recursion) and the 512 KiB cap."""
    from .fetch import fetch

    sub = replace(policy, optout=OptOutPolicy(False, False, False, False), opt_out=(),
                  max_bytes={**policy.max_bytes, "signal": SIGNAL_BYTES}, signals=None)
    o = fetch(url, "signal", sub)
    rec = {"url": url, "fetched_at": o.fetched_at.isoformat() if o.fetched_at else None, "http_status": o.http_status}
    if o.status == "kept":
        return {**rec, "state": "present", "text": o.data.decode("utf-8", "replace")}
    if o.reason in NOT_CHECKED:
        return {**rec, "state": "not_checked", "error": o.error}
    if o.reason == "http_error" and o.http_status is not None and 400 <= o.http_status < 500 and not o.transient:
        return {**rec, "state": "absent"}
    if o.reason == "too_large":  # RFC 9309 2.5: the first 500 KiB count; no partial body here
        return {**rec, "state": "invalid", "error": o.error}
    return {**rec, "state": "unreachable", "error": o.error, "transient": o.transient, "reason": o.reason}


def record_from_text(url: str, text: str | None) -> dict:
    """A host record from a rules file: text, or None for no file."""
    return {"url": url, "state": "present" if text is not None else "absent", "text": text, "fetched_at": None,
            "http_status": None}


def evidence_json(entries: list[dict]) -> str:
    return json.dumps(entries, sort_keys=True, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


def merge(entries: list[dict]) -> list[dict]:
    """Entries once each (a document's images on one host share their host records)."""
    seen, out = set(), []
    for e in entries:
        key = json.dumps(e, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def round_store(round_dir: Path) -> Path:
    """Where a crawl round keeps its host records (img2dataset's workers and the driver
    read the same ones)."""
    return Path(round_dir) / "optout"


def stored_evidence(store: Path, url: str) -> list[dict]:
    """Evidence for `url` from the host records a crawl round stored (no request): the
    entries for the signals that round checked."""
    from .fetch import USER_AGENT_TOKEN

    signals = HostSignals(store, fetch_missing=False)
    out = []
    for s in HOST_SIGNALS:
        if signals._path(f"{origin(url)} {s}").exists():
            out.append(evaluate(s, signals.record(url, s, None), url, USER_AGENT_TOKEN))
    return out
