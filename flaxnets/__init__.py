"""flaxnets: the classic ImageNet CNNs in JAX/Flax, exactly as their papers define them.

Quick start::

    import jax, jax.numpy as jnp, flaxnets
    model = flaxnets.create_model("resnet50", num_classes=1000)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images, train=False)          # images: NHWC

``flaxnets.list_models()`` lists every architecture; ``python -m flaxnets`` prints the table.
``flaxnets.from_torch`` / ``to_torch`` convert torchvision and timm weights (torch imported lazily).
"""

# Importing the family modules registers their variants.
from flaxnets import alexnet, densenet, googlenet, resnet, vgg, xception  # noqa: F401
from flaxnets.convert import load_converted
from flaxnets.dense import dense_logits
from flaxnets.features import extract_features
from flaxnets.registry import ModelInfo, create_model, list_models, model_info, register, resolve_name
from flaxnets.summary import count_params, summarize
from flaxnets.torch_weights import from_torch, load_pretrained, to_torch, torch_models

__all__ = [
    "ModelInfo",
    "count_params",
    "create_model",
    "dense_logits",
    "extract_features",
    "from_torch",
    "list_models",
    "load_converted",
    "load_pretrained",
    "model_info",
    "register",
    "resolve_name",
    "summarize",
    "to_torch",
    "torch_models",
]
__version__ = "0.1.0"
