"""Fetch weight files into a local cache, like ``torch.hub`` or Keras' ``get_file``.

Standard library only. ``fetch(url, sha256_prefix=...)`` returns the path of the file under
``<cache_dir()>/weights/``: a cached file is returned without network access; a download streams into
``<name>.part``, resumes it with a ``Range`` request after a dropped connection, and is renamed to its
final name only once complete and verified. ``FLAXNETS_OFFLINE=1`` forbids all downloads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import posixpath
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, concurrent fetches of one file are unguarded
    fcntl = None

CHUNK = 1 << 20
TIMEOUT = 10.0  # seconds to connect, and the longest wait for any single read
_MIB = 1 << 20


class WeightsUnavailableError(OSError):
    """A weight file could not be downloaded; the message says where to put it by hand."""


def cache_dir() -> str:
    """``$FLAXNETS_HOME``, else ``$XDG_CACHE_HOME/flaxnets`` (default ``~/.cache/flaxnets``)."""
    home = os.environ.get("FLAXNETS_HOME")
    if home:
        return os.path.expanduser(home)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(xdg), "flaxnets")


def fetch(
    url: str, *, sha256_prefix: str | None = None, filename: str | None = None, progress: bool = True
) -> str:
    """The local path of the weight file at ``url``, downloading it into the cache if needed.

    ``url`` is ``http(s)://...``, ``file:///abs/path`` or a plain local path; local files are only
    verified and returned in place. Downloads go to ``<cache_dir()>/weights/<filename>`` (default:
    the URL's last path component). ``sha256_prefix`` (hex, e.g. the ``0676ba61`` of torchvision's
    ``resnet50-0676ba61.pth``) is checked once, when a download completes: on mismatch the file is
    deleted and ``ValueError`` raised. ``progress`` draws one updating line on stderr.

    HTTP(S) goes through urllib's default opener, so ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY``
    from the environment apply. Raises ``WeightsUnavailableError`` when ``FLAXNETS_OFFLINE`` is set
    (``1``/``true``/``yes``), the server cannot be reached, answers an HTTP error, or drops the
    connection (the ``.part`` file is then kept and the next call resumes it).
    """
    prefix = _check_prefix(sha256_prefix)
    if "://" not in url:
        return _local(url, url, prefix)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL with a remote host is not supported: {url}")
        return _local(urllib.request.url2pathname(parts.path), url, prefix)
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r}: {url}")

    folder = os.path.join(cache_dir(), "weights")
    name = filename or urllib.parse.unquote(posixpath.basename(parts.path))
    dest = os.path.join(folder, _check_name(name, url))
    if _cached(dest):
        return dest
    offline = os.environ.get("FLAXNETS_OFFLINE", "")
    if offline.strip().lower() in ("1", "true", "yes"):
        raise WeightsUnavailableError(_unavailable(url, dest, f"offline: FLAXNETS_OFFLINE={offline}"))
    os.makedirs(folder, exist_ok=True)
    part = dest + ".part"
    with _locked(dest + ".lock"):
        if _cached(dest):  # another process finished it while we waited for the lock
            return dest
        _download(url, part, dest, progress)
        if prefix:
            actual = _sha256(part)
            if not actual.startswith(prefix):
                os.remove(part)
                raise ValueError(_mismatch(url, prefix, actual) + " (download deleted)")
        os.replace(part, dest)
    return dest


def _check_prefix(prefix: str | None) -> str | None:
    if prefix is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]+", prefix):
        raise ValueError(f"sha256_prefix must be hex digits, got {prefix!r}")
    return prefix.lower()


def _check_name(name: str, url: str) -> str:
    if name in ("", ".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"cannot name a cache file {name!r} for {url}; pass filename=")
    return name


def _local(path: str, url: str, prefix: str | None) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no such weights file", path)
    if prefix:
        actual = _sha256(path)
        if not actual.startswith(prefix):
            raise ValueError(_mismatch(url, prefix, actual))
    return path


def _cached(path: str) -> bool:
    # An empty file is what a crash between create and write leaves behind; never trust one.
    return os.path.isfile(path) and os.path.getsize(path) > 0


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _mismatch(url: str, prefix: str, actual: str) -> str:
    return f"SHA-256 mismatch for {url}: expected {prefix}, got {actual[:len(prefix)]}"


def _unavailable(url: str, dest: str, reason: str) -> str:
    reason = " ".join(reason.split())
    return (
        f"cannot download {url} ({reason}); "
        f"download it elsewhere and put it at {dest}, or pass a local path"
    )


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    # Concurrent fetches of one file take turns on an exclusive lock rather than each writing its
    # own per-pid .part: one shared .part is what lets a later call resume, and the waiter then
    # finds the finished file. The lock file is left in place: unlinking it would race.
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/n`` (or ``*/n``) header."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not match:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _download(url: str, part: str, dest: str, progress: bool) -> None:
    """Stream ``url`` into ``part``, resuming from its current size; raise unless it ends complete."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "flaxnets"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:  # nothing left after `offset`: complete, or a stale .part
            if _content_range(err.headers.get("Content-Range"))[1] == offset:
                return
            os.remove(part)
            return _download(url, part, dest, progress)
        raise WeightsUnavailableError(_unavailable(url, dest, f"HTTP {err.code} {err.reason}")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = str(getattr(err, "reason", None) or err) or type(err).__name__
        raise WeightsUnavailableError(_unavailable(url, dest, reason)) from err

    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                os.remove(part)
                return _download(url, part, dest, progress)
            if total is None and length is not None:
                total = offset + length
        else:  # 200: the server ignored the Range header, so start over
            offset, total = 0, length
        done = offset
        bar = _Progress(os.path.basename(dest), total, offset, progress)
        try:
            with open(part, "ab" if offset else "wb") as out:
                while True:
                    try:
                        # read1 returns what has arrived: a reset then loses no received bytes.
                        block = response.read1(CHUNK)
                    except (OSError, http.client.HTTPException) as err:
                        reason = str(err) or type(err).__name__
                        raise _dropped(url, part, dest, done, total, reason) from err
                    if not block:
                        break
                    out.write(block)
                    done += len(block)
                    bar.update(done)
        finally:
            bar.close()
    # http.client reports a connection closed before Content-Length as a short read, not an error.
    if total is not None and done != total:
        raise _dropped(url, part, dest, done, total, "connection closed early")
    if done == 0:
        raise WeightsUnavailableError(_unavailable(url, dest, "the server sent an empty file"))


def _dropped(
    url: str, part: str, dest: str, done: int, total: int | None, reason: str
) -> WeightsUnavailableError:
    size = f"{done} of {total}" if total is not None else str(done)
    return WeightsUnavailableError(
        f"download of {url} interrupted after {size} bytes ({' '.join(reason.split())}); "
        f"kept {part}, call again to resume, or download it elsewhere and put it at {dest}"
    )


class _Progress:
    """One self-overwriting stderr line, redrawn at most ten times a second."""

    def __init__(self, name: str, total: int | None, start: int, enabled: bool):
        self.name, self.total, self.start = name, total, start
        self.enabled = enabled and bool(total)
        self.began = self.last = time.monotonic()
        self.width = 0

    def update(self, done: int) -> None:
        """Redraw the line for ``done`` bytes, unless it was drawn under 0.1 s ago (and not final)."""
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done != self.total and self.width):
            return
        self.last = now
        speed = (done - self.start) / max(now - self.began, 1e-6) / _MIB
        line = (
            f"downloading {self.name}: {done / _MIB:.1f}/{self.total / _MIB:.1f} MiB "
            f"({100 * done // self.total}%) {speed:.1f} MiB/s"
        )
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def close(self) -> None:
        """End the line, if one was drawn."""
        if self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()
