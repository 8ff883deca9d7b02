"""Pretrained weights by name: download, verify, convert to flax variables and cache, without torch.

``pretrained("resnet50")`` returns ``(model, variables)`` with torchvision's best ResNet-50
weights; ``create_model("resnet50", pretrained=True)`` returns the same model bound to them. The
first call downloads the publisher's file (see :mod:`flaxnets.download`), reads it without torch
(:mod:`flaxnets.torch_reader`, or safetensors), converts it (:func:`flaxnets.from_torch`) and
caches the converted variables as a safetensors file beside it, so later calls only read that.

``FLAXNETS_MIRROR=https://host/path/`` fetches every file from a mirror of the publishers' files
(same file names) instead.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxnets import download
from flaxnets.initialize import init_variables
from flaxnets.registry import create_model, model_info
from flaxnets.weights_table import Weights, weights_info

_CONVERTED_SUFFIX = ".flaxnets.safetensors"


def pretrained(
    name: str,
    tag: str | None = None,
    *,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """A model and its published ImageNet weights: ``(model, {"params", "batch_stats"})``.

    Args:
      name: a model name or alias with published weights (:func:`list_pretrained`), or
        ``"model.tag"``.
      tag: which weights (``"tv_in1k"``, ``"tv2_in1k"``, ``"tf_in1k"``); default: the most accurate.
        A local path, ``file://`` or ``http(s)://`` URL of a torchvision/timm checkpoint
        (``.pth`` or ``.safetensors``) of this architecture also works.
      num_classes: a new classifier of this many classes, freshly initialised (``seed``); the
        backbone and its BatchNorm statistics keep the pretrained values. Default: the weights' 1000.
      dtype: compute dtype of the model (parameters stay float32).
      progress: show the download's progress on stderr.
      **overrides: other ``create_model`` fields (e.g. ``dropout_rate``).

    Raises:
      KeyError: a model without published weights or an unknown tag (the message lists them).
      flaxnets.download.WeightsUnavailableError: the file is not cached and cannot be downloaded.
      ValueError: a file that is not a checkpoint of this architecture, or fails its hash check.
    """
    if tag is not None and is_checkpoint_location(tag):
        options, variables = _convert_file(name, tag, {})
    else:
        options, variables = _load_published(weights_info(name, tag), progress)
    published_classes = options.pop("num_classes")
    model = create_model(name, num_classes=published_classes if num_classes is None else num_classes, dtype=dtype,
                         **{**options, **overrides})
    if num_classes is not None and num_classes != published_classes:
        variables = with_new_head(model, variables, model_info(name).input_size, seed)
    return model, variables


def with_new_head(model: nn.Module, loaded: dict[str, Any], input_size: int, seed: int = 0) -> dict[str, Any]:
    """``loaded`` with every leaf whose shape differs in ``model`` (the classifiers) freshly initialised.

    ``input_size`` is the resolution the weights were built for (it sizes VGG's and AlexNet's
    first FC layer); the new leaves come from ``model.init`` with ``seed``.
    """
    fresh = init_variables(model, jax.random.key(seed), input_size)
    return merge_by_shape(jax.tree.map(np.asarray, fresh), loaded)


def classifier_mask(model: nn.Module, input_size: int) -> dict[str, Any]:
    """The model's params as a tree of bools: True for the leaves sized by ``num_classes``.

    Those are the classifier layers (GoogLeNet's auxiliary ones included), found by comparing the
    parameter shapes for two class counts (``jax.eval_shape``: nothing is computed). Use it to
    give the head its own learning rate or to freeze everything else (``optax.multi_transform``).
    """
    dummy = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)

    def shapes(num_classes: int) -> Any:
        return jax.eval_shape(model.clone(num_classes=num_classes).init, jax.random.key(0), dummy)["params"]

    one, other = shapes(model.num_classes), shapes(model.num_classes + 1)
    return jax.tree.map(lambda a, b: a.shape != b.shape, one, other)


def merge_by_shape(fresh: Any, loaded: Any) -> Any:
    """The tree of ``fresh`` with each leaf taken from ``loaded`` where both exist with one shape."""
    if isinstance(fresh, dict):
        loaded = loaded if isinstance(loaded, dict) else {}
        return {key: merge_by_shape(value, loaded.get(key)) for key, value in fresh.items()}
    return loaded if loaded is not None and np.shape(loaded) == np.shape(fresh) else fresh


def is_checkpoint_location(tag: str) -> bool:
    """Whether a ``tag`` names a checkpoint file (a path or URL) rather than a published tag."""
    return "/" in tag or os.sep in tag or tag.endswith((".pth", ".pt", ".safetensors")) or "://" in tag


def _load_published(weights: Weights, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(create_model options, variables) of a table entry, from the converted cache when it is there."""
    converted = os.path.join(download.cache_dir(), "weights", f"{weights.name}{_CONVERTED_SUFFIX}")
    if os.path.isfile(converted):
        return _read_converted(converted)
    mirror = os.environ.get("FLAXNETS_MIRROR")
    url = mirror.rstrip("/") + "/" + weights.filename if mirror else weights.url
    path = download.fetch(url, sha256_prefix=weights.sha256_prefix, filename=weights.filename, progress=progress)
    options, variables = _convert_file(weights.model, path, weights.options)
    _write_converted(converted, options, variables)
    return options, variables


def _convert_file(name: str, location: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from flaxnets.torch_weights import load_pretrained

    path = download.fetch(location, progress=False) if "://" in location else location
    model, variables = load_pretrained(name, path, **options)
    options = {**options, "num_classes": model.num_classes}
    if hasattr(model, "aux_logits"):
        options["aux_logits"] = model.aux_logits
    return options, variables


def _write_converted(path: str, options: dict[str, Any], variables: dict[str, Any]) -> None:
    """Writes the variables as one flat safetensors file, atomically (a crash leaves no half file)."""
    from safetensors.numpy import save_file

    flat = {"/".join(key): np.ascontiguousarray(value)
            for key, value in traverse_util.flatten_dict(variables).items()}
    partial = f"{path}.{os.getpid()}.tmp"
    save_file(flat, partial, metadata={"options": json.dumps(options)})
    os.replace(partial, path)


def _read_converted(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        options = json.loads(f.metadata()["options"])
        flat = {tuple(key.split("/")): f.get_tensor(key) for key in f.keys()}
    return options, traverse_util.unflatten_dict(flat)
