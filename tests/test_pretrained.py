"""Pretrained weights by name, served from 127.0.0.1: download, hash, torch-free reading, cache."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import torch
import torchvision

import flaxnets
from flaxnets import weights_table
from tests.weights_server import serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Random torchvision ResNet-18 weights under the published file name and as safetensors,
    with torch's logits on a batch (NHWC) and the file's SHA-256."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for module in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    state = model.state_dict()
    path = root / weights_table.weights_info("resnet18").filename
    torch.save(state, path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "resnet18.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x).numpy()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"root": root, "path": str(path), "x": x.permute(0, 2, 3, 1).numpy(), "logits": logits, "sha": sha}


def _with_hash(monkeypatch, prefix: str) -> None:
    """Makes the table's resnet18.tv_in1k expect ``prefix`` (our random file is not torchvision's)."""
    table = tuple(dataclasses.replace(w, sha256_prefix=prefix) if w.name == "resnet18.tv_in1k" else w
                  for w in weights_table._TABLE)
    monkeypatch.setattr(weights_table, "_TABLE", table)


@pytest.fixture
def mirror(published, home, monkeypatch):
    """The published files on a local server, named by FLAXNETS_MIRROR, with the right hash."""
    _with_hash(monkeypatch, published["sha"][:8])
    with serve(published["root"]) as server:
        monkeypatch.setenv("FLAXNETS_MIRROR", server.url(""))
        yield server


def _assert_torch_logits(logits, published):
    scale = np.abs(published["logits"]).max()
    np.testing.assert_allclose(np.asarray(logits), published["logits"], atol=1e-4 * scale)


def test_pretrained_by_name_downloads_verifies_converts_and_caches(mirror, published, home):
    model = flaxnets.create_model("resnet18", pretrained=True)
    module, variables = model.unbind()
    forward = jax.jit(functools.partial(module.apply, train=False))
    _assert_torch_logits(forward(variables, published["x"]), published)
    weights = home / "weights"
    cached = sorted(f for f in os.listdir(weights) if not f.endswith(".lock"))
    assert cached == ["resnet18-f37072fd.pth", "resnet18.tv_in1k.flaxnets.safetensors"]
    assert len(mirror.requests) == 1

    os.remove(weights / "resnet18-f37072fd.pth")  # the second load reads only the converted cache
    again, cached = flaxnets.pretrained("resnet18")
    assert len(mirror.requests) == 1 and again == module
    jax.tree.map(np.testing.assert_array_equal, cached, variables)


def test_a_wrong_hash_deletes_the_download(published, home, monkeypatch):
    _with_hash(monkeypatch, "00000000")
    with serve(published["root"]) as server:
        monkeypatch.setenv("FLAXNETS_MIRROR", server.url(""))
        with pytest.raises(ValueError, match="SHA-256 mismatch.*expected 00000000"):
            flaxnets.create_model("resnet18", pretrained="tv_in1k")
    assert not [f for f in os.listdir(home / "weights") if not f.endswith(".lock")]


def test_offline_fails_at_once_naming_the_url_and_the_cache_path(home, monkeypatch):
    monkeypatch.setenv("FLAXNETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(flaxnets.WeightsUnavailableError) as err:
        flaxnets.pretrained("resnet50", "tv2_in1k")
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert str(home / "weights" / "resnet50-11ad3fa6.pth") in message and "\n" not in message


def test_safetensors_url_with_a_new_head_keeps_the_backbone(published, home):
    with serve(published["root"]) as server:
        model, variables = flaxnets.pretrained("resnet18", server.url("resnet18.safetensors"), num_classes=10)
    _, loaded = flaxnets.pretrained("resnet18", published["path"])
    assert model.num_classes == 10 and variables["params"]["fc"]["kernel"].shape == (512, 10)
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"], loaded["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(variables["batch_stats"]["layer4_1"]["bn2"]["var"],
                                  loaded["batch_stats"]["layer4_1"]["bn2"]["var"])
    assert np.abs(variables["params"]["fc"]["kernel"]).max() > 0  # initialised, not left empty


def test_loading_imports_neither_torch_nor_tensorflow(published, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import flaxnets
        import jax
        model, variables = flaxnets.pretrained("resnet18", {published['path']!r})
        images = flaxnets.preprocess(np.zeros((2, 80, 96, 3), np.uint8), "resnet18.tv_in1k")
        flaxnets.decode_predictions(jax.jit(model.apply, static_argnames="train")(variables, images, train=False))
        print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "tensorflow", "tensorflow_datasets"}}))
    """)
    env = {**os.environ, "FLAXNETS_HOME": str(tmp_path), "FLAXNETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _torchvision_weights():
    """(our model name, torchvision weight enum member) for every ImageNet-1k classifier we can load."""
    for name in flaxnets.torch_models():
        if name == "xception":  # timm's, not torchvision's
            continue
        torchvision_name = {"alexnet_owt": "alexnet", "googlenet_bn": "googlenet"}.get(name, name)
        for member in torchvision.models.get_model_weights(torchvision_name):
            if member.name != "IMAGENET1K_FEATURES":  # VGG-16 features only: no trained classifier
                yield name, member


def test_the_table_lists_every_torchvision_weight_with_its_figures():
    rows = list(_torchvision_weights())
    assert len(rows) == 27
    for name, member in rows:
        tag = {"IMAGENET1K_V1": "tv_in1k", "IMAGENET1K_V2": "tv2_in1k"}[member.name]
        if name == "resnext101_64x4d":  # torchvision calls its only (V2-recipe) weights V1
            tag = "tv2_in1k"
        entry = flaxnets.weights_info(name, tag)
        metrics = member.meta["_metrics"]["ImageNet-1K"]
        transform = member.transforms()
        assert entry.url == member.url and member.url.endswith(f"-{entry.sha256_prefix}.pth")
        assert (entry.top1, entry.top5) == (metrics["acc@1"], metrics["acc@5"])
        assert (entry.preprocessing.resize, entry.preprocessing.crop) == (transform.resize_size[0],
                                                                          transform.crop_size[0])
        assert entry.preprocessing.mean == tuple(transform.mean) and entry.preprocessing.std == tuple(transform.std)
    assert len(flaxnets.list_pretrained()) == len(rows) + 1  # and timm's Xception
    assert flaxnets.weights_info("resnet50").tag == "tv2_in1k"  # the default is the most accurate


def test_unknown_weights_are_named_clearly():
    with pytest.raises(KeyError, match="resnet50 has no weights tagged 'in22k'; available: tv_in1k, tv2_in1k"):
        flaxnets.weights_info("resnet50", "in22k")
    with pytest.raises(KeyError, match="no published weights for alexnet; models with weights: alexnet_owt"):
        flaxnets.create_model("alexnet", pretrained=True)


def test_preprocess_matches_torchvision_transforms():
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), np.uint8)
    image = np.asarray(np.cumsum(image, axis=1) % 256, np.uint8)  # some structure at every scale
    spec = flaxnets.weights_info("resnet50", "tv2_in1k").preprocessing
    transform = v2.Compose([v2.Resize(spec.resize, antialias=True), v2.CenterCrop(spec.crop),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])
    expected = transform(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    ours = np.asarray(flaxnets.preprocess(image, "resnet50.tv2_in1k"))
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - expected).mean() < 0.02


def test_decode_predictions_names_the_most_probable_classes():
    logits = np.zeros((2, 1000), np.float32)
    logits[0, [1, 2]] = [5.0, 4.0]
    logits[1, 999] = 3.0
    top = flaxnets.decode_predictions(logits, top=2)
    assert [(i, n) for i, n, _ in top[0]] == [(1, "goldfish"), (2, "great white shark")]
    assert top[1][0][:2] == (999, "toilet tissue")
    expected = np.exp(5.0) / (np.exp(5.0) + np.exp(4.0) + 998)
    assert top[0][0][2] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="10 logits per row but 1000 class names"):
        flaxnets.decode_predictions(np.zeros((1, 10)))
