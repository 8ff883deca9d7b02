"""PyTorch state dicts <-> flaxnets variables, for torchvision's and timm's versions of our models.

``from_torch`` turns a torchvision/timm state dict into ``{"params", "batch_stats"}`` for the
flaxnets model of the same architecture; ``to_torch`` goes back. Only ``to_torch`` and
``torch_counterpart`` import torch; checkpoint files are read without it.

Layouts: conv kernels OIHW <-> HWIO; dense kernels (out, in) <-> (in, out), and the first FC after
a flatten also reorders its inputs from PyTorch's (C, H, W) to our NHWC (H, W, C); BatchNorm
weight/bias/running_mean/running_var <-> scale/bias and batch_stats mean/var.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from flaxnets.registry import ModelInfo, create_model, model_info
from flaxnets.summary import abstract_variables


class TorchName(NamedTuple):
    """Where a flax module's parameters live in the PyTorch state dict."""

    prefix: str
    flatten_hw: int | None = None  # spatial size flattened in front of this FC layer, if any


def _alexnet(path: tuple[str, ...], info: ModelInfo) -> TorchName:
    convs = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}
    if path[0] in convs:
        return TorchName(f"features.{convs[path[0]]}")
    fc = {"fc1": (1, 6), "fc2": (4, None), "fc3": (6, None)}[path[1]]
    return TorchName(f"classifier.{fc[0]}", fc[1])


def _vgg(path: tuple[str, ...], info: ModelInfo) -> TorchName:
    if path[0] == "classifier":
        fc = {"fc1": (0, 7), "fc2": (3, None), "fc3": (6, None)}[path[1]]
        return TorchName(f"classifier.{fc[0]}", fc[1])
    # Index in torchvision's `features` Sequential: conv (+ BN) + ReLU per conv, a pool per stage.
    per_conv = 3 if info.fields.get("batch_norm") else 2
    index = 0
    for stage, kernels in enumerate(info.fields["stage_kernels"], start=1):
        for j in range(1, len(kernels) + 1):
            if path[0] == f"conv{stage}_{j}":
                return TorchName(f"features.{index + (path[1] == 'bn')}")
            index += per_conv
        index += 1
    raise KeyError(path)


_GOOGLENET_BRANCHES = {
    "branch2_reduce": "branch2.0", "branch2": "branch2.1",
    "branch3_reduce": "branch3.0", "branch3": "branch3.1", "branch4": "branch4.1",
}


def _googlenet(path: tuple[str, ...], info: ModelInfo) -> TorchName:
    parts = [_GOOGLENET_BRANCHES.get(p, p) for p in path]
    flatten = 4 if path[0].startswith("aux") and path[-1] == "fc1" else None
    return TorchName(".".join(parts), flatten)


def _resnet(path: tuple[str, ...], info: ModelInfo) -> TorchName:
    parts = [re.sub(r"^layer(\d+)_(\d+)$", r"layer\1.\2", p) for p in path]
    parts = [{"conv": "0", "bn": "1"}.get(p, p) if i and parts[i - 1] == "downsample" else p
             for i, p in enumerate(parts)]
    return TorchName(".".join(parts))


def _densenet(path: tuple[str, ...], info: ModelInfo) -> TorchName:
    if path[0] == "classifier":
        return TorchName("classifier")
    parts = [re.sub(r"^denseblock(\d+)_layer(\d+)$", r"denseblock\1.denselayer\2", p) for p in path]
    return TorchName("features." + ".".join(parts))


def _xception(path: tuple[str, ...], info: ModelInfo) -> TorchName:
    if len(path) == 1 or path[0] in ("conv3", "conv4"):
        parts = [{"depthwise": "conv1"}.get(p, p) for p in path]
        return TorchName(".".join(parts))
    block, inner = path[0], path[1]
    if inner in ("skip", "skipbn"):
        return TorchName(f"{block}.{inner}")
    # timm's `rep` Sequential holds (ReLU, SeparableConv, BN) per conv; block1 drops the first ReLU.
    offset = 0 if block == "block1" else 1
    number = int(inner.removeprefix("sepconv").removeprefix("bn"))
    index = 3 * (number - 1) + offset + (inner.startswith("bn"))
    if inner.startswith("bn"):
        return TorchName(f"{block}.rep.{index}")
    part = {"depthwise": "conv1", "pointwise": "pointwise"}[path[2]]
    return TorchName(f"{block}.rep.{index}.{part}")


# Our models that torchvision or timm ship, and how their module paths map to PyTorch keys.
_MAPPINGS: dict[str, Callable[[tuple[str, ...], ModelInfo], TorchName]] = {
    "alexnet_owt": _alexnet,
    **{n: _vgg for n in ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")},
    "googlenet_bn": _googlenet,
    **{n: _resnet for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                            "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")},
    **{n: _densenet for n in ("densenet121", "densenet161", "densenet169", "densenet201")},
    "xception": _xception,
}
# The flax path of each family's classifier (default ("fc",)); its PyTorch key follows from the mapping.
_HEAD_PATHS = {"alexnet": ("classifier", "fc3"), "vgg": ("classifier", "fc3"), "densenet": ("classifier",)}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# Old torchvision DenseNet checkpoints name layers "norm.1" where the module is "norm1".
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var)$")


def torch_models() -> list[str]:
    """The flaxnets models that have a torchvision or timm counterpart to convert from."""
    return sorted(_MAPPINGS)


def torch_counterpart(name: str, num_classes: int = 1000):
    """A new, randomly initialised torchvision (or timm) model of the same architecture as ``name``.

    ``googlenet_bn`` comes with its auxiliary heads and without ``transform_input``; ``xception``
    is timm's ``legacy_xception``. Raises ``KeyError`` for models without a counterpart.
    """
    info, _ = _mapping(name)
    if info.name == "xception":
        import timm

        return timm.create_model("legacy_xception", pretrained=False, num_classes=num_classes)
    import torchvision

    if info.name == "alexnet_owt":
        return torchvision.models.alexnet(num_classes=num_classes)
    if info.name == "googlenet_bn":
        return torchvision.models.googlenet(num_classes=num_classes, aux_logits=True, init_weights=True,
                                            transform_input=False)
    return getattr(torchvision.models, info.name)(num_classes=num_classes)


def _mapping(name: str) -> tuple[ModelInfo, Callable[[tuple[str, ...], ModelInfo], TorchName]]:
    info = model_info(name)
    if info.name not in _MAPPINGS:
        raise KeyError(
            f"{info.name} has no PyTorch counterpart to convert; convertible models: {', '.join(torch_models())}"
        )
    return info, _MAPPINGS[info.name]


def _plan(model, info, mapping) -> list[tuple[str, tuple[str, ...], str, TorchName, tuple[int, ...]]]:
    """(collection, flax path, torch key, TorchName, flax shape) for every variable of ``model``."""
    variables = abstract_variables(model, info.input_size)
    plan = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        keys = tuple(p.key for p in path)
        collection, module_path, leaf_name = keys[0], keys[1:-1], keys[-1]
        target = mapping(module_path, info)
        plan.append((collection, keys[1:], f"{target.prefix}.{_LEAF_NAMES[leaf_name]}", target, leaf.shape))
    return plan


def _to_flax_array(value: np.ndarray, target: TorchName, shape: tuple[int, ...]) -> np.ndarray:
    if value.ndim == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and target.flatten_hw:  # (out, C*H*W) -> (H*W*C, out)
        out, hw = value.shape[0], target.flatten_hw
        return value.reshape(out, -1, hw, hw).transpose(2, 3, 1, 0).reshape(shape)
    return value.T if value.ndim == 2 else value


def _to_torch_array(value: np.ndarray, target: TorchName) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2 and target.flatten_hw:  # (H*W*C, out) -> (out, C*H*W)
        hw = target.flatten_hw
        return value.reshape(hw, hw, -1, value.shape[1]).transpose(3, 2, 0, 1).reshape(value.shape[1], -1)
    return value.T if value.ndim == 2 else value


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _model_for(name: str, state_dict: Mapping[str, Any], **overrides: Any):
    info, mapping = _mapping(name)
    head = mapping(_HEAD_PATHS.get(info.family, ("fc",)), info).prefix
    if "num_classes" not in overrides and f"{head}.weight" in state_dict:
        overrides["num_classes"] = int(state_dict[f"{head}.weight"].shape[0])
    if info.family == "googlenet" and "aux_logits" not in overrides:
        overrides["aux_logits"] = any(k.startswith("aux1.") for k in state_dict)
    return create_model(info.name, **overrides), info, mapping


def from_torch(name: str, state_dict: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Converts a torchvision/timm state dict into variables for ``flaxnets.create_model(name)``.

    Args:
      name: a model of :func:`torch_models` (or its alias).
      state_dict: ``torch_model.state_dict()`` or a loaded ``.pth``; values may be torch tensors
        or arrays. ``num_batches_tracked`` entries are ignored; old DenseNet key names are accepted.
      **overrides: fields for ``create_model``; ``num_classes`` defaults to the checkpoint's and
        GoogLeNet's ``aux_logits`` to whether the checkpoint has auxiliary heads.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (no ``batch_stats`` for models without BatchNorm),
      NumPy float32 arrays, ready for ``model.apply``.

    Raises:
      KeyError: a model without PyTorch counterpart.
      ValueError: a state dict that does not fit; the message names the first missing,
        unexpected or mis-shaped key and the shapes.
    """
    return _convert(name, state_dict, **overrides)[1]


def _convert(name: str, state_dict: Mapping[str, Any], **overrides: Any):
    """(model, variables) for a state dict; see :func:`from_torch`."""
    state = {_OLD_DENSENET_KEY.sub(r"\1\2.\3", k): v for k, v in state_dict.items()
             if not k.endswith("num_batches_tracked")}
    model, info, mapping = _model_for(name, state, **overrides)
    # Parameters before statistics, so a missing layer is reported by its weight.
    plan = sorted(_plan(model, info, mapping), key=lambda entry: entry[0] != "params")
    by_key = {key: (collection, path, target, shape) for collection, path, key, target, shape in plan}
    variables: dict[str, Any] = {}
    for key, tensor in state.items():  # in the checkpoint's order, so the first misfit is named
        if key not in by_key:
            extra = sum(k not in by_key for k in state)
            raise ValueError(f"{info.name}: unexpected key {key!r} in the state dict ({extra} in all)")
        collection, path, target, shape = by_key[key]
        source = _as_numpy(tensor)
        value = _to_flax_array(source, target, shape)
        if value.shape != shape:
            raise ValueError(
                f"{info.name}: {key!r} has shape {tuple(source.shape)}, which does not fit "
                f"{'/'.join(path)} of shape {shape}"
            )
        _set(variables.setdefault(collection, {}), path, value)
    missing = [(key, entry) for key, entry in by_key.items() if key not in state]
    if missing:
        key, (_, path, _, shape) = missing[0]
        raise ValueError(
            f"{info.name}: state dict has no key {key!r} (expected for {'/'.join(path)}, shape {shape}; "
            f"{len(missing)} missing in all)"
        )
    return model, variables


def to_torch(name: str, variables: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Converts flaxnets variables back into a state dict that torchvision/timm's model loads.

    ``overrides`` are ``create_model`` fields (``num_classes`` is read from the variables). BN
    layers get ``num_batches_tracked = 0``. Returns an ordered ``{key: torch.Tensor}`` dict.
    """
    import torch

    info, mapping = _mapping(name)
    params = variables["params"]
    node = params
    for key in _HEAD_PATHS.get(info.family, ("fc",)):
        node = node[key]
    overrides.setdefault("num_classes", int(np.shape(node["kernel"])[-1]))
    if info.family == "googlenet":
        overrides.setdefault("aux_logits", "aux1" in params)
    model = create_model(info.name, **overrides)
    state: dict[str, Any] = {}
    for collection, path, key, target, _ in _plan(model, info, mapping):
        value = variables[collection]
        for part in path:
            value = value[part]
        state[key] = torch.from_numpy(np.array(_to_torch_array(_as_numpy(value), target), order="C"))
        if key.endswith(".running_var"):
            state[key.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0)
    return state


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A checkpoint's state dict as NumPy arrays, without torch: ``.safetensors`` or a ``torch.save`` file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a checkpoint, or a pickle that asks for anything but tensors (refused unrun).
    """
    if str(path).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a safetensors file ({err})") from None
    from flaxnets.torch_reader import read_torch_checkpoint

    return read_torch_checkpoint(path)


def load_pretrained(name: str, path: str, **overrides: Any):
    """Reads a torchvision/timm checkpoint file and returns ``(model, variables)`` for flaxnets.

    ``path`` is a ``torch.save`` file (``.pth``, zip or legacy format) or ``.safetensors``; torch
    is not needed (see :func:`read_state_dict`). For torchvision's pretrained GoogLeNet
    (``googlenet_bn``), pass ``transform_input=True`` to reproduce torchvision's input
    re-normalisation that those weights expect. :func:`flaxnets.pretrained` does all this by name.
    """
    return _convert(name, read_state_dict(path), **overrides)
