"""Start-up time of an image-folder source: checking every file vs the cached index.

    python benchmarks/folder_startup.py [--dir /tmp/flaxnets_folder_bench] [--classes 100] [--per-class 500]

Makes (once) a folder of small JPEGs, ``DIR/train/<class>/<file>.JPEG``, then times:

- before: list the folder and open + verify every file with ``check_image`` in one thread, as
  ``sources.folder_source`` did at each start;
- after, first start: ``folders.folder_source`` with no index (lists the folder, writes the index);
- after, cached start: ``folders.folder_source`` again (loads the index, stats the class folders);
- the audit (``python -m input_pipeline.check``'s thread pool), for reference.

Each is the median of ``--repeats`` runs. The files were just written or read, so they are in the
OS page cache (dropping it needs root): on network storage "before" is far slower, the cached
start hardly changes.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from input_pipeline import folders  # noqa: E402


def make_folder(root: str, classes: int, per_class: int) -> None:
    """Writes ``classes * per_class`` 32x32 JPEGs under ``root`` unless already complete."""
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return
    rng = np.random.default_rng(0)
    # A handful of distinct images suffice: what costs at start-up is the number of files.
    blobs = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    start = time.perf_counter()
    for c in range(classes):
        folder = os.path.join(root, f"n{c:08d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            with open(os.path.join(folder, f"n{c:08d}_{i}.JPEG"), "wb") as f:
                f.write(blobs[(c + i) % len(blobs)])
    open(done, "w").close()
    print(f"wrote {classes * per_class} files in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def check_everything(root: str) -> int:
    """Today's start-up: list, then open and verify each file in turn; the number of good files."""
    good = 0
    for name in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            good += folders.check_image(os.path.join(folder, file)) is None
    return good


def remove_index(root: str) -> None:
    """Deletes every stored index of ``root``."""
    for location in folders.index_locations(root):
        if os.path.exists(location):
            os.remove(location)


def median_seconds(run, repeats: int, before=None) -> float:
    """The median wall time of ``run()`` over ``repeats`` runs, calling ``before()`` untimed first."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Makes the folder, times the start-ups and prints a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/flaxnets_folder_bench")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    root = os.path.join(args.dir, "train")
    make_folder(root, args.classes, args.per_class)
    files = args.classes * args.per_class
    logging.basicConfig(level=logging.WARNING)

    check_everything(root)  # warm the page cache, and the imports PIL does on first use
    rows = [
        ("before: list + check_image every file (1 thread)",
         median_seconds(lambda: check_everything(root), args.repeats)),
        ("after, first start: list + write the index",
         median_seconds(lambda: folders.folder_source(root), args.repeats, before=lambda: remove_index(root))),
        ("after, cached start: load the index",
         median_seconds(lambda: folders.folder_source(root), args.repeats)),
        (f"audit (`python -m input_pipeline.check`, {args.workers} threads)",
         median_seconds(lambda: sum(p is None for _, p in folders.check_files(folders.load_index(root).paths(),
                                                                            args.workers)), args.repeats)),
    ]
    index_size = os.path.getsize(folders.index_locations(root)[0])
    before = rows[0][1]
    print(f"{files} files ({args.classes} classes x {args.per_class} JPEGs of 32x32) in {root}, in the page cache; "
          f"index {index_size / 1e6:.2f} MB")
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"median of {args.repeats} runs\n")
    print("| start-up | seconds | speed-up vs before |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {before / seconds:.1f}x |")


if __name__ == "__main__":
    main()
