"""Shared test helpers: cached model initialisation, so each model compiles its init once."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
import sys
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its worker processes and the training
# subprocesses they start: the many runs of the same small models compile each program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="flaxnets-tests-jax-cache-"))
# The registry's torchvision is a CUDA build whose compiled ops do not load on CPU torch; its model
# definitions need none of them, so its meta-registrations module is replaced by an empty one.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import jax  # noqa: E402
import pytest  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import flaxnets  # noqa: E402

# Smallest comfortable square input per model for real forward passes (default 64 px): AlexNet's
# unpadded 11x11/4 stem needs 67, Xception's unpadded stem 71, the paper GoogLeNet's aux pool 80.
SMALL_INPUT = {"alexnet": 67, "alexnet_2tower": 67, "xception": 71, "googlenet": 96}


def small_input(name: str, batch: int = 2) -> jax.Array:
    """A deterministic random NHWC batch at the model's small test size."""
    size = SMALL_INPUT.get(name, 64)
    return jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)


@functools.lru_cache(maxsize=4)
def init_small(name: str, num_classes: int = 10):
    """(model, variables, x) for a model initialised at its small test size.

    The key is an ``rbg`` one: XLA:CPU compiles its random bits in a third less time than
    threefry's for the many initialisers (GoogLeNet-BN's init: 16 s against 27 s here), and
    ``init_variables`` compiles them at LLVM level 1."""
    model = flaxnets.create_model(name, num_classes=num_classes)
    x = small_input(name)
    variables = flaxnets.init_variables(model, jax.random.key(0, impl="rbg"), x.shape[1])
    return model, variables, x


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh FLAXNETS_HOME, online, with no proxy in the way of 127.0.0.1."""
    monkeypatch.setenv("FLAXNETS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLAXNETS_OFFLINE", raising=False)
    monkeypatch.delenv("FLAXNETS_MIRROR", raising=False)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    return tmp_path / "home"
