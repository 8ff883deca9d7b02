"""``python -m train ... --plan TARGET``: will this run fit a TPU slice or GPU server, and what will it cost?

The run's own program (model, optimizer, precision, mesh, shardings, donation; see
``train.program``) is compiled for the target by XLA's TPU or GPU compiler on this CPU, in a
child process (``train.plan_compile``). Its memory analysis gives the per-chip footprint and XLA's
count of the step's HLO the FLOPs; time and chip-hours follow from the chip's peak at a stated
utilisation.
These are compiled estimates, not measurements.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from train.plan_compile import RESULT_PREFIX
from train.recipes import Recipe
from train.targets import GiB, Target, missing_compiler, parse_target

# Well-fed ResNet-50 training reaches about a quarter of an accelerator's bf16 peak: MLPerf-class
# A100 runs process ~2,800 images/s x 24.6 GFLOP = 69 TFLOP/s of 312. The convolutions' small
# channel counts and the memory-bound BatchNorm/ReLU passes keep CNNs well below LLM utilisation.
DEFAULT_UTILIZATION = 0.25
# The batch per chip that --plan-max-batch searches in steps of.
BATCH_GRANULE = 8
# Data sets whose sizes a plan may need before the data is on this machine.
KNOWN_DATASETS = {"imagenet2012": (1000, 1_281_167)}


class PlanError(RuntimeError):
    """A plan that cannot be made; the message is one line."""


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What a plan needs of the run besides the recipe: the data set's size and the preprocessing."""

    num_classes: int
    num_examples: int
    image_size: int
    precision: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_options: dict[str, Any]


def compile_request_for(target: Target, recipe: Recipe, shape: RunShape, batch_per_chip: int,
                        hlo_path: str | None = None) -> dict[str, Any]:
    """The JSON request ``python -m train.plan_compile`` (:func:`train.plan_compile.compile_request`) reads."""
    return {"target": target.name, "recipe": dataclasses.asdict(recipe), "batch_per_chip": batch_per_chip,
            "num_classes": shape.num_classes, "image_size": shape.image_size, "precision": shape.precision,
            "mean": list(shape.mean), "std": list(shape.std), "model_options": shape.model_options,
            "steps_per_epoch": max(1, shape.num_examples // (batch_per_chip * target.chips)),
            "hlo_path": os.path.abspath(hlo_path) if hlo_path else None}


def compile_for(target: Target, recipe: Recipe, shape: RunShape, batch_per_chip: int,
                timeout: float | None = None, hlo_path: str | None = None) -> dict[str, Any]:
    """Compiles the run's training step for ``target`` at ``batch_per_chip`` in a child process
    (``hlo_path``: also write the optimised HLO text there).

    Returns the child's result (``fits``, ``memory``, ``flops_per_step``, ``hlo``, ...).
    Raises PlanError in one line when the compiler crashes, fails or times out.
    """
    request = compile_request_for(target, recipe, shape, batch_per_chip, hlo_path)
    # No TPU is touched: libtpu must neither query cloud metadata nor take the one-process-per-host
    # lock (/tmp/libtpu_lockfile), so plans can compile side by side.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "TPU_SKIP_MDS_QUERY": "1",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("XLA_FLAGS", None)  # host-device counts and CPU-only flags mean nothing to the target's compiler
    try:
        done = subprocess.run([sys.executable, "-m", "train.plan_compile"], input=json.dumps(request), text=True,
                              capture_output=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PlanError(f"compiling for {target.name} took over {timeout:.0f} s; stopped") from None
    result = next((json.loads(line[len(RESULT_PREFIX):]) for line in done.stdout.splitlines()
                   if line.startswith(RESULT_PREFIX)), None)
    where = f"{recipe.model} at {batch_per_chip} images per chip for {target.chip.name} ({target.name})"
    if result is None:
        if done.returncode < 0:
            name = signal.Signals(-done.returncode).name
            raise PlanError(f"the XLA compiler crashed ({name}) compiling {where}; try another batch or target")
        last = next((line for line in reversed(done.stderr.strip().splitlines()) if line.strip()), "no output")
        raise PlanError(f"compiling {where} failed (exit {done.returncode}): {last[:300]}")
    if result.get("error") and result.get("fits") is not False:
        raise PlanError(f"compiling {where} failed: {result['error']}")
    return result


def usable_bytes(target: Target) -> int:
    """The memory a JAX process may use on one chip of ``target`` by default."""
    return int(target.chip.hbm_bytes * target.chip.usable_fraction)


def fits(target: Target, result: dict[str, Any]) -> bool:
    """Whether a compiled step fits one chip (the compiler accepted it and its peak is within reach)."""
    return bool(result.get("fits")) and result["memory"]["peak"] <= usable_bytes(target)


def max_batch_per_chip(target: Target, recipe: Recipe, shape: RunShape, start: int,
                       say: Callable[[str], None] = print, max_compiles: int = 8,
                       known: dict[int, dict[str, Any]] | None = None) -> tuple[int | None, dict[int, dict]]:
    """The largest batch per chip (a multiple of BATCH_GRANULE, or 1..7) whose step fits ``target``.

    Peak memory grows about linearly with the batch, so each probe aims at the batch the last two
    predict, then the search narrows between the largest batch seen to fit and the smallest seen
    not to. Returns (the batch or None if not even 1 fits, every compile's result by batch).
    """
    results = dict(known or {})
    limit = usable_bytes(target)

    def probe(batch: int) -> bool:
        if batch not in results:
            started = time.perf_counter()
            results[batch] = compile_for(target, recipe, shape, batch)
            peak = results[batch].get("memory", {}).get("peak")
            peak_text = f"peak {peak / GiB:.2f} GiB" if peak else "refused by the compiler"
            say(f"  batch {batch} per chip: {peak_text}, {'fits' if fits(target, results[batch]) else 'does not fit'} "
                f"({time.perf_counter() - started:.0f} s)")
        return fits(target, results[batch])

    good, bad = 0, None
    batch = max(1, start)
    for _ in range(max_compiles):
        if probe(batch):
            good = max(good, batch)
        else:
            bad = batch if bad is None else min(bad, batch)
        if bad is not None and bad - good <= (BATCH_GRANULE if good >= BATCH_GRANULE else 1):
            break
        batch = _next_probe(results, good, bad, limit)
        if batch in results:
            break
    return (good or None), results


def _next_probe(results: dict[int, dict], good: int, bad: int | None, limit: int) -> int:
    """The next batch to compile: the linear fit of the measured peaks, kept inside (good, bad)."""
    measured = sorted((b, r["memory"]["peak"]) for b, r in results.items() if r.get("memory", {}).get("peak"))
    guess = None
    if len(measured) >= 2:
        (b0, p0), (b1, p1) = measured[0], measured[-1]
        per_image = (p1 - p0) / (b1 - b0) if b1 != b0 else 0
        if per_image > 0:
            guess = int((limit - (p0 - per_image * b0)) / per_image)
    elif measured:
        b0, p0 = measured[0]
        memory = results[b0]["memory"]
        # One compile: what does not grow with the batch is about the state and the code.
        fixed = min(memory.get("state", 0) + memory.get("generated_code", 0), p0 - 1)
        guess = int(b0 * (limit - fixed) / (p0 - fixed)) if p0 else None
    if bad is None and guess is not None:
        # XLA:TPU squeezes its schedule into the memory it has, so peaks bend below the line:
        # while nothing has failed, grow by at least a quarter.
        guess = max(guess, good + max(BATCH_GRANULE, good // 4))
    upper = bad if bad is not None else max(2 * good, BATCH_GRANULE)
    if guess is None:
        guess = (good + upper) // 2 if bad is not None else upper
    guess = guess - guess % BATCH_GRANULE if guess >= BATCH_GRANULE else max(guess, 1)
    if bad is not None:
        step = BATCH_GRANULE if good >= BATCH_GRANULE else 1
        middle = (good + bad) // 2
        middle = max(good + step, middle - middle % step)
        # A fit that points outside the bracket (or at a batch already compiled) has stopped
        # describing the compiler: split the gap instead.
        if not good + step <= guess <= bad - step or guess in results:
            guess = middle
    return max(1, guess)


def estimate(target: Target, recipe: Recipe, shape: RunShape, result: dict[str, Any], batch_per_chip: int,
             utilization: float) -> dict[str, Any]:
    """The plan's figures from one compile: memory per chip, FLOPs, and the recipe's time and chip-hours."""
    memory = result["memory"]
    global_batch = batch_per_chip * target.chips
    hosts = result.get("hosts", 1)
    steps_per_epoch = shape.num_examples // global_batch
    peak_tflops = target.chip.bf16_tflops if shape.precision == "bf16" else target.chip.fp32_tflops
    step_seconds = result["flops_per_step"] / (peak_tflops * 1e12 * utilization)
    total_steps = steps_per_epoch * recipe.epochs
    hours = total_steps * step_seconds / 3600
    return {
        "target": target.name, "chip": target.chip.name, "chips": target.chips, "hosts": hosts,
        "model": recipe.model, "recipe": recipe.name, "precision": shape.precision, "image_size": shape.image_size,
        "batch": {"global": global_batch, "per_host": global_batch // hosts, "per_chip": batch_per_chip},
        "memory_per_chip": {
            "state": memory["state"], "temporaries": memory["temp"], "peak": memory["peak"],
            "hbm": target.chip.hbm_bytes, "usable": usable_bytes(target), "fits": fits(target, result)},
        "flops": {"per_image": result["flops_per_step"] / batch_per_chip,
                  "per_step_per_chip": result["flops_per_step"],
                  "compiled_per_image": (result["compiled_flops_per_step"] / batch_per_chip
                                         if result.get("compiled_flops_per_step") else None)},
        "hlo": result["hlo"], "compile_seconds": result["compile_seconds"],
        "recipe_time": {"epochs": recipe.epochs, "steps_per_epoch": steps_per_epoch, "steps": total_steps,
                        "utilization": utilization, "peak_tflops": peak_tflops, "step_seconds": step_seconds,
                        "hours": hours, "chip_hours": hours * target.chips},
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines ``--plan`` prints."""
    mem, flops, when, batch = plan["memory_per_chip"], plan["flops"], plan["recipe_time"], plan["batch"]
    hosts = f" on {plan['hosts']} hosts" if plan["hosts"] > 1 else ""
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    usable = "" if mem["usable"] == mem["hbm"] else f", {mem['usable'] / GiB:.1f} GiB usable by default"
    lines = [
        f"plan for {plan['model']} ({plan['recipe']}) on {plan['chip']} {plan['target']}: {plan['chips']} chips{hosts}, "
        f"{plan['precision']}, {plan['image_size']} px, batch {batch['global']} "
        f"({batch['per_chip']} per chip, {batch['per_host']} per host)",
        f"  compiled by XLA for the target in {plan['compile_seconds']:.0f} s (an estimate from the compiler, "
        "not a measurement)",
        "  memory per chip:",
        f"    parameters + optimizer state   {mem['state'] / GiB:7.2f} GiB",
        f"    activations and temporaries    {mem['temporaries'] / GiB:7.2f} GiB",
        f"    peak                           {mem['peak'] / GiB:7.2f} GiB of {mem['hbm'] / GiB:.1f} GiB HBM{usable}: "
        f"{verdict} ({100 * mem['peak'] / mem['usable']:.0f}%)",
        f"  compute: {flops['per_image'] / 1e9:.2f} GFLOP per image, {flops['per_step_per_chip'] / 1e12:.3f} TFLOP per "
        f"step per chip",
        f"  recipe: {when['epochs']} epochs x {when['steps_per_epoch']:,} steps = {when['steps']:,} steps; at "
        f"{100 * when['utilization']:.0f}% of the {when['peak_tflops']:.0f} TFLOP/s peak (assumed, "
        f"--plan-utilization): {when['step_seconds'] * 1000:.3g} ms per step, {_hours(when['hours'])}, "
        f"{when['chip_hours']:,.3g} chip-hours",
    ]
    if "max_batch_per_chip" in plan:
        best = plan["max_batch_per_chip"]
        lines.append(f"  largest batch that fits: {best} per chip ({best * plan['chips']} global)" if best
                     else "  not even 1 image per chip fits")
    return "\n".join(lines)


def _hours(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.3g} min"


def make_plan(target_name: str, recipe: Recipe, shape: RunShape, *, utilization: float = DEFAULT_UTILIZATION,
              search_max_batch: bool = False, say: Callable[[str], None] = print,
              hlo_path: str | None = None) -> dict[str, Any]:
    """Compiles ``recipe``'s step for ``target_name`` and returns the plan (see :func:`format_plan`);
    ``hlo_path``: also write the compiled HLO text there (copies, transposes, fusions to read).

    Raises:
      TargetError / PlanError: one line: an unknown target, a compiler that is not installed, a
        batch that does not split over the chips, a compiler that crashed.
    """
    target = parse_target(target_name)
    if not 0 < utilization <= 1:
        raise PlanError(f"--plan-utilization must be in (0, 1]; got {utilization}")
    if problem := missing_compiler(target):
        raise PlanError(problem)
    if recipe.batch_size % target.chips:
        raise PlanError(f"batch size {recipe.batch_size} does not split over the {target.chips} chips of "
                        f"{target.name}: use a multiple of {target.chips} (--batch-size)")
    batch_per_chip = recipe.batch_size // target.chips
    say(f"compiling {recipe.model}'s training step for {target.chip.name} ({target.name}, {target.chips} chips) at "
        f"{batch_per_chip} images per chip (minutes for a big model on a small CPU)")
    started = time.perf_counter()
    result = compile_for(target, recipe, shape, batch_per_chip, hlo_path=hlo_path)
    say(f"  compiled in {time.perf_counter() - started:.0f} s")
    if result.get("fits") is False and not search_max_batch:
        raise PlanError(f"{recipe.model} at {batch_per_chip} images per chip does not fit {target.chip.name}: "
                        f"{result.get('error', '')[:200]} (--plan-max-batch finds the largest batch that does)")
    found = None
    if search_max_batch:
        say(f"searching the largest batch per chip that fits {target.chip.name} (a compile per probe):")
        found, results = max_batch_per_chip(target, recipe, shape, batch_per_chip, say=say,
                                            known={batch_per_chip: result})
        if not fits(target, result):  # the run's own batch does not fit: plan the largest that does
            if found is None:
                raise PlanError(f"{recipe.model} does not fit {target.chip.name} even at 1 image per chip")
            batch_per_chip, result = found, results[found]
    plan = estimate(target, recipe, shape, result, batch_per_chip, utilization)
    if search_max_batch:
        plan["max_batch_per_chip"] = found
    return plan


def run_shape(recipe: Recipe, *, precision: str, data_dir: str | None = None, pretrained: str | None = None) -> RunShape:
    """The data set's classes and size, the resolution and the normalisation the run would use.

    The data set's split is read when it is on this machine; ImageNet's sizes are known without it,
    so a run can be planned before the data is copied.
    """
    from input_pipeline.sources import DatasetNotReadyError, load_source
    from train.trainer import _preprocessing, run_image_size

    try:
        if os.path.isdir(recipe.dataset):
            source = load_source(os.path.join(recipe.dataset, "train"))
        else:
            source = load_source(recipe.dataset, "train", data_dir=data_dir, download=False)
        num_classes, num_examples = source.num_classes, source.num_examples
    except DatasetNotReadyError:
        if recipe.dataset not in KNOWN_DATASETS:
            raise PlanError(f"{recipe.dataset} is not prepared here, and a plan needs its number of classes and "
                            f"images: prepare it, or plan with --dataset {' or '.join(KNOWN_DATASETS)}") from None
        num_classes, num_examples = KNOWN_DATASETS[recipe.dataset]
    prep, options = _preprocessing(recipe.model, pretrained)
    return RunShape(num_classes=num_classes, num_examples=num_examples,
                    image_size=run_image_size(recipe, pretrained, prep), precision=precision,
                    mean=tuple(prep.mean), std=tuple(prep.std), model_options=options)


def write_json(plan: dict[str, Any], path: str) -> None:
    """Writes ``plan`` to ``path`` whole or not at all."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(plan, f, indent=2)
    os.replace(partial, path)
