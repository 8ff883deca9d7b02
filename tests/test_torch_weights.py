"""PyTorch weights: torchvision/timm models converted to flaxnets give the same numbers."""

import jax
import numpy as np
import pytest
import torch
import torchvision

import flaxnets
from flaxnets.torch_weights import from_torch, load_pretrained, to_torch, torch_counterpart, torch_models
from tests.conftest import small_input

FAST = {"alexnet_owt", "vgg11_bn", "googlenet_bn", "resnet18", "resnext50_32x4d", "densenet121", "xception"}
CASES = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in torch_models()]

# flaxnets feature name -> the PyTorch module whose output it equals.
FEATURE_MODULES = {
    "resnet": {f"stage{i}": f"layer{i}" for i in range(1, 5)},
    "densenet": {f"stage{i}": f"features.denseblock{i}" for i in range(1, 5)},
    "googlenet": {"inception3": "inception3b", "inception4": "inception4e", "inception5": "inception5b"},
    "xception": {"stage1": "block1", "stage2": "block2", "stage3": "block11", "stage4": "act4"},
    "alexnet": {"stage5": "features.12"},
}


def torch_model(name: str) -> torch.nn.Module:
    """The torchvision/timm model of the same architecture, randomly initialised, eval mode."""
    torch.manual_seed(0)
    model = torch_counterpart(name)
    # Random BN affine parameters and statistics, so a mix-up cannot hide behind identity BNs.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _torch_run(model, x_nhwc, modules=()):
    """Logits and the outputs of the named modules (as NHWC arrays) for an NHWC batch."""
    outputs, hooks = {}, []
    named = dict(model.named_modules())
    for module_name in modules:
        hooks.append(named[module_name].register_forward_hook(
            lambda m, i, o, key=module_name: outputs.__setitem__(key, o.detach().permute(0, 2, 3, 1).numpy())))
    with torch.no_grad():
        logits = model(torch.from_numpy(np.array(x_nhwc)).permute(0, 3, 1, 2)).numpy()
    for hook in hooks:
        hook.remove()
    return logits, outputs


@pytest.mark.parametrize("name", CASES)
def test_converted_model_matches_pytorch(name):
    reference = torch_model(name)
    variables = from_torch(name, reference.state_dict())
    model = flaxnets.create_model(name, aux_logits=True) if name == "googlenet_bn" else flaxnets.create_model(name)
    x = small_input(name)
    family = flaxnets.model_info(name).family
    want_logits, want_feats = _torch_run(reference, x, FEATURE_MODULES.get(family, {}).values())
    feats = jax.jit(lambda v: flaxnets.extract_features(model, v, x))(variables)
    scale = np.abs(want_logits).max()
    np.testing.assert_allclose(feats["logits"], want_logits, rtol=1e-4, atol=1e-4 * max(scale, 1))
    for ours, theirs in FEATURE_MODULES.get(family, {}).items():
        got, want = np.asarray(feats[ours]), want_feats[theirs]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(np.abs(want).max(), 1), err_msg=ours)


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_exact(name):
    state = torch_model(name).state_dict()
    back = to_torch(name, from_torch(name, state))
    assert list(back) == list(state) or set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_to_torch_loads_strictly_and_keeps_outputs():
    model = flaxnets.create_model("resnet18", num_classes=10)
    x = small_input("resnet18")
    variables = jax.jit(model.init)(jax.random.key(0), x)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    reference.load_state_dict(to_torch("resnet18", variables), strict=True)
    want, _ = _torch_run(reference, x)
    np.testing.assert_allclose(model.apply(variables, x), want, rtol=1e-4, atol=1e-4)


def test_num_classes_and_aux_heads_follow_the_checkpoint():
    state = torchvision.models.googlenet(num_classes=7, aux_logits=False, init_weights=True).state_dict()
    variables = from_torch("googlenet_bn", state)
    assert variables["params"]["fc"]["kernel"].shape == (1024, 7)
    assert "aux1" not in variables["params"]


def test_old_densenet_key_names_are_accepted():
    state = torchvision.models.densenet121().state_dict()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()}
    assert any(".norm.1." in k for k in old)
    converted = from_torch("densenet121", old)
    np.testing.assert_array_equal(
        converted["params"]["denseblock1_layer1"]["norm1"]["scale"],
        state["features.denseblock1.denselayer1.norm1.weight"].numpy(),
    )


def test_mismatched_state_dict_names_the_key_and_shapes():
    with pytest.raises(ValueError, match=r"'layer1.0.conv1.weight' has shape \(64, 64, 1, 1\).*\(3, 3, 64, 64\)"):
        from_torch("resnet18", torchvision.models.resnet50().state_dict())
    with pytest.raises(ValueError, match=r"no key 'layer1\.2\.bn1\.bias'.*80 missing in all"):
        from_torch("resnet34", torchvision.models.resnet18().state_dict())
    state = torchvision.models.resnet18().state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        from_torch("resnet18", state)
    with pytest.raises(KeyError, match="no PyTorch counterpart"):
        from_torch("vgg11_lrn", state)


def test_load_pretrained_reads_a_pth_file(tmp_path):
    reference = torch_model("googlenet_bn")
    path = tmp_path / "googlenet.pth"
    torch.save(reference.state_dict(), path)
    model, variables = load_pretrained("googlenet_bn", str(path), transform_input=True)
    assert model.transform_input and model.aux_logits
    reference.transform_input = True
    x = small_input("googlenet_bn")
    want, _ = _torch_run(reference, x)
    got = jax.jit(lambda v: model.apply(v, x))(variables)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(np.abs(want).max(), 1))


def test_convert_cli_writes_a_checkpoint_that_loads(tmp_path):
    import subprocess
    import sys

    reference = torch_model("resnet18")
    weights = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), weights)
    out = tmp_path / "converted"
    cmd = [sys.executable, "-m", "flaxnets.convert", str(weights), "--model", "r18", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    model, variables = flaxnets.load_converted(str(out))
    assert model.num_classes == 1000
    x = small_input("resnet18")
    want, _ = _torch_run(reference, x)
    np.testing.assert_allclose(jax.jit(lambda v: model.apply(v, x))(variables), want, rtol=1e-4, atol=1e-4)
    # Writing over an existing conversion and reading a non-checkpoint are clear errors.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr
    with pytest.raises(FileNotFoundError, match="not a flaxnets checkpoint"):
        flaxnets.load_converted(str(tmp_path))
