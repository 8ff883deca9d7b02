"""Training recipes: one typed dataclass, one named preset per paper (and a few practical ones).

Preset names follow the detection-codebase convention ``{model}_{optimizer-schedule}_{epochs}e_{data}``,
e.g. ``resnet50_sgd-step_90e_imagenet``. ``python -m train --list-recipes`` prints them; any field
can be overridden on the command line with ``--set field=value``; :func:`validate` checks a whole
recipe before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Literal

Schedule = Literal["constant", "step", "exponential", "cosine"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run except where the data and outputs live.

    Attributes:
      name: preset name.
      model: flaxnets model name.
      dataset: tfds name or image folder.
      epochs: passes over the training split.
      batch_size: global batch size.
      lr: base learning rate (at ``lr_reference_batch`` images per batch, if set).
      lr_reference_batch: scale ``lr`` by ``batch_size / lr_reference_batch`` (Goyal et al.).
      momentum: SGD momentum.
      nesterov: Nesterov momentum.
      weight_decay: L2 penalty on conv and dense kernels (biases and BN parameters are not decayed).
      schedule: ``constant``, ``step`` (x ``decay_factor`` at ``milestones``), ``exponential``
        (x ``decay_factor`` every ``decay_every_epochs``) or ``cosine``.
      milestones: epochs of the step schedule.
      decay_factor: multiplier of the step and exponential schedules.
      decay_every_epochs: period of the exponential schedule.
      warmup_epochs: linear warm-up from 0 (any schedule).
      plateau_patience: if > 0, divide the lr by 10 when the eval top-1 has not improved for this
        many epochs (AlexNet/VGG's "when validation error stops improving").
      plateau_max_reductions: how many times the plateau rule may divide the lr.
      label_smoothing: cross-entropy label smoothing.
      aux_loss_weight: weight of auxiliary classifier losses (GoogLeNet: 0.3).
      ema_decay: Polyak/EMA averaging of the weights (evaluated alongside the raw weights), or None.
      augmentation: ``input_pipeline`` recipe name.
      image_size: training resolution; None for the model's default (227, 224 or 299).
      dropout_rate: override the model's dropout; None keeps the paper's.
      zero_init_residual: ResNets: start each block's last BN at zero.
      freeze_backbone: train only the classifier(s) (a linear probe): every other parameter gets
        no update at all.
      frozen_bn: BatchNorm normalises with its running statistics and never updates them.
      head_lr_multiplier: the classifier's learning rate is this times the schedule's (a new head
        learns faster than a pretrained backbone).
    """

    name: str
    model: str
    dataset: str = "imagenet2012"
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    lr_reference_batch: int | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: Schedule = "step"
    milestones: tuple[int, ...] = (30, 60)
    decay_factor: float = 0.1
    decay_every_epochs: float = 1.0
    warmup_epochs: float = 0.0
    plateau_patience: int = 0
    plateau_max_reductions: int = 3
    label_smoothing: float = 0.0
    aux_loss_weight: float = 0.0
    ema_decay: float | None = None
    augmentation: str = "resnet"
    image_size: int | None = None
    dropout_rate: float | None = None
    zero_init_residual: bool = False
    freeze_backbone: bool = False
    frozen_bn: bool = False
    head_lr_multiplier: float = 1.0

    def scaled_lr(self) -> float:
        """The base learning rate for this recipe's batch size."""
        if self.lr_reference_batch:
            return self.lr * self.batch_size / self.lr_reference_batch
        return self.lr


_PRESETS: dict[str, Recipe] = {}


def _preset(recipe: Recipe) -> None:
    _PRESETS[recipe.name] = recipe


_PAPER_PLATEAU = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="constant", plateau_patience=3)
_preset(Recipe("alexnet_sgd-plateau_90e_imagenet", "alexnet", batch_size=128, augmentation="alexnet", **_PAPER_PLATEAU))
_preset(Recipe("vgg16_sgd-plateau_74e_imagenet", "vgg16", epochs=74, augmentation="vgg", **_PAPER_PLATEAU))
# The paper gives no base lr; 0.01 with x0.96 every 8 epochs as in its text.
_preset(Recipe(
    "googlenet_sgd-exp_250e_imagenet", "googlenet", epochs=250, lr=0.01, weight_decay=2e-4,
    schedule="exponential", decay_factor=0.96, decay_every_epochs=8, aux_loss_weight=0.3,
    ema_decay=0.9999, augmentation="inception",
))
_RESNET = dict(lr=0.1, lr_reference_batch=256, schedule="step", milestones=(30, 60), weight_decay=1e-4)
_preset(Recipe("resnet50_sgd-step_90e_imagenet", "resnet50", augmentation="resnet", **_RESNET))
_preset(Recipe("resnext50_sgd-step_90e_imagenet", "resnext50_32x4d", augmentation="inception_crop_flip", **_RESNET))
_preset(Recipe("densenet121_nesterov-step_90e_imagenet", "densenet121", nesterov=True,
               augmentation="inception_crop_flip", **_RESNET))
_preset(Recipe(
    "xception_sgd-exp_100e_imagenet", "xception", epochs=100, lr=0.045, weight_decay=1e-5,
    schedule="exponential", decay_factor=0.94, decay_every_epochs=2, ema_decay=0.9999,
    augmentation="inception",
))
_preset(Recipe(
    "resnet50_sgd-cosine-ls-ema_100e_imagenet", "resnet50", epochs=100, lr=0.1, lr_reference_batch=256,
    weight_decay=5e-5, schedule="cosine", warmup_epochs=5, label_smoothing=0.1, ema_decay=0.9998,
    augmentation="inception_crop_flip", zero_init_residual=True,
))
# The embedded default: a few minutes on a 2-core CPU.
_preset(Recipe(
    "resnet18_sgd-cosine_15e_digits", "resnet18", dataset="flaxnets_digits", epochs=15, batch_size=64,
    lr=0.05, weight_decay=5e-4, schedule="cosine", warmup_epochs=1, augmentation="scale_crop", image_size=32,
))

# Fine-tuning a pretrained backbone (python -m train --pretrained): the lr is a tenth of the
# from-scratch ResNet recipe's 0.1 per 256 images, and the new classifier learns 10x faster, as in
# Caffe's fine-tuning example (lr_mult 10 on the replaced layer); cosine after one epoch of warm-up,
# 10 epochs: a short run for small data sets (raise --epochs for large ones).
FINETUNE_RECIPE = "finetune_sgd-cosine_10e"
_preset(Recipe(
    FINETUNE_RECIPE, "resnet50", dataset="flaxnets_digits", epochs=10, batch_size=64, lr=0.01, lr_reference_batch=256, weight_decay=1e-4,
    schedule="cosine", warmup_epochs=1, augmentation="inception_crop_flip", head_lr_multiplier=10.0,
))

DEFAULT_RECIPE = "resnet18_sgd-cosine_15e_digits"
# The paper recipe of each family, used when only --model is given.
FAMILY_RECIPES = {
    "alexnet": "alexnet_sgd-plateau_90e_imagenet",
    "vgg": "vgg16_sgd-plateau_74e_imagenet",
    "googlenet": "googlenet_sgd-exp_250e_imagenet",
    "resnet": "resnet50_sgd-step_90e_imagenet",
    "densenet": "densenet121_nesterov-step_90e_imagenet",
    "xception": "xception_sgd-exp_100e_imagenet",
}


def list_recipes() -> list[str]:
    """Names of the presets."""
    return sorted(_PRESETS)


def get_recipe(name: str) -> Recipe:
    """The preset called ``name``; unknown names raise ``KeyError`` with close matches."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown recipe {name!r}.{hint} `python -m train --list-recipes` lists them.")
    return _PRESETS[name]


def recipe_for_model(model: str) -> Recipe:
    """The paper recipe of ``model``'s family, with the model swapped in (e.g. resnext50 -> ResNet's)."""
    from flaxnets import model_info

    info = model_info(model)
    name = FAMILY_RECIPES[info.family]
    if info.name.startswith("resnext"):
        name = "resnext50_sgd-step_90e_imagenet"
    return dataclasses.replace(get_recipe(name), model=info.name)


def override(recipe: Recipe, assignments: list[str]) -> Recipe:
    """Applies ``field=value`` strings, parsing each value by the field's type.

    Raises:
      ValueError: an unknown field or a value that does not parse.
    """
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    changes = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"--set expects field=value with a Recipe field; got {assignment!r}. "
                             f"Fields: {', '.join(fields)}")
        changes[key] = _parse(text.strip(), str(fields[key].type), key)
    return dataclasses.replace(recipe, **changes)


class RecipeError(ValueError):
    """A recipe with bad fields; the message has one line per problem (also in ``problems``)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def validate(recipe: Recipe) -> Recipe:
    """Checks every field of ``recipe`` and how they fit together; returns it unchanged.

    Counts and sizes must be positive, rates and decays inside their ranges, the step schedule's
    milestones inside the epochs, the schedule and augmentation names known, the model registered
    and the image size at least the model's minimum (computed from its layers, not compiled).

    Raises:
      RecipeError: a ``ValueError`` whose message lists every problem, one per line.
    """
    r = recipe
    epochs = r.epochs if _is_int(r.epochs) and r.epochs >= 1 else None
    problems = [
        *(_text(r, key) for key in ("name", "model", "dataset", "augmentation")),
        *(_flag(r, key) for key in ("nesterov", "zero_init_residual", "freeze_backbone", "frozen_bn")),
        _count(r, "epochs"),
        _count(r, "batch_size"),
        _count(r, "lr_reference_batch", optional=True),
        _count(r, "image_size", optional=True),
        _count(r, "plateau_patience", least=0),
        _count(r, "plateau_max_reductions", least=0),
        _number(r, "lr", 0, low_open=True),
        _number(r, "momentum", 0, 1, high_open=True),
        _number(r, "weight_decay", 0, 1, high_open=True),
        _number(r, "decay_factor", 0, 1, low_open=True),
        _number(r, "decay_every_epochs", 0, low_open=True),
        _number(r, "warmup_epochs", 0, epochs or math.inf),
        _number(r, "label_smoothing", 0, 1, high_open=True),
        _number(r, "aux_loss_weight", 0),
        _number(r, "ema_decay", 0, 1, low_open=True, high_open=True, optional=True),
        _number(r, "dropout_rate", 0, 1, high_open=True, optional=True),
        _number(r, "head_lr_multiplier", 0, low_open=True),
    ]
    if r.nesterov is True and r.momentum == 0:
        problems.append("nesterov needs momentum > 0")
    schedules = typing.get_args(Schedule)
    if r.schedule not in schedules:
        problems.append(f"unknown schedule {r.schedule!r}; use {', '.join(schedules)}")
    if not (isinstance(r.milestones, (tuple, list)) and all(_is_int(m) for m in r.milestones)):
        problems.append(f"milestones must be a tuple of epochs, e.g. (30, 60); got {r.milestones!r}")
    elif epochs and r.schedule == "step":
        problems.append(_milestones_problem(r.milestones, epochs))
    if isinstance(r.augmentation, str) and r.augmentation:
        from input_pipeline.recipes import list_recipes as augmentations

        if r.augmentation not in augmentations():
            problems.append(f"unknown augmentation {r.augmentation!r}; use one of {', '.join(augmentations())}")
    if isinstance(r.model, str) and r.model:
        size_ok = _count(r, "image_size", optional=True) is None
        problems.append(_model_problem(r.model, r.image_size if size_ok else None))
    problems = [p for p in problems if p]
    if problems:
        raise RecipeError(problems)
    return recipe


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(recipe: Recipe, key: str) -> str | None:
    value = getattr(recipe, key)
    return None if isinstance(value, str) and value else f"{key} must be a non-empty string; got {value!r}"


def _flag(recipe: Recipe, key: str) -> str | None:
    value = getattr(recipe, key)
    return None if isinstance(value, bool) else f"{key} must be true or false; got {value!r}"


def _count(recipe: Recipe, key: str, least: int = 1, optional: bool = False) -> str | None:
    value = getattr(recipe, key)
    if (optional and value is None) or (_is_int(value) and value >= least):
        return None
    kind = "a positive integer" if least == 1 else f"an integer >= {least}"
    return f"{key} must be {kind}{' or None' if optional else ''}; got {value!r}"


def _number(recipe: Recipe, key: str, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False, optional: bool = False) -> str | None:
    value = getattr(recipe, key)
    if optional and value is None:
        return None
    if _is_number(value) and (low < value if low_open else low <= value) and (
            value < high if high_open else value <= high):
        return None
    if high == math.inf:
        where = f"{'>' if low_open else '>='} {low:g}"
    else:
        where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    hint = " (a negative rate climbs the loss)" if key == "lr" and _is_number(value) and value < 0 else ""
    return f"{key} must be a number {where}; got {value!r}{hint}"


def _milestones_problem(milestones, epochs: int) -> str | None:
    """What is wrong with the step schedule's milestones, suggesting ones at the same fractions of ``epochs``."""
    if all(0 < m < epochs for m in milestones) and list(milestones) == sorted(set(milestones)):
        return None
    if epochs < 2:
        return "the step schedule needs at least 2 epochs to place a milestone; with 1 use schedule=cosine or constant"
    text = f"milestones {tuple(milestones)} must be increasing epochs inside the {epochs} epochs (1 to {epochs - 1})"
    # The same fractions of the run as the given milestones (the papers' x/90), else thirds.
    last = max([m for m in milestones if m > 0], default=0)
    fractions = [m / (1.5 * last) for m in milestones if m > 0] if last else [1 / 3, 2 / 3]
    scaled = sorted({min(epochs - 1, max(1, round(f * epochs))) for f in fractions})
    return f"{text}; e.g. --set milestones={','.join(map(str, scaled))}"


def _model_problem(name: str, image_size: int | None) -> str | None:
    """An unknown model, or an image size below the model's minimum in training (no compilation needed)."""
    import flaxnets

    try:
        model = flaxnets.create_model(name)
    except KeyError as err:
        return err.args[0]
    least, why = model.min_input_size(train=True)
    if image_size is not None and image_size < least:
        return f"{flaxnets.resolve_name(name)} needs images of at least {least} px ({why}); got image_size {image_size}"
    return None


def _parse(text: str, type_name: str, key: str):
    if text.lower() == "none" and "None" in type_name:
        return None
    try:
        if type_name.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if type_name.startswith("tuple"):
            return tuple(int(v) for v in text.strip("()").split(",") if v.strip())
        if type_name.startswith("int"):
            return int(text)
        if type_name.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as {type_name} for {key}") from None
    return text
