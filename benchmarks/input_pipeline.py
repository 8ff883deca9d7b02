"""Augmentation throughput per CPU core: flaxnets recipes in tf.data vs torchvision transforms.

    python benchmarks/input_pipeline.py [--images 200] [--repeats 3] [--json results.json]

Makes ImageNet-sized JPEGs (500x375, smooth photographic-like content), holds their bytes in
memory, and decodes + augments them with one thread on each side, alternating the two per recipe;
prints images/s per core and the ratio (median of the repeats).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# torchvision's registry build carries CUDA ops that do not load on CPU torch; its transforms
# need none of them.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import v2 as T  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flaxnets.layers import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from input_pipeline import augment as aug  # noqa: E402
from input_pipeline.recipes import get_recipe  # noqa: E402


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs of 500x375 with smooth structure plus grain (compress like photographs)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), np.int16)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


class Lighting:
    """AlexNet PCA lighting for a CHW float tensor (torchvision has none)."""

    def __init__(self, std: float = 0.1):
        self.std = std
        self.eigval = torch.tensor(aug.IMAGENET_EIGVAL)
        self.eigvec = torch.tensor(aug.IMAGENET_EIGVEC)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        return x + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)


def torchvision_recipes() -> dict[str, T.Compose]:
    """The same augmentations written with torchvision.transforms.v2 on PIL images."""
    to_tensor = [T.PILToTensor(), T.ToDtype(torch.float32, scale=True)]
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    jitter = T.ColorJitter(0.4, 0.4, 0.4)
    modes = [T.InterpolationMode.BILINEAR, T.InterpolationMode.BOX, T.InterpolationMode.NEAREST,
             T.InterpolationMode.BICUBIC]
    return {
        "alexnet": T.Compose([T.Resize(256), T.CenterCrop(256), T.RandomCrop(224), T.RandomHorizontalFlip(),
                              *to_tensor, Lighting(), normalize]),
        "vgg": T.Compose([T.RandomShortestSize(list(range(256, 513))), T.RandomCrop(224), T.RandomHorizontalFlip(),
                          *to_tensor, Lighting(), normalize]),
        "inception": T.Compose([T.RandomChoice([T.RandomResizedCrop(224, interpolation=m) for m in modes]),
                                T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0.1), *to_tensor, normalize]),
        "resnet": T.Compose([T.RandomShortestSize(list(range(256, 481))), T.RandomCrop(224), T.RandomHorizontalFlip(),
                             jitter, *to_tensor, Lighting(), normalize]),
        "inception_crop_flip": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *to_tensor, normalize]),
        "eval": T.Compose([T.Resize(256), T.CenterCrop(224), *to_tensor, normalize]),
    }


def time_tf(recipe: str, jpegs: list[bytes]) -> float:
    """Images/s of one recipe in a single-threaded tf.data pipeline."""
    transform = get_recipe(recipe).transform
    ds = tf.data.Dataset.from_tensor_slices(jpegs).enumerate()
    ds = ds.map(lambda i, b: transform(b, tf.stack([tf.constant(0, tf.int64), i]), 224))
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    for _ in ds.take(4):  # trace and warm up
        pass
    start = time.perf_counter()
    for _ in ds:
        pass
    return len(jpegs) / (time.perf_counter() - start)


def time_torch(pipeline: T.Compose, jpegs: list[bytes]) -> float:
    """Images/s of PIL decoding + the torchvision pipeline in this (single-threaded) process."""
    for data in jpegs[:4]:
        pipeline(Image.open(io.BytesIO(data)).convert("RGB"))
    start = time.perf_counter()
    for data in jpegs:
        out = pipeline(Image.open(io.BytesIO(data)).convert("RGB"))
    assert out.shape == (3, 224, 224)
    return len(jpegs) / (time.perf_counter() - start)


def main() -> None:
    """Runs the comparison and prints a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="JPEGs per timing")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timings per side and recipe")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    torch.set_num_threads(1)
    jpegs = make_jpegs(args.images)
    rows = []
    for recipe, pipeline in torchvision_recipes().items():
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(time_tf(recipe, jpegs))
            theirs.append(time_torch(pipeline, jpegs))
        row = {"recipe": recipe, "flaxnets_tfdata": statistics.median(ours),
               "torchvision": statistics.median(theirs)}
        row["ratio"] = row["flaxnets_tfdata"] / row["torchvision"]
        rows.append(row)
        print(f"{recipe}: {row['flaxnets_tfdata']:.0f} vs {row['torchvision']:.0f} img/s/core", file=sys.stderr)

    print(f"\nImages/s per CPU core, {args.images} JPEGs of 500x375 to 224x224, median of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, tensorflow {tf.__version__}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}\n")
    print("| recipe | flaxnets (tf.data) | torchvision | ratio |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['recipe']} | {row['flaxnets_tfdata']:.0f} | {row['torchvision']:.0f} | {row['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
