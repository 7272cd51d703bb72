"""A static file server on 127.0.0.1 for the demo corpus (and for tests)."""

from __future__ import annotations

import contextlib
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


class LoopbackServer(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a crawler with dozens of connections
    # would see dropped SYNs and one-second retransmit stalls.
    request_queue_size = 1024
    daemon_threads = True


class _HeaderHandler(_QuietHandler):
    """Adds `extra_headers` ((url path prefix, ((name, value), ...)), ...) to the responses
    under each prefix: the demo's opt-out headers (corpus.RESPONSE_HEADERS)."""

    extra_headers: tuple = ()

    def end_headers(self):
        path = self.path.split("?", 1)[0]
        for prefix, headers in self.extra_headers:
            if path.startswith(prefix):
                for name, value in headers:
                    self.send_header(name, value)
        super().end_headers()


@contextlib.contextmanager
def serve_directory(root: str | Path, headers: dict[str, tuple] | None = None):
    """Serve `root` on 127.0.0.1 on a free port; yields the base url (no trailing slash).
    `headers`: url path prefix -> ((name, value), ...) added to the responses under it."""
    handler = type("_Handler", (_HeaderHandler,), {"extra_headers": tuple((headers or {}).items())})
    with serve(functools.partial(handler, directory=str(root))) as base:
        yield base


@contextlib.contextmanager
def serve(handler):
    """Run an HTTP request handler on 127.0.0.1 on a free port, in a background thread;
    yields the base url and shuts the server down on exit."""
    server = LoopbackServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
