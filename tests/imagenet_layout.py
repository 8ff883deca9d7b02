"""A tiny ImageNet 2012 in the layout of the real downloads, for the real tfds ``imagenet2012`` builder.

tfds cannot download ImageNet: ``tfds build imagenet2012`` reads two archives from its manual
directory (``<data_dir>/downloads/manual`` unless told otherwise):

* ``ILSVRC2012_img_train.tar``: one tar per class, ``nXXXXXXXX.tar``, each holding
  ``nXXXXXXXX_<k>.JPEG``. The label is the inner tar's name less ``.tar`` (the image names only
  have to be unique: they are the example keys).
* ``ILSVRC2012_img_val.tar``: flat ``ILSVRC2012_val_000000NN.JPEG``. The labels come from
  ``datasets/imagenet2012/validation_labels.txt`` inside tfds (50,000 synsets, line ``i`` for
  image ``i``), but the builder pairs them by position: the ``k``-th name of the sorted archive
  gets line ``k``. So a subset must be images 1..N for every image to get its true label.

``ILSVRC2012_img_test.tar`` is optional (a missing split is only logged). File names in the
builder's ``CMYK_IMAGES`` and ``PNG_IMAGES`` lists are converted, so none is used here.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Sequence

import numpy as np
from PIL import Image

# Validation images 1, 2 and 3 are of these classes (sea snake, alp, Shetland sheepdog; label
# indices 65, 970 and 230), so the validation split holds classes the training split has.
DEFAULT_SYNSETS = ("n01751748", "n09193705", "n02105855")
DEFAULT_VAL_FILES = (1, 2, 3, 4, 5, 6)
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
_SIZE = (40, 30)  # width, height: a landscape image, as most of ImageNet's are


def _tfds_lines(relative: str) -> list[str]:
    import tensorflow_datasets as tfds

    with open(tfds.core.tfds_path(relative)) as f:
        return f.read().strip().splitlines()


def _jpeg(rng: np.random.Generator, label: int | None) -> bytes:
    """A small JPEG: a per-class colour and stripe direction (plain noise for ``None``), per-image noise."""
    width, height = _SIZE
    if label is None:
        pixels = rng.integers(0, 256, (height, width, 3))
    else:
        colour = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230]][label % 3]) * (0.6 + 0.4 * (label // 3 % 2))
        y, x = np.mgrid[:height, :width]
        stripes = ((x if label % 2 else y) // 5 % 2)[..., None] * 60.0
        pixels = colour + stripes + rng.normal(0, 25, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=80)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def make_manual_imagenet(manual_dir: str, synsets: Sequence[str] = DEFAULT_SYNSETS, per_class: int = 8,
                         val_files: Sequence[int] = DEFAULT_VAL_FILES, seed: int = 0) -> dict:
    """Writes ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` into ``manual_dir``.

    The training tar has one inner tar per synset with ``per_class`` JPEGs of 40x30 px (about
    1 KB each); validation images get their true class's look when that class is in ``synsets``.
    The output is the same for the same arguments.

    Args:
      manual_dir: created if missing.
      synsets: WordNet ids from tfds' ``imagenet2012/labels.txt``.
      per_class: training images per synset.
      val_files: validation image numbers; must be 1..N (see the module docstring).
      seed: pixel noise seed.

    Returns:
      ``{"synsets", "labels" (their label indices), "per_class", "num_train", "val_files" (names in
      the tar), "val_synsets", "val_labels" (what tfds assigns them), "num_val", "train_tar",
      "val_tar"}``.

    Raises:
      ValueError: an unknown synset, or validation numbers that are not 1..N.
    """
    names = _tfds_lines("datasets/imagenet2012/labels.txt")
    index = {name: i for i, name in enumerate(names)}
    unknown = [s for s in synsets if s not in index]
    if unknown or len(set(synsets)) != len(synsets):
        raise ValueError(f"synsets must be distinct ImageNet classes; unknown: {unknown}")
    numbers = sorted(val_files)
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"val_files must be 1..N (the builder pairs sorted names with label lines); got {numbers}")
    from tensorflow_datasets.datasets.imagenet2012.imagenet2012_dataset_builder import CMYK_IMAGES, PNG_IMAGES

    special = set(CMYK_IMAGES) | set(PNG_IMAGES)
    rng = np.random.default_rng(seed)
    os.makedirs(manual_dir, exist_ok=True)
    train_tar = os.path.join(manual_dir, TRAIN_TAR)
    with tarfile.open(train_tar, "w") as outer:
        for label, synset in enumerate(synsets):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for k in range(1, per_class + 1):
                    name = f"{synset}_{k}.JPEG"
                    assert name not in special, name
                    _add(inner, name, _jpeg(rng, label))
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())

    val_lines = _tfds_lines("datasets/imagenet2012/validation_labels.txt")
    val_names = [f"ILSVRC2012_val_{n:08d}.JPEG" for n in numbers]
    val_synsets = [val_lines[n - 1] for n in numbers]
    val_tar = os.path.join(manual_dir, VAL_TAR)
    with tarfile.open(val_tar, "w") as tar:
        for name, synset in zip(val_names, val_synsets):
            _add(tar, name, _jpeg(rng, list(synsets).index(synset) if synset in synsets else None))
    return {
        "synsets": tuple(synsets),
        "labels": tuple(index[s] for s in synsets),
        "per_class": per_class,
        "num_train": per_class * len(synsets),
        "val_files": tuple(val_names),
        "val_synsets": tuple(val_synsets),
        "val_labels": tuple(index[s] for s in val_synsets),
        "num_val": len(val_names),
        "train_tar": train_tar,
        "val_tar": val_tar,
    }


def prepare_imagenet2012(data_dir: str, **layout):
    """Writes the tiny archives to ``<data_dir>/downloads/manual`` and prepares ``imagenet2012`` there.

    The same as ``tfds build imagenet2012 --data_dir DATA_DIR`` with the archives in its manual
    directory: the real builder reads them (offline, a few seconds) and writes its TFRecords to
    ``<data_dir>/imagenet2012/<version>``.

    Args:
      data_dir: the tensorflow-datasets data directory.
      **layout: passed to :func:`make_manual_imagenet` (synsets, per_class, val_files, seed).

    Returns:
      The prepared ``tfds`` builder (``builder.info.splits`` has ``train`` and ``validation``).
    """
    import tensorflow_datasets as tfds

    manual_dir = os.path.join(data_dir, "downloads", "manual")
    make_manual_imagenet(manual_dir, **layout)
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
