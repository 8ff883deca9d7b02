"""``python -m train.evaluate (--workdir DIR | --pretrained MODEL[.TAG]) [--protocol NAME|all] [--ensemble DIR ...]``

Evaluates a trained model (its best or last checkpoint, raw or EMA weights), weights converted
by ``python -m flaxnets.convert``, or published weights from flaxnets' table (``--pretrained``,
with their own preprocessing: resize, crop, mean and std) with one of the papers' test protocols,
alone or as an ensemble whose members' softmax probabilities are averaged (GoogLeNet's 7 models,
VGG's D+E). Prints top-1 and top-5 (and the publisher's figures for published weights) and writes
them as JSON; ``--protocol all`` runs every protocol and draws them side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flaxnets
from flaxnets.convert import META_FILE
from flaxnets.download import WeightsUnavailableError
from flaxnets.weights_table import IMAGENET_MEAN, IMAGENET_STD, weights_info
from input_pipeline.pipeline import pad_batch
from input_pipeline.sources import Source
from train.checkpoints import restore_run
from train.protocols import (PROTOCOLS, Protocol, crop_probabilities, dense_probabilities, get_protocol,
                             pixel_views)
from train.steps import normalize_images
from train.trainer import RUN_INFO, eval_source, print_error


class EvaluationError(RuntimeError):
    """Evaluation cannot run; the message says why (the CLI prints it alone)."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of an evaluation, built and with its weights.

    Attributes:
      directory: the training workdir or converted-weights directory it came from; for published
        weights (:func:`load_pretrained_member`) their ``model.tag`` name.
      model: the flax module.
      variables: ``{"params"[, "batch_stats"]}``.
      image_size: its training resolution, or published weights' crop (protocol sizes scale with it).
      dataset: the data set it was trained on (None for converted weights).
      source: which weights, e.g. ``best checkpoint, step 660, EMA``.
      scale_jittered: trained with VGG's scale jitter (dense evaluation then uses larger scales).
      mean, std: the per-channel normalisation of its input (on the [0, 1] scale).
      resize: the shorter side the centre protocol rescales to before its crop (None:
        ``image_size / 0.875``); published weights' own.
      published: the publisher's (top-1, top-5) in percent, for published weights.
      data_dir: the tfds data directory it was trained with (from its ``run.json``), if recorded.
    """

    directory: str
    model: nn.Module
    variables: dict[str, Any]
    image_size: int
    dataset: str | None
    source: str
    scale_jittered: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None
    published: tuple[float, float] | None = None
    data_dir: str | None = None


def load_member(directory: str, checkpoint: str = "best", ema: bool = False, image_size: int | None = None) -> Member:
    """Loads a training workdir (``run.json`` + ``checkpoints/``) or a ``flaxnets.convert`` directory.

    Args:
      directory: the directory.
      checkpoint: ``best`` (highest eval top-1; falls back to ``last`` when absent) or ``last``.
      ema: use the Polyak/EMA weights of a run trained with ``ema_decay``.
      image_size: evaluate at this resolution instead of the training one (the registry's default
        for converted weights).

    Raises:
      EvaluationError: not such a directory, an incomplete ``run.json``, no checkpoint in it, or
        ``ema`` for a run trained without EMA.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise EvaluationError(f"{directory} {'is a file, not' if os.path.exists(directory) else 'is not'} a "
                              "`python -m train` workdir or a `python -m flaxnets.convert` output")
    if os.path.isfile(os.path.join(directory, META_FILE)):
        if ema:
            raise EvaluationError(f"--ema: {directory} holds converted weights, which have no EMA copy")
        with open(os.path.join(directory, META_FILE)) as f:
            name = json.load(f)["model"]
        model, variables = flaxnets.load_converted(directory)
        size = image_size or flaxnets.model_info(name).input_size
        return Member(directory, model, variables, size, None, "converted weights")
    info_path = os.path.join(directory, RUN_INFO)
    if not os.path.isfile(info_path):
        raise EvaluationError(f"{directory} has neither {RUN_INFO} (a `python -m train` workdir) nor {META_FILE} "
                              "(a `python -m flaxnets.convert` output)")
    info = _read_run_info(info_path)
    if checkpoint not in ("best", "last"):
        raise EvaluationError(f"--checkpoint must be best or last, not {checkpoint!r}")
    recipe = info.get("recipe") if isinstance(info.get("recipe"), dict) else {}
    if ema and "ema_decay" in recipe and recipe["ema_decay"] is None:
        raise EvaluationError(f"--ema: {directory} was trained without EMA (its recipe's ema_decay is None), "
                              "so it has no averaged weights")
    found = restore_run(directory, checkpoint)
    if found is None:
        raise EvaluationError(f"no checkpoint in {os.path.join(directory, 'checkpoints')}: train first "
                              f"(`python -m train --workdir {directory}`)")
    missing = [k for k in ("model", "num_classes", "image_size", "precision", "dataset", "recipe") if k not in info]
    if missing:
        raise EvaluationError(f"{info_path} lacks {', '.join(missing)}: not written by `python -m train`")
    which, step, state = found
    params = state["ema_params"] if ema else state["params"]
    variables = {"params": params, **({"batch_stats": state["batch_stats"]} if state.get("batch_stats") else {})}
    dtype = jnp.bfloat16 if info["precision"] == "bf16" else jnp.float32
    model = flaxnets.create_model(info["model"], num_classes=info["num_classes"], dtype=dtype)
    label = f"{which} checkpoint, step {step}{', EMA' if ema else ''}"
    jittered = info["recipe"].get("augmentation") == "vgg"
    size = image_size or info["image_size"]
    # A fine-tuned run records the preprocessing of the weights it started from.
    prep = info.get("preprocessing") or {}
    fraction = prep.get("eval_crop_fraction", 0.875)
    resize = None if abs(fraction - 0.875) < 1e-9 else round(size / fraction)
    return Member(directory, model, variables, size, info["dataset"], label, jittered,
                  tuple(prep.get("mean", IMAGENET_MEAN)), tuple(prep.get("std", IMAGENET_STD)), resize,
                  data_dir=info.get("data_dir"))


def load_pretrained_member(name: str, image_size: int | None = None, *, progress: bool = True) -> Member:
    """Published weights from flaxnets' table (``flaxnets.list_pretrained()``) with their own preprocessing.

    The weights are downloaded and cached by :func:`flaxnets.pretrained` (``FLAXNETS_MIRROR``,
    ``FLAXNETS_OFFLINE`` and the cache apply). The member's crop, centre-protocol resize and
    mean/std are the table's (torchvision V2 ResNet-50: resize 232, crop 224); its data set is
    ``imagenet2012``.

    Args:
      name: ``model`` (its most accurate weights), ``model.tag`` (e.g. ``resnet50.tv2_in1k``), or
        either followed by ``@LOCATION``, a local path or URL of a torchvision/timm checkpoint of
        that architecture (no download from the table): ``model.tag@LOCATION`` is evaluated with
        that entry's preprocessing, ``model@LOCATION`` with ImageNet's mean/std, the model's input
        size and the ``size / 0.875`` resize.
      image_size: crop at this size instead (the resize keeps the weights' resize/crop ratio).
      progress: show the download's progress on stderr.

    Raises:
      EvaluationError: an unknown model or tag (the message lists those that exist), weights that
        cannot be downloaded, or a file that is not a checkpoint of this architecture.
    """
    spec, _, location = name.partition("@")
    model_name, _, tag = spec.partition(".")
    if "@" in name and not location:
        raise EvaluationError(f"--pretrained {name}: nothing after '@'; expected MODEL[.TAG]@PATH_OR_URL")
    if location and "://" not in location:
        if not os.path.isfile(location):
            raise EvaluationError(f"--pretrained {name}: {location} is not a file")
        location = os.path.abspath(location)  # never mistaken for a tag
    weights = None
    try:
        weights = weights_info(model_name, tag or None) if tag or not location else None
        model_name = weights.model if weights is not None else flaxnets.model_info(model_name).name
        overrides = weights.options if weights is not None and location else {}
        model, variables = flaxnets.pretrained(model_name, location or weights.tag, progress=progress, **overrides)
    except KeyError as err:
        raise EvaluationError(f"--pretrained {name}: {err.args[0] if err.args else err}") from None
    except WeightsUnavailableError as err:
        hint = f" (then --pretrained {weights.name}@PATH)" if weights is not None and not location else ""
        raise EvaluationError(f"--pretrained {name}: {err}{hint}") from None
    except ValueError as err:
        raise EvaluationError(f"--pretrained {name}: {err}") from None
    if weights is None:
        size = image_size or flaxnets.model_info(model_name).input_size
        return Member(model_name, model, variables, size, "imagenet2012", f"{model_name} weights from {location}")
    pre = weights.preprocessing
    size = image_size or pre.crop
    resize = pre.resize if image_size is None else round(pre.resize * image_size / pre.crop)
    label = f"published {weights.name} (top-1 {weights.top1:.3f}% reported)"
    if location:
        label = f"{weights.name} weights from {location} (top-1 {weights.top1:.3f}% reported)"
    return Member(weights.name, model, variables, size, "imagenet2012", label, mean=tuple(pre.mean),
                  std=tuple(pre.std), resize=resize, published=(weights.top1, weights.top5))


def _read_run_info(path: str) -> dict[str, Any]:
    """``run.json`` as a dict, or a one-line error."""
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise EvaluationError(f"{path} is not a readable run record ({type(err).__name__}: {err})") from None
    if not isinstance(info, dict):
        raise EvaluationError(f"{path} is not a readable run record (a JSON {type(info).__name__}, not an object)")
    return info


def check_sizes(members: list[Member], protocol_names: list[str], scales: tuple[int, ...] | None) -> None:
    """Each member's crop size (or, for dense evaluation, each scale) must be one its model can take,
    and crops must fit inside the rescaled images they are cut from.

    Raises:
      EvaluationError: naming the member, the size and the model's minimum.
    """
    for member in members:
        least, why = member.model.min_input_size(train=False)
        name = f"{os.path.basename(member.directory)} ({type(member.model).__name__})"
        if member.image_size < least:
            raise EvaluationError(f"{name} needs images of at least {least} px ({why}); got image size "
                                  f"{member.image_size}")
        for protocol in map(get_protocol, protocol_names):
            used = protocol.scales(member.image_size, scales, member.scale_jittered, member.resize)
            dense_least, dense_why = member.model.min_input_size(train=False, dense=True)
            if protocol.dense and min(used, default=dense_least) < dense_least:
                raise EvaluationError(f"--scales {','.join(map(str, used))}: the dense protocol's shorter sides must "
                                      f"be at least {dense_least} px for {name} ({dense_why})")
            if not protocol.dense and min(used, default=member.image_size) < member.image_size:
                raise EvaluationError(f"--scales {','.join(map(str, used))}: the {protocol.name} protocol crops "
                                      f"{member.image_size} px views, so every scale must be at least that")


def _check_args(args) -> tuple[int, ...] | None:
    """Checks the numeric and path flags before anything is loaded; returns the parsed ``--scales``."""
    if args.pretrained is not None:
        for flag, given in (("--ema", args.ema), ("--checkpoint", hasattr(args, "checkpoint"))):
            if given:
                raise EvaluationError(f"{flag} picks among a workdir's weights; --pretrained "
                                      f"{args.pretrained} is one published set")
    counts = {"--image-size": args.image_size, "--batch-views": args.batch_views, "--limit": args.limit}
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise EvaluationError(f"{flag} must be a positive integer; got {value}")
    scales = None
    if args.scales is not None:
        try:
            scales = tuple(int(s) for s in args.scales.split(","))
        except ValueError:
            scales = ()
        if not scales or min(scales) < 1:
            raise EvaluationError(f"--scales expects comma-separated positive integers, e.g. 256,384,512; "
                                  f"got {args.scales!r}")
    if args.out is not None:
        parent = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out) or not os.path.isdir(parent):
            raise EvaluationError(f"--out {args.out} must be a file path in an existing directory")
    if args.accelerator:
        try:
            found = jax.devices(args.accelerator)
        except RuntimeError:
            found = []
        if not found:
            raise EvaluationError(f"--accelerator {args.accelerator}: no {args.accelerator.upper()} is visible to JAX")
    return scales


def _image_batches(source: Source, protocol: Protocol, size: int, scales, images_per_batch: int, limit):
    """This process's examples as NumPy batches of views (padded, with ``mask``), or one image at a time for dense."""
    ds = source.make(jax.process_index(), jax.process_count())
    if limit:
        ds = ds.take(limit)

    def prepare(example):
        views = pixel_views(protocol, example["image"], size, scales)
        return {"views": tuple(views) if protocol.dense else views, "label": tf.cast(example["label"], tf.int32)}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not protocol.dense:
        ds = ds.map(lambda e: {**e, "mask": True})
        ds = ds.batch(images_per_batch).map(lambda b: pad_batch(b, images_per_batch))
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def member_probabilities(member: Member, protocol: Protocol, source: Source, *, scales=None,
                         batch_views: int = 256, limit: int | None = None, progress: bool = True):
    """The protocol's class probabilities of each of this process's examples, and their labels.

    Returns ``(probabilities (N, classes) float32, labels (N,) int)`` in the order of the split.
    Crop protocols run ``batch_views`` views per step, sharded over this process's devices;
    dense evaluation runs one image at a time (compiling once per distinct image shape).
    """
    size, scales = member.image_size, protocol.scales(member.image_size, scales, member.scale_jittered, member.resize)
    num_views = protocol.num_views(size, scales)
    devices = jax.local_devices()
    per_batch = 1 if protocol.dense else max(1, batch_views // num_views)
    per_batch = -(-per_batch // len(devices)) * len(devices)
    total = min(limit or source.num_examples, -(-source.num_examples // jax.process_count()))
    bar = _progress(progress, f"{os.path.basename(member.directory)} {protocol.name} ({num_views} views)", total)
    probabilities, labels = [], []
    if protocol.dense:
        variables = jax.device_put(member.variables, devices[0])
        apply = jax.jit(lambda variables, views: flaxnets.dense_logits(
            member.model, variables, normalize_images(views, member.mean, member.std)))
        for example in _image_batches(source, protocol, size, scales, 1, limit):
            pairs = [np.concatenate(example["views"][i:i + 2]) for i in range(0, len(example["views"]), 2)]
            probabilities.append(np.asarray(dense_probabilities(apply, variables, pairs))[None])
            labels.append(example["label"][None])
            _advance(bar, 1)
    else:
        mesh = Mesh(np.array(devices), ("data",))
        variables = jax.device_put(member.variables, NamedSharding(mesh, PartitionSpec()))
        data = NamedSharding(mesh, PartitionSpec("data"))
        step = jax.jit(functools.partial(crop_probabilities, member.model, mean=member.mean, std=member.std))
        for batch in _image_batches(source, protocol, size, scales, per_batch, limit):
            probs = np.asarray(step(variables, jax.device_put(batch["views"], data)))
            probabilities.append(probs[batch["mask"]])
            labels.append(batch["label"][batch["mask"]])
            _advance(bar, int(batch["mask"].sum()))
    if bar is not None:
        bar.close()
    if not labels:
        raise EvaluationError(f"{source.name} {source.split} gave no examples to this process")
    return np.concatenate(probabilities).astype(np.float32), np.concatenate(labels)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1/top-5 of (N, classes) scores over all processes; ``count`` is the number of examples."""
    k = min(5, probabilities.shape[1])
    top5 = np.argsort(-probabilities, axis=1)[:, :k]
    counts = np.array([np.sum(top5[:, 0] == labels), np.sum(np.any(top5 == labels[:, None], axis=1)), len(labels)])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(0)
    return {"top1": float(counts[0] / max(counts[2], 1)), "top5": float(counts[1] / max(counts[2], 1)),
            "count": int(counts[2])}


def evaluate(members: list[Member], protocol_name: str, source: Source, *, scales=None, batch_views: int = 256,
             limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluates ``members`` (one model, or an ensemble) with a protocol on ``source``.

    The ensemble's prediction is the mean of its members' probabilities, each already averaged
    over the views. Returns top-1/top-5 of the ensemble and of each member, and what was run.
    """
    protocol = get_protocol(protocol_name)
    check_sizes(members, [protocol.name], scales)
    classes = {m.model.num_classes for m in members}
    if len(classes) > 1 or classes != {source.num_classes}:
        raise EvaluationError(f"the models have {sorted(classes)} classes but {source.name} has {source.num_classes}")
    start, total, labels, per_member = time.perf_counter(), None, None, []
    for member in members:
        probs, member_labels = member_probabilities(member, protocol, source, scales=scales, batch_views=batch_views,
                                                    limit=limit, progress=progress)
        if labels is not None and not np.array_equal(labels, member_labels):
            raise EvaluationError("the ensemble's members saw different examples")
        labels, total = member_labels, probs if total is None else total + probs
        published = {} if member.published is None else {
            "published_top1": member.published[0] / 100, "published_top5": member.published[1] / 100}
        per_member.append({"directory": member.directory, "weights": member.source, **accuracy(probs, labels),
                           **published})
    result = accuracy(total / len(members), labels)
    first = members[0]
    first_scales = protocol.scales(first.image_size, scales, first.scale_jittered, first.resize)
    return {"protocol": protocol.name, "description": protocol.description,
            "views": protocol.num_views(first.image_size, first_scales), "scales": list(first_scales),
            "image_size": first.image_size,
            "dataset": source.name, "split": source.split, **result, "members": per_member,
            "seconds": round(time.perf_counter() - start, 1)}


def _progress(enabled: bool, desc: str, total: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    which = parser.add_mutually_exclusive_group(required=True)  # exactly one: argparse's usage error otherwise
    which.add_argument("--workdir", help="a `python -m train` workdir or a `python -m flaxnets.convert` output")
    which.add_argument("--pretrained", metavar="MODEL[.TAG]",
                       help="instead of --workdir: published weights (flaxnets.list_pretrained(), e.g. "
                            "resnet50.tv2_in1k; a bare model takes its best), evaluated with their own "
                            "resize/crop/mean/std, on imagenet2012 by default; MODEL[.TAG]@PATH_OR_URL reads that "
                            "checkpoint file instead of downloading")
    add("--protocol", default="center", choices=[*PROTOCOLS, "all"], help="test protocol (all: each in turn, and a PNG)")
    add("--ensemble", nargs="+", default=[], metavar="DIR", help="more models whose probabilities are averaged in")
    # Absent unless given (so that --pretrained can refuse it); best by default.
    add("--checkpoint", choices=("best", "last"), default=argparse.SUPPRESS, help="which checkpoint of a workdir "
        "(default: best)")
    add("--ema", action="store_true", help="evaluate the Polyak/EMA weights")
    add("--image-size", type=int, help="evaluate at this crop size (default: each model's training size, or "
                                       "the published weights' crop)")
    add("--scales", help="comma-separated shorter sides overriding the protocol's (e.g. 256,384,512)")
    add("--dataset", help="data set (default: the one the model was trained on; needed for converted weights)")
    add("--data-dir", help="tensorflow-datasets data directory (default: the training run's)")
    add("--download", action="store_true", help="let tfds download a data set that is not prepared")
    add("--batch-views", type=int, default=256, help="views per device step (crop protocols)")
    add("--limit", type=int, help="evaluate only the first N examples (of each process)")
    add("--accelerator", choices=("cpu", "gpu", "tpu"), help="platform to run on (default: JAX's default)")
    add("--out", help="JSON output path (default: DIR/eval_<protocol>.json; with --pretrained, "
                      "./eval_<model>.<tag>_<protocol>.json in the current directory)")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 done, 1 error)."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from input_pipeline.sources import BadImageError, DatasetNotReadyError
    from train.report import plot_protocols

    try:
        if args.accelerator:
            jax.config.update("jax_platforms", args.accelerator if args.accelerator != "gpu" else "cuda")
        scales = _check_args(args)
        checkpoint = getattr(args, "checkpoint", "best")
        first = (load_pretrained_member(args.pretrained, args.image_size, progress=not args.no_progress)
                 if args.pretrained else load_member(args.workdir, checkpoint, args.ema, args.image_size))
        members = [first, *(load_member(d, checkpoint, args.ema, args.image_size) for d in args.ensemble)]
        names = list(PROTOCOLS) if args.protocol == "all" else [args.protocol]
        check_sizes(members, names, scales)
        dataset = args.dataset or members[0].dataset or "imagenet2012"
        data_dir = args.data_dir or members[0].data_dir
        source = eval_source(dataset, data_dir, args.download)
        results = []
        for name in names:
            result = evaluate(members, name, source, scales=scales, batch_views=args.batch_views, limit=args.limit,
                              progress=not args.no_progress)
            results.append(result)
            if jax.process_index() == 0:
                print(f"{name:8s} {result['views']:4d} views  top-1 {100 * result['top1']:6.2f}%  top-5 "
                      f"{100 * result['top5']:6.2f}%  ({result['count']} images, {len(members)} model(s), "
                      f"{result['seconds']:.0f}s)", flush=True)
                for member in members:
                    if member.published is not None:
                        print(f"{'':9s}{'published':>10s}  top-1 {member.published[0]:6.2f}%  top-5 "
                              f"{member.published[1]:6.2f}%  ({member.directory}, the publisher's own centre crop)",
                              flush=True)
    except (KeyError, ValueError, EvaluationError, DatasetNotReadyError, BadImageError, OSError) as err:
        print_error(err)
        return 1
    if jax.process_index() == 0:
        suffix = f"_ensemble{len(members)}" if len(members) > 1 else ""
        if args.out:
            out = args.out
        elif args.pretrained:
            out = f"eval_{members[0].directory}_{args.protocol}{suffix}.json"
        else:
            out = os.path.join(members[0].directory, f"eval_{args.protocol}{suffix}.json")
        with open(out, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=2)
        written = [out]
        if len(results) > 1:
            written.append(plot_protocols(results, os.path.splitext(out)[0] + ".png"))
        print(f"wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
