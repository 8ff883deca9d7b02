"""Parameter counts and FLOPs of registered models, without allocating their weights."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets.conv import rewrites_for
from flaxnets.registry import create_model, model_info


def abstract_variables(model: nn.Module, input_size: int, batch: int = 1) -> dict[str, Any]:
    """The model's variables as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` of ``init``)."""
    x = jax.ShapeDtypeStruct((batch, input_size, input_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays or shape structs (e.g. ``variables["params"]``)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def forward_flops(model: nn.Module, variables: Any, input_size: int, batch: int = 1) -> float:
    """FLOPs of one inference forward pass, from XLA's cost analysis of the lowered program.

    XLA counts a multiply-add as 2 FLOPs, so this is about twice the "multiply-adds" that papers
    often quote as FLOPs.
    """
    x = jax.ShapeDtypeStruct((batch, input_size, input_size, 3), jnp.float32)
    # Traced with the plain convolutions (as for a TPU): the CPU's Winograd form needs fewer
    # multiplies, and this is the architecture's count, not the CPU algorithm's.
    with rewrites_for("tpu"):
        lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    return float(lowered.cost_analysis()["flops"])


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """One row of the model table."""

    name: str
    family: str
    params: int
    gflops: float | None
    input_size: int


def summarize(name: str, *, flops: bool = True) -> ModelSummary:
    """Parameters (1000 classes, BN statistics excluded), GFLOPs and default input size of a model."""
    info = model_info(name)
    model = create_model(info.name)
    variables = abstract_variables(model, info.input_size)
    gflops = forward_flops(model, variables, info.input_size) / 1e9 if flops else None
    return ModelSummary(info.name, info.family, count_params(variables["params"]), gflops, info.input_size)
