"""Compiles a run's training step for a target that is not attached, in a process of its own.

``python -m train.plan_compile`` reads a JSON request on stdin (see :func:`compile_request`) and
prints one JSON result line. ``train.plan`` starts it with ``JAX_PLATFORMS=cpu``: XLA's TPU and
GPU compilers can crash (a stack overflow, an abort) or take minutes, and a crash must end this
process, not the user's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import threading
import time
from typing import Any

RESULT_PREFIX = "PLAN_RESULT "
_COMPILER_STACK_BYTES = 1 << 30

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][\w\-]*)\(", re.M)


def _shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO result shape (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape_text):
        total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def hlo_stats(text: str) -> dict[str, Any]:
    """Counts what an optimised HLO module runs as separate kernels.

    Instructions inside fusion bodies run fused and are not counted. A top-level copy or
    transpose (or a fusion whose body is just one) writes a whole array to memory: those are
    counted with their bytes. Convolutions and matrix products are counted wherever they are
    (XLA:TPU fuses them into ``fusion`` kernels, XLA:GPU calls cuDNN/cuBLAS).
    """
    computations: dict[str, list[tuple[str, str, str]]] = {}
    fused: set[str] = set()
    name = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            computations[name] = []
            continue
        match = _INSTRUCTION.match(line)
        if match and name is not None:
            computations[name].append((match.group(2), match.group(1), line))
            if match.group(2) == "fusion":
                fused.update(re.findall(r"calls=%?([\w.\-]+)", line))
    roots = {comp: next((op for op, _, line in ops if line.lstrip().startswith("ROOT")), None)
             for comp, ops in computations.items()}
    stats = {"copies": 0, "copy_bytes": 0, "transposes": 0, "transpose_bytes": 0, "convolutions": 0, "dots": 0,
             "kernels": 0}
    for comp, ops in computations.items():
        for op, shape, line in ops:
            if op in ("convolution", "dot") or (op == "custom-call" and "conv" in line.split("custom_call_target")[-1]):
                stats["convolutions" if op != "dot" else "dots"] += 1
            if comp in fused:
                continue
            kind = op
            if op == "fusion":
                called = re.findall(r"calls=%?([\w.\-]+)", line)
                kind = roots.get(called[0], op) if called else op
                if kind != "copy" and kind != "transpose":
                    kind = "fusion"
            if kind in ("copy", "transpose"):
                stats["copies" if kind == "copy" else "transposes"] += 1
                stats[f"{kind}_bytes"] += _shape_bytes(shape)
            if op in ("fusion", "convolution", "dot", "custom-call", "copy", "transpose", "reduce", "all-reduce"):
                stats["kernels"] += 1
    return stats


def _compiled_flops(compiled: Any) -> float | None:
    """The target compiler's FLOP count of the step on one chip, if it gives one (XLA:GPU does not)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and cost.get("flops") else None


def _hlo_flops(recipe, batch_per_chip: int, build) -> float:
    """XLA's FLOP count of one chip's step before optimisation: the same step lowered for one CPU
    device at the per-chip batch. Every target is counted alike (TPU v4's compiled count, for one,
    comes out a quarter lower than the layers' multiply-adds)."""
    import jax

    program = build(dataclasses.replace(recipe, batch_size=batch_per_chip), [jax.devices("cpu")[0]])
    return float(program.train.lower(program.abstract_state(), program.abstract_batch(batch_per_chip))
                 .cost_analysis()["flops"])


def _memory(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    memory = {name.replace("_size_in_bytes", ""): int(getattr(stats, name, 0) or 0) for name in fields}
    memory["peak"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                      + memory["generated_code"])
    return memory


def _out_of_memory(message: str) -> dict[str, Any] | None:
    """XLA:TPU refuses a program that does not fit: 'Used 20.5G of 15.75G hbm'."""
    if "Ran out of memory" not in message and "RESOURCE_EXHAUSTED" not in message:
        return None
    used = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", message)
    result: dict[str, Any] = {"fits": False, "error": message.strip().splitlines()[0][:300]}
    if used:
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
        result["memory"] = {"peak": int(float(used.group(1)) * scale[used.group(2)])}
    return result


def compile_request(request: dict[str, Any]) -> dict[str, Any]:
    """Builds the run's program on the target's devices and compiles its training step.

    ``request``: ``target`` (a :func:`train.targets.parse_target` name), ``recipe`` (the recipe's
    fields), ``batch_per_chip``, ``num_classes``, ``image_size``, ``precision``, ``mean``, ``std``
    and ``model_options``; optionally ``hlo_path``, where the optimised HLO text is written.
    Returns the compile time, per-chip memory, FLOPs and HLO counts, or ``fits: False`` when the
    compiler refuses the program for lack of memory.
    """
    import jax

    from flaxnets.conv import rewrites_for
    from train.program import build_program
    from train.recipes import Recipe
    from train.targets import parse_target, target_devices

    target = parse_target(request["target"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in request["recipe"].items()}
    batch_per_chip = int(request["batch_per_chip"])
    recipe = dataclasses.replace(Recipe(**fields), batch_size=batch_per_chip * target.chips)

    def build(recipe, devices):
        return build_program(recipe, num_classes=request["num_classes"], image_size=request["image_size"],
                             steps_per_epoch=max(1, request.get("steps_per_epoch", 1)),
                             precision=request["precision"], devices=devices, mean=request["mean"],
                             std=request["std"], model_options=request.get("model_options") or {})

    devices = target_devices(target)
    with rewrites_for(target.chip.platform):
        program = build(recipe, devices)
        started = time.perf_counter()
        state = program.abstract_state()
        lowered = program.train.lower(state, program.abstract_batch(recipe.batch_size))
        try:
            compiled = lowered.compile()
        except Exception as err:  # noqa: BLE001 - XLA reports a program too big as a generic error
            refused = _out_of_memory(str(err))
            if refused is None:
                raise
            return {**refused, "compile_seconds": time.perf_counter() - started}
        seconds = time.perf_counter() - started
        hlo_text = compiled.as_text()
        if request.get("hlo_path"):
            with open(request["hlo_path"], "w") as f:
                f.write(hlo_text)
        flops = _hlo_flops(recipe, batch_per_chip, build)
    state_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    return {"fits": True, "compile_seconds": seconds, "memory": {**_memory(compiled), "state": state_bytes},
            "flops_per_step": flops, "compiled_flops_per_step": _compiled_flops(compiled),
            "hlo": hlo_stats(hlo_text),
            "devices": len(devices), "hosts": len({d.process_index for d in devices}),
            "device_kind": devices[0].device_kind}


def main() -> int:
    """Reads the request from stdin, prints ``PLAN_RESULT {json}``; exit 0 even when refused for memory."""
    request = json.loads(sys.stdin.read())
    result: dict[str, Any] = {}

    def work():
        try:
            result.update(compile_request(request))
        except Exception as err:  # noqa: BLE001 - the parent prints it as one line
            text = str(err).strip().splitlines()
            result["error"] = f"{type(err).__name__}: {text[0] if text else ''}"[:400]

    # XLA's TPU compiler recurses deeply on big programs (a v6e compile overflowed the 8 MiB main
    # stack): compile on a thread with a large one.
    threading.stack_size(_COMPILER_STACK_BYTES)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if "error" not in result or result.get("fits") is False else 1


if __name__ == "__main__":
    sys.exit(main())
