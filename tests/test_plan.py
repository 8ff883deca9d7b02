"""``python -m train --plan``: compiling the real training step for a TPU or GPU that is not here.

One compile runs in the default suite (ResNet-18, 64 px, for a TPU v5e slice, about 30 s); the
GPU target, the batch growth and the refused batch are ``slow``. The search and the error paths
are checked without compiling.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import flaxnets
from flaxnets.summary import abstract_variables, count_params
from input_pipeline.sources import tfds_source
from train import plan as plan_module
from train.__main__ import main
from train.plan import PlanError, RunShape, make_plan, max_batch_per_chip
from train.recipes import recipe_for_model
from train.targets import GiB, TargetError, parse_target

SIZE = 64
SHAPE = RunShape(num_classes=10, num_examples=1437, image_size=SIZE, precision="bf16",
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), model_options={})


def _valid_taps(in_size: int, out_size: int, kernel: int, stride: int, pad_low: int) -> int:
    """(output position, kernel tap) pairs along one axis that read the input, not its padding."""
    return sum(1 for o in range(out_size) for t in range(kernel) if 0 <= o * stride + t - pad_low < in_size)


def layer_macs(model: nn.Module, size: int, skip_padding: bool = True) -> list[int]:
    """Multiply-adds per image of every convolution and dense layer, in call order, from the layers'
    shapes (``skip_padding``: kernel taps that fall on the zero padding are not counted, as XLA
    does not count them)."""
    macs = []

    def spy(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module, x = context.module, args[0]
        if context.method_name != "__call__":
            return out
        if isinstance(module, nn.Conv):
            (kh, kw), strides = module.kernel_size, module.strides or (1, 1)
            strides = (strides, strides) if isinstance(strides, int) else strides
            pads = []
            for axis, (k, s) in enumerate(zip((kh, kw), strides)):
                i, o = x.shape[1 + axis], out.shape[1 + axis]
                if isinstance(module.padding, str):
                    pads.append(max((o - 1) * s + k - i, 0) // 2 if module.padding == "SAME" else 0)
                else:
                    pad = module.padding[axis]
                    pads.append(pad if isinstance(pad, int) else pad[0])
            taps = (_valid_taps(x.shape[1], out.shape[1], kh, strides[0], pads[0])
                    * _valid_taps(x.shape[2], out.shape[2], kw, strides[1], pads[1])
                    if skip_padding else out.shape[1] * out.shape[2] * kh * kw)
            macs.append(taps * x.shape[-1] // module.feature_group_count * out.shape[-1])
        elif isinstance(module, nn.Dense):
            macs.append(out.size * x.shape[-1])
        return out

    with nn.intercept_methods(spy):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return macs


def training_flops_per_image(model: nn.Module, size: int) -> float:
    """2 FLOPs per multiply-add, x3 for the forward pass, the input gradient and the weight
    gradient, less the first layer's input gradient, which nothing needs."""
    macs = layer_macs(model, size)
    return 2 * (3 * sum(macs) - macs[0])


def test_independent_count_matches_the_published_resnet50_figure():
    """The counter itself: torchvision publishes 4.09 G multiply-adds for ResNet-50 at 224 px
    (padded taps counted); leaving out the padded taps removes a few percent."""
    model = flaxnets.create_model("resnet50")
    assert sum(layer_macs(model, 224, skip_padding=False)) == pytest.approx(4.09e9, rel=0.005)
    assert 0.95 < sum(layer_macs(model, 224)) / sum(layer_macs(model, 224, skip_padding=False)) < 0.98


def test_plan_on_a_tpu_slice_from_the_command_line(tmp_path, capsys):
    """The real TPU compiler, through the CLI: per-chip memory, FLOPs, time, and the JSON."""
    out, hlo = tmp_path / "plan.json", tmp_path / "step.hlo"
    status = main(["--model", "resnet18", "--dataset", "flaxnets_digits", "--set", f"image_size={SIZE}",
                   "--batch-size", "32", "--precision", "bf16", "--plan", "v5e:2x2", "--plan-json", str(out),
                   "--plan-hlo", str(hlo)])
    text = capsys.readouterr().out
    assert status == 0, text
    plan = json.loads(out.read_text())
    assert plan["chip"] == "TPU v5e" and plan["chips"] == 4 and plan["batch"]["per_chip"] == 8
    memory = plan["memory_per_chip"]
    assert 0 < memory["state"] < memory["peak"] < memory["hbm"] == 16 * GiB and memory["fits"]
    # parameters and momentum in float32 (no EMA copy: the recipe keeps none)
    params = count_params(abstract_variables(flaxnets.create_model("resnet18", num_classes=10), SIZE)["params"])
    assert 2 * 4 * params <= memory["state"] < 2 * 4 * params * 1.01
    expected = training_flops_per_image(flaxnets.create_model("resnet18", num_classes=10), SIZE)
    assert plan["flops"]["per_image"] == pytest.approx(expected, rel=0.10)
    assert plan["flops"]["compiled_per_image"] == pytest.approx(expected, rel=0.10)  # XLA:TPU's own count
    when = plan["recipe_time"]
    assert when["steps"] == (1437 // 32) * when["epochs"] and when["chip_hours"] == pytest.approx(4 * when["hours"])
    assert "peak" in text and "fits" in text and "chip-hours" in text and "plan written to" in text
    # No parameter-sized copy: without EMA the state no longer carries (and copies each step) a second set of weights.
    assert plan["hlo"]["copy_bytes"] < 0.01 * memory["state"] and "convolution" in hlo.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["v4:2x2x1", "v5p:2x2x1", "v6e:2x2", "a100x8"])
def test_every_chip_family_compiles(target):
    recipe = dataclasses.replace(recipe_for_model("resnet18"), dataset="flaxnets_digits", image_size=SIZE)
    chips = parse_target(target).chips
    plan = make_plan(target, dataclasses.replace(recipe, batch_size=8 * chips), SHAPE, say=lambda _: None)
    assert plan["memory_per_chip"]["fits"] and 0 < plan["memory_per_chip"]["peak"]
    expected = training_flops_per_image(flaxnets.create_model("resnet18", num_classes=10), SIZE)
    assert plan["flops"]["per_image"] == pytest.approx(expected, rel=0.10)


@pytest.mark.slow
def test_plan_on_gpus_grows_with_the_batch_and_refuses_an_absurd_one():
    """H100 target: memory grows with the batch, FLOPs per image hold, a huge batch does not fit."""
    recipe = dataclasses.replace(recipe_for_model("resnet18"), dataset="flaxnets_digits", image_size=SIZE)
    plans = {b: make_plan("h100x8", dataclasses.replace(recipe, batch_size=8 * b), SHAPE, say=lambda _: None)
             for b in (8, 64, 65536)}
    peaks = [plans[b]["memory_per_chip"]["peak"] for b in (8, 64, 65536)]
    assert 0 < peaks[0] < peaks[1] < peaks[2]
    assert plans[64]["memory_per_chip"]["fits"] and not plans[65536]["memory_per_chip"]["fits"]
    expected = training_flops_per_image(flaxnets.create_model("resnet18", num_classes=10), SIZE)
    assert plans[8]["flops"]["per_image"] == pytest.approx(expected, rel=0.10)
    assert plans[8]["flops"]["compiled_per_image"] is None  # XLA:GPU gives no count
    assert plans[8]["memory_per_chip"]["usable"] == pytest.approx(0.75 * plans[8]["memory_per_chip"]["hbm"], rel=1e-6)


@pytest.mark.slow
def test_tpu_compiler_refusing_a_batch_is_reported_in_one_line(capsys):
    status = main(["--model", "resnet18", "--dataset", "flaxnets_digits", "--set", f"image_size={SIZE}",
                   "--batch-size", str(4 * 200_000), "--precision", "bf16", "--plan", "v5e:2x2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "does not fit TPU v5e" in err[0] and "--plan-max-batch" in err[0]


def _fake_compiles(monkeypatch, peak_of, refuse_above=None):
    """Replaces the compiler with a memory model (refusing batches above ``refuse_above``, as
    XLA:TPU does); returns the list of batches compiled."""
    compiled = []

    def fake(target, recipe, shape, batch_per_chip, timeout=None, hlo_path=None):
        compiled.append(batch_per_chip)
        if refuse_above is not None and batch_per_chip > refuse_above:
            return {"fits": False, "error": "Ran out of memory in memory space hbm", "compile_seconds": 1.0}
        return {"fits": True, "memory": {"peak": peak_of(batch_per_chip), "state": GiB // 2, "temp": 0},
                "flops_per_step": 1e9 * batch_per_chip, "compiled_flops_per_step": None, "hlo": {},
                "compile_seconds": 1.0, "hosts": 1}

    monkeypatch.setattr(plan_module, "compile_for", fake)
    return compiled


@pytest.mark.parametrize("fixed, per_image, expected", [(1.0, 0.1, 144), (1.0, 0.0625, 240), (15.9, 0.2, None),
                                                        (2.0, 3.0, 4)])
def test_max_batch_search_finds_the_largest_fitting_batch_in_few_compiles(monkeypatch, fixed, per_image, expected):
    """On a 16 GiB chip with peak = fixed + batch x per_image (GiB): the largest multiple of 8
    (or, below 8, the largest batch) that fits, within 8 compiles."""
    compiled = _fake_compiles(monkeypatch, lambda b: int((fixed + per_image * b) * GiB))
    target = parse_target("v5e:2x2")
    recipe = recipe_for_model("resnet18")
    best, results = max_batch_per_chip(target, recipe, SHAPE, 64, say=lambda _: None)
    assert best == expected
    assert len(compiled) <= 8
    if expected:
        assert plan_module.fits(target, results[expected])
        assert all(not plan_module.fits(target, r) for b, r in results.items() if b > expected)


def test_max_batch_search_climbs_when_the_compiler_squeezes_memory(monkeypatch):
    """XLA:TPU bends its peaks below the line and refuses only past some batch (here 600)."""
    import math

    compiled = _fake_compiles(monkeypatch, lambda b: int((5 + 10 * (1 - math.exp(-b / 300))) * GiB), refuse_above=600)
    best, _ = max_batch_per_chip(parse_target("v5e:2x2"), recipe_for_model("resnet18"), SHAPE, 128,
                                 say=lambda _: None, max_compiles=10)
    assert best == 600 and len(compiled) <= 10


def test_plan_max_batch_plans_the_largest_batch_when_the_runs_own_does_not_fit(monkeypatch):
    compiled = _fake_compiles(monkeypatch, lambda b: int((1.0 + 0.1 * b) * GiB))
    recipe = dataclasses.replace(recipe_for_model("resnet18"), batch_size=4 * 256)
    plan = make_plan("v5e:2x2", recipe, SHAPE, search_max_batch=True, say=lambda _: None)
    assert plan["max_batch_per_chip"] == 144 and compiled[0] == 256
    assert plan["batch"]["per_chip"] == 144 and plan["memory_per_chip"]["fits"]


@pytest.mark.parametrize("argv, message", [
    (["--plan", "v9z:2x2"], "unknown target"),
    (["--plan", "h100x12"], "whole hosts of 8"),
    (["--plan", "v5e:2x2", "--batch-size", "30"], "use a multiple of 4"),
    (["--plan", "v5e:2x2", "--plan-utilization", "1.5"], "--plan-utilization must be in (0, 1]"),
    (["--plan-max-batch"], "go with --plan"),
    (["--plan", "v5e:2x2", "--plan-json", "/nonexistent/dir/plan.json"], "give a file path in an existing directory"),
    (["--plan", "v5e:2x2", "--dataset", "no_such_dataset_here"], "no_such_dataset_here"),
])
def test_plan_input_errors_are_one_line(capsys, argv, message):
    status = main(["--model", "resnet18", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and message in err[0], err


def test_a_missing_compiler_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    # In a fresh checkout this may be the first test to use the digits: tfds's progress bars while
    # it prepares them are not the plan's output.
    tfds_source("flaxnets_digits", "train")
    capsys.readouterr()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax_cuda12_plugin" else real(name, *a))
    status = main(["--model", "resnet18", "--dataset", "flaxnets_digits", "--plan", "h100x8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "jax-cuda12-plugin" in err[0] and "flaxnets[plan]" in err[0]


def test_a_compiler_crash_is_one_line(monkeypatch):
    monkeypatch.setattr(plan_module.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, -11, stdout="noise\n", stderr="Segmentation"))
    with pytest.raises(PlanError, match=r"^the XLA compiler crashed \(SIGSEGV\) compiling resnet18 at 8 images"):
        plan_module.compile_for(parse_target("v6e:2x2"), recipe_for_model("resnet18"), SHAPE, 8)


def test_targets_parse_to_chip_counts_and_topologies():
    assert parse_target("v5e:4x4").chips == 16 and parse_target("v4:2x2x2").chips == 8
    gpus = parse_target("h100x16")
    assert gpus.chips == 16 and gpus.topology == "1x2x8" and gpus.target_config.endswith("h100_sxm.txtpb")
    with pytest.raises(TargetError):
        parse_target("v5e")
