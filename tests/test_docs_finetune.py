"""docs/finetune_example.py runs offline on a local checkpoint; its linear probe leaves the backbone as loaded."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import flaxnets
from tests.weights_server import write_random_resnet18

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "docs", "finetune_example.py")
# Small images and few steps, so the runs take seconds on a 2-core CPU (digits are 8x8 anyway).
QUICK = ["--image-size", "24", "--batch-size", "32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """Random torchvision ResNet-18 weights (1000 classes, BatchNorm statistics not the identity) as safetensors."""
    return str(write_random_resnet18(tmp_path_factory.mktemp("weights"))["safetensors"])


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict:
    """An empty FLAXNETS_HOME, offline (nothing may be downloaded), for this process and its children."""
    monkeypatch.setenv("FLAXNETS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLAXNETS_OFFLINE", "1")
    monkeypatch.delenv("FLAXNETS_MIRROR", raising=False)
    return dict(os.environ)


def _load_example():
    """docs/finetune_example.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# First: its compiled programs (the new head's initialisation, evaluation) land in the tests' persistent
# JAX compilation cache, which the script's subprocess below then reads.
@pytest.mark.slow  # the same guarantee runs by default through the CLI (tests/test_finetune.py)
def test_a_linear_probe_trains_the_head_and_leaves_the_backbone_bit_identical(checkpoint, offline):
    result = _load_example().main(["--weights", checkpoint, "--linear-probe", *QUICK, "--steps", "5"])
    _, initial = flaxnets.pretrained("resnet18", checkpoint, num_classes=10)  # what the script started from
    trained = result["variables"]
    trained_head, initial_head = trained["params"].pop("fc"), initial["params"].pop("fc")
    jax.tree.map(np.testing.assert_array_equal, trained, initial)  # every conv, BN scale/bias and BN statistic
    assert not np.array_equal(trained_head["kernel"], initial_head["kernel"])  # and the head did learn


@pytest.mark.slow  # a second process compiling the full fine-tuning step; the probe above runs the same code
def test_the_example_script_fine_tunes_a_new_head_and_beats_chance(checkpoint, offline):
    command = [sys.executable, EXAMPLE, "--weights", checkpoint, *QUICK, "--steps", "20"]
    done = subprocess.run(command, cwd=ROOT, env=offline, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss ([\d.]+)$", done.stdout, re.M)]
    assert len(losses) == 2, done.stdout
    assert losses[-1] < 0.8 * losses[0], done.stdout
    accuracy = float(re.search(r"^held-out accuracy ([\d.]+) on 360 images", done.stdout, re.M)[1])
    assert accuracy > 0.2, done.stdout  # chance is 0.1


def test_preprocessing_comes_from_the_weights_metadata(checkpoint):
    example = _load_example()
    assert example.preprocessing_for("tv_in1k") == flaxnets.weights_info("resnet18", "tv_in1k").preprocessing
    assert example.preprocessing_for(checkpoint) == flaxnets.weights_info("resnet18").preprocessing
    small = example.preprocessing_for(None, image_size=32)
    assert (small.resize, small.crop, small.mean) == (37, 32, flaxnets.weights_info("resnet18").preprocessing.mean)
