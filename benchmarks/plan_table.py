"""Compiled estimates for the README: each model's bf16 training step planned for TPU v5e and H100.

For every model: the paper's recipe on ImageNet, bf16, 128 images per chip, compiled for a v5e
2x2 slice and an 8-GPU H100 server by ``train.plan`` (the same path as ``python -m train ...
--plan``), plus the largest batch per chip that fits v5e. Results go to
``benchmarks/results/plan_table.json`` after each compile, so an interrupted run resumes; the
markdown table is printed at the end. Needs the ``[plan]`` extra. XLA's TPU compiler takes
minutes per model on a 2-core machine.

    python benchmarks/plan_table.py [--models resnet50 vgg16] [--skip-max-batch]

``--models all --targets v4:2x2x1 v5p:2x2x1 --skip-max-batch`` sweeps every registered model over
other targets (the issue's check that ``--plan`` works for each); a target that fails is recorded
with its one-line error and the sweep goes on. Two sweeps can compile side by side, each with its
own ``--results`` file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flaxnets  # noqa: E402
from train.plan import PlanError, estimate, make_plan, max_batch_per_chip, run_shape  # noqa: E402
from train.recipes import recipe_for_model  # noqa: E402
from train.targets import GiB, parse_target  # noqa: E402

MODELS = ("resnet50", "resnext50_32x4d", "vgg16", "densenet121", "googlenet", "xception")
TARGETS = ("v5e:2x2", "h100x8")
PER_CHIP = 128
RESULTS = os.path.join(os.path.dirname(__file__), "results", "plan_table.json")


def _load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".partial", path)


def table(results: dict) -> str:
    """The README's markdown table from the saved results."""
    rows = ["| model | v5e peak GiB/chip (of 16) | H100 peak GiB/chip (of 80) | GFLOP/image (training) | "
            "largest batch/chip on v5e | compile s (v5e, H100) |",
            "|---|---:|---:|---:|---:|---:|"]
    for model in MODELS:
        entry = results.get(model, {})
        tpu, gpu = entry.get("v5e:2x2"), entry.get("h100x8")
        cell = lambda plan: f"{plan['memory_per_chip']['peak'] / GiB:.2f}" if plan else "-"  # noqa: E731
        flops = (gpu or tpu or {}).get("flops", {}).get("per_image")  # XLA's count before optimisation
        best = entry.get("max_batch_v5e", "-")
        best = best if entry.get("max_batch_exact", True) else f">= {best}"
        seconds = ", ".join(f"{p['compile_seconds']:.0f}" if p else "-" for p in (tpu, gpu))
        rows.append(f"| {model} | {cell(tpu)} | {cell(gpu)} | {flops / 1e9:.1f} | {best} | {seconds} |"
                    if flops else f"| {model} | - | - | - | - | - |")
    return "\n".join(rows)


def sweep_table(results: dict, models: list[str], targets: list[str]) -> str:
    """A markdown row per model: each target's peak GiB per chip and compile seconds, or its error."""
    rows = ["| model | GFLOP/image (training) | " + " | ".join(f"{t}: peak GiB/chip, compile s" for t in targets) + " |",
            "|---|---:|" + "---:|" * len(targets)]
    for model in models:
        entry, cells, flops = results.get(model, {}), [], None
        for name in targets:
            plan = entry.get(name)
            if not plan:
                cells.append("not planned")
            elif "error" in plan:
                cells.append(f"failed: {plan['error'][:60]}")
            else:
                flops = flops or plan["flops"]["per_image"]
                cells.append(f"{plan['memory_per_chip']['peak'] / GiB:.2f}, {plan['compile_seconds']:.0f}")
        rows.append(f"| {model} | {flops / 1e9:.1f} | " if flops else f"| {model} | - | ")
        rows[-1] += " | ".join(cells) + " |"
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help="registered model names, or 'all'")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--skip-max-batch", action="store_true")
    parser.add_argument("--max-compiles", type=int, default=5,
                        help="probes of the max-batch search (the 128 compile counts); fewer give a lower bound")
    parser.add_argument("--results", default=RESULTS,
                        help="JSON file to resume from and write to (one per sweep that runs beside another)")
    args = parser.parse_args()
    results = _load(args.results)
    models = flaxnets.list_models() if args.models == ["all"] else args.models
    for model in models:
        entry = results.setdefault(model, {})
        base = recipe_for_model(model)
        shape = run_shape(base, precision="bf16")
        for name in args.targets:
            if name in entry:
                continue
            recipe = dataclasses.replace(base, batch_size=PER_CHIP * parse_target(name).chips)
            try:
                entry[name] = make_plan(name, recipe, shape)
            except PlanError as error:
                print(f"{model} on {name}: {error}")
                entry[name] = {"error": str(error)}
            _save(results, args.results)
        if not args.skip_max_batch and "max_batch_v5e" not in entry:
            if "memory_per_chip" not in entry.get("v5e:2x2", {}):
                # The search starts from the 128-per-chip v5e plan; a sweep of other targets has none.
                print(f"{model}: no v5e:2x2 plan to start the largest-batch search from; skipped "
                      "(add v5e:2x2 to --targets, or pass --skip-max-batch)")
                continue
            target = parse_target("v5e:2x2")
            recipe = dataclasses.replace(base, batch_size=PER_CHIP * target.chips)
            measured = entry["v5e:2x2"]["memory_per_chip"]
            known = {PER_CHIP: {"fits": True, "memory": {"peak": measured["peak"], "state": measured["state"]}}}
            print(f"{model}: largest batch per chip on v5e")
            best, probes = max_batch_per_chip(target, recipe, shape, PER_CHIP, known=known,
                                              max_compiles=args.max_compiles)
            entry["max_batch_v5e"] = best
            larger = [b for b, r in probes.items() if b > (best or 0)]
            entry["max_batch_exact"] = bool(larger) and min(larger) - (best or 0) <= 8
            entry["max_batch_probes"] = {str(b): r.get("memory", {}).get("peak") for b, r in probes.items()}
            if best and best != PER_CHIP and best in probes and probes[best].get("flops_per_step"):
                entry["v5e_at_max_batch"] = estimate(target, recipe, shape, probes[best], best, 0.25)
            _save(results, args.results)
    print(table(results) if args.targets == list(TARGETS) else sweep_table(results, models, args.targets))


if __name__ == "__main__":
    main()
