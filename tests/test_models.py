"""Every registered model: exact parameter counts, shapes, gradients, modes, precision, features.

Parametrized over ``flaxnets.list_models()``, so a newly registered model is tested at once.
The full numeric test (real init, forward, gradients) runs by default for a representative set
and for every model under ``-m slow``; parameter counts and default-size shapes always cover all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxnets
from flaxnets.summary import abstract_variables, count_params, forward_flops
from tests.conftest import init_small, small_input

# Parameter counts for 1000 classes, weights and biases only, from ../shared/REFERENCE.md.
REFERENCE_PARAMS = {
    "alexnet": 62_378_344,
    "alexnet_2tower": 60_965_224,
    "alexnet_owt": 61_100_840,
    "vgg11": 132_863_336,
    "vgg11_lrn": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16_1x1": 133_638_952,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "googlenet": 13_378_280,  # with both auxiliary classifiers (6,998,552 without)
    "googlenet_bn": 13_004_888,  # with both auxiliary classifiers (6,624,904 without)
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x4d": 44_177_704,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "xception": 22_855_952,
}

# One or two models per family for the default suite; the rest run under `-m slow`. The paper
# GoogLeNet shares every layer type with googlenet_bn but BatchNorm, which the others cover;
# DenseNet-121's forward pass is checked against torchvision's in the default suite
# (test_torch_weights), its gradients (2.5 minutes here) under `-m slow`.
FAST = {
    "alexnet", "alexnet_2tower", "alexnet_owt", "vgg11_lrn", "vgg11_bn",
    "googlenet_bn", "resnet18", "resnext50_32x4d", "xception",
}
ALL = flaxnets.list_models()
FAST_FIRST = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in ALL]


def test_every_registered_model_has_a_reference_count():
    assert set(ALL) == set(REFERENCE_PARAMS)


@pytest.mark.parametrize("name", ALL)
def test_param_count_matches_reference(name):
    info = flaxnets.model_info(name)
    variables = abstract_variables(flaxnets.create_model(name), info.input_size)
    assert count_params(variables["params"]) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name, expected", [("googlenet", 6_998_552), ("googlenet_bn", 6_624_904)])
def test_googlenet_param_count_without_aux(name, expected):
    variables = abstract_variables(flaxnets.create_model(name, aux_logits=False), 224)
    assert count_params(variables["params"]) == expected


@pytest.mark.parametrize("name", ALL)
def test_output_shape_at_default_size(name):
    model = flaxnets.create_model(name, num_classes=17)
    size = flaxnets.model_info(name).input_size
    variables = abstract_variables(model, size, batch=3)
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert (out.shape, out.dtype) == ((3, 17), jnp.float32)


# The paper GoogLeNet at 224 px (40 s to compile here) runs under `-m slow`.
@pytest.mark.parametrize("name", ["alexnet", "alexnet_owt", "vgg11_lrn", pytest.param("googlenet", marks=pytest.mark.slow),
                                  "resnet18"])
def test_finite_forward_at_default_size(name):
    model = flaxnets.create_model(name)
    size = flaxnets.model_info(name).input_size
    x = jax.random.uniform(jax.random.key(0), (1, size, size, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    logits = jax.jit(lambda v: model.apply(v, x))(variables)
    assert logits.shape == (1, 1000) and bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.std(logits)) > 0


def _train_apply(model, variables, x, dropout_key):
    """Training-mode forward; returns (logits, updated collections)."""
    return model.apply(
        variables, x, train=True, rngs={"dropout": dropout_key},
        mutable=["batch_stats", "aux_logits"],
    )


@pytest.mark.parametrize("name", FAST_FIRST)
def test_forward_gradients_and_modes(name):
    model, variables, x = init_small(name)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    feats = jax.jit(lambda v: flaxnets.extract_features(model, v, x))(variables)
    logits = feats["logits"]
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert all(bool(jnp.all(jnp.isfinite(f))) for f in feats.values())
    assert set(variables) <= {"params", "batch_stats"}, "init must return only weights and BN statistics"

    def loss(p, key):
        out, updates = _train_apply(model, {"params": p, **rest}, x, key)
        aux = sum(jnp.sum(a**2) for a in jax.tree.leaves(updates.get("aux_logits", {})))
        return jnp.sum(out**2) + aux, (out, updates)

    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    grads, (train_logits, updates) = grad_fn(params, jax.random.key(2))
    dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
            if not bool(jnp.any(g != 0))]
    assert not dead, f"parameters without gradient: {dead}"
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))

    # Training mode differs from eval: dropout is on and/or BatchNorm uses batch statistics.
    # Compared relative to the logits' scale: the plain deep VGGs under the paper's N(0, 0.01)
    # init give logits of 1e-7..1e-9 (the vanishing signal the paper avoided by starting B-E from A).
    assert _differs(train_logits, logits)
    if "batch_stats" in rest:
        before, after = jax.tree.leaves(rest["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
        assert any(not np.allclose(a, b) for a, b in zip(before, after)), "BN statistics not updated"
    if getattr(model, "dropout_rate", 0) > 0:
        _, (other, _) = grad_fn(params, jax.random.key(3))
        assert _differs(other, train_logits), "dropout ignores its rng"


def _differs(a, b, rel=1e-3):
    """True if ``a`` and ``b`` differ by more than ``rel`` of their magnitude."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max()) > rel * float(max(np.abs(a).max(), np.abs(b).max()))


# bfloat16 compute by layer kind: LRN, BatchNorm, residual; grouped, depthwise and inception
# blocks (the costliest compiles) under `-m slow`.
BF16_SET = ["alexnet", "vgg11_bn", "resnet18",
            *(pytest.param(n, marks=pytest.mark.slow) for n in ("googlenet", "resnext50_32x4d", "xception"))]


@pytest.mark.parametrize("name", BF16_SET)
def test_bfloat16_compute_stays_close_to_float32(name):
    model, variables, x = init_small(name)
    bf16 = flaxnets.create_model(name, num_classes=10, dtype=jnp.bfloat16)
    ref = jax.jit(lambda v: model.apply(v, x))(variables)
    got = jax.jit(lambda v: bf16.apply(v, x))(variables)
    assert got.dtype == jnp.float32  # logits are returned in float32
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, f"bf16 relative error {rel:.3f}"
    # Parameters created under bf16 compute stay float32 (master weights).
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), x)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes["params"])} == {jnp.dtype(jnp.float32)}


def test_alexnet_paper_initialisation():
    params = init_small("alexnet")[1]["params"]
    for i in range(1, 6):
        bias = params[f"conv{i}"]["bias"]
        assert np.all(bias == (1.0 if i in (2, 4, 5) else 0.0)), f"conv{i} bias"
    head = params["classifier"]
    assert np.all(head["fc1"]["bias"] == 1) and np.all(head["fc2"]["bias"] == 1)
    assert np.all(head["fc3"]["bias"] == 0)
    for kernel in (params["conv3"]["kernel"], head["fc1"]["kernel"]):
        assert float(jnp.std(kernel)) == pytest.approx(0.01, rel=0.02)


def test_vgg_paper_initialisation():
    params = init_small("vgg11_lrn")[1]["params"]
    kernel = params["conv3_1"]["conv"]["kernel"]
    assert float(jnp.std(kernel)) == pytest.approx(0.01, rel=0.02)
    assert np.all(params["conv3_1"]["conv"]["bias"] == 0)


def test_resnet_he_init_and_zero_init_residual_and_init_variables_is_init():
    model = flaxnets.create_model("resnet50", zero_init_residual=True)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    # The same program compiled with init_compiler_options (LLVM level 1 on the CPU): bit for bit.
    assert flaxnets.initialize.init_compiler_options("cpu") == {"xla_backend_optimization_level": 1}
    quick = flaxnets.init_variables(model, jax.random.key(0), 64)["params"]
    assert jax.tree.structure(quick) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(quick), jax.tree.leaves(params)))
    assert np.all(params["layer1_0"]["bn3"]["scale"] == 0)
    assert np.all(params["layer1_0"]["bn1"]["scale"] == 1)
    kernel = params["layer3_0"]["conv2"]["kernel"]  # 3x3, 256 -> 256: fan_out 2304
    assert float(jnp.std(kernel)) == pytest.approx(np.sqrt(2 / (9 * 256)), rel=0.03)
    default = flaxnets.create_model("resnet50")
    shapes = abstract_variables(default, 64)
    assert default.zero_init_residual is False and "bn3" in shapes["params"]["layer1_0"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", {"stem": (16, 64), "stage1": (16, 64), "stage2": (8, 128), "stage3": (4, 256),
                      "stage4": (2, 512), "pre_logits": (512,)}),
        ("resnext50_32x4d", {"stem": (16, 64), "stage1": (16, 256), "stage2": (8, 512),
                             "stage3": (4, 1024), "stage4": (2, 2048), "pre_logits": (2048,)}),
        ("densenet121", {"stem": (16, 64), "stage1": (16, 256), "stage2": (8, 512), "stage3": (4, 1024),
                         "stage4": (2, 1024), "pre_logits": (1024,)}),
        ("xception", {"stem": (33, 64), "stage1": (17, 128), "stage2": (9, 256), "stage3": (5, 728),
                      "stage4": (3, 2048), "pre_logits": (2048,)}),
        ("vgg11_bn", {f"stage{i}": (64 // 2**i, w) for i, w in enumerate((64, 128, 256, 512, 512), 1)}),
        ("googlenet_bn", {"stem": (8, 192), "inception3": (8, 480), "inception4": (4, 832),
                          "inception5": (2, 1024), "pre_logits": (1024,)}),
        ("alexnet_owt", {"stage1": (7, 64), "stage2": (3, 192), "stage5": (1, 256), "pre_logits": (9216,)}),
    ],
)
def test_named_features(name, expected):
    model = flaxnets.create_model(name, num_classes=10)
    x = small_input(name)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    feats = jax.eval_shape(lambda v, x: flaxnets.extract_features(model, v, x), variables, x)
    for key, shape in expected.items():
        got = feats[key].shape[1:]
        want = (shape[0], shape[0], shape[1]) if len(shape) == 2 else shape
        assert got == want, f"{key}: {got} != {want}"
    assert feats["logits"].shape == (2, 10)
    picked = jax.eval_shape(
        lambda v, x: flaxnets.extract_features(model, v, x, names=("pre_logits",)), variables, x)
    assert list(picked) == ["pre_logits"]
    with pytest.raises(KeyError, match="no feature"):
        jax.eval_shape(lambda v, x: flaxnets.extract_features(model, v, x, names=("stage9",)), variables, x)


def test_extract_features_logits_equal_apply():
    model, variables, x = init_small("resnet18")
    feats = flaxnets.extract_features(model, variables, x, names=("stage4", "logits"))
    np.testing.assert_allclose(feats["logits"], model.apply(variables, x), rtol=1e-5, atol=1e-6)
    # Calling twice gives the same values: nothing accumulates in the variables.
    again = flaxnets.extract_features(model, variables, x, names=("stage4",))
    np.testing.assert_array_equal(again["stage4"], feats["stage4"])


# The auxiliary heads are the same code in both GoogLeNets; the paper one (40 s more to compile)
# runs under `-m slow`.
@pytest.mark.parametrize("name", [pytest.param("googlenet", marks=pytest.mark.slow), "googlenet_bn"])
def test_googlenet_aux_logits_only_in_training(name):
    model, variables, x = init_small(name)
    collections = ["batch_stats", "aux_logits"]
    _, state = jax.eval_shape(lambda v: model.apply(v, x, train=False, mutable=collections), variables)
    assert "aux_logits" not in state
    _, state = jax.jit(lambda v: _train_apply(model, v, x, jax.random.key(0)))(variables)
    aux = {k: v["logits"][0] for k, v in state["aux_logits"].items()}
    assert {k: a.shape for k, a in aux.items()} == {"aux1": (2, 10), "aux2": (2, 10)}
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in aux.values())
    assert not np.allclose(aux["aux1"], aux["aux2"])
    plain = flaxnets.create_model(name, num_classes=10, aux_logits=False)
    _, state = jax.eval_shape(
        lambda v: plain.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=collections),
        variables,
    )
    assert "aux_logits" not in state


def test_paper_googlenet_aux_head_rejects_too_small_input():
    model = flaxnets.create_model("googlenet", num_classes=10)
    with pytest.raises(ValueError, match=r"at least 79 px \(its auxiliary heads pool 5x5"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    small = flaxnets.create_model("googlenet", num_classes=10, aux_pool_window=None)
    jax.eval_shape(small.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def _resnet50_macs():
    """Multiply-adds of ResNet-50's convs and FC at 224 px, counted by hand from the paper's table."""
    def conv(size, cin, cout, k):
        return size * size * cin * cout * k * k
    macs, size, cin = conv(112, 3, 64, 7), 56, 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for i in range(blocks):
            out = size // 2 if stage > 0 and i == 0 else size
            macs += conv(size, cin, width, 1) + conv(out, width, width, 3) + conv(out, width, 4 * width, 1)
            if i == 0:
                macs += conv(out, cin, 4 * width, 1)
            cin, size = 4 * width, out
    return macs + 2048 * 1000


def test_flops_from_xla_cost_analysis():
    model = flaxnets.create_model("resnet50")
    flops = forward_flops(model, abstract_variables(model, 224), 224)
    # XLA counts 2 FLOPs per multiply-add and skips the products with zero padding at borders.
    assert 0.95 * 2 * _resnet50_macs() < flops <= 2 * _resnet50_macs() * 1.005
    summary = flaxnets.summarize("alexnet_owt")
    assert summary.params == REFERENCE_PARAMS["alexnet_owt"] and 1.0 < summary.gflops < 1.6
