"""Model zoo: parameter counts against the paper's Table 2, width multiplier, errors."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

from nf_lightning import models
from nf_lightning.models import KNOWN_MODELS, VGG, create, mobilenetv2, resnet, scale_channels, vgg


def num_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def meta_count(name: str, width_mult: float = 1.0) -> int:
    with torch.device("meta"):
        return num_parameters(create(name, num_classes=10, width_mult=width_mult))


@pytest.mark.parametrize(("name", "millions"), [("vgg16", 14.7), ("vgg19", 20.0)])
def test_vgg_parameter_count_matches_table_2(name: str, millions: float) -> None:
    assert meta_count(name) == pytest.approx(millions * 1e6, rel=0.02)


def test_resnet18_parameter_count_matches_table_2() -> None:
    assert 11.0e6 <= meta_count("resnet18") <= 11.2e6


def test_vgg11_parameter_count() -> None:
    # Not in Table 2; the standard CIFAR VGG-11 with BN and one Linear has 9.23M.
    assert meta_count("vgg11") == pytest.approx(9.23e6, rel=0.02)


def test_mobilenetv2_has_torchvisions_parameter_count() -> None:
    # Same layer table as torchvision's MobileNetV2 (2.24M with 10 classes); only strides differ.
    with torch.device("meta"):
        reference = mobilenet_v2(num_classes=10)
    assert meta_count("mobilenetv2") == num_parameters(reference)


@pytest.mark.parametrize("name", KNOWN_MODELS)
def test_width_mult_reduces_parameters(name: str) -> None:
    full, half, quarter = (meta_count(name, width) for width in (1.0, 0.5, 0.25))
    assert quarter < half < 0.35 * full


@pytest.mark.parametrize("name", KNOWN_MODELS)
def test_channels_are_multiples_of_8_and_at_least_8(name: str) -> None:
    with torch.device("meta"):
        model = create(name, width_mult=0.01)
    widths = [module.out_channels for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert min(widths) == 8
    assert all(width % 8 == 0 for width in widths)


@pytest.mark.parametrize("name", KNOWN_MODELS)
def test_forward_gives_one_logit_per_class(name: str) -> None:
    model = create(name, num_classes=7, width_mult=0.125)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_scale_channels_rounds_to_multiples_of_8() -> None:
    assert scale_channels(64, 1.0) == 64
    assert scale_channels(64, 0.5) == 32
    assert scale_channels(64, 0.01) == 8
    assert scale_channels(100, 1.0) == 104  # nearest multiple of 8
    assert scale_channels(20, 1.0) == 24  # 16 would be more than 10% below 20


def test_unknown_model_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg13'") as error:
        create("vgg13")
    assert all(name in str(error.value) for name in KNOWN_MODELS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_classes": 0}, "num_classes"), ({"num_classes": 2.5}, "num_classes"), ({"width_mult": 0.0}, "width_mult")],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create("vgg11", **kwargs)


@pytest.mark.parametrize("config", [("M", 64), (64, 0), ()])
def test_bad_vgg_config_is_rejected(config: tuple) -> None:
    with pytest.raises(ValueError, match="VGG config"):
        VGG(config)


@pytest.mark.parametrize("module", [models, vgg, resnet, mobilenetv2], ids=lambda module: module.__name__)
def test_docstring_examples(module) -> None:
    assert doctest.testmod(module).failed == 0
