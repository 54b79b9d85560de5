"""mnv2_jax.weights.download against a real HTTP server on localhost: caching, verification, resume, offline use,
mirrors and concurrent fetches."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import tarfile
import threading

import pytest
from http_origin import serve

from mnv2_jax.weights import download
from mnv2_jax.weights.download import DownloadError

BLOB_PATH = "/files/blob.bin"
ARCHIVE_PATH = "/example.invalid/models/x.tgz"  # also the mirror's path of https://example.invalid/models/x.tgz
ARCHIVE_MEMBER = ("weights/params.txt", b"conv1 32 3 3 3\n" * 20)
CUT_AFTER_BYTES = 100_000


def tgz_bytes() -> bytes:
    """A .tgz holding ARCHIVE_MEMBER, as weights are often published."""
    name, content = ARCHIVE_MEMBER
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.fixture
def origin(monkeypatch, tmp_path):
    """A ThreadingHTTPServer on 127.0.0.1 serving a random blob and a .tgz; the cache in tmp_path, online."""
    monkeypatch.setenv("MNV2_CACHE", str(tmp_path / "cache"))
    for name in ("MNV2_OFFLINE", "HF_HUB_OFFLINE", "MNV2_WEIGHTS_MIRROR", "MNV2_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    with serve({BLOB_PATH: os.urandom(300 * 1024), ARCHIVE_PATH: tgz_bytes()}) as served:
        yield served


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def one_line_error(url: str, sha: str | None) -> str:
    with pytest.raises(DownloadError) as raised:
        download.fetch(url, sha)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_download_then_cache_hit_without_requests_also_offline(origin, monkeypatch):
    url, blob = origin.url(BLOB_PATH), origin.files[BLOB_PATH]
    path = download.fetch(url, sha256(blob))
    assert path == str(download.cached_path(url))
    assert path.startswith(os.environ["MNV2_CACHE"])
    with open(path, "rb") as file:
        assert file.read() == blob
    assert len(origin.requests) == 1
    assert download.fetch(url, sha256(blob)) == path
    monkeypatch.setenv("MNV2_OFFLINE", "1")
    assert download.fetch(url, sha256(blob)) == path
    assert len(origin.requests) == 1


def test_checksum_mismatch_caches_nothing(origin):
    url = origin.url(BLOB_PATH)
    wrong = "0" * 64
    message = one_line_error(url, wrong)
    assert url in message and "checksum mismatch" in message and "nothing was cached" in message
    assert f"expected sha256 {wrong}" in message and sha256(origin.files[BLOB_PATH]) in message
    cached = download.cached_path(url)
    assert not cached.exists()
    assert not cached.with_name(cached.name + ".partial").exists()


def test_interrupted_download_resumes_with_a_range_request(origin):
    url, blob = origin.url(BLOB_PATH), origin.files[BLOB_PATH]
    origin.cut_next_after = CUT_AFTER_BYTES
    message = one_line_error(url, sha256(blob))
    assert url in message and "resume" in message
    cached = download.cached_path(url)
    partial = cached.with_name(cached.name + ".partial")
    assert partial.stat().st_size == CUT_AFTER_BYTES and not cached.exists()
    path = download.fetch(url, sha256(blob))
    assert origin.requests[-1] == (BLOB_PATH, f"bytes={CUT_AFTER_BYTES}-")
    with open(path, "rb") as file:
        assert file.read() == blob
    assert not partial.exists()


def test_a_stalled_connection_times_out_and_resumes(origin, monkeypatch):
    monkeypatch.setenv("MNV2_DOWNLOAD_TIMEOUT", "0.1")
    url, blob = origin.url(BLOB_PATH), origin.files[BLOB_PATH]
    origin.cut_next_after, origin.stall_before_cut_s = CUT_AFTER_BYTES, 1.0
    message = one_line_error(url, sha256(blob))
    assert "TimeoutError" in message and "resume" in message
    cached = download.cached_path(url)
    assert cached.with_name(cached.name + ".partial").stat().st_size == CUT_AFTER_BYTES
    path = download.fetch(url, sha256(blob))
    assert origin.requests[-1] == (BLOB_PATH, f"bytes={CUT_AFTER_BYTES}-")
    with open(path, "rb") as file:
        assert file.read() == blob


def test_progress_is_logged_with_rate_and_eta(origin, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(download, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(download, "CHUNK_BYTES", 64 * 1024)
    download.fetch(origin.url(BLOB_PATH), None)
    progress = [record.getMessage() for record in caplog.records if "MB/s" in record.getMessage()]
    assert progress and all(" of 0.3 MB" in line and "ETA" in line for line in progress)


def test_a_server_that_ignores_ranges_still_gives_the_right_file(origin):
    url, blob = origin.url(BLOB_PATH), origin.files[BLOB_PATH]
    origin.cut_next_after = CUT_AFTER_BYTES
    one_line_error(url, sha256(blob))
    origin.ignore_range = True
    path = download.fetch(url, sha256(blob))
    assert origin.requests[-1] == (BLOB_PATH, f"bytes={CUT_AFTER_BYTES}-")  # asked for a range, got 200
    with open(path, "rb") as file:
        assert file.read() == blob


def test_a_complete_partial_answered_416_starts_over(origin):
    url, blob = origin.url(BLOB_PATH), origin.files[BLOB_PATH]
    cached = download.cached_path(url)
    cached.parent.mkdir(parents=True)
    cached.with_name(cached.name + ".partial").write_bytes(b"x" * len(blob))  # complete, but wrong
    path = download.fetch(url, sha256(blob))
    assert [header for _, header in origin.requests] == [f"bytes={len(blob)}-", None]
    with open(path, "rb") as file:
        assert file.read() == blob


def test_offline_with_nothing_cached_makes_no_request(origin, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "True")
    url = origin.url(BLOB_PATH)
    message = one_line_error(url, sha256(origin.files[BLOB_PATH]))
    assert url in message and str(download.cached_path(url)) in message and "HF_HUB_OFFLINE" in message
    assert origin.requests == []


def test_a_refused_connection_is_one_line(origin):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{closed_port}/files/blob.bin"
    message = one_line_error(url, None)
    assert f"cannot download {url}" in message and str(download.cached_path(url)) in message


def test_http_error_is_one_line(origin):
    url = origin.url("/files/missing.bin")
    message = one_line_error(url, None)
    assert f"cannot download {url}" in message and "404" in message


def test_without_sha256_the_first_download_is_recorded_and_checked(origin):
    url, blob = origin.url(BLOB_PATH), origin.files[BLOB_PATH]
    path = download.fetch(url, None)
    record = download.cached_path(url).with_name("blob.bin.sha256")
    assert record.read_text().strip() == sha256(blob)
    assert download.fetch(url, None) == path and len(origin.requests) == 1
    with open(path, "r+b") as file:
        file.write(b"tampered")
    message = one_line_error(url, None)
    assert url in message and "recorded" in message


def test_prefix_checksum_and_local_files(origin, tmp_path):
    url, blob = origin.url(BLOB_PATH), origin.files[BLOB_PATH]
    assert download.fetch(url, sha256(blob)[:8].upper()) == str(download.cached_path(url))
    assert "checksum mismatch" in one_line_error(origin.url(ARCHIVE_PATH), sha256(blob)[:8])
    local = tmp_path / "local.bin"
    local.write_bytes(blob)
    assert download.fetch(str(local), sha256(blob)) == str(local)
    assert download.fetch(local.as_uri(), sha256(blob)[:8]) == str(local)
    assert "checksum mismatch" in one_line_error(str(local), "f" * 8)
    missing = str(tmp_path / "missing.bin")
    assert missing in one_line_error(missing, None)
    assert "hex digits" in one_line_error(url, sha256(blob)[:7])


def test_mirror_serves_the_origin_url_into_the_origins_cache_path(origin, monkeypatch):
    monkeypatch.setenv("MNV2_WEIGHTS_MIRROR", origin.url("/"))
    url = "https://example.invalid/models/x.tgz"
    assert download.mirrored(url) == origin.url(ARCHIVE_PATH)
    path = download.fetch(url, sha256(origin.files[ARCHIVE_PATH]))
    assert origin.requests == [(ARCHIVE_PATH, None)]
    assert path == str(download.cached_path(url))
    assert path.endswith(os.path.join("downloads", "example.invalid", "models", "x.tgz"))
    name, content = ARCHIVE_MEMBER
    with tarfile.open(path) as archive:
        assert archive.extractfile(name).read() == content


def test_concurrent_fetches_download_once(origin):
    url, blob = origin.url(BLOB_PATH), origin.files[BLOB_PATH]
    origin.delay_s = 0.3
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(download.fetch(url, sha256(blob)))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 2 and len(origin.requests) == 1


def test_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MNV2_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert download.cache_dir() == tmp_path / "mnv2_jax"
    monkeypatch.setenv("MNV2_CACHE", str(tmp_path / "mine"))
    assert download.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MNV2_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not download.offline()
    monkeypatch.setenv("MNV2_OFFLINE", "YES")
    assert download.offline()
    monkeypatch.setenv("MNV2_WEIGHTS_MIRROR", "http://mirror:8080/prefix/")
    assert download.mirrored("https://a.b/c/d.tgz") == "http://mirror:8080/prefix/a.b/c/d.tgz"
    monkeypatch.delenv("MNV2_WEIGHTS_MIRROR")
    assert download.mirrored("https://a.b/c/d.tgz") == "https://a.b/c/d.tgz"
    assert download.cached_path("https://a.b/c/d.tgz") == tmp_path / "mine" / "downloads" / "a.b" / "c" / "d.tgz"


def test_download_error_is_one_line():
    assert str(DownloadError("cannot download x (a\nreason)")) == "cannot download x (a reason)"
