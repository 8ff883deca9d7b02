"""The published ImageNet-1k weights flaxnets can load, with their accuracy and preprocessing.

Every torchvision ImageNet-1k classification weight for an architecture we have (V1, and V2 where
torchvision trained one with its newer recipe), and timm's port of the Keras Xception weights.
Names follow timm's ``model.tag`` convention: ``resnet50.tv_in1k`` (torchvision V1),
``resnet50.tv2_in1k`` (V2), ``xception.tf_in1k``. Accuracies are the publishers' own single
224 px (Xception: 299 px) centre-crop figures on the ImageNet validation set.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any

from flaxnets.registry import resolve_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How the weights' training images were prepared for evaluation.

    Images are resized (short side to ``resize``), centre-cropped to ``crop``, scaled to [0, 1]
    and normalised with ``mean``/``std`` per RGB channel; models take NHWC float input.
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published set of weights.

    Attributes:
      model: the flaxnets model name.
      tag: ``tv_in1k``, ``tv2_in1k`` or ``tf_in1k``.
      url: where the publisher serves the file.
      sha256_prefix: leading hex digits of the file's SHA-256 (torchvision puts them in the name).
      top1, top5: the publisher's ImageNet validation accuracy in percent.
      preprocessing: the evaluation transform the accuracy was measured with.
      source: who trained and publishes the weights.
      options: ``create_model`` fields the weights need (GoogLeNet's ``transform_input``).
      file_format: ``pth`` (PyTorch zip or legacy pickle) or ``safetensors``.
    """

    model: str
    tag: str
    url: str
    sha256_prefix: str
    top1: float
    top5: float
    preprocessing: Preprocessing
    source: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    file_format: str = "pth"

    @property
    def name(self) -> str:
        """``model.tag``, the name :func:`list_pretrained` lists."""
        return f"{self.model}.{self.tag}"

    @property
    def filename(self) -> str:
        """The file's name in the publisher's URL and in the cache."""
        return os.path.basename(self.url)


_TORCHVISION = "https://download.pytorch.org/models/"
_V2 = Preprocessing(resize=232)


def _tv(model: str, file: str, top1: float, top5: float, tag: str = "tv_in1k",
        preprocessing: Preprocessing = Preprocessing(), **options: Any) -> Weights:
    digest = file.rsplit("-", 1)[1].split(".")[0]
    recipe = "V2 (torchvision's 2021 recipe)" if tag == "tv2_in1k" else "V1"
    return Weights(model, tag, _TORCHVISION + file, digest, top1, top5, preprocessing,
                   f"torchvision IMAGENET1K_{recipe}", options)


_TABLE: tuple[Weights, ...] = (
    _tv("alexnet_owt", "alexnet-owt-7be5be79.pth", 56.522, 79.066),
    _tv("vgg11", "vgg11-8a719046.pth", 69.020, 88.628),
    _tv("vgg13", "vgg13-19584684.pth", 69.928, 89.246),
    _tv("vgg16", "vgg16-397923af.pth", 71.592, 90.382),
    _tv("vgg19", "vgg19-dcbb9e9d.pth", 72.376, 90.876),
    _tv("vgg11_bn", "vgg11_bn-6002323d.pth", 70.370, 89.810),
    _tv("vgg13_bn", "vgg13_bn-abd245e5.pth", 71.586, 90.374),
    _tv("vgg16_bn", "vgg16_bn-6c64b313.pth", 73.360, 91.516),
    _tv("vgg19_bn", "vgg19_bn-c79401a0.pth", 74.218, 91.842),
    # torchvision's GoogLeNet re-normalises its input inside the model (transform_input).
    _tv("googlenet_bn", "googlenet-1378be20.pth", 69.778, 89.530, transform_input=True),
    _tv("resnet18", "resnet18-f37072fd.pth", 69.758, 89.078),
    _tv("resnet34", "resnet34-b627a593.pth", 73.314, 91.420),
    _tv("resnet50", "resnet50-0676ba61.pth", 76.130, 92.862),
    _tv("resnet50", "resnet50-11ad3fa6.pth", 80.858, 95.434, "tv2_in1k", _V2),
    _tv("resnet101", "resnet101-63fe2227.pth", 77.374, 93.546),
    _tv("resnet101", "resnet101-cd907fc2.pth", 81.886, 95.780, "tv2_in1k", _V2),
    _tv("resnet152", "resnet152-394f9c45.pth", 78.312, 94.046),
    _tv("resnet152", "resnet152-f82ba261.pth", 82.284, 96.002, "tv2_in1k", _V2),
    _tv("resnext50_32x4d", "resnext50_32x4d-7cdf4587.pth", 77.618, 93.698),
    _tv("resnext50_32x4d", "resnext50_32x4d-1a0047aa.pth", 81.198, 95.340, "tv2_in1k", _V2),
    _tv("resnext101_32x8d", "resnext101_32x8d-8ba56ff5.pth", 79.312, 94.526),
    _tv("resnext101_32x8d", "resnext101_32x8d-110c445d.pth", 82.834, 96.228, "tv2_in1k", _V2),
    # torchvision published only its V2 recipe for this one.
    _tv("resnext101_64x4d", "resnext101_64x4d-173b62eb.pth", 83.246, 96.454, "tv2_in1k", _V2),
    _tv("densenet121", "densenet121-a639ec97.pth", 74.434, 91.972),
    _tv("densenet161", "densenet161-8d451a50.pth", 77.138, 93.560),
    _tv("densenet169", "densenet169-b2777c0a.pth", 75.600, 92.806),
    _tv("densenet201", "densenet201-c1103571.pth", 76.896, 93.370),
    Weights("xception", "tf_in1k",
            "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-cadene/xception-43020ad28.pth",
            "43020ad28", 79.0, 94.5,
            Preprocessing(resize=333, crop=299, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),
            "Keras' Xception weights as ported by timm (legacy_xception.tf_in1k)"),
)


def list_pretrained(pattern: str = "*") -> list[str]:
    """The ``model.tag`` names of the published weights whose name matches ``pattern`` (e.g. ``"resnet*"``)."""
    return sorted(w.name for w in _TABLE if fnmatch.fnmatchcase(w.name, pattern.lower()))


def default_tag(model: str) -> str:
    """The tag ``pretrained=True`` picks for ``model``: the most accurate weights published for it.

    Raises:
      KeyError: the model has no published weights (the message lists those that do).
    """
    return max(_weights_of(model), key=lambda w: w.top1).tag


def weights_info(name: str, tag: str | None = None) -> Weights:
    """The :class:`Weights` entry for ``name`` (a model or ``model.tag``) and ``tag`` (default: the best).

    Raises:
      KeyError: an unknown model, a model without weights, or an unknown tag; the message lists
        what exists.
    """
    if tag is None and "." in name:
        name, tag = name.split(".", 1)
    candidates = _weights_of(name)
    if tag is None:
        tag = default_tag(name)
    for weights in candidates:
        if weights.tag == tag:
            return weights
    raise KeyError(f"{candidates[0].model} has no weights tagged {tag!r}; "
                   f"available: {', '.join(w.tag for w in candidates)}")


def _weights_of(model: str) -> list[Weights]:
    canonical = resolve_name(model)
    found = [w for w in _TABLE if w.model == canonical]
    if not found:
        with_weights = sorted({w.model for w in _TABLE})
        raise KeyError(f"no published weights for {canonical}; models with weights: {', '.join(with_weights)}")
    return found
