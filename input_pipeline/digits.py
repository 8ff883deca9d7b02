"""The embedded default data set: scikit-learn's handwritten digits as a tfds dataset.

1,797 real 8x8 greyscale scans of handwritten digits (UCI "optdigits" test set, 17 grey levels,
shipped inside scikit-learn), split 1,437 train / 360 test with a fixed permutation. It needs no
download, so it is prepared on first use, offline, in a few seconds.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "flaxnets_digits"
_TEST_EXAMPLES = 360


class FlaxnetsDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits: ``image`` (8, 8, 1) uint8 scaled to [0, 255], ``label`` 0-9."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # tfds finds a builder's metadata folder through importlib.resources, which fails for
    # editable installs; name it directly.
    pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ship with scikit-learn
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        order = np.random.RandomState(0).permutation(len(images))
        test, train = order[:_TEST_EXAMPLES], order[_TEST_EXAMPLES:]
        return {
            "train": self._generate_examples(images[train], digits.target[train], train),
            "test": self._generate_examples(images[test], digits.target[test], test),
        }

    def _generate_examples(self, images, labels, indices):
        for image, label, index in zip(images, labels, indices):
            yield int(index), {"image": image, "label": int(label)}
