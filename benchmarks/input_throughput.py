"""End-to-end input throughput: tfds JPEG records -> ``make_dataset`` -> ``global_batches``, no train step.

    python benchmarks/input_throughput.py            # full run: about 13-15 minutes on 2 cores
    python benchmarks/input_throughput.py --quick    # smoke run (300 images, a few batches)

What it measures, on the CPU cores of this machine:

* It builds once (cached under ``--data-dir``) ``imagenet_like``, a real tfds data set of
  ``--images`` JPEGs at ImageNet's typical sizes (500x375, 375x500, 500x333, ...; quality 90;
  smooth multi-scale structure plus grain, so they compress like photographs to ~60-120 KB),
  1000 classes, in ``--shards`` TFRecord files (at least 8, so per-host file splitting is real).
* For every recipe (the training ones, and ``eval`` with ``train=False``) it runs the library's
  own ``make_dataset`` + ``global_batches`` onto a CPU mesh (``NamedSharding(mesh, P("data"))``)
  at 224 px and a global batch of 64; the train step is a no-op (``jax.block_until_ready`` of the
  batch). After ``--warmup`` batches it times ``--batches`` batches and reports images/s and
  images/s per core, the first batch's latency, the processes' CPU use and the records and bytes
  read per delivered image.
* Once in this process, then as two real ``jax.distributed`` processes on localhost (the script
  starts itself twice with ``--process-id``/``--num-processes``/``--coordinator``): per-host
  reading (each process reads only its share) for every recipe, and per-host against
  ``input_order="global"`` (every process reads everything) for one recipe, with a shuffle buffer
  below a process's share (the default 10,000 holds several epochs of this small data set, so
  nothing would be read while timing), to show what per-host reading saves.
* Every case is timed ``--rounds`` times, round by round, and the best round is reported: the
  machine may be shared. Images per CPU-second of the benchmark's own processes are reported
  too; they depend much less on other jobs than images/s do.
* How many CPU cores a GPU eating ``--gpu-rate`` images/s would need, per recipe.
* tf.data knobs on one recipe (``inception_crop_flip``, 1 process): ``deterministic=False``,
  ``threads``, ``ram_budget_gb``, ``shuffle_buffer`` and tfds's read side (a
  ``tfds.ReadConfig`` with another ``interleave_cycle_length``/``block_length``; the library's
  ``tfds_source`` does not take one, so the script builds an equivalent ``Source`` whose ``make``
  passes it, without touching the library).
* Host-to-device bytes per image as the pipeline makes them (uint8) against float32.

Markdown tables and machine information go to stdout, progress lines to stderr, everything to
``--json`` (default ``benchmarks/results/input_throughput.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import math
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Iterable, Iterator

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from etils import epath  # noqa: E402
from PIL import Image  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from input_pipeline.pipeline import global_batches, make_dataset  # noqa: E402
from input_pipeline.recipes import list_recipes  # noqa: E402
from input_pipeline.sources import Source, tfds_source  # noqa: E402

DATASET = "imagenet_like"
NUM_CLASSES = 1000
TUNED_RECIPE = "inception_crop_flip"
# (width, height) of ImageNet's commonest image sizes, with rough frequencies.
IMAGE_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (500, 400), (400, 500), (500, 281))
SIZE_WEIGHTS = (0.42, 0.16, 0.14, 0.05, 0.08, 0.06, 0.04, 0.05)
NOISE_SIDE = 640  # side of the grain texture that images take random windows of

_grain_texture: np.ndarray | None = None


# ----------------------------------------------------------------------------- the data set
def _grain() -> np.ndarray:
    """A fixed Gaussian texture (NOISE_SIDE^2 x 4: RGB grain and a luma grain channel), made once per process."""
    global _grain_texture
    if _grain_texture is None:
        _grain_texture = np.random.default_rng(2024).standard_normal((NOISE_SIDE, NOISE_SIDE, 4), dtype=np.float32)
    return _grain_texture


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, grain: float, quality: int = 90) -> bytes:
    """A JPEG that compresses like a photograph: three octaves of smooth colour structure plus grain.

    The structure is interpolated (bicubic) from random colour grids of 4x5, 10x13 and 28x37
    points; the grain is a random window of a fixed Gaussian texture, ``grain`` grey levels of
    luma noise plus half that per channel.
    """
    small_w, small_h = max(8, width // 4), max(8, height // 4)
    field = np.zeros((small_h, small_w, 3), np.float32)
    for octave, weight in enumerate((1.0, 0.5, 0.3)):
        points = rng.integers(0, 256, (3 * 3**octave + 1, 4 * 3**octave + 1, 3), dtype=np.uint8)
        field += weight * np.asarray(Image.fromarray(points).resize((small_w, small_h), Image.BICUBIC), np.float32)
    # Stretch the averaged octaves back to a photo-like contrast.
    field = np.clip((field / 1.8 - 128.0) * 1.6 + 128.0, 0, 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), np.float32)
    top, left = rng.integers(0, NOISE_SIDE - height + 1), rng.integers(0, NOISE_SIDE - width + 1)
    noise = _grain()[top:top + height, left:left + width]
    image += grain * noise[..., 3:] + (grain / 2) * noise[..., :3]
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _example(index: int) -> tuple[int, bytes, int]:
    """The ``index``-th example of the data set: (index, JPEG bytes, label), the same on every call."""
    rng = np.random.default_rng([7, index])
    width, height = IMAGE_SIZES[rng.choice(len(IMAGE_SIZES), p=SIZE_WEIGHTS)]
    jpeg = photo_like_jpeg(rng, width, height, grain=float(rng.uniform(5.0, 16.0)))
    return index, jpeg, int(rng.integers(0, NUM_CLASSES))


class ImagenetLike(tfds.core.GeneratorBasedBuilder):
    """``imagenet_like``: synthetic ImageNet-sized JPEGs (``image``) with 1000-way ``label`` s, split ``train``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # tfds looks for a builder's metadata next to its module; this module is a script.
    pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))

    def __init__(self, *, num_images: int = 5000, **kwargs: Any) -> None:
        """``num_images`` is only used when preparing; loading reads the count from the prepared files."""
        self._num_images = num_images
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: JPEG ``image`` of any size, ``label`` among 1000 classes."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic photo-like JPEGs at ImageNet's typical sizes, for input benchmarks.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=[f"class_{i:04d}" for i in range(NUM_CLASSES)]),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        """One ``train`` split; nothing is downloaded."""
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The JPEGs, made on every core (spawned workers: this process runs JAX's and TF's threads)."""
        workers = max(1, _cores())
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            done = 0
            for index, jpeg, label in pool.imap_unordered(_example, range(self._num_images), chunksize=16):
                yield index, {"image": jpeg, "label": label}
                done += 1
                if done % 1000 == 0:
                    progress(f"made {done}/{self._num_images} JPEGs")


def dataset_dir(data_dir: str, images: int, shards: int) -> str:
    """The tfds data directory of one (image count, shard count) version of the data set."""
    return os.path.join(os.path.expanduser(data_dir), f"n{images}_s{shards}")


def prepare_dataset(data_dir: str, images: int, shards: int) -> dict[str, Any]:
    """Builds the data set unless it is there; returns its files' count, sizes and mean JPEG size.

    Raises:
      RuntimeError: tfds wrote fewer than 8 shard files.
    """
    root = dataset_dir(data_dir, images, shards)
    builder = ImagenetLike(data_dir=root, num_images=images)
    if not builder.is_prepared():
        progress(f"building {DATASET} ({images} JPEGs, {shards} shards) in {root}")
        start = time.perf_counter()
        config = tfds.download.DownloadConfig(num_shards=shards, try_download_gcs=False)
        builder.download_and_prepare(download_config=config)
        progress(f"built in {time.perf_counter() - start:.0f} s")
    files = sorted(f for f in os.listdir(builder.data_dir) if ".tfrecord" in f)
    if len(files) < 8:
        raise RuntimeError(f"{builder.data_dir} holds {len(files)} shard files; the benchmark needs at least 8")
    sizes = [os.path.getsize(os.path.join(builder.data_dir, f)) for f in files]
    sample = builder.as_dataset(split="train[:200]", decoders={"image": tfds.decode.SkipDecoding()})
    jpeg_sizes = [len(example["image"].numpy()) for example in sample]
    return {"name": DATASET, "data_dir": root, "examples": builder.info.splits["train"].num_examples,
            "classes": NUM_CLASSES, "shard_files": len(files), "total_mb": sum(sizes) / 2**20,
            "shard_mb_min": min(sizes) / 2**20, "shard_mb_max": max(sizes) / 2**20,
            "jpeg_kb_mean": float(np.mean(jpeg_sizes)) / 1e3, "jpeg_kb_p10": float(np.percentile(jpeg_sizes, 10)) / 1e3,
            "jpeg_kb_p90": float(np.percentile(jpeg_sizes, 90)) / 1e3}


# ----------------------------------------------------------------------------- sources
def counting(source: Source, counter: tf.Variable) -> Source:
    """``source`` whose every record read adds one to ``counter`` (records read, not delivered)."""

    def make(process_index: int, process_count: int, seed: int | None = None) -> tf.data.Dataset:
        """The wrapped source's shard, counted."""

        def count(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            """Counts one record and passes it on."""
            counter.assign_add(1)
            return example

        return source.make(process_index, process_count, seed).map(count)

    return dataclasses.replace(source, make=make)


def with_read_config(source: Source, data_dir: str, **read_options: Any) -> Source:
    """``source`` read through a ``tfds.ReadConfig`` with ``read_options`` (e.g. ``interleave_cycle_length``).

    The same read as ``tfds_source``'s (this process's ``even_splits`` share, files shuffled by
    ``seed``, JPEG bytes left encoded), only with the extra read options.
    """
    builder = tfds.builder(source.name, data_dir=data_dir)

    def make(process_index: int, process_count: int, seed: int | None = None) -> tf.data.Dataset:
        """This process's share, read with the custom ``ReadConfig``."""
        share = tfds.even_splits(source.split, n=process_count, drop_remainder=False)[process_index]
        config = tfds.ReadConfig(shuffle_seed=seed, **read_options)
        ds = builder.as_dataset(split=share, decoders={"image": tfds.decode.SkipDecoding()},
                                shuffle_files=seed is not None, read_config=config)
        return ds.map(lambda example: {"image": example["image"], "label": tf.cast(example["label"], tf.int64)})

    return dataclasses.replace(source, make=make)


# ----------------------------------------------------------------------------- measuring
def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _bytes_read() -> int:
    """Bytes this process has read through system calls so far (``rchar``; 0 where /proc is unavailable)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _system_busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy so far (0 where /proc is unavailable)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> float:
    """User plus system CPU time of this process so far."""
    times = os.times()
    return times.user + times.system


def progress(message: str) -> None:
    """A progress line on stderr, tagged with the process (in multi-process runs)."""
    tag = f"[p{jax.process_index()}] " if jax.process_count() > 1 else ""
    print(f"{time.strftime('%H:%M:%S')} {tag}{message}", file=sys.stderr, flush=True)


def _sync(name: str) -> None:
    """A barrier over all processes (nothing with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def time_case(case: dict[str, Any], data_dir: str, sharding: NamedSharding, warmup: int, batches: int,
              batch_size: int, image_size: int) -> dict[str, Any]:
    """Times one pipeline configuration in this process; returns this process's figures.

    ``case`` holds ``recipe`` (``"eval"`` means ``train=False``), optional ``make_dataset``
    keywords in ``kwargs`` and optional ``read`` (``tfds.ReadConfig`` options).
    """
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    source = tfds_source(DATASET, "train", data_dir=data_dir)
    if case.get("read"):
        source = with_read_config(source, data_dir, **case["read"])
    source = counting(source, counter)
    train = case["recipe"] != "eval"
    kwargs = dict(case.get("kwargs", {}))
    ds = make_dataset(source, batch_size=batch_size, train=train, recipe=case["recipe"] if train else TUNED_RECIPE,
                      image_size=image_size, seed=0, **kwargs)
    if not train:
        ds = ds.repeat()  # one pass is ~images/batch batches; loop it like repeated evaluations
    local_batch = batch_size // jax.process_count()

    _sync(f"start {case['label']}")
    start = time.perf_counter()
    batch_iter = global_batches(ds, sharding)
    first = jax.block_until_ready(next(batch_iter))
    first_batch_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        jax.block_until_ready(next(batch_iter))
    records0, bytes0, cpu0, busy0 = int(counter.numpy()), _bytes_read(), _cpu_seconds(), _system_busy_seconds()
    start = time.perf_counter()
    for _ in range(batches):
        batch = jax.block_until_ready(next(batch_iter))
    elapsed = time.perf_counter() - start
    records, read, cpu = int(counter.numpy()) - records0, _bytes_read() - bytes0, _cpu_seconds() - cpu0
    busy = _system_busy_seconds() - busy0
    image_bytes = batch["image"].nbytes / batch_size
    dtype = str(first["image"].dtype)
    batch_iter.close()
    del batch_iter, ds, first, batch
    gc.collect()
    _sync(f"end {case['label']}")
    return {"label": case["label"], "process": jax.process_index(), "elapsed_s": elapsed,
            "images": batches * local_batch, "first_batch_s": first_batch_s, "cpu_s": cpu, "system_busy_s": busy,
            "records_read": records, "bytes_read": read, "image_bytes_per_image": image_bytes,
            "image_dtype": dtype}


def run_cases(cases: list[dict[str, Any]], data_dir: str, warmup: int, batches: int, batch_size: int,
              image_size: int, rounds: int) -> list[dict[str, Any]]:
    """Times every case ``rounds`` times in this process, round by round (so load from elsewhere on
    the machine spreads over all cases), on a no-op step and a mesh over all processes' CPU devices."""
    tf.config.set_visible_devices([], "GPU")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    results = []
    for round_index in range(rounds):
        for case in cases:
            result = time_case(case, data_dir, sharding, warmup, batches, batch_size, image_size)
            progress(f"round {round_index + 1}/{rounds} {case['label']}: "
                     f"{result['images'] / result['elapsed_s']:.0f} images/s in this process "
                     f"(first batch after {result['first_batch_s']:.1f} s)")
            results.append(result)
    return results


def combine(per_process: list[list[dict[str, Any]]], cores: int) -> list[dict[str, Any]]:
    """One row per case from every process's figures, its best round.

    A round's rate is the processes' images over the slowest process's time; the best round is
    the one least slowed by other work on the machine (all rounds' rates are kept).
    """
    rounds: dict[str, list[dict[str, Any]]] = {}
    for results in zip(*per_process):
        rounds.setdefault(results[0]["label"], []).append(_round_row(results, cores))
    rows = []
    for label, candidates in rounds.items():
        best = dict(max(candidates, key=lambda row: row["images_per_s"]))
        best["rounds_images_per_s"] = [row["images_per_s"] for row in candidates]
        rows.append(best)
    return rows


def _round_row(results: tuple[dict[str, Any], ...], cores: int) -> dict[str, Any]:
    """The figures of one round of one case, from each process's."""
    images = sum(r["images"] for r in results)
    elapsed = max(r["elapsed_s"] for r in results)
    rate = images / elapsed
    ours = sum(r["cpu_s"] for r in results)
    machine = float(np.mean([r["system_busy_s"] for r in results]))
    return {
        "label": results[0]["label"], "processes": len(results), "images_per_s": rate,
        "images_per_s_per_core": rate / cores,
        "first_batch_s": max(r["first_batch_s"] for r in results),
        "cpu_use_of_cores": ours / elapsed / cores,
        "images_per_cpu_s": images / ours if ours else 0.0,
        "others_cpu_use_of_cores": max(0.0, machine - ours) / elapsed / cores,
        "records_read_per_image": sum(r["records_read"] for r in results) / images,
        "records_read_per_process": [r["records_read"] for r in results],
        "kb_read_per_image": sum(r["bytes_read"] for r in results) / images / 1e3,
        "image_bytes_per_image": results[0]["image_bytes_per_image"],
    }


def free_port() -> int:
    """A TCP port free on localhost right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(num_processes: int, cases: list[dict[str, Any]], args: argparse.Namespace) -> list[list[dict]]:
    """Runs ``cases`` in ``num_processes`` ``jax.distributed`` processes of this script; their figures.

    Raises:
      RuntimeError: a process failed (its output's tail is in the message).
    """
    coordinator = f"127.0.0.1:{free_port()}"
    workdir = os.path.join(os.path.expanduser(args.data_dir), "worker_results")
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    procs, outputs = [], []
    for pid in range(num_processes):
        out = os.path.join(workdir, f"p{pid}.json")
        if os.path.exists(out):
            os.remove(out)
        outputs.append(out)
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--coordinator", coordinator,
                   "--num-processes", str(num_processes), "--process-id", str(pid), "--cases", json.dumps(cases),
                   "--result-file", out, "--data-dir", args.data_dir, "--images", str(args.images),
                   "--shards", str(args.shards), "--warmup", str(args.warmup), "--batches", str(args.batches),
                   "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
                   "--rounds", str(args.rounds)]
        procs.append(subprocess.Popen(command, env=env))
    codes = [p.wait(timeout=3600) for p in procs]
    if any(codes):
        raise RuntimeError(f"worker processes exited with {codes}")
    results = []
    for out in outputs:
        with open(out) as f:
            results.append(json.load(f))
    return results


def worker(args: argparse.Namespace) -> None:
    """One process of a multi-process run: joins the cluster, times the cases, writes its figures."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    data_dir = dataset_dir(args.data_dir, args.images, args.shards)
    results = run_cases(json.loads(args.cases), data_dir, args.warmup, args.batches, args.batch_size,
                        args.image_size, args.rounds)
    with open(args.result_file, "w") as f:
        json.dump(results, f)
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------- reporting
def machine_info() -> dict[str, Any]:
    """Platform, CPU and library versions."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": model,
            "cpu_count": os.cpu_count(), "cores_usable": _cores(), "tensorflow": tf.__version__,
            "tensorflow_datasets": tfds.__version__, "jax": jax.__version__, "numpy": np.__version__}


def markdown(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table; the first column left-aligned, the rest right-aligned."""
    headers = list(headers)
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(rows: list[dict[str, Any]]) -> str:
    """The per-recipe throughput rows as Markdown."""
    return markdown(
        ("case", "processes", "images/s", "images/s/core", "all rounds", "images/CPU-s", "CPU use", "others' CPU",
         "first batch s", "records read/image", "KB read/image"),
        ((r["label"], r["processes"], f"{r['images_per_s']:.0f}", f"{r['images_per_s_per_core']:.0f}",
          _rounds(r), f"{r['images_per_cpu_s']:.0f}", f"{100 * r['cpu_use_of_cores']:.0f}%",
          f"{100 * r['others_cpu_use_of_cores']:.0f}%",
          f"{r['first_batch_s']:.1f}", f"{r['records_read_per_image']:.2f}", f"{r['kb_read_per_image']:.0f}")
         for r in rows))


def _rounds(row: dict[str, Any]) -> str:
    """Every round's images/s of a row, e.g. ``512/498``."""
    return "/".join(f"{rate:.0f}" for rate in row["rounds_images_per_s"])


def tuning_cases() -> list[dict[str, Any]]:
    """The tf.data and tfds knobs tried on ``TUNED_RECIPE``, the default first."""
    cores = _cores()
    knobs: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("default", {}, {}),
        ("deterministic=False", {"deterministic": False}, {}),
        (f"threads={cores} (cores)", {"threads": cores}, {}),
        (f"threads={2 * cores} (2x cores)", {"threads": 2 * cores}, {}),
        ("ram_budget_gb=0.05", {"ram_budget_gb": 0.05}, {}),
        ("ram_budget_gb=16", {"ram_budget_gb": 16.0}, {}),
        ("shuffle_buffer=256", {"shuffle_buffer": 256}, {}),
        ("shuffle_buffer=2048", {"shuffle_buffer": 2048}, {}),
        ("tfds interleave_cycle_length=1", {}, {"interleave_cycle_length": 1}),
        ("tfds interleave_cycle_length=4", {}, {"interleave_cycle_length": 4}),
        ("tfds interleave_block_length=1", {}, {"interleave_block_length": 1}),
    ]
    return [{"label": label, "recipe": TUNED_RECIPE, "kwargs": kwargs, "read": read} for label, kwargs, read in knobs]


def main() -> None:
    """Builds the data set, runs the 1-process, 2-process and tuning cases, prints and saves the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", default="/tmp/flaxnets_input_bench", help="where the data set is built (once) and cached")
    add("--images", type=int, default=5000, help="JPEGs in the data set")
    add("--shards", type=int, default=16, help="TFRecord files of the data set (at least 8)")
    add("--batches", type=int, default=24, help="timed batches per case")
    add("--warmup", type=int, default=3, help="untimed batches first (the first fills the shuffle buffer)")
    add("--batch-size", type=int, default=64, help="global batch")
    add("--image-size", type=int, default=224, help="output height and width")
    add("--rounds", type=int, default=2, help="times each case is timed (in rounds); the best is reported")
    add("--gpu-rate", type=float, default=3000.0, help="images/s of the GPU to feed")
    add("--json", default=os.path.join(REPO, "benchmarks", "results", "input_throughput.json"), help="results file")
    add("--quick", action="store_true", help="smoke run: 300 images, 3 timed batches, 2 warm-up")
    add("--skip-tuning", action="store_true", help="leave out the knob table")
    internal = parser.add_argument_group("internal (the multi-process workers)")
    internal.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--coordinator", help=argparse.SUPPRESS)
    internal.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    internal.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    internal.add_argument("--cases", help=argparse.SUPPRESS)
    internal.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.images, args.shards, args.batches, args.warmup = 300, 8, 3, 2
    if args.warmup < 1 or args.rounds < 1:
        parser.error("--warmup and --rounds must be at least 1")
    run_start = time.perf_counter()
    cores = _cores()
    info = machine_info()
    dataset = prepare_dataset(args.data_dir, args.images, args.shards)
    progress(f"data set: {dataset['examples']} JPEGs, {dataset['shard_files']} shard files, "
             f"{dataset['total_mb']:.0f} MB, mean JPEG {dataset['jpeg_kb_mean']:.0f} KB")
    data_dir = dataset["data_dir"]
    recipes = [r for r in list_recipes() if r not in ("eval", "scale_crop")] + ["eval"]
    recipe_cases = [{"label": r, "recipe": r} for r in recipes]

    progress(f"1 process: {len(recipe_cases)} recipes")
    single = combine([run_cases(recipe_cases, data_dir, args.warmup, args.batches, args.batch_size,
                                args.image_size, args.rounds)], cores)
    progress("2 processes (jax.distributed on localhost)")
    # The default shuffle buffer (10,000) holds several epochs of a small data set's share, so the
    # timed window may read nothing; the order comparison uses a buffer well below the share.
    order_buffer = max(64, min(1000, args.images // 5))
    order_cases = [{"label": f"{TUNED_RECIPE} {order} shuffle_buffer={order_buffer}", "recipe": TUNED_RECIPE,
                    "kwargs": {"input_order": order, "shuffle_buffer": order_buffer}}
                   for order in ("per_host", "global")]
    multi_cases = recipe_cases + order_cases
    multi = combine(run_processes(2, multi_cases, args), cores)
    tuning: list[dict[str, Any]] = []
    if not args.skip_tuning:
        progress(f"tuning {TUNED_RECIPE} (1 process)")
        tuning = combine([run_cases(tuning_cases(), data_dir, args.warmup, args.batches, args.batch_size,
                                    args.image_size, args.rounds)], cores)
        for row in tuning:
            row["ratio_to_default"] = row["images_per_s"] / tuning[0]["images_per_s"]
            row["cpu_ratio_to_default"] = row["images_per_cpu_s"] / tuning[0]["images_per_cpu_s"]

    per_core = {r["label"]: r["images_per_s_per_core"] for r in single}
    per_core_multi = {r["label"]: r["images_per_s_per_core"] for r in multi}
    per_cpu_s = {r["label"]: r["images_per_cpu_s"] for r in single}
    gpu_rows = [{"recipe": r, "images_per_s_per_core_1p": per_core[r], "images_per_s_per_core_2p": per_core_multi[r],
                 "images_per_cpu_s_1p": per_cpu_s[r],
                 "cores_needed_1p": math.ceil(args.gpu_rate / per_core[r]),
                 "cores_needed_2p": math.ceil(args.gpu_rate / per_core_multi[r]),
                 "cores_needed_by_cpu_time": math.ceil(args.gpu_rate / per_cpu_s[r])} for r in recipes]
    image_bytes = single[0]["image_bytes_per_image"]
    transfer = {"uint8_bytes_per_image": image_bytes, "float32_bytes_per_image": image_bytes * 4,
                "label_bytes_per_image": 4,
                "uint8_mb_per_s_at_gpu_rate": image_bytes * args.gpu_rate / 1e6,
                "float32_mb_per_s_at_gpu_rate": 4 * image_bytes * args.gpu_rate / 1e6}
    run_time = time.perf_counter() - run_start

    print(f"# Input pipeline throughput ({DATASET}, {args.image_size} px, global batch {args.batch_size}, "
          f"{args.batches} timed batches after {args.warmup} warm-up, no-op step, best of {args.rounds} rounds)\n")
    print("images/s/core: images/s over all cores of the machine. images/CPU-s: images per CPU-second the "
          "benchmark's processes used (what a core gives when the machine is shared). CPU use: those processes' "
          "CPU time over the timed window, as a share of all cores; others' CPU: the rest of the machine's busy "
          "time in the same window (other jobs slow the figures). records and KB (rchar) read per delivered "
          "image are counted in the timed window.\n")
    print(f"Machine: {info['cpu']}, {info['cpu_count']} CPUs ({cores} usable), {info['platform']}, "
          f"python {info['python']}, tensorflow {info['tensorflow']}, tensorflow-datasets "
          f"{info['tensorflow_datasets']}, jax {info['jax']}\n")
    print(f"Data set: {dataset['examples']} JPEGs in {dataset['shard_files']} shard files "
          f"({dataset['total_mb']:.0f} MB; JPEG mean {dataset['jpeg_kb_mean']:.0f} KB, 10-90% "
          f"{dataset['jpeg_kb_p10']:.0f}-{dataset['jpeg_kb_p90']:.0f} KB), {dataset['classes']} classes\n")
    print("## 1 process\n")
    print(throughput_table(single))
    print("\n## 2 processes (jax.distributed, localhost; aggregate of both, over the slower one's time)\n")
    print(throughput_table(multi))
    if any(not r["records_read_per_image"] for r in multi):
        print(f"\nRows that read 0 records while timing: the default shuffle buffer (10,000 records) is larger "
              f"than a process's share ({dataset['examples'] // 2}); tf.data (shuffle and repeat, fused) fills it "
              f"with several epochs of the share before the first batch, so the timed batches came from memory.")
    per_host, glob = multi[-2], multi[-1]
    share = dataset["examples"] / 2
    print(f"\nPer-host vs global order ({TUNED_RECIPE}, 2 processes, shuffle_buffer={order_buffer}): records read "
          f"per delivered image {per_host['records_read_per_image']:.2f} vs {glob['records_read_per_image']:.2f} "
          f"(theory 1 vs 2; per epoch each process reads {share:.0f} vs {dataset['examples']} records), "
          f"KB read per image {per_host['kb_read_per_image']:.0f} vs {glob['kb_read_per_image']:.0f}; "
          f"images/s {per_host['images_per_s']:.0f} vs {glob['images_per_s']:.0f}, images per CPU-second "
          f"{per_host['images_per_cpu_s']:.0f} vs {glob['images_per_cpu_s']:.0f}.")
    print(f"\n## CPU cores to feed a GPU at {args.gpu_rate:.0f} images/s\n")
    print(markdown(("recipe", "images/s/core (1 proc)", "cores needed", "images/s/core (2 proc)", "cores needed",
                    "images/CPU-s (1 proc)", "cores needed"),
                   ((g["recipe"], f"{g['images_per_s_per_core_1p']:.0f}", g["cores_needed_1p"],
                     f"{g['images_per_s_per_core_2p']:.0f}", g["cores_needed_2p"], f"{g['images_per_cpu_s_1p']:.0f}",
                     g["cores_needed_by_cpu_time"]) for g in gpu_rows)))
    if tuning:
        print(f"\n## tf.data knobs ({TUNED_RECIPE}, 1 process)\n")
        print(markdown(("knob", "images/s", "ratio to default", "all rounds", "images/CPU-s", "ratio", "CPU use",
                        "others' CPU", "first batch s"),
                       ((r["label"], f"{r['images_per_s']:.0f}", f"{r['ratio_to_default']:.2f}", _rounds(r),
                         f"{r['images_per_cpu_s']:.0f}", f"{r['cpu_ratio_to_default']:.2f}",
                         f"{100 * r['cpu_use_of_cores']:.0f}%", f"{100 * r['others_cpu_use_of_cores']:.0f}%",
                         f"{r['first_batch_s']:.1f}") for r in tuning)))
    print("\n## Host-to-device bytes per image\n")
    print(markdown(("as", "bytes/image", f"MB/s at {args.gpu_rate:.0f} images/s"),
                   (("uint8 (as made)", f"{image_bytes:.0f}", f"{transfer['uint8_mb_per_s_at_gpu_rate']:.0f}"),
                    ("float32 (if normalised on the host)", f"{4 * image_bytes:.0f}",
                     f"{transfer['float32_mb_per_s_at_gpu_rate']:.0f}"))))
    print(f"\nRun time {run_time:.0f} s.")

    results = {"machine": info, "dataset": dataset,
               "settings": {"image_size": args.image_size, "global_batch": args.batch_size, "batches": args.batches,
                            "warmup": args.warmup, "cores": cores, "gpu_rate": args.gpu_rate, "quick": args.quick},
               "one_process": single, "two_processes": multi, "gpu_cores_needed": gpu_rows,
               "tuning": tuning, "host_to_device": transfer, "run_time_s": run_time}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    progress(f"wrote {args.json}")


if __name__ == "__main__":
    main()
