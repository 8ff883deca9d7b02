"""Image folders (``root/<class>/<image>``) at ImageNet scale: a cached listing, lazy checks.

``folder_source`` lists a folder once and keeps the listing in an index file,
``<root>/.flaxnets_index.json`` (or under the user cache dir when ``root`` is read-only). Later
starts only stat ``root`` and its class folders (about 1,000 stats for ImageNet) and re-list the
folders whose modification time changed. No image is opened when the source is made: each one is
checked in the tf.data graph right after it is read, and one that TensorFlow cannot decode is
dropped with a warning naming it (``skipped_files(root)`` counts them). ``check_folder`` /
``python -m input_pipeline.check`` open and verify every file up front instead.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import sys
import threading
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf

from input_pipeline.sources import BadImageError, DatasetNotReadyError, Source

log = logging.getLogger(__name__)

INDEX_NAME = ".flaxnets_index.json"
_INDEX_FORMAT = "flaxnets-folder-index/1"
# Formats that tf.io.decode_image reads.
_DECODABLE = {"JPEG", "PNG", "GIF", "BMP"}
# A JPEG's end-of-image marker is searched for in this many trailing bytes.
_TAIL = 1024
# The magic bytes tf.io.decode_image recognises.
_MAGIC = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n", "GIF87": b"GIF87a", "GIF89": b"GIF89a", "BMP": b"BM"}
# Problem codes computed in the graph, and their text.
_REASONS = {
    1: "empty file",
    2: "not a JPEG, PNG, GIF or BMP file",
    3: f"truncated JPEG (no end-of-image marker in its last {_TAIL} bytes)",
}


# --- The index ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """The listing of an image folder.

    Attributes:
      root: the folder, as given.
      class_names: non-hidden sub-folders of ``root``, sorted; label = index.
      files: per class, its non-hidden file names, sorted.
      class_mtimes: per class, the folder's ``st_mtime_ns`` read just before it was listed.
      root_mtime: ``root``'s ``st_mtime_ns`` read just before it was listed.
    """

    root: str
    class_names: tuple[str, ...]
    files: tuple[tuple[str, ...], ...]
    class_mtimes: tuple[int, ...]
    root_mtime: int

    @property
    def num_files(self) -> int:
        """Number of listed files, all classes."""
        return sum(len(names) for names in self.files)

    def paths(self) -> np.ndarray:
        """Full paths in class order, as a 1-D object array of file-system-encoded ``bytes``.

        Bytes (not str) so that any file name reaches ``tf.io.read_file``; an object array converts
        to a tensor about 15 times faster than a list.
        """
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        out = np.empty(self.num_files, dtype=object)
        start = 0
        for name, names in zip(self.class_names, self.files):
            if not names:
                continue
            prefix = os.path.join(self.root, name, "")
            # One join, encode and split per class (C loops); NUL cannot occur in a path.
            joined = prefix + ("\0" + prefix).join(names)
            out[start:start + len(names)] = joined.encode(encoding, errors).split(b"\0")
            start += len(names)
        return out

    def labels(self) -> np.ndarray:
        """Labels (int64) aligned with :meth:`paths`."""
        return np.repeat(np.arange(len(self.class_names), dtype=np.int64), [len(n) for n in self.files])


def _index_key(root: str) -> str:
    return hashlib.sha256(os.fsencode(os.path.abspath(root))).hexdigest() + ".json"


def _cache_folder() -> str:
    # Imported here: the flaxnets package imports jax (over a second), needed only for this path.
    from flaxnets.download import cache_dir

    return os.path.join(cache_dir(), "folder_index")


def _locations(root: str, index_dir: str | None) -> Iterator[str]:
    # A generator: the cache dir (and the import it needs) is only reached when root fails.
    if index_dir is not None:
        yield os.path.join(index_dir, _index_key(root))
        return
    yield os.path.join(root, INDEX_NAME)
    yield os.path.join(_cache_folder(), _index_key(root))


def index_locations(root: str, index_dir: str | None = None) -> list[str]:
    """Where the index of ``root`` is looked for, in order: ``index_dir`` alone when given, else
    ``<root>/.flaxnets_index.json`` then ``<cache_dir()>/folder_index/<sha256 of abspath>.json``."""
    return list(_locations(root, index_dir))


def _class_folders(root: str) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _list_folder(folder: str) -> tuple[int, tuple[str, ...]]:
    """(mtime_ns, sorted non-hidden file names) of one class folder."""
    # The mtime is read first, so a change made while listing shows up at the next start.
    mtime = os.stat(folder).st_mtime_ns
    with os.scandir(folder) as entries:
        # is_file() comes from the directory entry's type; no stat per file on most file systems.
        names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())
    return mtime, tuple(names)


def _list(root: str, previous: FolderIndex | None) -> FolderIndex:
    """Lists ``root``, reusing the file lists of ``previous``'s unchanged class folders."""
    root_mtime = os.stat(root).st_mtime_ns
    classes = _class_folders(root)
    if not classes:
        raise DatasetNotReadyError(f"image folder {root!r} has no class sub-folders (expected root/<class>/<image>)")
    known = {}
    if previous is not None:
        known = {n: (m, f) for n, m, f in zip(previous.class_names, previous.class_mtimes, previous.files)}
    mtimes, files = [], []
    for name in classes:
        folder = os.path.join(root, name)
        if name in known and os.stat(folder).st_mtime_ns == known[name][0]:
            mtime, names = known[name]
        else:
            mtime, names = _list_folder(folder)
        mtimes.append(mtime)
        files.append(names)
    return FolderIndex(root, tuple(classes), tuple(files), tuple(mtimes), root_mtime)


def _why_stale(root: str, index: FolderIndex) -> str | None:
    """None if ``index`` still describes ``root``, else what changed (stats only, no listing)."""
    if os.stat(root).st_mtime_ns != index.root_mtime:
        # Also changes when the index itself is written into root, so compare the class folders.
        classes = _class_folders(root)
        if classes != list(index.class_names):
            added = sorted(set(classes) - set(index.class_names))
            removed = sorted(set(index.class_names) - set(classes))
            return f"class folders added: {_some(added)}; removed: {_some(removed)}"
    changed = []
    for name, mtime in zip(index.class_names, index.class_mtimes):
        try:
            if os.stat(os.path.join(root, name)).st_mtime_ns != mtime:
                changed.append(name)
        except FileNotFoundError:
            return f"class folder {name!r} is gone"
    if changed:
        return f"files added, removed or renamed in {len(changed)} class folder(s): {_some(changed)}"
    return None


def _some(names: list[str], most: int = 3) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _read_index(path: str, root: str) -> FolderIndex | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("ignoring the unreadable index %s: %s", path, err)
        return None
    try:
        if data["format"] != _INDEX_FORMAT:
            return None
        classes = data["classes"]
        # "/" separates the file names: it is the one character no file name can hold.
        return FolderIndex(
            root,
            tuple(c["name"] for c in classes),
            tuple(tuple(c["files"].split("/")) if c["files"] else () for c in classes),
            tuple(int(c["mtime_ns"]) for c in classes),
            int(data["root_mtime_ns"]),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        log.warning("ignoring the malformed index %s: %s", path, err)
        return None


def _atomic_write(path: str, text: str) -> None:
    """Writes ``text`` to a unique temporary file beside ``path``, then renames it over ``path``.

    Readers see the old file or the new one, never part of one; concurrent writers each rename a
    complete file, and the last one wins.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open rather than tempfile: mode 0o666 less the umask, so other users can read the index.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_index(index: FolderIndex, index_dir: str | None) -> str | None:
    """Stores ``index`` (in root when writable, else the cache dir); its path, or None."""
    text = json.dumps({
        "format": _INDEX_FORMAT,
        "root": os.path.abspath(index.root),
        "root_mtime_ns": index.root_mtime,
        "classes": [
            {"name": name, "mtime_ns": mtime, "files": "/".join(files)}
            for name, mtime, files in zip(index.class_names, index.class_mtimes, index.files)
        ],
    }, separators=(",", ":"))
    targets = []
    for target in _locations(index.root, index_dir):
        if index_dir is None and not targets and not os.access(index.root, os.W_OK):
            targets.append(f"{target} (read-only)")
            continue
        targets.append(target)
        try:
            _atomic_write(target, text)
            return target
        except OSError as err:
            log.debug("cannot write the index to %s: %s", target, err)
    log.warning("could not write the index of %s to %s; it will be listed again at the next start",
                index.root, " or ".join(targets))
    return None


def load_index(root: str, index_dir: str | None = None) -> FolderIndex:
    """The listing of ``root``, from its index file when that is still current, else listed anew.

    The index is current when ``root``'s class folders are the recorded ones and each class folder
    has its recorded modification time (adding, removing or renaming a file changes it; editing a
    file in place does not). Otherwise only the changed class folders are listed again and the
    index is rewritten (see :func:`index_locations` for where). Hidden files and folders (name
    starting with ``.``) are left out. Logs one INFO line with the count and the time taken.

    Raises:
      DatasetNotReadyError: ``root`` missing, without class folders, or without any file.
    """
    if not os.path.isdir(root):
        raise DatasetNotReadyError(f"image folder {root!r} does not exist")
    start = time.perf_counter()
    stale, why = None, None
    # Every location is tried: a stale index left in a root that has since become read-only must
    # not hide the current one in the cache dir.
    for location in _locations(root, index_dir):
        cached = _read_index(location, root)
        if cached is None:
            continue
        problem = _why_stale(root, cached)
        if problem is None:
            log.info("using the cached index %s: %d files in %d classes of %s (%.2f s)", location,
                     cached.num_files, len(cached.class_names), root, time.perf_counter() - start)
            return cached
        if stale is None:
            stale, why = cached, problem
    if stale is not None:
        log.info("re-listing %s: %s", root, why)
    index = _list(root, stale)
    if index.num_files == 0:
        raise DatasetNotReadyError(f"image folder {root!r} has no images")
    written = _write_index(index, index_dir)
    log.info("listed %d files in %d classes of %s in %.2f s%s", index.num_files, len(index.class_names), root,
             time.perf_counter() - start, f"; index written to {written}" if written else "")
    return index


# --- Checking files ----------------------------------------------------------------------------


def check_image(path: str | bytes) -> str | None:
    """None if ``path`` is an image TensorFlow decodes, else the reason it is not.

    Opens the file with PIL and verifies it (does not decode the pixels); a JPEG must also end with
    its end-of-image marker.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format not in _DECODABLE:
                return f"unsupported format {image.format}"
            image.verify()
            is_jpeg = image.format == "JPEG"
    except Exception as err:  # PIL raises many types for bad files
        return f"{type(err).__name__}: {err}"
    if is_jpeg:
        # verify() does not decode, so a cut-off JPEG passes it; its end-of-image marker is missing.
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - _TAIL))
            if b"\xff\xd9" not in f.read():
                return "truncated JPEG (no end-of-image marker)"
    return None


def check_files(paths: Iterable[str | bytes], workers: int | None = None,
                chunk: int = 64) -> Iterator[tuple[str, str | None]]:
    """``(path, check_image(path))`` for each path, in order, checked by a pool of threads.

    Threads suit it: the work is mostly waiting for the file system. ``workers`` defaults to
    ``os.cpu_count()``; at most ``4 * workers`` chunks of ``chunk`` paths are in flight.
    """
    workers = workers or os.cpu_count() or 1

    def check_chunk(batch: list[str]) -> list[tuple[str, str | None]]:
        return [(p, check_image(p)) for p in batch]

    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="check_image") as pool:
        try:
            batch: list[str] = []
            for path in paths:
                batch.append(os.fsdecode(path))
                if len(batch) == chunk:
                    pending.append(pool.submit(check_chunk, batch))
                    batch = []
                    if len(pending) >= 4 * workers:
                        yield from pending.popleft().result()
            if batch:
                pending.append(pool.submit(check_chunk, batch))
            while pending:
                yield from pending.popleft().result()
        finally:  # the caller stopped early (e.g. strict mode at the first bad file)
            for future in pending:
                future.cancel()


def in_graph_problem(data: tf.Tensor) -> tf.Tensor:
    """An int32 scalar: 0 if the encoded ``data`` looks decodable, else a code of ``_REASONS``.

    Cheap tensor ops only: the magic bytes must be those of a format ``tf.io.decode_image`` reads,
    and a JPEG must have its end-of-image marker (0xFF 0xD9) in its last 1024 bytes.
    """
    head = tf.strings.substr(data, 0, 8)
    is_jpeg = tf.equal(tf.strings.substr(head, 0, len(_MAGIC["JPEG"])), _MAGIC["JPEG"])
    known = is_jpeg
    for name, magic in _MAGIC.items():
        if name != "JPEG":
            known = known | tf.equal(tf.strings.substr(head, 0, len(magic)), magic)
    size = tf.strings.length(data)
    tail = tf.io.decode_raw(tf.strings.substr(data, tf.maximum(size - _TAIL, 0), _TAIL), tf.uint8)
    has_end = tf.reduce_any(tf.logical_and(tf.equal(tail[:-1], 0xFF), tf.equal(tail[1:], 0xD9)))
    return tf.where(tf.equal(size, 0), 1,
                    tf.where(tf.logical_not(known), 2,
                             tf.where(tf.logical_and(is_jpeg, tf.logical_not(has_end)), 3, 0)))


class _SkippedFiles:
    """The distinct unreadable files met so far, per folder; safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, set[str]] = {}

    def add(self, root: str, path: str) -> tuple[bool, int]:
        """Records ``path``; (whether it is new, the folder's count)."""
        with self._lock:
            paths = self._paths.setdefault(os.path.abspath(root), set())
            new = path not in paths
            paths.add(path)
            return new, len(paths)

    def count(self, root: str) -> int:
        """The number of distinct files recorded for ``root``."""
        with self._lock:
            return len(self._paths.get(os.path.abspath(root), ()))


# Process-wide on purpose: the callbacks run on tf.data's threads, for every dataset made from any
# Source of a folder, and Source (a frozen dataclass) has no field to hold the count.
_SKIPPED = _SkippedFiles()


def skipped_files(root: str) -> int:
    """How many distinct files of ``root`` the datasets of this process have dropped so far."""
    return _SKIPPED.count(root)


def _reporter(root: str) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], bool]:
    def report(path: tf.Tensor, code: tf.Tensor, head: tf.Tensor) -> bool:
        name = os.fsdecode(path.numpy())
        reason = _REASONS.get(int(code.numpy()), "unknown problem")
        if int(code.numpy()) == 2:
            reason += f" (starts with {head.numpy()!r})"
        new, count = _SKIPPED.add(root, name)
        if new:  # once per file, not once per epoch
            log.warning("skipping %s: %s; skipped %d unreadable file(s) so far in %s", name, reason, count, root)
        return False

    return report


# --- The source --------------------------------------------------------------------------------


# Named functions, not lambdas: AutoGraph cannot tell two lambdas on one line apart.
def _kept(example: dict[str, tf.Tensor], keep: tf.Tensor) -> tf.Tensor:
    return keep


def _example(example: dict[str, tf.Tensor], keep: tf.Tensor) -> dict[str, tf.Tensor]:
    return example


def folder_source(root: str, split: str = "train", strict: bool = False, index_dir: str | None = None) -> Source:
    """Images under ``root/<class name>/`` (classes sorted by name), any size and format TF decodes.

    The listing is cached (see :func:`load_index`; ``index_dir`` overrides where), and no file is
    opened here, so ``num_examples`` counts the listed files, including any unreadable ones. Those
    are found lazily: a file whose bytes are not a JPEG/PNG/GIF/BMP, or a JPEG without its
    end-of-image marker, is dropped from the dataset with a warning naming it, once per process
    (:func:`skipped_files` counts them). ``strict=True`` opens and verifies every file now (in a
    thread pool) and raises :class:`BadImageError` naming the first bad one. Grayscale and RGBA
    images are converted to RGB when decoded.

    ``make(process_index, process_count, seed=None)`` gives ``{"image": encoded bytes, "label":
    int64}`` for the files ``paths[process_index::process_count]``: in listing order, or shuffled
    with ``seed`` (the same order for the same seed).

    Raises:
      DatasetNotReadyError: ``root`` missing, without class folders or without files.
      BadImageError: ``strict`` and a file that TensorFlow cannot decode.
    """
    index = load_index(root, index_dir)
    paths, labels = index.paths(), index.labels()
    if strict:
        start = time.perf_counter()
        for path, problem in check_files(paths):
            if problem is not None:
                raise BadImageError(f"{path}: {problem}")
        log.info("checked %d files of %s in %.1f s", len(paths), root, time.perf_counter() - start)
    report = _reporter(root)

    def read(path: tf.Tensor, label: tf.Tensor) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        data = tf.io.read_file(path)
        problem = in_graph_problem(data)
        # Python runs only for a bad file: good ones never take the GIL.
        keep = tf.cond(
            tf.equal(problem, 0),
            lambda: tf.constant(True),
            lambda: tf.py_function(report, [path, problem, tf.strings.substr(data, 0, 8)], tf.bool),
        )
        return {"image": data, "label": label}, tf.reshape(keep, [])

    def make(process_index: int, process_count: int, seed: int | None = None) -> tf.data.Dataset:
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        shard_paths = paths[process_index::process_count]
        shard_labels = labels[process_index::process_count]
        if seed is not None:
            order = np.random.default_rng(seed).permutation(len(shard_paths))
            shard_paths, shard_labels = shard_paths[order], shard_labels[order]
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(shard_paths, tf.string), shard_labels))
        ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.filter(_kept).map(_example)

    return Source(root, split, len(paths), index.class_names, make)
