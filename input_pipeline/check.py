"""Audit image folders: open and verify every file with PIL, as ``folder_source(strict=True)`` does.

    python -m input_pipeline.check DIR [DIR ...] [--workers N] [--quiet]

DIR is a folder of class sub-folders (``DIR/<class>/<image>``), or a data set root whose
sub-folders are such folders (``DIR/train/<class>/...``, ``DIR/val/<class>/...``): each of those
splits is then checked. The listing comes from the folder's index (built and stored if missing,
see ``input_pipeline.folders.load_index``). Files are checked in a pool of threads (default: one
per CPU), with a progress bar on stderr; each bad file is printed on stdout as
``BAD <path>: <reason>``, then one summary line per folder.

Exit status: 0 when every file is good, 1 when any is bad, 1 with a one-line ``error: ...`` when a
DIR is missing or holds no class folders.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the index needs no TensorFlow, keep it quiet

from tqdm import tqdm  # noqa: E402

from input_pipeline.folders import check_files, load_index  # noqa: E402
from input_pipeline.sources import DatasetNotReadyError  # noqa: E402


def _subfolders(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.path for e in entries if not e.name.startswith(".") and e.is_dir())


def _has_files(path: str) -> bool:
    with os.scandir(path) as entries:
        return any(not e.name.startswith(".") and e.is_file() for e in entries)


def split_roots(directory: str) -> list[str]:
    """The image folders to check for ``directory``: itself, or its split sub-folders.

    ``directory`` is a data set root when none of its sub-folders holds a file while some hold
    sub-folders (``train/<class>/``); its splits are those sub-folders that hold sub-folders.
    """
    if not os.path.isdir(directory):
        raise DatasetNotReadyError(f"image folder {directory!r} does not exist")
    subs = _subfolders(directory)
    if subs and not any(_has_files(s) for s in subs):
        splits = [s for s in subs if _subfolders(s)]
        if splits:
            return splits
    return [directory]


def check_folder(root: str, workers: int | None = None, quiet: bool = False) -> tuple[int, int]:
    """Checks every listed file of ``root``, printing bad ones and a summary; (checked, bad)."""
    index = load_index(root)
    paths = index.paths()
    bad = 0
    start = time.perf_counter()
    with tqdm(total=len(paths), desc=root, unit="file", file=sys.stderr, disable=quiet,
              mininterval=1.0) as bar:
        for path, problem in check_files(paths, workers):
            if problem is not None:
                bad += 1
                bar.write(f"BAD {path}: {problem}", file=sys.stdout)
            bar.update()
    seconds = time.perf_counter() - start
    print(f"{root}: checked {len(paths)} files in {seconds:.1f} s ({len(paths) / max(seconds, 1e-9):.0f} files/s), "
          f"{bad} bad", flush=True)
    return len(paths), bad


def main(argv: list[str] | None = None) -> int:
    """Runs the audit; the exit status (0: all good, 1: bad files or an error)."""
    parser = argparse.ArgumentParser(prog="python -m input_pipeline.check", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="image folder, or data set root with split folders")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="threads opening files (default: CPUs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no index messages")
    args = parser.parse_args(argv)
    # A no-op when logging is already set up (e.g. under pytest).
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    total_bad = 0
    try:
        for directory in args.dirs:
            for root in split_roots(directory):
                total_bad += check_folder(root, args.workers, args.quiet)[1]
    except DatasetNotReadyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
