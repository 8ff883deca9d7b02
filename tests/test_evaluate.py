"""Evaluation protocols, ensembles and ``python -m train.evaluate`` on the embedded digits, and
published weights (``--pretrained``) served from 127.0.0.1."""

import dataclasses
import functools
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import flaxnets
from flaxnets import weights_table
from flaxnets.convert import save_converted
from flaxnets.weights_table import IMAGENET_MEAN, IMAGENET_STD
from input_pipeline.pipeline import make_dataset
from input_pipeline.sources import load_source
from tests.weights_server import serve, write_random_resnet18
from train.evaluate import (EvaluationError, Member, evaluate, load_member, load_pretrained_member, main,
                            member_probabilities)
from train.protocols import PROTOCOLS, crop_probabilities, get_protocol, mean_probabilities, pixel_views
from train.steps import normalize_images
from train.recipes import DEFAULT_RECIPE, get_recipe
from train.trainer import RunConfig, run

IMAGE = tf.io.encode_jpeg(tf.constant(np.random.default_rng(0).integers(0, 256, (300, 400, 3)), tf.uint8))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    load_source("flaxnets_digits", "train", data_dir=path)
    return path


@pytest.fixture(scope="module")
def digits_test(data_dir):
    return load_source("flaxnets_digits", "test", data_dir=data_dir)


def random_member(name="resnet18", size=16, seed=0, directory="random"):
    model = flaxnets.create_model(name, num_classes=10)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    return Member(directory, model, variables, size, "flaxnets_digits", "random init")


@pytest.mark.parametrize("name, views", [("center", 1), ("10crop", 10), ("144crop", 144), ("dense", 6)])
def test_view_counts_and_shapes(name, views):
    protocol = get_protocol(name)
    assert protocol.num_views(224) == views
    out = pixel_views(protocol, IMAGE, 224, protocol.scales(224))
    if protocol.dense:
        # Q = S-32, S, S+32 for a 224 px model trained at S = 256; the image is 300x400.
        assert [tuple(v.shape) for v in out] == [(1, q, round(q * 4 / 3), 3) for q in (224, 256, 288) for _ in "ab"]
        assert protocol.scales(224, jittered=True) == (256, 384, 512)
    else:
        assert out.shape == (views, 224, 224, 3)
        assert out.dtype == tf.uint8 and 50 < float(tf.reduce_mean(tf.cast(out, tf.float32))) < 200
    # Smaller models get proportionally smaller scales.
    assert protocol.num_views(32) == views


def test_unknown_protocol_lists_the_valid_ones():
    with pytest.raises(KeyError, match="center, 10crop, 144crop, dense"):
        get_protocol("12crop")


# Both turn their classifier into convolutions the same way; VGG-11 (60 s here) runs under `-m slow`.
@pytest.mark.parametrize("name", [pytest.param("vgg11", marks=pytest.mark.slow), "alexnet"])
def test_dense_equals_plain_at_the_training_size(name):
    model = flaxnets.create_model(name, num_classes=10)
    size = flaxnets.model_info(name).input_size
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    plain = model.apply(variables, x)
    dense = flaxnets.dense_logits(model, variables, x)
    np.testing.assert_allclose(dense, plain, rtol=1e-4, atol=1e-5 * float(jnp.abs(plain).max()))
    # A larger image gives one score vector: the average of the score map.
    assert flaxnets.dense_logits(model, variables, jnp.zeros((1, size + 64, size + 32, 3))).shape == (1, 10)


def test_dense_rejects_images_smaller_than_the_fc_window():
    model, size = flaxnets.create_model("vgg11", num_classes=10), 224
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    with pytest.raises(ValueError, match="7x7 window"):
        jax.eval_shape(lambda v: flaxnets.dense_logits(model, v, jnp.zeros((1, 160, 160, 3))), variables)


class _LogitsByFirstPixel(nn.Module):
    """A stub model: the logits are row ``table[k]`` for an image whose first pixel is k."""

    table: tuple

    def __call__(self, x, train=False):
        return jnp.asarray(self.table)[x[:, 0, 0, 0].astype(jnp.int32)]


def test_views_are_averaged_as_probabilities_not_logits():
    # Averaging logits picks class 0 ((20+0)/2 > (0+5)/2), averaging probabilities picks class 1.
    table = ((20.0, 0.0, 19.0), (0.0, 5.0, 0.0))
    views = jnp.stack([jnp.zeros((4, 4, 3)), jnp.ones((4, 4, 3))])[None]  # one image, two views
    probs = crop_probabilities(_LogitsByFirstPixel(table), {}, views)
    expected = np.mean([np.exp(r) / np.exp(r).sum() for r in np.array(table)], axis=0)
    np.testing.assert_allclose(probs[0], expected, rtol=1e-5)
    assert int(jnp.argmax(probs[0])) == 1 and int(np.argmax(np.mean(table, axis=0))) == 0
    np.testing.assert_allclose(mean_probabilities(jnp.asarray(table), axis=0), expected, rtol=1e-5)


def test_center_protocol_matches_an_independent_forward_pass(digits_test):
    member = random_member()
    probs, labels = member_probabilities(member, get_protocol("center"), digits_test, progress=False)
    batches = list(make_dataset(digits_test, batch_size=120, train=False, image_size=16).as_numpy_iterator())
    logits = np.concatenate([member.model.apply(member.variables, normalize_images(b["image"])) for b in batches])
    np.testing.assert_array_equal(labels, np.concatenate([b["label"] for b in batches]))
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), atol=1e-5)
    result = evaluate([member], "center", digits_test, progress=False)
    assert result["count"] == 360
    assert result["top1"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))


def test_an_ensemble_averages_its_members_probabilities(digits_test):
    members = [random_member(seed=0, directory="a"), random_member(seed=1, directory="b")]
    one = evaluate(members[:1], "10crop", digits_test, limit=40, progress=False)
    twice = evaluate(members[:1] * 2, "10crop", digits_test, limit=40, progress=False)
    assert (one["top1"], one["top5"]) == (twice["top1"], twice["top5"]) == (
        one["members"][0]["top1"], one["members"][0]["top5"])
    both = evaluate(members, "10crop", digits_test, limit=40, progress=False)
    p = [member_probabilities(m, get_protocol("10crop"), digits_test, limit=40, progress=False) for m in members]
    labels = p[0][1]
    assert both["top1"] == pytest.approx(np.mean(np.argmax(p[0][0] + p[1][0], -1) == labels))
    assert [m["top1"] for m in both["members"]] == pytest.approx([np.mean(np.argmax(q, -1) == labels) for q, _ in p])


def test_missing_or_foreign_directories_are_clear_errors(tmp_path):
    with pytest.raises(EvaluationError, match="neither run.json"):
        load_member(str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({"model": "resnet18"}))
    with pytest.raises(EvaluationError, match="no checkpoint in .*checkpoints: train first"):
        load_member(str(tmp_path))
    assert main(["--workdir", str(tmp_path / "nowhere"), "--no-progress"]) == 1


def test_command_line_reproduces_a_trained_runs_evaluation(tmp_path, data_dir):
    recipe = dataclasses.replace(get_recipe(DEFAULT_RECIPE), image_size=16, epochs=1)
    run(recipe, RunConfig(workdir=str(tmp_path / "run"), data_dir=data_dir, progress=False))
    trained_top1 = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["eval_top1"]
    assert main(["--workdir", str(tmp_path / "run"), "--data-dir", data_dir, "--no-progress"]) == 0
    center = json.load(open(tmp_path / "run" / "eval_center.json"))
    assert center["top1"] == pytest.approx(trained_top1)  # the training-time evaluation, reproduced
    assert center["members"][0]["weights"].startswith("best checkpoint, step 22")


def test_command_line_on_an_ensemble_of_converted_weights_with_every_protocol(tmp_path, data_dir, capsys):
    for seed, directory in enumerate(("first", "second")):
        save_converted(str(tmp_path / directory), "resnet18", random_member(seed=seed).variables, num_classes=10)
    args = ["--workdir", str(tmp_path / "first"), "--ensemble", str(tmp_path / "second"), "--protocol", "all",
            "--dataset", "flaxnets_digits", "--image-size", "16", "--limit", "6", "--data-dir", data_dir,
            "--no-progress", "--out", str(tmp_path / "all.json")]
    capsys.readouterr()
    assert main(args) == 0
    results = json.load(open(tmp_path / "all.json"))
    assert [(r["protocol"], r["views"], r["count"], len(r["members"])) for r in results] == [
        (name, views, 6, 2) for name, views in zip(PROTOCOLS, (1, 10, 144, 6))]
    assert os.path.getsize(tmp_path / "all.png") > 10_000
    assert "144crop   144 views" in capsys.readouterr().out


# --- published weights (``--pretrained``), served from 127.0.0.1 -------------------------------------

# resnet18.tv_in1k's table entry, with preprocessing no default would produce: a 48 px crop of a
# shorter side of 60 (not 48 / 0.875), and per-channel mean/std that are not ImageNet's.
ODD = weights_table.Preprocessing(resize=60, crop=48, mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def served_resnet18(tmp_path_factory):
    """Random torchvision ResNet-18 weights under resnet18.tv_in1k's published file name, and their SHA-256."""
    root = tmp_path_factory.mktemp("served")
    path = write_random_resnet18(root)["pth"]
    return root, path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def odd_resnet18(served_resnet18, home, monkeypatch):
    """resnet18.tv_in1k with the served file's hash and ODD preprocessing, fetched via FLAXNETS_MIRROR."""
    root, path, sha = served_resnet18
    table = tuple(dataclasses.replace(w, sha256_prefix=sha[:8], preprocessing=ODD, top1=12.345, top5=67.891)
                  if w.name == "resnet18.tv_in1k" else w for w in weights_table._TABLE)
    monkeypatch.setattr(weights_table, "_TABLE", table)
    with serve(root) as server:
        monkeypatch.setenv("FLAXNETS_MIRROR", server.url(""))
        yield str(path)


def _log_softmax(logits):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def test_a_published_member_is_evaluated_with_its_own_resize_crop_mean_and_std(odd_resnet18, digits_test):
    member = load_pretrained_member("resnet18", progress=False)  # the model's only (so best) weights
    assert (member.directory, member.image_size, member.resize, member.mean, member.std, member.dataset) == (
        "resnet18.tv_in1k", 48, 60, ODD.mean, ODD.std, "imagenet2012")
    assert member.source == "published resnet18.tv_in1k (top-1 12.345% reported)"
    assert member.published == (12.345, 67.891)
    center, dense = get_protocol("center"), get_protocol("dense")
    assert center.scales(48, None, False, member.resize) == (60,)
    assert get_protocol("10crop").scales(48, None, False, member.resize) == (55,)  # the paper's 256, rescaled

    probs, labels = member_probabilities(member, center, digits_test, batch_views=8, limit=6, progress=False)
    # Dense evaluation (at one scale: the image and its mirror) normalises with them too.
    dense_probs, _ = member_probabilities(member, dense, digits_test, scales=(48,), limit=1, progress=False)
    # Independently: decode, take the central window that a 60 px shorter side cropped to 48 px
    # keeps (crop, then resize: the protocol's way), quantise, normalise with ODD, forward.
    images, expected_labels = [], []
    for example in digits_test.make(0, 1).take(6).as_numpy_iterator():
        image = tf.io.decode_png(example["image"], channels=3).numpy()
        short = min(image.shape[:2])
        side = min(short, round(48 * short / 60))
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        window = image[top:top + side, left:left + side].astype(np.float32)
        resized = tf.image.resize(window, [48, 48], method="bilinear").numpy()
        images.append(np.round(np.clip(resized / 255, 0, 1) * 255) / 255)
        expected_labels.append(example["label"])
    first = next(digits_test.make(0, 1).as_numpy_iterator())["image"]
    whole = [view.numpy()[0] / 255 for view in pixel_views(dense, first, 48, (48,))]  # 8 px -> 48 px, mirrored
    assert len(whole) == 2 and whole[0].shape == (48, 48, 3)
    pixels = np.stack(images + whole)
    # One forward pass for all: centre crops and whole images with ODD's, centre crops with ImageNet's mean/std.
    batch = np.concatenate([(pixels - ODD.mean) / ODD.std, (pixels[:6] - IMAGENET_MEAN) / IMAGENET_STD])
    logits = _log_softmax(jax.jit(functools.partial(member.model.apply, train=False))(member.variables, batch))
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(np.log(probs), logits[:6], atol=1e-4)
    np.testing.assert_allclose(dense_probs[0], np.exp(logits[6:8]).mean(0), rtol=1e-4, atol=1e-7)
    # ImageNet's mean/std would have given clearly different scores: the test can tell them apart.
    assert np.abs(np.log(probs) - logits[8:]).max() > 1e-2


def test_a_local_copy_of_published_weights(odd_resnet18):
    published = load_pretrained_member("resnet18.tv_in1k", progress=False)
    local = load_pretrained_member(f"resnet18.tv_in1k@{odd_resnet18}", image_size=96)
    assert (local.directory, local.image_size, local.resize, local.mean) == ("resnet18.tv_in1k", 96, 120, ODD.mean)
    assert local.source.startswith(f"resnet18.tv_in1k weights from {odd_resnet18}")
    jax.tree.map(np.testing.assert_array_equal, local.variables, published.variables)
    bare = load_pretrained_member(f"resnet18@{odd_resnet18}")  # no table entry: ImageNet's defaults
    assert (bare.directory, bare.image_size, bare.resize, bare.mean, bare.published) == (
        "resnet18", 224, None, IMAGENET_MEAN, None)
    for bad, message in [("resnet18.in22k", "no weights tagged 'in22k'; available: tv_in1k"),
                         ("resnet18@/no/such.pth", "/no/such.pth is not a file"),
                         ("alexnet", "no published weights for alexnet")]:
        with pytest.raises(EvaluationError, match=message):
            load_pretrained_member(bad)


def test_command_line_with_published_weights(odd_resnet18, digits_test, data_dir, tmp_path, monkeypatch, capsys):
    # The digits' 10 labels stand in for ImageNet's 1000 classes: this checks the plumbing.
    asked = []

    def fake_imagenet(dataset, data_dir, download):
        asked.append((dataset, data_dir))
        return dataclasses.replace(digits_test, class_names=tuple(map(str, range(1000))))

    monkeypatch.setattr("train.evaluate.eval_source", fake_imagenet)
    monkeypatch.chdir(tmp_path)
    assert main(["--pretrained", "resnet18.tv_in1k", "--data-dir", data_dir, "--limit", "5", "--batch-views", "8",
                 "--no-progress"]) == 0
    assert asked == [("imagenet2012", data_dir)]  # the published weights' data set by default
    result = json.load(open(tmp_path / "eval_resnet18.tv_in1k_center.json"))
    assert (result["count"], result["image_size"], result["scales"]) == (5, 48, [60])
    assert result["members"][0]["published_top1"] == pytest.approx(0.12345)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("          published  top-1  12.35%  top-5  67.89%  (resnet18.tv_in1k")
    assert lines[0].index("top-1") == lines[1].index("top-1")


@pytest.mark.parametrize("args, message", [
    (["--pretrained", "resnet50", "--ema"], "--ema picks among a workdir's weights"),
    (["--pretrained", "resnet50", "--checkpoint", "last"], "--checkpoint picks among a workdir's weights"),
    (["--pretrained", "nosuchnet"], "--pretrained nosuchnet: unknown model 'nosuchnet'"),
    (["--pretrained", "resnet50@"], "nothing after '@'"),
])
def test_pretrained_command_line_errors_are_one_line(args, message, home, capsys):
    assert main([*args, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


@pytest.mark.parametrize("args, message", [
    (["--workdir", "runs/x", "--pretrained", "resnet50"], "argument --pretrained: not allowed with argument --workdir"),
    ([], "one of the arguments --workdir --pretrained is required"),
])
def test_exactly_one_of_workdir_and_pretrained(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.splitlines()[-1] == f"python -m train.evaluate: error: {message}"
