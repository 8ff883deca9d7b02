"""flaxnets.download against a local HTTP server: caching, hashes, resume, offline and errors."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from flaxnets.download import WeightsUnavailableError, cache_dir, fetch
from tests.weights_server import WeightsServer, serve

SIZE = 3_000_000


@pytest.fixture
def server(tmp_path: Path, home: Path):
    """A threaded HTTP server on a free port serving random files ``a.bin`` and ``b.bin``."""
    root = tmp_path / "served"
    root.mkdir()
    rng = random.Random(0)
    for name in ("a.bin", "b.bin"):
        (root / name).write_bytes(rng.randbytes(SIZE))
    with serve(root) as srv:
        yield srv


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAXNETS_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert cache_dir() == os.path.join("/x/cache", "flaxnets")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "flaxnets")
    monkeypatch.setenv("FLAXNETS_HOME", "/y")
    assert cache_dir() == "/y"


def test_download_then_cached(server: WeightsServer, home: Path) -> None:
    source = server.root / "a.bin"
    path = fetch(server.url("a.bin"), sha256_prefix=_sha(source)[:8], progress=False)
    assert path == str(home / "weights" / "a.bin")
    assert Path(path).read_bytes() == source.read_bytes()
    assert not os.path.exists(path + ".part")
    assert fetch(server.url("a.bin"), sha256_prefix=_sha(source)[:8]) == path
    assert len(server.requests) == 1


def test_empty_cached_file_is_fetched_again(server: WeightsServer, home: Path) -> None:
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "a.bin").write_bytes(b"")
    path = fetch(server.url("a.bin"), progress=False)
    assert Path(path).read_bytes() == (server.root / "a.bin").read_bytes()
    assert len(server.requests) == 1


def test_filename_override(server: WeightsServer, home: Path) -> None:
    path = fetch(server.url("a.bin"), filename="renamed.bin", progress=False)
    assert path == str(home / "weights" / "renamed.bin")
    with pytest.raises(ValueError, match="filename"):
        fetch(server.url("a.bin"), filename="../evil.bin")


def test_wrong_hash(server: WeightsServer, home: Path) -> None:
    actual = _sha(server.root / "a.bin")
    wrong = "0" * 8 if not actual.startswith("0" * 8) else "f" * 8
    with pytest.raises(ValueError, match=f"expected {wrong}, got {actual[:8]}") as info:
        fetch(server.url("a.bin"), sha256_prefix=wrong, progress=False)
    assert server.url("a.bin") in str(info.value) and "\n" not in str(info.value)
    assert not (home / "weights" / "a.bin").exists()
    assert not (home / "weights" / "a.bin.part").exists()


def test_cut_connection_resumes(server: WeightsServer, home: Path) -> None:
    server.cut_after = 1_000_000
    url = server.url("a.bin")
    with pytest.raises(WeightsUnavailableError, match="resume"):
        fetch(url, progress=False)
    part = home / "weights" / "a.bin.part"
    assert part.stat().st_size == 1_000_000
    assert not (home / "weights" / "a.bin").exists()
    source = server.root / "a.bin"
    path = fetch(url, sha256_prefix=_sha(source)[:10], progress=False)
    assert server.requests[-1] == ("/a.bin", "bytes=1000000-")
    assert Path(path).read_bytes() == source.read_bytes()
    assert not part.exists()


def test_server_ignoring_range_restarts(server: WeightsServer, home: Path) -> None:
    part = home / "weights" / "a.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes")
    server.ignore_range = True
    path = fetch(server.url("a.bin"), progress=False)
    assert server.requests == [("/a.bin", f"bytes={len(b'stale bytes')}-")]
    assert Path(path).read_bytes() == (server.root / "a.bin").read_bytes()


def test_complete_part_answered_416(server: WeightsServer, home: Path) -> None:
    source = server.root / "a.bin"
    part = home / "weights" / "a.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(source.read_bytes())
    path = fetch(server.url("a.bin"), sha256_prefix=_sha(source)[:8], progress=False)
    assert Path(path).read_bytes() == source.read_bytes()
    assert len(server.requests) == 1


def test_offline(server: WeightsServer, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAXNETS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        fetch(server.url("a.bin"))
    assert time.monotonic() - start < 1
    message = str(info.value)
    assert str(home / "weights" / "a.bin") in message and "FLAXNETS_OFFLINE" in message
    assert "\n" not in message
    assert server.requests == []


def test_connection_refused(home: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w-12345678.pth"
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=re.escape(url)) as info:
        fetch(url)
    assert time.monotonic() - start < 1
    assert str(home / "weights" / "w-12345678.pth") in str(info.value)


def test_http_404(server: WeightsServer, home: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="HTTP 404") as info:
        fetch(server.url("missing.bin"))
    assert server.url("missing.bin") in str(info.value)
    assert not {"missing.bin", "missing.bin.part"} & set(os.listdir(home / "weights"))


def test_local_paths(tmp_path: Path, home: Path) -> None:
    source = tmp_path / "local.bin"
    source.write_bytes(b"weights")
    digest = _sha(source)
    assert fetch(str(source), sha256_prefix=digest[:8]) == str(source)
    assert fetch(source.as_uri(), sha256_prefix=digest[:8].upper()) == str(source)
    with pytest.raises(ValueError, match="mismatch"):
        fetch(str(source), sha256_prefix="0" * 8 if digest[0] != "0" else "f" * 8)
    assert source.exists() and not home.exists()  # left in place, never copied
    with pytest.raises(FileNotFoundError):
        fetch(str(tmp_path / "absent.bin"))


def test_progress_line(server: WeightsServer, capsys: pytest.CaptureFixture[str]) -> None:
    fetch(server.url("b.bin"))
    err = capsys.readouterr().err
    assert err.startswith("\rdownloading b.bin: ") and err.endswith("\n")
    assert "2.9/2.9 MiB (100%)" in err


def test_concurrent_fetches_share_one_download(server: WeightsServer) -> None:
    results: list[str] = []

    def worker() -> None:
        results.append(fetch(server.url("a.bin"), progress=False))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert Path(results[0]).read_bytes() == (server.root / "a.bin").read_bytes()
    assert len(server.requests) == 1
