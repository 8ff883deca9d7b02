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
    name: str,
    *,
    num_classes: int = 1000,
    dtype: Any = jnp.float32,
    pretrained: bool | str = False,
    **overrides: Any,
) -> nn.Module:
    """Builds a registered model, optionally with its published ImageNet weights.

    Args:
      name: a registry name or alias (``"resnet50"``, ``"r50"``, ``"resnext50"``...).
      num_classes: size of the classifier output. With ``pretrained``, a count other than the
        weights' 1000 gets a freshly initialised classifier on the pretrained backbone.
      dtype: compute dtype; parameters stay float32 (``param_dtype``), so
        ``dtype=jnp.bfloat16`` is mixed precision with float32 master weights.
      **overrides: any other field of the model's module, e.g. ``zero_init_residual=True``
        for ResNets, ``aux_logits=False`` for GoogLeNet, ``dropout_rate=0.2``.

      pretrained: ``True`` for the most accurate published weights, a tag (``"tv_in1k"``,
        ``"tv2_in1k"``; ``flaxnets.list_pretrained()``), or a checkpoint path or URL. Downloaded
        once and cached; see :func:`flaxnets.pretrained`.

    Returns:
      An unbound Flax module; use ``module.init(rng, x)`` and
      ``module.apply(variables, x, train=...)`` with NHWC input. With ``pretrained``, the module
      bound to its weights: ``model(x, train=False)`` runs it, ``model.variables`` holds them and
      ``module, variables = model.unbind()`` gives the pair for ``jax.jit(module.apply)``.

    Raises:
      KeyError: unknown name (the message lists close matches), or no such published weights.
      TypeError: a name that is not a string, a dtype that is not floating, or an override that
        is not a field of the module.
      ValueError: ``num_classes`` not a positive integer, or a ``dropout_rate`` outside [0, 1).
    """
    if not isinstance(name, str):
        raise TypeError(f"create_model expects a model name (str); got {type(name).__name__}. "
                        "`flaxnets.list_models()` lists them")
    info = model_info(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    if not _is_float_dtype(dtype):
        raise TypeError(f"dtype must be a floating dtype (jnp.float32, jnp.bfloat16, jnp.float16); got "
                        f"{getattr(dtype, '__name__', dtype)!r}")
    rate = overrides.get("dropout_rate")
    if rate is not None and not (isinstance(rate, (int, float)) and 0 <= rate < 1):
        raise ValueError(f"dropout_rate must be in [0, 1); got {rate!r}")
    known = {f.name for f in dataclasses.fields(info.module)} - {"parent", "name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"{info.name} ({info.module.__name__}) has no option(s) {unknown}; "
            f"valid options: {sorted(known)}"
        )
    if pretrained:
        from flaxnets.pretrained import pretrained as load_weights

        tag = None if pretrained is True else pretrained
        model, variables = load_weights(name, tag, num_classes=num_classes, dtype=dtype, **overrides)
        return model.bind(variables)
    fields = {**info.fields, **overrides, "num_classes": num_classes, "dtype": dtype}
    return info.module(**fields)


def _is_float_dtype(dtype: Any) -> bool:
    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
    except TypeError:
        return False
