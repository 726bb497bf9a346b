"""decompose(): every supported form reproduces the model's output with the model's own modules."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn
from torchvision import models as tv
from torchvision.models.resnet import Bottleneck
from torchvision.models.vgg import make_layers

from nf_lightning.core.exits.aux_heads import num_classes
from nf_lightning.core.network import decompose as decompose_module
from nf_lightning.core.network.decompose import Decomposition, UndecomposableModelError, decompose
from nf_lightning.models import KNOWN_MODELS, create


def assert_reproduces(model: nn.Module, parts: Decomposition, input_size: int = 32) -> None:
    """Same output in eval mode, and every model parameter in exactly one part."""
    model.eval()
    x = torch.randn(2, 3, input_size, input_size)
    with torch.no_grad():
        assert torch.equal(parts.forward(x), model(x))
    part_parameters = [id(p) for part in [*parts.units, parts.head] for p in part.parameters()]
    assert sorted(part_parameters) == sorted(id(p) for p in model.parameters())


def small_torchvision_vgg() -> tv.VGG:
    """torchvision's VGG class with BN, small features and a small classifier (not 120M parameters)."""
    with torch.device("meta"):
        model = tv.VGG(nn.Sequential())
    model.features = make_layers([8, "M", 16, 16, "M"], batch_norm=True)
    model.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 3))
    return model


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())


ZOO_UNITS = {"vgg11": 8, "vgg16": 13, "vgg19": 16, "resnet18": 8, "mobilenetv2": 17}


@pytest.mark.parametrize("name", KNOWN_MODELS)
def test_zoo_models(name: str) -> None:
    model = create(name, num_classes=5, width_mult=0.125)
    parts = decompose(model)
    assert len(parts) == ZOO_UNITS[name]
    assert_reproduces(model, parts)


def test_zoo_vgg_units_are_its_feature_modules() -> None:
    model = create("vgg11", width_mult=0.125)
    parts = decompose(model)
    assert all(unit is feature for unit, feature in zip(parts.units, model.features, strict=True))
    assert parts.head is model.classifier


def test_zoo_resnet_merges_stem_into_first_unit() -> None:
    model = create("resnet18", width_mult=0.125)
    first = decompose(model).units[0]
    assert first[0] is model.stem and first[1] is model.stages[0][0]


def test_torchvision_vgg() -> None:
    model = small_torchvision_vgg()
    parts = decompose(model)
    assert [len(unit) for unit in parts.units] == [4, 3, 4]  # conv+BN+ReLU, the pool joins its unit
    assert_reproduces(model, parts)


@pytest.mark.parametrize(
    ("build", "num_units"),
    [
        (lambda: tv.resnet18(num_classes=3), 8),
        (lambda: tv.ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3), 4),
    ],
    ids=["resnet18", "bottleneck"],
)
def test_torchvision_resnet(build, num_units: int) -> None:
    model = build()
    parts = decompose(model)
    assert len(parts) == num_units
    assert parts.units[0][0][0] is model.conv1
    assert_reproduces(model, parts)


def test_torchvision_mobilenetv2() -> None:
    model = tv.mobilenet_v2(num_classes=3, width_mult=0.25)
    parts = decompose(model)
    assert len(parts) == 17
    assert parts.head[0] is model.features[-1]  # the final 1x1 conv belongs to the head
    assert_reproduces(model, parts)


def small_convnext() -> tv.ConvNeXt:
    from torchvision.models.convnext import CNBlockConfig

    return tv.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=3)


# torchvision family -> (a small instance, its units: blocks, or conv/Fire layers where it has no blocks)
TORCHVISION_FAMILIES = {
    "alexnet": (lambda: tv.alexnet(num_classes=3), 5),
    "squeezenet": (lambda: tv.squeezenet1_1(num_classes=3), 9),
    "mobilenet_v3": (lambda: tv.mobilenet_v3_small(num_classes=3), 11),
    "efficientnet": (lambda: tv.efficientnet_b0(num_classes=3), 16),
    "convnext": (small_convnext, 3),
    "mnasnet": (lambda: tv.mnasnet0_5(num_classes=3), 16),
    "regnet": (lambda: tv.regnet_x_400mf(num_classes=3), 22),
    "shufflenet_v2": (lambda: tv.shufflenet_v2_x0_5(num_classes=3), 16),
    "densenet": (lambda: tv.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=3), 2),
}


@pytest.mark.parametrize("family", TORCHVISION_FAMILIES)
def test_torchvision_families_split_into_their_blocks(family: str) -> None:
    build, num_units = TORCHVISION_FAMILIES[family]
    model = build()
    parts = decompose(model)
    assert len(parts) == num_units
    model.eval()
    x = torch.randn(2, 3, 64, 64)  # AlexNet needs more than 32 px
    with torch.no_grad():  # ShuffleNetV2 pools with x.mean([2, 3]) where its head has AdaptiveAvgPool2d
        torch.testing.assert_close(parts.forward(x), model(x), rtol=0, atol=1e-6)
    part_parameters = [id(p) for part in [*parts.units, parts.head] for p in part.parameters()]
    assert sorted(part_parameters) == sorted(id(p) for p in model.parameters())


def test_stems_and_downsampling_layers_lead_the_block_after_them() -> None:
    convnext = small_convnext()
    stem, stage1, downsampling, stage2 = convnext.features
    first, second, third = decompose(convnext).units
    assert list(first) == [stem, stage1[0]] and second is stage1[1] and list(third) == [downsampling, stage2[0]]
    densenet = tv.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=3)
    units = decompose(densenet).units
    assert list(units[1]) == [densenet.features.transition1, densenet.features.denseblock2]


def test_a_model_whose_classifier_alone_has_a_form_is_refused() -> None:
    """Its convolutions live in another child: decomposing the classifier would train an MLP on the image."""

    class FeaturesAndClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    with pytest.raises(UndecomposableModelError, match=r"only decomposable child is 'classifier'.*features\.0"):
        decompose(FeaturesAndClassifier())


def test_flat_sequential_groups_weightless_layers_with_the_unit_before() -> None:
    model = nn.Sequential(
        nn.BatchNorm2d(3),  # before any conv: joins the first unit
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(8, 4),
        nn.LogSoftmax(dim=1),
    )
    parts = decompose(model)
    assert [list(unit) if isinstance(unit, nn.Sequential) else [unit] for unit in parts.units] == [
        list(model[:4]),
        [model[4]],
    ]
    assert list(parts.head) == list(model[5:])
    assert_reproduces(model, parts)


def test_a_hidden_mlp_after_the_convs_is_the_head() -> None:
    """The usual hand-written CNN: its Linear layers form the classifier, none of them a unit of its own."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 3),
    )  # fmt: skip
    parts = decompose(model)
    assert [len(unit) for unit in parts.units] == [4, 3]
    assert list(parts.head) == list(model)[7:]
    assert_reproduces(model, parts)


def test_an_all_convolutional_sequential_has_its_last_conv_as_the_classifier() -> None:
    """Network-in-network style: a 1x1 conv gives the class scores, then a global pool and Flatten."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    parts = decompose(model)
    assert [len(unit) for unit in parts.units] == [4, 2]
    assert list(parts.head) == list(model)[6:] and num_classes(parts.head) == 5
    assert_reproduces(model, parts)
    with pytest.raises(UndecomposableModelError):  # convs without a Flatten: no classifier to find
        decompose(model[:-1])


def test_sequential_of_blocks_uses_its_children_as_units() -> None:
    model = nn.Sequential(
        conv_block(3, 8),
        conv_block(8, 16),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)),
    )
    parts = decompose(model)
    assert parts.units == [model[0], model[1]] and parts.head is model[2]
    assert_reproduces(model, parts)


def test_explicit_decomposition_is_returned_as_is() -> None:
    parts = Decomposition(units=[conv_block(3, 8)], head=nn.Sequential(nn.Flatten(), nn.Linear(8 * 32 * 32, 2)))
    assert decompose(parts) is parts


def test_explicit_list_is_units_then_head() -> None:
    units, head = [conv_block(3, 8), conv_block(8, 8)], nn.Sequential(nn.Flatten(), nn.Linear(8 * 32 * 32, 2))
    parts = decompose([*units, head])
    assert parts.units == units and parts.head is head
    assert_reproduces(nn.Sequential(*units, head), parts)


class SelfDescribing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_block(3, 8)
        self.out = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))

    def neuroflux_decomposition(self) -> Decomposition:
        return Decomposition(units=[self.body], head=self.out)


def test_model_method_gives_the_decomposition() -> None:
    model = SelfDescribing()
    assert_reproduces(model, decompose(model))


class Wrapper(nn.Module):
    """Like a LightningModule: the network plus modules that are not networks."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.loss = nn.CrossEntropyLoss()


@pytest.mark.parametrize(
    "build",
    [lambda: create("vgg11", num_classes=3, width_mult=0.125), small_torchvision_vgg, SelfDescribing],
    ids=["zoo", "torchvision", "method"],
)
def test_wrapper_decomposes_its_only_network(build) -> None:
    wrapper = Wrapper(build())
    assert_reproduces(wrapper.net, decompose(wrapper))


def test_sequential_holding_a_model_decomposes_the_model() -> None:
    model = nn.Sequential(create("vgg11", num_classes=3, width_mult=0.125))
    assert_reproduces(model, decompose(model))


def test_wrapper_with_two_networks_is_ambiguous() -> None:
    wrapper = Wrapper(create("vgg11", width_mult=0.125))
    wrapper.teacher = create("resnet18", width_mult=0.125)
    with pytest.raises(UndecomposableModelError, match=r"several decomposable children \(net, teacher\)"):
        decompose(wrapper)


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    "model",
    [Custom(), nn.Sequential(conv_block(3, 8), nn.AdaptiveAvgPool2d(1)), nn.Sequential(nn.Flatten(), nn.Linear(3, 2))],
    ids=["custom", "sequential-without-linear", "sequential-without-units"],
)
def test_undecomposable_model_error_names_forms_and_explicit_route(model: nn.Module) -> None:
    with pytest.raises(UndecomposableModelError) as error:
        decompose(model)
    message = str(error.value)
    assert type(model).__name__ in message
    for hint in ("neuroflux_decomposition", "torchvision", "nn.Sequential", "Decomposition(units=", "[unit_1"):
        assert hint in message
    assert isinstance(error.value, TypeError)


def test_non_module_is_undecomposable() -> None:
    with pytest.raises(UndecomposableModelError, match="cannot decompose a str"):
        decompose("vgg16")


def test_method_returning_something_else_is_a_type_error() -> None:
    model = SelfDescribing()
    model.neuroflux_decomposition = lambda: [model.body, model.out]
    with pytest.raises(TypeError, match=r"must return a Decomposition, got list"):
        decompose(model)


def test_bad_explicit_decompositions_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one unit"):
        Decomposition(units=[], head=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unit 1 must be an nn.Module"):
        Decomposition(units=[nn.ReLU(), "conv"], head=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="head must be an nn.Module"):
        Decomposition(units=[nn.ReLU()], head=None)
    with pytest.raises(ValueError, match=r"\[unit_1, \.\.\., unit_n, head\]"):
        decompose([nn.Linear(2, 2)])


def test_docstring_examples() -> None:
    assert doctest.testmod(decompose_module).failed == 0
