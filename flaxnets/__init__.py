"""flaxnets: the classic ImageNet CNNs in JAX/Flax, exactly as their papers define them.

Quick start::

    import jax, flaxnets
    model = flaxnets.create_model("resnet50", num_classes=1000)
    variables = flaxnets.init_variables(model, jax.random.key(0), 224)  # = model.init, compiled
    logits = model.apply(variables, images, train=False)  # images: NHWC

``flaxnets.list_models()`` lists every architecture; ``python -m flaxnets`` prints the table.
``create_model(name, pretrained=True)`` loads published ImageNet weights (``list_pretrained()``)
without torch; ``preprocess`` and ``decode_predictions`` go with them. ``flaxnets.nnx`` gives the
same models as Flax NNX modules. ``from_torch`` / ``to_torch`` convert state dicts.
"""

# Importing the family modules registers their variants.
from flaxnets import alexnet, densenet, googlenet, resnet, vgg, xception  # noqa: F401
from flaxnets.convert import load_converted
from flaxnets.dense import dense_logits
from flaxnets.download import WeightsUnavailableError, cache_dir
from flaxnets.features import extract_features
from flaxnets.initialize import init_variables
from flaxnets.pretrained import classifier_mask, is_checkpoint_location, pretrained
from flaxnets.preprocess import decode_predictions, imagenet_classes, preprocess
from flaxnets.registry import ModelInfo, create_model, list_models, model_info, register, resolve_name
from flaxnets.summary import count_params, summarize
from flaxnets.torch_weights import from_torch, load_pretrained, to_torch, torch_models
from flaxnets.weights_table import Preprocessing, Weights, list_pretrained, weights_info

__all__ = [
    "ModelInfo",
    "Preprocessing",
    "Weights",
    "WeightsUnavailableError",
    "cache_dir",
    "classifier_mask",
    "count_params",
    "create_model",
    "decode_predictions",
    "dense_logits",
    "extract_features",
    "from_torch",
    "imagenet_classes",
    "init_variables",
    "is_checkpoint_location",
    "list_models",
    "list_pretrained",
    "load_converted",
    "load_pretrained",
    "model_info",
    "preprocess",
    "pretrained",
    "register",
    "resolve_name",
    "summarize",
    "to_torch",
    "torch_models",
    "weights_info",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # flaxnets.nnx imports flax.nnx, which linen users need not pay for: load it on first use.
    if name == "nnx":
        import importlib

        return importlib.import_module("flaxnets.nnx")
    raise AttributeError(f"module 'flaxnets' has no attribute {name!r}")
