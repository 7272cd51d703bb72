"""The fetch policy: one module that every crawl kind fetches through.

* The address guard runs on the resolved addresses before connecting, and the
  connection goes to a vetted address (no second DNS lookup an attacker could answer
  differently). Redirects are followed by hand and every hop is vetted again.
* Transient failures (5xx, 408, 429, timeouts, resets, short reads) are retried with
  exponential backoff and jitter; permanent ones (other 4xx, not an image, too large,
  opt-out) are not.
* Bodies are read in chunks up to a per-kind size cap, inside a whole-request deadline
  that defeats servers trickling bytes slowly.
* Images: the pixel count is read from the header before any decompression (bombs are
  dropped), then the image is decoded within that bound to catch corrupt files.
* `X-Robots-Tag` opt-outs (noai, noimageai, noindex, noimageindex; global or addressed
  to our user agent) are honoured and recorded as reason `opt_out`.
* Host opt-out signals (robots.txt, tdmrep.json, ai.txt; optout.py) are checked before
  every hop's request, and the `tdm-reservation: 1` header on the response: refusals
  are dropped as `opt_out:<signal>`; every check is kept in `Outcome.evidence`.
"""

from __future__ import annotations

import http.client
import io
import json
import random
import socket
import ssl
import threading
import time
import warnings
from datetime import datetime, timezone
from dataclasses import dataclass, field, replace
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

from PIL import Image

from .. import __version__
from . import optout as signals_lib
from .guard import check_url, resolve

USER_AGENT_TOKEN = "curation-vlm"
USER_AGENT = f"Mozilla/5.0 (compatible; {USER_AGENT_TOKEN}/{__version__}; VLM training-data crawler; honours X-Robots-Tag noai)"
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
REDIRECTS = (301, 302, 303, 307, 308)
MiB = 1 << 20


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0  # seconds per socket operation
    deadline: float = 60.0  # seconds for the whole request, body included
    retries: int = 2  # extra attempts for transient failures
    backoff: float = 0.5  # first wait; doubles per retry, with jitter
    backoff_max: float = 8.0
    max_redirects: int = 5
    max_bytes: dict = field(default_factory=lambda: {"image": 16 * MiB, "video": 256 * MiB, "any": 64 * MiB})
    max_pixels: int = 64_000_000
    verify_images: bool = True
    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()
    opt_out: tuple[str, ...] = OPT_OUT_DIRECTIVES
    user_agent: str = USER_AGENT
    optout: signals_lib.OptOutPolicy = signals_lib.OptOutPolicy()
    # host -> robots.txt/tdmrep.json/ai.txt records, fetched once per host (None: host
    # signals are not checked). Pickles as an empty cache over the same store folder.
    signals: signals_lib.HostSignals | None = field(default_factory=signals_lib.HostSignals, compare=False, repr=False)
    # host -> addresses; None is the system resolver. Tests inject one so that no name is
    # ever looked up. It travels to img2dataset's workers, so it must pickle (a module-level
    # function, not a lambda).
    resolver: Callable[[str, int], list[str]] | None = field(default=None, compare=False, repr=False)

    def cap(self, kind: str) -> int:
        return self.max_bytes.get(kind, self.max_bytes["any"])


@dataclass
class Outcome:
    """How one url ended: kept (with data), dropped (reason) or failed (reason + error).
    `transient` marks failures worth retrying in a later crawl run; `http_status` is the
    last response's status (after redirects; None when none came), `fetched_at` when the
    last attempt started (UTC)."""

    url: str
    status: str
    reason: str | None = None
    error: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    final_url: str | None = None
    attempts: int = 0
    transient: bool = False
    http_status: int | None = None
    fetched_at: datetime | None = None
    evidence: list = field(default_factory=list)  # opt-out checks (optout.evaluate entries)


ERROR_PREFIX = "curation:"


def encode_outcome(o: Outcome) -> str:
    """An outcome as an error string (img2dataset's error_message column), decodable by decode_error."""
    return ERROR_PREFIX + json.dumps({"status": o.status, "reason": o.reason, "error": o.error,
                                      "transient": o.transient, "http_status": o.http_status,
                                      "fetched_at": o.fetched_at.isoformat() if o.fetched_at else None,
                                      "evidence": o.evidence})


def decode_error(message: str | None) -> dict | None:
    if message and message.startswith(ERROR_PREFIX):
        return json.loads(message[len(ERROR_PREFIX):])
    return None


class _Transient(Exception):
    def __init__(self, reason: str, error: str):
        super().__init__(error)
        self.reason, self.error = reason, error


class _Final(Exception):
    """Not retried within this fetch; `transient`: worth a later crawl run."""

    def __init__(self, status: str, reason: str, error: str | None = None, transient: bool = False):
        super().__init__(error or reason)
        self.status, self.reason, self.error, self.transient = status, reason, error, transient


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to a vetted address while sending the url's host name."""

    def __init__(self, host, port, address, timeout):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, address, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


# Directives that carry a value after a colon: not crawler names.
VALUED_DIRECTIVES = ("max-snippet", "max-image-preview", "max-video-preview", "unavailable_after")


def opted_out(header_values: list[str], directives=OPT_OUT_DIRECTIVES, token: str = USER_AGENT_TOKEN) -> str | None:
    """The opt-out directive that applies, if any. Values are comma lists of directives;
    `name: directive` switches the scope to one crawler ("otherbot: noai, noindex") until
    the next name. Only global rules and those addressed to us (or "*") count; `none`
    means noindex + nofollow."""
    for value in header_values:
        scope = None
        for part in value.split(","):
            part = part.strip()
            head, sep, tail = part.partition(":")
            if sep and head.strip().lower() not in VALUED_DIRECTIVES:
                scope, part = head.strip().lower(), tail.strip()
            if scope not in (None, "*", token.lower()):
                continue
            d = part.lower()
            if d == "none" and "noindex" in directives:
                return "noindex"
            if d in directives:
                return d
    return None


def check_image(data: bytes, max_pixels: int, verify: bool) -> None:
    """Raise _Final for bytes that are not a usable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
    except Image.DecompressionBombError as exc:  # PIL's own header check, past 2x its limit
        raise _Final("dropped", "too_many_pixels", str(exc)) from None
    except Exception as exc:
        raise _Final("dropped", "not_image", f"{type(exc).__name__}: not a decodable image") from None
    if w * h > max_pixels:
        raise _Final("dropped", "too_many_pixels", f"{w}x{h} exceeds {max_pixels} pixels")
    if verify:
        try:
            img.load()
        except Exception as exc:
            raise _Final("failed", "corrupt_image", f"{type(exc).__name__}: {exc}") from None


def check_video(data: bytes) -> None:
    """Container magic of mp4/mov (ftyp box) or webm/mkv (EBML); the probe comes later."""
    if not (data[4:8] == b"ftyp" or data[:4] == b"\x1a\x45\xdf\xa3"):
        raise _Final("dropped", "not_video", "body is not an mp4/webm container")


def _abort(conn: http.client.HTTPConnection) -> None:
    """Deadline reached: break the connection so the blocked read returns."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_body(resp: http.client.HTTPResponse, cap: int, deadline: float) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > cap:
        raise _Final("dropped", "too_large", f"Content-Length {length} exceeds {cap} bytes")
    chunks, size = [], 0
    while True:
        # read1 returns what has arrived, so a server trickling bytes cannot hold a
        # single read open past the deadline.
        chunk = resp.read1(min(65536, cap + 1 - size))
        if time.monotonic() > deadline:
            raise _Transient("timeout", "whole-request deadline exceeded while reading the body")
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            raise _Final("dropped", "too_large", f"body exceeds {cap} bytes")
    if length and length.isdigit() and size < int(length):
        # read(amt) returns short data at EOF instead of raising: check it ourselves.
        raise _Transient("connection_error", f"connection closed after {size} of {length} bytes")
    return b"".join(chunks)


# Characters a request target may carry as they are; everything else (spaces, non-ASCII,
# quotes) is percent-encoded as a browser would. Existing %XX escapes are left alone.
_TARGET_SAFE = "/%:@!$&'()*+,;=-._~?"


def _request_target(parts) -> str:
    return quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_TARGET_SAFE)


def _fetch_once(url: str, kind: str, policy: FetchPolicy, resolver, seen: dict) -> Outcome:
    """One attempt; `seen["http_status"]` is set to each response's status as it comes."""
    deadline = time.monotonic() + policy.deadline
    current = url
    for _hop in range(policy.max_redirects + 1):
        verdict = check_url(current, policy.allow_private, resolver, policy.allowed_networks)
        if not verdict.allowed:
            if verdict.reason == "dns_error":
                if verdict.error and ("EAI_AGAIN" in verdict.error or "Temporary failure" in verdict.error):
                    raise _Transient("dns_error", verdict.error)
                raise _Final("failed", "dns_error", verdict.error or "name resolution failed")  # NXDOMAIN etc.
            raise _Final("dropped" if verdict.reason in ("private_address", "bad_url") else "failed", verdict.reason,
                         verdict.error or f"refused address for {urlsplit(current).hostname}")
        _check_host_signals(current, policy, resolver, seen)
        parts = urlsplit(current)
        port = parts.port or (443 if parts.scheme == "https" else 80)  # http.client misreads "[v6]" alone
        conn_cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Transient("timeout", "whole-request deadline exceeded (redirects)")
        conn = conn_cls(parts.hostname, port, verdict.addresses[0], min(policy.timeout, remaining))
        # The watchdog enforces the deadline on every socket operation (connect, headers
        # sent one byte at a time, body), which per-operation timeouts cannot.
        watchdog = threading.Timer(remaining, _abort, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            path = _request_target(parts)
            conn.request("GET", path, headers={"User-Agent": policy.user_agent, "Accept": "*/*"})
            resp = conn.getresponse()
            seen["http_status"] = resp.status
            if resp.status in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise _Final("failed", "http_error", f"HTTP {resp.status} without Location")
                current = urljoin(current, location)
                continue
            if resp.status >= 500 or resp.status in (408, 429):
                raise _Transient("http_error", f"HTTP {resp.status} {resp.reason}")
            if resp.status != 200:
                raise _Final("failed", "http_error", f"HTTP {resp.status} {resp.reason}")
            _check_response_signals(resp, current, policy, seen)
            data = _read_body(resp, policy.cap(kind), deadline)
            if kind == "image":
                check_image(data, policy.max_pixels, policy.verify_images)
            elif kind == "video":
                check_video(data)
            return Outcome(url, "kept", data=data, content_type=resp.getheader("Content-Type"), final_url=current)
        except (OSError, http.client.HTTPException):  # what a read cut by the watchdog raises
            if time.monotonic() >= deadline:
                raise _Transient("timeout", "whole-request deadline exceeded") from None
            raise
        finally:
            watchdog.cancel()
            conn.close()
    raise _Final("failed", "too_many_redirects", f"more than {policy.max_redirects} redirects")


def _check_host_signals(url: str, policy: FetchPolicy, resolver, seen: dict) -> None:
    """robots.txt, tdmrep.json, ai.txt of `url`'s host (fetched once per host, with the
    same resolver as the url)."""
    if policy.signals is None or not policy.optout.host_signals():
        return
    policy = replace(policy, resolver=resolver)
    entries = policy.signals.check(url, policy)
    seen["evidence"].extend(entries)
    hit = signals_lib.refusal(entries)
    if hit is None:
        return
    if hit["outcome"] == "refused":
        raise _Final("dropped", signals_lib.refusal_reason(hit), f"{hit['source']}: {hit['rule']}")
    rec = policy.signals.record(url, "robots", policy)  # unreachable: disallow all, ask again next run
    raise _Final("failed", rec.get("reason") or "robots_unreachable",
                 f"{hit['source']} unreachable ({rec.get('error')}): disallow all (RFC 9309)", transient=True)


def _check_response_signals(resp, url: str, policy: FetchPolicy, seen: dict) -> None:
    """`tdm-reservation: 1` (TDMRep) and X-Robots-Tag on a 200 response."""
    stamp = {"target": url, "source": "header", "fetched_at": seen["fetched_at"].isoformat(), "http_status": resp.status}
    if policy.optout.tdm_header:
        reserved = (resp.getheader("tdm-reservation") or "").strip() == "1"
        seen["evidence"].append({"signal": "tdm_header", "outcome": "refused" if reserved else "allowed",
                                 "rule": "tdm-reservation: 1" if reserved else None, **stamp})
        if reserved:
            raise _Final("dropped", "opt_out:tdm", "tdm-reservation: 1")
    if policy.opt_out:
        directive = opted_out(resp.headers.get_all("X-Robots-Tag") or [], policy.opt_out)
        seen["evidence"].append({"signal": "x_robots_tag", "outcome": "refused" if directive else "allowed",
                                 "rule": f"X-Robots-Tag: {directive}" if directive else None, **stamp})
        if directive:
            raise _Final("dropped", "opt_out", f"X-Robots-Tag: {directive}")


def _stamped(outcome: Outcome, seen: dict) -> Outcome:
    outcome.http_status, outcome.fetched_at = seen.get("http_status"), seen["fetched_at"]
    outcome.evidence = signals_lib.merge(seen["evidence"])
    return outcome


def fetch(url: str, kind: str = "image", policy: FetchPolicy | None = None,
          resolver: Callable[[str, int], list[str]] | None = None,
          sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Fetch `url` under `policy`; never raises for anything the remote side does.
    `resolver` (else the policy's, else the system's) turns host names into addresses."""
    policy = policy or FetchPolicy()
    resolver = resolver or policy.resolver or resolve
    last: Outcome | None = None
    for attempt in range(1, policy.retries + 2):
        seen: dict = {"fetched_at": datetime.now(timezone.utc), "evidence": []}
        try:
            outcome = _fetch_once(url, kind, policy, resolver, seen)
            outcome.attempts = attempt
            return _stamped(outcome, seen)
        except _Final as exc:
            return _stamped(Outcome(url, exc.status, exc.reason, exc.error, attempts=attempt, transient=exc.transient), seen)
        except _Transient as exc:
            last = _stamped(Outcome(url, "failed", exc.reason, exc.error, attempts=attempt, transient=True), seen)
        except (TimeoutError, socket.timeout) as exc:
            last = _stamped(Outcome(url, "failed", "timeout", f"{type(exc).__name__}: {exc or 'timed out'}",
                                    attempts=attempt, transient=True), seen)
        except (ConnectionError, http.client.IncompleteRead, http.client.RemoteDisconnected) as exc:
            last = _stamped(Outcome(url, "failed", "connection_error", f"{type(exc).__name__}: {exc}",
                                    attempts=attempt, transient=True), seen)
        except ssl.SSLError as exc:
            return _stamped(Outcome(url, "failed", "tls_error", f"{type(exc).__name__}: {exc}", attempts=attempt), seen)
        except (http.client.HTTPException, OSError, ValueError) as exc:
            return _stamped(Outcome(url, "failed", "fetch_error", f"{type(exc).__name__}: {exc}", attempts=attempt), seen)
        if attempt <= policy.retries:
            wait = min(policy.backoff_max, policy.backoff * 2 ** (attempt - 1))
            sleep(wait * random.uniform(0.5, 1.0))
    return last
