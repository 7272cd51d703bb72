"""`curate browse`: a local web app over one run's output (the JSON API is in README's
Browse section).

One `Browser` holds the run's locked catalog connection (curation/catalog.py; one query
at a time, behind a lock) and the tar indexes (tarindex.py). The HTTP side is the
standard library's ThreadingHTTPServer. Everything a request names is hostile: a uid must
look like one, a member must be one the uid's own row lists (a kept sample's `media`,
or, for a ledger row, the members its raw sample has in its raw shard) and have a
content type in the fixed map; paths never come from the request. Responses carry
`X-Content-Type-Options: nosniff` and a Content-Security-Policy (the page may load
only its own scripts, styles, images, media and API; everything else is sandboxed
with no sources at all). Requests whose Host is not the address the server is bound to
are refused (a web page cannot reach the API through DNS rebinding). An error is a JSON
`{"error": ...}` with 400/404, never a traceback.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import threading
import traceback
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..catalog import connect, find_run_root, shards_frame
from ..errors import CurationError
from ..inputs import raw_shards_at_hand
from . import query as q
from .tarindex import IMAGE_EXTS, VIDEO_EXTS, IndexCache, Member, content_type, read_range, servable

UID = re.compile(r"^[0-9a-f]{16}\Z")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/app.css": ("app.css", "text/css; charset=utf-8"),
          "/static/favicon.svg": ("favicon.svg", "image/svg+xml")}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DATA_CSP = "default-src 'none'; sandbox; frame-ancestors 'none'"
DEFAULT_ORDER = {"samples": ("tier", "shard", "key"), "ledger": ("status", "reason", "uid")}
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def _member_rank(name: str) -> tuple:
    """Images first in their number order ("0.jpg" < "1.png" < "10.jpg"), then video,
    then text and json."""
    stem, _, ext = name.rpartition(".")
    ext = (ext or name).lower()
    kind = 0 if ext in IMAGE_EXTS else 1 if ext in VIDEO_EXTS else 2
    digits = re.search(r"([0-9]+)$", stem)
    return kind, int(digits.group(1)) if digits else -1, name


class Browser:
    """The run's data as the API serves it."""

    def __init__(self, root: str | Path):
        self.run_root = find_run_root(root).resolve()
        self.con = connect(self.run_root)
        self.lock = threading.Lock()
        self.indexes = IndexCache()
        self.tiers_dir = (self.run_root / "tiers").resolve()
        self.tier_tars = {}
        for r in shards_frame(self.run_root).itertuples():
            path = Path(r.path).resolve()
            if path.is_relative_to(self.tiers_dir):  # a manifest's shard name is data: it stays in tiers/
                self.tier_tars[(r.tier, r.shard)] = path
        self.columns = {view: [c[0] for c in self.con.execute(f"DESCRIBE {view}").fetchall()] for view in q.VIEWS}
        self._raw: dict[str, Path] | None = None
        self._raw_note = ""
        self._located: OrderedDict[str, dict | None] = OrderedDict()

    # ------------------------------------------------------------------ queries
    def _run(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        with self.lock:
            return q.run(self.con, sql, params)

    def _order(self, view: str, order: str | None, desc: bool) -> str:
        if order:
            if order not in self.columns[view]:
                raise q.QueryError(f"order: {view} has no column {order[:80]!r}")
            names = [order]
        else:
            names = [c for c in DEFAULT_ORDER[view] if c in self.columns[view]]
        names += ["uid"] if "uid" not in names else []
        return ", ".join(f"{q.quote_ident(n)}{' DESC' if desc and i == 0 else ''} NULLS LAST"
                         for i, n in enumerate(names))

    def samples(self, params: dict[str, str]) -> dict:
        view = params.get("view") or "samples"
        base = q.where_select(params.get("where"), view)
        limit, offset = q.paging(params.get("limit"), params.get("offset"))
        order = self._order(view, params.get("order"), params.get("desc") in ("1", "true"))
        columns, rows = self._run(f"SELECT * FROM ({base}) AS q ORDER BY {order} LIMIT ? OFFSET ?", [limit, offset])
        _, (total,) = self._run(f"SELECT count(*) FROM ({base}) AS q")
        records = [dict(zip(columns, r)) for r in rows]
        media = self._media_of_rows(view, records)
        return {"view": view, "total": total[0], "limit": limit, "offset": offset, "columns": columns,
                "rows": [q.jsonable(r) for r in records], "media": media}

    def sample(self, uid: str) -> dict | None:
        if not UID.match(uid):
            return None
        found = self._locate(uid)
        if found is None:
            return None
        out = {"uid": uid, "view": found["view"], "row": q.jsonable(found["row"]), "ledger": q.jsonable(found["ledger"]),
               "media": [self._media_entry(uid, m) for m in found["members"]], "media_note": found["note"]}
        doc = found["row"].get("doc") if found["view"] == "samples" else None
        if doc is not None:
            out["doc"] = q.as_object(doc)
        return out

    def _one(self, view: str, uid: str) -> dict | None:
        columns, rows = self._run(f"SELECT * FROM {view} WHERE uid = ? LIMIT 1", [uid])
        return dict(zip(columns, rows[0])) if rows else None

    def _locate(self, uid: str) -> dict | None:
        """The uid's row (its kept sample, else its ledger row), ledger row, and the
        members that may be served for it."""
        row = self._one("samples", uid)
        ledger = self._one("ledger", uid)
        if row is not None:
            members, note = self._tier_members(row)
            found = {"view": "samples", "row": row, "ledger": ledger, "members": members, "note": note}
        elif ledger is not None:
            members, note = self._raw_members(ledger)
            found = {"view": "ledger", "row": ledger, "ledger": ledger, "members": members, "note": note}
        else:
            found = None
        return found

    def _media_of_rows(self, view: str, records: list[dict]) -> list[list[dict]]:
        if view == "samples":
            pairs = [self._tier_members(r)[0] for r in records]
        else:
            kept = [r["uid"] for r in records if r.get("status") == "kept"]
            tier_rows = {}
            if kept:
                marks = ", ".join("?" for _ in kept)
                columns, rows = self._run(f"SELECT uid, tier, shard, key, media FROM samples WHERE uid IN ({marks})", kept)
                tier_rows = {r[0]: dict(zip(columns, r)) for r in rows}
            pairs = [self._tier_members(tier_rows[r["uid"]])[0] if r.get("uid") in tier_rows else self._raw_members(r)[0]
                     for r in records]
        return [[self._media_entry(r.get("uid"), m) for m in members] for r, members in zip(records, pairs)]

    @staticmethod
    def _media_entry(uid: str, member: str) -> dict:
        return {"name": member, "url": f"/media/{uid}/{member}", "type": content_type(member)}

    # ------------------------------------------------------------------ media
    def _tier_members(self, row: dict) -> tuple[list[str], str]:
        path = self.tier_tars.get((row.get("tier"), row.get("shard")))
        if path is None:
            return [], "the tier shard is not in its manifest"
        return [m for m in q.as_list(row.get("media")) if servable(m)], ""

    def raw_paths(self) -> dict[str, Path]:
        """Raw shard name -> local path, from the run's recorded input (run.json), when
        that input is a local folder still at hand."""
        with self.lock:
            if self._raw is None:
                self._raw, self._raw_note = self._find_raw()
            return self._raw

    def _find_raw(self) -> tuple[dict[str, Path], str]:
        refs, _, note = raw_shards_at_hand(self.run_root)
        # Media are served by offset out of plain local tars; other raw formats show none.
        return {name: Path(r.url) for name, r in refs.items() if r.format == "tar"}, note

    def _raw_members(self, ledger: dict) -> tuple[list[str], str]:
        shard, key = ledger.get("raw_shard"), ledger.get("raw_key")
        if not isinstance(shard, str) or not isinstance(key, str):
            return [], "never reached a raw shard" if ledger.get("stage") == "crawl" else "no raw sample"
        path = self.raw_paths().get(shard)
        if path is None:
            return [], self._raw_note or f"raw shard {shard} is not at hand"
        index = self.indexes.get(path)
        if index is None:
            return [], f"raw shard {shard} cannot be read by offset (compressed, missing or not a tar)"
        return sorted((m for m in index.sample_members(key) if servable(m)), key=_member_rank), ""

    def media(self, uid: str, member: str) -> tuple[Path, Member, str] | None:
        """Where the bytes of `member` of `uid` are, when the uid's row lists it."""
        if not UID.match(uid) or not servable(member):
            return None
        with self.lock:
            cached = self._located.get(uid, False)
            if cached is not False:
                self._located.move_to_end(uid)
        if cached is False:
            found = self._locate(uid)
            cached = None
            if found is not None:
                row = found["row"]
                if found["view"] == "samples":
                    tar, key = self.tier_tars.get((row.get("tier"), row.get("shard"))), row.get("key")
                else:
                    tar, key = self.raw_paths().get(row.get("raw_shard")), row.get("raw_key")
                cached = {"tar": tar, "key": key, "members": set(found["members"])}
            with self.lock:
                self._located[uid] = cached
                while len(self._located) > 4096:
                    self._located.popitem(last=False)
        if cached is None or cached["tar"] is None or member not in cached["members"]:
            return None
        index = self.indexes.get(cached["tar"])
        entry = index.members.get(f"{cached['key']}.{member}") if index else None
        return (cached["tar"], entry, content_type(member)) if entry else None


# ---------------------------------------------------------------------- HTTP
class Handler(BaseHTTPRequestHandler):
    server_version = "curate-browse"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    @property
    def browser(self) -> Browser:
        return self.server.browser

    def log_message(self, fmt, *args):  # quiet: the terminal shows the URL, not every request
        pass

    def _send(self, status: int, body: bytes, ctype: str, csp: str = DATA_CSP, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._common(csp)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _common(self, csp: str) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", csp)
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("X-Frame-Options", "DENY")

    def _json(self, status: int, data) -> None:
        body = json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", extra={"Cache-Control": "no-store"})

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        try:
            if not self.server.host_allowed(self.headers.get("Host", "")):
                return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except q.QueryError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except CurationError as exc:
            self._error(HTTPStatus.BAD_REQUEST, q.first_line(exc))
        except Exception as exc:  # a bug: logged here, never sent
            traceback.print_exc(file=sys.stderr)
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(exc).__name__})")
            except OSError:
                pass

    def _route(self) -> None:
        url = urlsplit(self.path)
        raw_parts = url.path.split("/")
        if url.path in STATIC:
            name, ctype = STATIC[url.path]
            return self._send(HTTPStatus.OK, self.server.static[name], ctype, csp=PAGE_CSP,
                              extra={"Cache-Control": "no-cache"})
        parts = [unquote(p) for p in raw_parts]
        if url.path == "/api/samples":
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True, max_num_fields=32).items()}
            return self._json(HTTPStatus.OK, self.browser.samples(params))
        if len(parts) == 4 and parts[:3] == ["", "api", "sample"]:
            found = self.browser.sample(parts[3])
            return self._json(HTTPStatus.OK, found) if found else self._error(HTTPStatus.NOT_FOUND, "unknown uid")
        if len(parts) == 4 and parts[:2] == ["", "media"]:
            return self._media(parts[2], parts[3])
        self._error(HTTPStatus.NOT_FOUND, "not found")

    def _media(self, uid: str, member: str) -> None:
        found = self.browser.media(uid, member)
        if found is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such media for this uid")
        path, entry, ctype = found
        start, end, status = 0, entry.size - 1, HTTPStatus.OK
        wanted = _byte_range(self.headers.get("Range"), entry.size)
        if wanted == "unsatisfiable":
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{entry.size}")
            self.send_header("Content-Length", "0")
            self._common(DATA_CSP)
            return self.end_headers()
        if wanted:
            (start, end), status = wanted, HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(max(0, end - start + 1)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", "private, max-age=300")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self._common(DATA_CSP)
        self.end_headers()
        if self.command != "HEAD" and entry.size:
            sent = 0
            for chunk in read_range(path, entry, start, end):
                self.wfile.write(chunk)
                sent += len(chunk)
            if sent != end - start + 1:  # the tar changed under us: the client must not wait for the rest
                self.close_connection = True


def _byte_range(header: str | None, size: int):
    """(start, end) of a single `bytes=` range, "unsatisfiable", or None (whole body:
    no header, several ranges, or one we do not understand, which RFC 9110 allows)."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes=(\d{0,18})-(\d{0,18})\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if m.group(2) and int(m.group(2)) < start:
            return None
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or size == 0:
        return "unsatisfiable"
    return start, end


class BrowseServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, browser: Browser, host: str, port: int):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.browser = browser
        self.static = {name: resources.files(__package__).joinpath("static", name).read_bytes()
                       for name, _ in STATIC.values()}
        bound = self.server_address[1]
        self.hosts = {f"{h}:{bound}".lower() for h in (*LOOPBACK, host, f"[{host}]")}
        self.any_host = host not in LOOPBACK  # bound beyond loopback on purpose: names are the user's business

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the browser closed a connection (a video seek, a page left): not an error
        super().handle_error(request, client_address)

    def host_allowed(self, host: str) -> bool:
        return self.any_host or host.lower() in self.hosts

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.server_address[1]}/"


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 0) -> BrowseServer:
    """A server over the run at `root`, bound (port 0: any free port) but not yet serving."""
    return BrowseServer(Browser(root), host, port)


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until Ctrl-C."""
    try:
        server = make_server(root, host, port)
    except OSError as exc:
        raise CurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    print(f"curate browse: {server.url}  (Ctrl-C stops it)", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM stop it, also when started from a shell that ignores SIGINT in
    # background jobs (Python then installs no KeyboardInterrupt handler of its own).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
