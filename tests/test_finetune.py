"""Fine-tuning from the command line: pretrained weights by tag or file, linear probe, frozen
BatchNorm, the weights' preprocessing, transfer between tasks and the compilation cache."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

import flaxnets
from flaxnets import weights_table
from tests.weights_server import serve, write_random_resnet18
from train import program, steps
from train.__main__ import main
from train.checkpoints import restore_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--no-progress", "--log-every", "1", "--set", "image_size=16", "--set", "batch_size=32"]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A folder with random torchvision ResNet-18 weights (see ``write_random_resnet18``)."""
    root = tmp_path_factory.mktemp("weights")
    write_random_resnet18(root)
    return root


def _checkpoint(workdir):
    return restore_run(workdir, "last")[2]


def _flat(tree, prefix=""):
    """{"prefix/a/b": array} for a nested dict of arrays."""
    return {f"{prefix}/{path}": np.asarray(leaf) for path, leaf in flatten_dict(tree, sep="/").items()}


def test_linear_probe_uses_the_weights_preprocessing_and_changes_only_the_head(
        weights_file, home, monkeypatch, tmp_path):
    # The published resnet18 entry, served from 127.0.0.1, with unusual preprocessing to look for.
    import hashlib

    info = weights_table.weights_info("resnet18")
    sha = hashlib.sha256((weights_file / info.filename).read_bytes()).hexdigest()
    odd = weights_table.Preprocessing(resize=20, crop=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    table = tuple(dataclasses.replace(w, sha256_prefix=sha[:8], preprocessing=odd) if w.name == info.name else w
                  for w in weights_table._TABLE)
    monkeypatch.setattr(weights_table, "_TABLE", table)
    seen = []
    real_step = steps.train_step

    def spy(state, batch, **kwargs):
        seen.append((batch["image"].shape, batch["image"].dtype, kwargs["image_mean"], kwargs["image_std"]))
        return real_step(state, batch, **kwargs)

    monkeypatch.setattr(program, "train_step", spy)
    workdir = str(tmp_path / "probe")
    with serve(weights_file) as server:
        monkeypatch.setenv("FLAXNETS_MIRROR", server.url(""))
        code = main(["--model", "resnet18", "--pretrained", "tv_in1k", "--linear-probe", "--workdir", workdir,
                     "--max-steps", "2", "--no-progress", "--set", "batch_size=32", "--compilation-cache", "none",
                     "--data-dir", str(tmp_path / "tfds")])
    assert code == 0
    # The step saw 16 px uint8 images (the weights' crop) normalised with the weights' mean/std.
    assert seen == [((32, 16, 16, 3), np.uint8, odd.mean, odd.std)]
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["image_size"] == 16 and run["preprocessing"]["mean"] == list(odd.mean)
    assert run["preprocessing"]["eval_crop_fraction"] == pytest.approx(16 / 20)

    loaded = flaxnets.pretrained("resnet18", str(weights_file / "resnet18.safetensors"))[1]
    before = {**_flat(loaded["params"], "p"), **_flat(loaded["batch_stats"], "s")}
    tree = _checkpoint(workdir)
    after = {**_flat(tree["params"], "p"), **_flat(tree["batch_stats"], "s")}
    assert after["p/fc/kernel"].shape == (512, 10)  # the data set's classes
    backbone = [k for k in before if not k.startswith("p/fc/")]
    assert len(backbone) == len(before) - 2 and all(np.array_equal(before[k], after[k]) for k in backbone)
    assert not np.allclose(after["p/fc/kernel"], 0) and int(tree["step"]) == 2


@pytest.mark.slow
def test_frozen_batchnorm_keeps_the_statistics_while_the_backbone_learns(weights_file, home, tmp_path):
    path = str(weights_file / "resnet18.safetensors")
    workdir = str(tmp_path / "frozen_bn")
    code = main(["--model", "resnet18", "--pretrained", path, "--freeze-bn", "--workdir", workdir,
                 "--max-steps", "2", *TINY, "--compilation-cache", "none", "--data-dir", str(tmp_path / "tfds")])
    assert code == 0
    loaded = flaxnets.pretrained("resnet18", path)[1]
    tree = _checkpoint(workdir)
    stats, new_stats = _flat(loaded["batch_stats"]), _flat(tree["batch_stats"])
    assert stats.keys() == new_stats.keys() and all(np.array_equal(stats[k], new_stats[k]) for k in stats)
    params, new_params = _flat(loaded["params"]), _flat(tree["params"])
    assert not np.array_equal(params["/conv1/kernel"], new_params["/conv1/kernel"])


def _digit_folders(root, classes):
    """scikit-learn's digits of ``classes`` as PNG folders ``root/{train,val}/<digit>/``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        if label not in classes:
            continue
        split = "val" if i % 5 == 0 else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.kron(np.round(image * 255 / 16).astype(np.uint8), np.ones((2, 2), np.uint8))
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(root)


def _train(args, cache):
    """``python -m train ARGS`` in a fresh process (the compilation cache is set up once per process)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-m", "train", *args, "--compilation-cache", str(cache)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split("first step done ")[1].split(" s")[0])


@pytest.mark.slow
def test_a_backbone_from_another_task_beats_training_from_scratch(tmp_path):
    """Digits 0-4 pretrain a backbone; on digits 5-9 it beats a fresh one after the same few steps.
    The from-scratch run repeats the fine-tuning run's programs: it reads them from the cache."""
    first, second = _digit_folders(tmp_path / "d04", range(5)), _digit_folders(tmp_path / "d59", range(5, 10))
    cache = tmp_path / "jax_cache"
    common = ["--recipe", "resnet18_sgd-cosine_15e_digits", *TINY, "--set", "warmup_epochs=0"]
    _train(["--dataset", first, "--epochs", "3", "--workdir", str(tmp_path / "pre"), *common], cache)

    def top1(workdir):
        return json.loads(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()[-1])["eval_top1"]

    tuned, scratch = str(tmp_path / "tuned"), str(tmp_path / "scratch")
    cold = _train(["--dataset", second, "--epochs", "1", "--workdir", tuned, "--init-from", str(tmp_path / "pre"),
                   *common], cache)
    cached = set(os.listdir(cache))
    warm = _train(["--dataset", second, "--epochs", "1", "--workdir", scratch, *common], cache)
    assert cached and set(os.listdir(cache)) == cached  # same programs: nothing compiled anew
    print(f"time to the first step: cold {cold:.1f} s, warm {warm:.1f} s")
    assert top1(tuned) > top1(scratch) + 0.1, (top1(tuned), top1(scratch))


def test_bad_fine_tuning_flags_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    code = main(["--pretrained", "--init-from", str(tmp_path), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == "error: --init-from and --pretrained both give starting weights: pick one", err
    code = main(["--model", "resnet18", "--pretrained", "no_such_tag", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "no_such_tag" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "w")


def test_normalisation_on_the_device_matches_the_formula():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = jax.jit(steps.normalize_images, static_argnums=(1, 2))(pixels, mean, std)
    np.testing.assert_allclose(out, (pixels / 255.0 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)
