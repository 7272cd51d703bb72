"""A deliberately hostile HTTP server on 127.0.0.1 for crawl tests: every way a url
can go wrong, each on its own path. Requests are bounded by the tests that use it."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

from curation.demo.server import serve

from PIL import Image


def jpeg_bytes(seed: int, size=(96, 72)) -> bytes:
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    for x in range(0, size[0], 8):
        img.putpixel((x, (x * seed) % size[1]), (0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims width x height pixels over a few bytes of zlib data:
    the shape of a decompression bomb, without the cost of building a real one."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


class Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: Counter = Counter()
    bomb = None

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", ctype="image/jpeg", headers=(), length=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts, caps)
            self.close_connection = True

    def do_GET(self):  # noqa: C901 - one branch per hostile behaviour, on purpose
        path = self.path.split("?")[0]
        Hostile.hits[path] += 1
        n = Hostile.hits[path]
        good = jpeg_bytes(len(path))
        if path.startswith("/img/"):
            self._send(200, jpeg_bytes(int(path.split("/")[-1].split(".")[0])))
        elif path == "/missing.jpg":
            self._send(404, b"not here", "text/plain")
        elif path == "/gone.jpg":
            self._send(410, b"gone", "text/plain")
        elif path.startswith("/flaky"):  # 500 twice, then fine
            self._send(500, b"oops", "text/plain") if n <= 2 else self._send(200, good)
        elif path == "/always-500.jpg":
            self._send(503, b"down", "text/plain")
        elif path == "/truncated.jpg":  # intact header, cut data, served consistently
            self._send(200, good[: len(good) * 4 // 5])
        elif path == "/short-read.jpg":  # promises more than it sends, then hangs up
            self._send(200, good[: len(good) // 2], length=len(good))
            self.close_connection = True
        elif path == "/page.jpg":
            self._send(200, b"<!doctype html><html><body>hello</body></html>", "text/html")
        elif path == "/optout.jpg":
            self._send(200, good, headers=[("X-Robots-Tag", "noindex, noai")])
        elif path == "/optout-us.jpg":
            self._send(200, good, headers=[("X-Robots-Tag", "curation-vlm: noimageai")])
        elif path == "/optout-other.jpg":
            self._send(200, good, headers=[("X-Robots-Tag", "otherbot: noai")])
        elif path == "/slow.jpg":  # no answer within the socket timeout
            time.sleep(1.5)
            self._send(200, good)
        elif path == "/drip.jpg":  # each byte in time, the whole far too late
            self.send_response(200)
            self.send_header("Content-Length", str(len(good)))
            self.end_headers()
            try:
                for i in range(0, len(good), 64):
                    self.wfile.write(good[i:i + 64])
                    self.wfile.flush()
                    time.sleep(0.25)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
        elif path == "/huge-declared.jpg":
            self._send(200, b"", length=500 * 1024 * 1024)
            self.close_connection = True
        elif path == "/huge-chunked.jpg":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\xff" * 65536
            try:
                for _ in range(200):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        elif path == "/bomb.png":
            Hostile.bomb = Hostile.bomb or bomb_png()
            self._send(200, Hostile.bomb, "image/png")
        elif path == "/redirect-ok.jpg":
            self._send(302, b"", headers=[("Location", "/img/7.jpg")])
        elif path == "/redirect-private.jpg":
            self._send(302, b"", headers=[("Location", "http://10.255.255.1/x.jpg")])
        elif path == "/redirect-loop.jpg":
            self._send(302, b"", headers=[("Location", "/redirect-loop.jpg")])
        elif path.startswith("/video/"):
            self._send(200, Hostile.videos[path], "video/mp4")
        else:
            self._send(404, b"unknown", "text/plain")

    videos: dict = {}


@contextlib.contextmanager
def hostile_server():
    Hostile.hits = Counter()
    with serve(Hostile) as base:
        yield base
