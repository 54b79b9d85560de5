"""Downloads of weight files into a local cache, verified by SHA-256, resumable and safe across processes.

Cache layout: `cache_dir()/downloads/<host>/<path of the URL>` holds each file under its origin URL (also when it
came from a mirror). Beside it:

- `<file>.partial`: an unfinished download; the next `fetch` resumes it (HTTP `Range`). It never counts as cached: a
  download becomes `<file>` only once verified, by an atomic rename.
- `<file>.sha256`: the digest recorded at the first download of a URL fetched without a checksum; every later use
  checks the file against it.
- `<file>.lock`: the lock that serialises processes fetching the same file (multi-process training on one host).

Environment variables:

- `MNV2_CACHE`: the cache directory (default `$XDG_CACHE_HOME/mnv2_jax`, else `~/.cache/mnv2_jax`).
- `MNV2_OFFLINE` or `HF_HUB_OFFLINE` = 1/true/yes: no network; cached files are still used.
- `MNV2_WEIGHTS_MIRROR=http://host/prefix`: download `https://a.b/c/d.tgz` from `http://host/prefix/a.b/c/d.tgz`
  (for air-gapped clusters with an internal mirror).
- `MNV2_DOWNLOAD_TIMEOUT`: seconds a connection may stay silent before the download fails (default 60).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import pathlib
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import BinaryIO

from absl import logging

from mnv2_jax.errors import UserError

CHUNK_BYTES = 1 << 20
PROGRESS_INTERVAL_S = 5.0
DEFAULT_TIMEOUT_S = 60.0
MIN_PREFIX_HEX = 8
OFFLINE_VARIABLES = ("MNV2_OFFLINE", "HF_HUB_OFFLINE")
REMOTE_SCHEMES = ("http", "https")


class DownloadError(UserError):
    """A file could not be fetched or verified; the message is one line naming the URL and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


def cache_dir() -> pathlib.Path:
    """`$MNV2_CACHE` if set, else `$XDG_CACHE_HOME/mnv2_jax`, else `~/.cache/mnv2_jax`."""
    if os.environ.get("MNV2_CACHE"):
        return pathlib.Path(os.environ["MNV2_CACHE"]).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(xdg_cache) / "mnv2_jax"


def _offline_variable() -> str | None:
    """The first variable of OFFLINE_VARIABLES set to 1/true/yes, if any."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes"):
            return name
    return None


def offline() -> bool:
    """True when `MNV2_OFFLINE` or `HF_HUB_OFFLINE` is 1/true/yes (case-insensitive)."""
    return _offline_variable() is not None


def mirrored(url: str) -> str:
    """`url` as fetched through `$MNV2_WEIGHTS_MIRROR` (`https://a.b/c` -> `<mirror>/a.b/c`); unchanged if unset."""
    mirror = os.environ.get("MNV2_WEIGHTS_MIRROR", "").strip()
    parsed = urllib.parse.urlsplit(url)
    if not mirror or parsed.scheme not in REMOTE_SCHEMES:
        return url
    query = f"?{parsed.query}" if parsed.query else ""
    return f"{mirror.rstrip('/')}/{_host(parsed)}{parsed.path}{query}"


def _host(parsed: urllib.parse.SplitResult) -> str:
    """The URL's host (and port), without any user name or password."""
    return parsed.netloc.rpartition("@")[2].lower()


def cached_path(url: str) -> pathlib.Path:
    """Where `url`'s file lives in the cache: `cache_dir()/downloads/<host>/<path of the URL>`."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in REMOTE_SCHEMES:
        raise DownloadError(f"{url} is not an http(s) URL, so it has no place in the download cache")
    parts = [urllib.parse.unquote(part) for part in parsed.path.split("/") if part]
    if not parts or any(part in (".", "..") or "/" in part or "\0" in part for part in parts):
        raise DownloadError(f"{url} does not name a file (its path must be a plain file path); check the URL")
    return cache_dir() / "downloads" / _host(parsed) / pathlib.Path(*parts)


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of the file at `path`, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _checked_digest(url: str, sha256: str | None) -> str | None:
    """`sha256` lower-cased, once checked to be 8 to 64 hex digits."""
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if not re.fullmatch(f"[0-9a-f]{{{MIN_PREFIX_HEX},64}}", digest):
        raise DownloadError(
            f"the sha256 given for {url} ({sha256!r}) is not 8 to 64 hex digits; pass its SHA-256 or a prefix of it"
        )
    return digest


def _mismatch(url: str, expected: str, actual: str) -> str:
    ellipsis = "…" if len(expected) < 64 else ""
    return f"{url}: checksum mismatch: expected sha256 {expected}{ellipsis}, got {actual}"


def fetch(url: str, sha256: str | None) -> str:
    """The local path of `url`'s file, verified; downloads it into the cache unless it is there already.

    `url` is an http(s) URL, a `file://` URL or a local path (the last two are used where they are, not copied).
    `sha256` is the file's full hex SHA-256 or a prefix of at least 8 hex digits. With `sha256=None` the digest of
    the first download is recorded in `<cached file>.sha256`, and every later use checks the file against that
    record (trust on first use). A cached file whose digest matches is used without any network request, also
    offline. Raises DownloadError (one line) when the file cannot be had or does not match.
    """
    expected = _checked_digest(url, sha256)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in REMOTE_SCHEMES:
        return str(_fetch_remote(url, expected))
    if scheme == "file":
        return _local_file(url, urllib.request.url2pathname(urllib.parse.urlsplit(url).path), expected)
    if "://" in url:
        raise DownloadError(f"cannot fetch {url}: only http(s) and file:// URLs or local paths are supported")
    return _local_file(url, url, expected)


def _local_file(url: str, path: str, expected: str | None) -> str:
    if not os.path.isfile(path):
        raise DownloadError(f"no such file: {url}; check the path, or pass a URL to download it")
    if expected is not None:
        actual = sha256_of(path)
        if not actual.startswith(expected):
            raise DownloadError(f"{_mismatch(url, expected, actual)}; pass the right file or its right sha256")
    return path


@contextlib.contextmanager
def _locked(cached: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive lock on `<cached>.lock` (left in place: removing a lock file others wait on is racy)."""
    with open(_beside(cached, ".lock"), "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("Waiting for another process fetching %s", cached)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _beside(cached: pathlib.Path, suffix: str) -> pathlib.Path:
    return cached.with_name(cached.name + suffix)


def _fetch_remote(url: str, given: str | None) -> pathlib.Path:
    cached = cached_path(url)
    record = _beside(cached, ".sha256")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with _locked(cached):
        recorded = record.read_text().strip() if record.exists() else None
        expected = given or recorded
        if cached.exists():
            actual = sha256_of(cached)
            if expected is None:  # placed there by hand: it becomes the record
                record.write_text(actual + "\n")
                return cached
            if actual.startswith(expected):
                return cached
            if given is None:
                raise DownloadError(
                    f"{url}: the cached file {cached} no longer matches the sha256 recorded at its download "
                    f"({recorded}, in {record}), got {actual}; delete both files to download it again"
                )
            logging.warning("%s does not match its sha256 %s…; downloading it again", cached, expected)
        partial = _beside(cached, ".partial")
        _download(url, partial)
        actual = sha256_of(partial)
        if expected is not None and not actual.startswith(expected):
            partial.unlink()
            raise DownloadError(
                f"{_mismatch(url, expected, actual)}; nothing was cached (check the URL and its checksum"
                f"{', or the mirror ' + mirrored(url) if mirrored(url) != url else ''})"
            )
        os.replace(partial, cached)
        if expected is None:
            record.write_text(actual + "\n")
        return cached


def _cannot_download(url: str, reason: str) -> DownloadError:
    source = mirrored(url)
    via = f" from the mirror {source}" if source != url else ""
    return DownloadError(
        f"cannot download {url}{via} ({reason}); without network, download it elsewhere and place it at "
        f"{cached_path(url)}, or pass the local file path instead"
    )


def _timeout_s() -> float:
    text = os.environ.get("MNV2_DOWNLOAD_TIMEOUT", "")
    try:
        return float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DownloadError(f"MNV2_DOWNLOAD_TIMEOUT={text!r} is not a number of seconds; set it to e.g. 60") from None


def _open(url: str, offset: int) -> http.client.HTTPResponse | None:
    """The response to a GET of `url`'s source from byte `offset` on; None when the server answers 416."""
    variable = _offline_variable()
    if variable:
        raise _cannot_download(url, f"offline: {variable} is set")
    request = urllib.request.Request(mirrored(url), headers={"User-Agent": "mnv2_jax"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=_timeout_s())
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == http.HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE and offset:
            return None
        raise _cannot_download(url, f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise _cannot_download(url, str(error.reason)) from None
    except (OSError, http.client.HTTPException) as error:  # timeouts, resets before the headers
        raise _cannot_download(url, f"{type(error).__name__}: {error}") from None


def _resumes_at(response: http.client.HTTPResponse, offset: int) -> bool:
    """Whether `response` continues a partial file of `offset` bytes (206 from there) or replaces it (200)."""
    if response.status != http.HTTPStatus.PARTIAL_CONTENT:
        return True
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return bool(match) and int(match.group(1)) == offset


def _download(url: str, partial: pathlib.Path) -> None:
    """Downloads `url` (through any mirror) into `partial`, resuming what it holds already."""
    offset = partial.stat().st_size if partial.exists() else 0
    response = _open(url, offset)
    if response is None or not _resumes_at(response, offset):  # a complete, stale or misread partial: start over
        if response is not None:
            response.close()
        partial.unlink(missing_ok=True)
        offset = 0
        response = _open(url, offset)
    with response:
        if response.status != http.HTTPStatus.PARTIAL_CONTENT:
            offset = 0  # the server ignored the range and sends it all
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        if offset:
            logging.info("Resuming %s at byte %d", url, offset)
        with open(partial, "ab" if offset else "wb") as file:
            _copy(url, response, file, offset, total)


def _copy(url: str, response: http.client.HTTPResponse, file: BinaryIO, done: int, total: int | None) -> None:
    """Copies the body into `file` in chunks, logging progress at most every PROGRESS_INTERVAL_S seconds."""
    start, started_at, logged_at = done, time.monotonic(), time.monotonic()
    while True:
        try:  # read1: a stalled or reset connection loses nothing that arrived before it
            chunk = response.read1(CHUNK_BYTES)
        except (http.client.HTTPException, OSError) as error:
            raise _interrupted(url, file.name, done, total, f"{type(error).__name__}: {error}") from None
        if not chunk:
            break
        file.write(chunk)
        done += len(chunk)
        now = time.monotonic()
        if now - logged_at >= PROGRESS_INTERVAL_S:
            logged_at = now
            _log_progress(url, done, total, (done - start) / max(now - started_at, 1e-6))
    # http.client returns a short body without an error when a connection with a Content-Length closes early
    if total is not None and done < total:
        raise _interrupted(url, file.name, done, total, "the connection closed early")


def _log_progress(url: str, done: int, total: int | None, bytes_per_s: float) -> None:
    megabytes_per_s = bytes_per_s / 1e6
    if total is None:
        logging.info("Downloading %s: %.1f MB, %.1f MB/s", url, done / 1e6, megabytes_per_s)
        return
    eta_s = (total - done) / bytes_per_s if bytes_per_s > 0 else float("inf")
    logging.info(
        "Downloading %s: %.1f of %.1f MB, %.1f MB/s, ETA %.0f s", url, done / 1e6, total / 1e6, megabytes_per_s, eta_s
    )


def _interrupted(url: str, partial: str, done: int, total: int | None, reason: str) -> DownloadError:
    of_total = f" of {total}" if total is not None else ""
    return DownloadError(
        f"the download of {url} was interrupted after {done}{of_total} bytes ({reason}); {partial} is kept, so "
        f"running the same command again resumes it"
    )
