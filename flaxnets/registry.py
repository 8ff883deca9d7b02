"""The model registry: one table of every flaxnets architecture.

Each family file registers its variants with :func:`register`; the CLI, the tests and the
benchmarks all go through :func:`create_model` and :func:`list_models`.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model name.

    Attributes:
      name: canonical registry name, e.g. ``"resnext50_32x4d"``.
      family: the family file it lives in, e.g. ``"resnet"``.
      module: the Flax module class.
      fields: the module fields that make this variant (its row of the family's spec table).
      input_size: default square input resolution in pixels (227, 224 or 299).
      aliases: short names that resolve to this model.
    """

    name: str
    family: str
    module: type[nn.Module]
    fields: dict[str, Any]
    input_size: int
    aliases: tuple[str, ...] = ()


_MODELS: dict[str, ModelInfo] = {}
# Every name and alias in normalised form -> canonical name.
_LOOKUP: dict[str, str] = {}


def _normalise(name: str) -> str:
    """Lower case without separators, so "ResNet-50", "resnet_50" and "resnet50" are one name."""
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


def register(
    name: str,
    module: type[nn.Module],
    *,
    family: str,
    input_size: int,
    aliases: tuple[str, ...] = (),
    **fields: Any,
) -> None:
    """Registers a model variant: ``module(**fields)`` under ``name`` and its ``aliases``.

    Raises:
      ValueError: if the name or an alias is already taken, or a field is not a module field.
    """
    known = {f.name for f in dataclasses.fields(module)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{module.__name__} has no field(s) {unknown} (registering {name!r})")
    for key in (name, *aliases):
        if _normalise(key) in _LOOKUP:
            raise ValueError(f"model name {key!r} is already registered (as {_LOOKUP[_normalise(key)]!r})")
    _MODELS[name] = ModelInfo(name, family, module, dict(fields), input_size, tuple(aliases))
    for key in (name, *aliases):
        _LOOKUP[_normalise(key)] = name


def resolve_name(name: str) -> str:
    """Returns the canonical registry name for ``name`` or one of its aliases.

    Matching ignores case, ``-`` and ``_``.

    Raises:
      KeyError: for an unknown name; the message lists the closest known names.
    """
    key = _normalise(name)
    if key in _LOOKUP:
        return _LOOKUP[key]
    candidates = {_normalise(n): n for n in _MODELS}
    for alias, target in _LOOKUP.items():
        candidates.setdefault(alias, target)
    close = difflib.get_close_matches(key, list(candidates), n=8, cutoff=0.5)
    close = list(dict.fromkeys(candidates[c] for c in close))[:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise KeyError(
        f"unknown model {name!r}.{hint} `flaxnets.list_models()` lists all {len(_MODELS)} models."
    )


def model_info(name: str) -> ModelInfo:
    """Returns the :class:`ModelInfo` of a model name or alias."""
    return _MODELS[resolve_name(name)]


def list_models(pattern: str = "*") -> list[str]:
    """Lists the canonical model names matching a shell-style ``pattern``, sorted.

    Example: ``list_models("resnext*")``. Matching ignores case, ``-`` and ``_``; aliases are
    matched but only canonical names are listed.
    """
    pattern = _normalise(pattern)
    return sorted({name for key, name in _LOOKUP.items() if fnmatch.fnmatchcase(key, pattern)})


def create_model(
    name: str, *, num_classes: int = 1000, dtype: Any = jnp.float32, **overrides: Any
) -> nn.Module:
    """Builds a registered model.

    Args:
      name: a registry name or alias (``"resnet50"``, ``"r50"``, ``"resnext50"``...).
      num_classes: size of the classifier output.
      dtype: compute dtype; parameters stay float32 (``param_dtype``), so
        ``dtype=jnp.bfloat16`` is mixed precision with float32 master weights.
      **overrides: any other field of the model's module, e.g. ``zero_init_residual=True``
        for ResNets, ``aux_logits=False`` for GoogLeNet, ``dropout_rate=0.2``.

    Returns:
      An unbound Flax module; use ``module.init(rng, x)`` and
      ``module.apply(variables, x, train=...)`` with NHWC input.

    Raises:
      KeyError: unknown name (the message lists close matches).
      TypeError: an override that is not a field of the module.
    """
    info = model_info(name)
    known = {f.name for f in dataclasses.fields(info.module)} - {"parent", "name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"{info.name} ({info.module.__name__}) has no option(s) {unknown}; "
            f"valid options: {sorted(known)}"
        )
    fields = {**info.fields, **overrides, "num_classes": num_classes, "dtype": dtype}
    return info.module(**fields)
