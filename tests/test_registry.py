"""The registry: names, aliases, patterns, overrides and the errors users see."""

import flax.linen as nn
import jax.numpy as jnp
import pytest

import flaxnets
from flaxnets.registry import register


def test_list_models_holds_every_family():
    names = flaxnets.list_models()
    assert names == sorted(names)
    families = {flaxnets.model_info(n).family for n in names}
    assert families == {"alexnet", "vgg", "googlenet", "resnet", "densenet", "xception"}


def test_list_models_pattern():
    assert flaxnets.list_models("resnext*") == [
        "resnext101_32x4d",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "resnext50_32x4d",
    ]
    assert flaxnets.list_models("vgg*_bn") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    assert flaxnets.list_models("nothing*") == []


@pytest.mark.parametrize(
    "alias, name",
    [
        ("r50", "resnet50"),
        ("R50", "resnet50"),
        ("resnext50", "resnext50_32x4d"),
        ("x101", "resnext101_32x8d"),
        ("resnext101", "resnext101_32x8d"),
        ("vgg-16", "vgg16"),
        ("vgg_e", "vgg19"),
        ("inception_v1", "googlenet"),
        ("d121", "densenet121"),
    ],
)
def test_aliases_resolve(alias, name):
    assert flaxnets.resolve_name(alias) == name
    assert isinstance(flaxnets.create_model(alias), flaxnets.model_info(name).module)


def test_unknown_name_lists_close_matches():
    with pytest.raises(KeyError, match="resnet50") as err:
        flaxnets.create_model("resnet05")
    assert "list_models" in str(err.value)


def test_create_model_sets_classes_dtype_and_overrides():
    model = flaxnets.create_model("resnet18", num_classes=7, dtype=jnp.bfloat16, zero_init_residual=True)
    assert (model.num_classes, model.dtype, model.zero_init_residual) == (7, jnp.bfloat16, True)
    assert model.param_dtype == jnp.float32


def test_unknown_override_is_a_clear_error():
    with pytest.raises(TypeError, match=r"no option\(s\) \['depth'\].*valid options"):
        flaxnets.create_model("resnet18", depth=18)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register("r50", nn.Dense, family="x", input_size=1)


def test_registering_an_unknown_field_is_refused():
    with pytest.raises(ValueError, match="no field"):
        register("brand_new", nn.Dense, family="x", input_size=1, widths=3)
