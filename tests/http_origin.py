"""A real HTTP server on localhost for download tests: serves given bytes, honours `Range: bytes=N-`, records the
requests, and can cut or stall the next response."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import re
import threading
import time
from collections.abc import Iterator


@dataclasses.dataclass
class Origin:
    """What the test server serves, what it was asked, and how it misbehaves on the next request."""

    port: int = 0
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)  # (path, Range header)
    cut_next_after: int | None = None  # bytes of the next body sent before the connection is closed
    stall_before_cut_s: float = 0.0  # how long the cut connection stays silent before it closes
    ignore_range: bool = False
    delay_s: float = 0.0  # before each body, so that concurrent fetches overlap

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    origin: Origin  # set on a subclass per server

    def do_GET(self) -> None:
        origin = self.origin
        requested_range = self.headers.get("Range")
        origin.requests.append((self.path, requested_range))
        body = origin.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", requested_range or "")
        if match and not origin.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        time.sleep(origin.delay_s)
        cut, origin.cut_next_after = origin.cut_next_after, None
        self.wfile.write(body[start:] if cut is None else body[start : start + cut])
        if cut is not None:
            self.wfile.flush()
            time.sleep(origin.stall_before_cut_s)
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(files: dict[str, bytes]) -> Iterator[Origin]:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) serving `files` (URL path -> bytes) until the block ends."""
    served = Origin(files=dict(files))
    handler = type("Handler", (RangeHandler,), {"origin": served})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    served.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
