"""A Google Cloud Storage emulator for `gs://` workdirs, and the environment that points every layer at it.

    python tests/gcs_emulator.py BUCKET CA_FILE

serves the pure-Python emulator of PyPI's `gcp-storage-emulator` (in memory, with BUCKET created) on a free
localhost port, and an HTTPS proxy in front of it on another; it writes a test CA's certificate to CA_FILE and prints
one JSON line with both ports once both listen. `start()` runs it as a child process and `Emulator.stop()` ends it
by its process id.

Each layer that writes a `gs://` workdir is pointed at the emulator by environment variables only, so that `mnv2`
subprocesses inherit them (`Emulator.environment`):

- tensorstore (orbax's arrays): `TENSORSTORE_GCS_HTTP_URL`, the GCS endpoint, here the emulator itself;
- TensorFlow's Cloud Storage file system (`tf.io.gfile`, hence `etils.epath`, orbax's directory operations and the
  TensorBoard writer) has its endpoints compiled in (`https://www.googleapis.com/storage/v1/`, `.../upload/...` and
  `https://storage.googleapis.com/` in `xla/tsl/platform/cloud/gcs_file_system.cc`) and no variable to change them;
  its libcurl honours `https_proxy`, though, and TF sets `CURLOPT_CAINFO` from `CURL_CA_BUNDLE`
  (`curl_http_request.cc`). So `https_proxy` names this module's proxy, which accepts `CONNECT` to those two hosts
  only, terminates TLS with a certificate of the test CA (`CURL_CA_BUNDLE`) and forwards each request to the emulator;
- google-cloud-storage (orbax lists a `gs://` directory's steps with it): `STORAGE_EMULATOR_HOST`, which also makes
  it use anonymous credentials;
- tensorstore and TF: `GOOGLE_AUTH_TOKEN_FOR_TESTING`, a fixed bearer token instead of looking for credentials (the
  emulator ignores it); `no_proxy` keeps the plain-HTTP clients off the proxy.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import http.server
import io
import json
import logging
import os
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http import HTTPStatus
from typing import Any

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")  # where TF's file system sends its requests
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # whatever proxy the environment names
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "content-length"}


class _TlsProxy(http.server.BaseHTTPRequestHandler):
    """`CONNECT` to a Google host becomes TLS with the test CA's certificate; each request inside is forwarded to the
    emulator, whose `http://` upload URLs (`Location`) are turned back into `https://` ones."""

    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered here
    disable_nagle_algorithm = True  # else each response's body waits for the client's delayed ACK of its headers
    upstream: tuple[str, int]
    tls: ssl.SSLContext

    def do_CONNECT(self) -> None:
        host, _, port = self.path.rpartition(":")
        if host not in GOOGLE_HOSTS or port != "443":
            self.send_error(403, f"this test proxy serves only {GOOGLE_HOSTS}")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.connection = self.tls.wrap_socket(self.connection, server_side=True)
        self.rfile = self.connection.makefile("rb")
        self.wfile = self.connection.makefile("wb", buffering=0)

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):  # TF's uploads from a file
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"expect"}}
        upstream = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() in HOP_BY_HOP:
                continue
            if name.lower() == "location":
                value = value.replace("http://", "https://", 1)
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_chunked(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the chunk's CRLF
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("GCS_EMULATOR_LOG"):
            sys.stderr.write(f"proxy: {self.command} {self.path} {self.headers.get('User-Agent')}: {format % args}\n")


def _complete_the_emulator() -> None:
    """Fills the gaps of gcp-storage-emulator that tensorstore and TF's file system run into, as Cloud Storage does:

    - media downloads carry `x-goog-generation` (without it tensorstore reads every object as generation 0 and its
      next conditional write of that object fails: "Malformed StorageGeneration");
    - media and resumable uploads honour `ifGenerationMatch` (tensorstore's and TF's create-if-absent and
      compare-and-swap writes), answering 412 when the object's generation differs (0: no such object);
    - a media upload may be empty (TF marks a directory `d` with an empty object `d/`; the emulator failed on
      `len(None)`).
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    download, insert, media_upload = objects.download, objects.insert, objects._media_upload

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    def insert_if_generation_matches(request, response, storage, *args, **kwargs):
        wanted, name = request.query.get("ifGenerationMatch"), request.query.get("name")
        if wanted and name:
            try:
                current = str(storage.get_file_obj(request.params["bucket_name"], name[0])["generation"])
            except NotFound:
                current = "0"
            if current != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return insert(request, response, storage, *args, **kwargs)

    def media_upload_maybe_empty(request, response, storage):
        if request.data is None:
            request._data = b""
        return media_upload(request, response, storage)

    replacements = {download: download_with_generation, insert: insert_if_generation_matches}
    for _, methods in server.HANDLERS:
        methods.update({method: replacements.get(fn, fn) for method, fn in methods.items()})
    objects.download, objects.insert = download_with_generation, insert_if_generation_matches  # get(alt=media)
    objects._media_upload = media_upload_maybe_empty


def serve(bucket: str, ca_file: str) -> None:
    """The child process: the emulator and the proxy, until SIGTERM or SIGKILL."""
    import trustme
    from gcp_storage_emulator.handlers.buckets import create_bucket
    from gcp_storage_emulator.server import RequestHandler
    from gcp_storage_emulator.storage import Storage

    _complete_the_emulator()
    if not os.environ.get("GCS_EMULATOR_LOG"):  # else each request and the emulator's own messages on stderr
        logging.disable(logging.CRITICAL)
    storage = Storage(use_memory_fs=True)
    storage._write_config_to_file = lambda: None  # in memory: it re-encoded every object's metadata at each write
    create_bucket(bucket, storage)
    lock = threading.Lock()

    class OneRequestAtATime(RequestHandler):
        """Each connection in its own thread, which reads the request's body; the emulator's storage, not written
        to from several threads in the package's own (single-threaded) server, then serves one request at a time."""

        disable_nagle_algorithm = True

        def _serve(self, method: str) -> None:
            if self.headers.get("Content-Length"):
                self.rfile = io.BytesIO(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                getattr(RequestHandler, method)(self)

        def do_GET(self):
            self._serve("do_GET")

        def do_POST(self):
            self._serve("do_POST")

        def do_PUT(self):
            self._serve("do_PUT")

        def do_DELETE(self):
            self._serve("do_DELETE")

        def do_PATCH(self):
            self._serve("do_PATCH")

    emulator = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(OneRequestAtATime, storage))
    emulator.daemon_threads = True

    ca = trustme.CA()
    ca.cert_pem.write_to_path(ca_file)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*GOOGLE_HOSTS).configure_cert(tls)
    handler = type("Proxy", (_TlsProxy,), {"upstream": emulator.server_address, "tls": tls})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    proxy.daemon_threads = True

    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    print(json.dumps({"port": emulator.server_address[1], "proxy_port": proxy.server_address[1]}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    emulator.serve_forever()


# What the emulator and its environment need: the emulator, the proxy's test CA, and the client orbax lists a
# bucket's steps with (a dependency of the project: orbax imports it for gs:// paths without declaring it).
MODULES = ("gcp_storage_emulator", "trustme", "google.cloud.storage")


def missing_modules() -> list[str]:
    import importlib.util

    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False

    return [name for name in MODULES if not found(name)]


@dataclasses.dataclass
class Emulator:
    process: subprocess.Popen
    bucket: str
    port: int
    proxy_port: int
    ca_file: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def environment(self) -> dict[str, str]:
        """The variables that send tensorstore's and TensorFlow's `gs://` requests here."""
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "STORAGE_EMULATOR_HOST": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "https_proxy": f"http://127.0.0.1:{self.proxy_port}",
            "CURL_CA_BUNDLE": self.ca_file,
            "no_proxy": "127.0.0.1,localhost",
        }

    def objects(self, prefix: str = "") -> list[str]:
        """The names of the bucket's objects under `prefix`, asked of the emulator's JSON API."""
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            url = f"{self.url}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}"
            with _DIRECT.open(url, timeout=30) as response:
                listing = json.load(response)
            names += [item["name"] for item in listing.get("items", [])]
            token = listing.get("nextPageToken")
            if not token:
                return sorted(names)

    def stop(self) -> None:
        """Ends the child process by its id (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process.stdout.close()


def start(bucket: str, ca_file: str, timeout_s: float = 60) -> Emulator:
    """Starts `serve` in a child process and waits until it listens."""
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), bucket, str(ca_file)], stdout=subprocess.PIPE, text=True
    )
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    line = process.stdout.readline() if ready else ""  # its one line, once both servers listen ("" if it died)
    if not line:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)
        raise RuntimeError(f"the GCS emulator exited with status {process.returncode} before it listened")
    ports = json.loads(line)
    emulator = Emulator(process, bucket, ports["port"], ports["proxy_port"], str(ca_file))
    deadline = time.time() + timeout_s
    while True:
        try:
            with _DIRECT.open(emulator.url + "/", timeout=5):
                return emulator
        except OSError:
            if time.time() > deadline:
                emulator.stop()
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    serve(*sys.argv[1:])
