"""Accelerators a run can be planned for without having them: TPU slices and GPU servers.

``parse_target("v5e:4x4")`` and ``parse_target("h100x8")`` name a target; :func:`target_devices`
gives JAX device descriptions of it on a CPU-only machine (``jax.experimental.topologies``, with
libtpu for TPUs and the jax CUDA plugin for GPUs), which ``jax.jit(...).lower(...).compile()``
compiles for. Chip figures are the vendors' published ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax

GiB = 1024 ** 3

# What to install for --plan: libtpu and the CUDA plugin, at the jax version we run on.
PLAN_EXTRA = "pip install 'flaxnets[plan]' (from a clone: pip install -e '.[plan]')"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip.

    Attributes:
      name: what users call it.
      platform: ``tpu`` or ``gpu``.
      hbm_bytes: its memory.
      bf16_tflops: dense bfloat16 matrix peak.
      fp32_tflops: the peak of float32 matmuls under JAX's default precision (one bf16 pass on a
        TPU; TF32 tensor cores on a GPU).
      usable_fraction: the share of ``hbm_bytes`` a JAX process may use by default (JAX's GPU
        client preallocates 75% unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says otherwise).
      source: where the figures come from.
    """

    name: str
    platform: str
    hbm_bytes: int
    bf16_tflops: float
    fp32_tflops: float
    usable_fraction: float = 1.0
    source: str = ""


TPU_CHIPS = {
    "v4": Chip("TPU v4", "tpu", 32 * GiB, 275.0, 275.0, source="Google Cloud TPU v4 documentation"),
    "v5e": Chip("TPU v5e", "tpu", 16 * GiB, 197.0, 197.0, source="Google Cloud TPU v5e documentation"),
    "v5p": Chip("TPU v5p", "tpu", 95 * GiB, 459.0, 459.0, source="Google Cloud TPU v5p documentation"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GiB, 918.0, 918.0, source="Google Cloud TPU v6e (Trillium) documentation"),
}

# GPU servers: the chip, and the XLA target-config file shipped in train/gpu_targets/.
GPU_CHIPS = {
    "h100": (Chip("NVIDIA H100 SXM 80GB", "gpu", 84_942_979_072, 989.0, 495.0, usable_fraction=0.75,
                  source="NVIDIA H100 datasheet (dense, no sparsity)"), "h100_sxm.txtpb"),
    "a100": (Chip("NVIDIA A100 SXM 80GB", "gpu", 85_100_068_864, 312.0, 156.0, usable_fraction=0.75,
                  source="NVIDIA A100 datasheet (dense, no sparsity)"), "a100_sxm_80gb.txtpb"),
}
GPUS_PER_HOST = 8

_TPU_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")
_GPU_NAME = re.compile(r"^(h100|a100)x(\d+)$")


class TargetError(ValueError):
    """A target that cannot be planned for; the message says why and what to do, in one line."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A named accelerator slice or server.

    Attributes:
      name: as given (``v5e:4x4``, ``h100x8``).
      chip: the chip's figures.
      chips: how many chips.
      topology: the topology string JAX's ``get_topology_desc`` takes.
      target_config: the GPU target-config file, or None for TPUs.
    """

    name: str
    chip: Chip
    chips: int
    topology: str
    target_config: str | None = None


def list_targets() -> list[str]:
    """Example target names, one per chip."""
    return ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2", "h100x8", "a100x8"]


def parse_target(name: str) -> Target:
    """The target called ``name``: ``v4|v5e|v5p|v6e:AxB[xC]`` (a TPU slice) or ``h100xN``/``a100xN`` (GPUs)."""
    text = name.strip().lower()
    if match := _TPU_NAME.match(text):
        chips = 1
        for dim in match.groups()[1:]:
            chips *= int(dim or 1)
        return Target(text, TPU_CHIPS[match.group(1)], chips, text)
    if match := _GPU_NAME.match(text):
        chip, config = GPU_CHIPS[match.group(1)]
        count = int(match.group(2))
        if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
            raise TargetError(f"--plan {name}: a GPU count must be 1 to {GPUS_PER_HOST}, or whole hosts of "
                              f"{GPUS_PER_HOST} (16, 24, ...)")
        per_host = min(count, GPUS_PER_HOST)
        return Target(text, chip, count, f"1x{count // per_host}x{per_host}",
                      os.path.join(os.path.dirname(__file__), "gpu_targets", config))
    raise TargetError(f"--plan {name}: unknown target; use a TPU slice as JAX names it (v4:2x2x1, v5e:4x4, "
                      f"v5p:2x2x2, v6e:2x2) or GPUs as h100x8 / a100x8")


def missing_compiler(target: Target) -> str | None:
    """What to install to compile for ``target``, or None if its compiler is here."""
    module = "libtpu" if target.chip.platform == "tpu" else "jax_cuda12_plugin"
    if importlib.util.find_spec(module) is None:
        return f"planning for {target.chip.name} needs {module.replace('_', '-')}, which is not installed: {PLAN_EXTRA}"
    return None


def target_devices(target: Target) -> list[jax.Device]:
    """JAX device descriptions of every chip of ``target``, for compiling without the hardware."""
    from jax.experimental import topologies

    if target.chip.platform == "tpu":
        description = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    else:
        with open(target.target_config) as f:
            config = f.read()
        description = topologies.get_topology_desc("gpu", "cuda", target_config=config, topology=target.topology)
    return list(description.devices)
