"""Auxiliary heads: the AAN and classic filter policies, meta-device shapes, head outputs."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from nf_lightning.core.exits import aux_heads
from nf_lightning.core.exits.aux_heads import AuxHead, aux_widths, build_aux_heads, unit_shapes
from nf_lightning.core.network.decompose import decompose
from nf_lightning.models import create


def meta_units(name: str) -> list[nn.Module]:
    with torch.device("meta"):
        return decompose(create(name)).units


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vgg11", [32] + [256] * 6),  # the first pool ends unit 1
        ("vgg16", [32] * 2 + [256] * 10),  # the paper's example: 64 // 2 early, 512 // 2 after
        ("vgg19", [32] * 2 + [256] * 13),
        ("resnet18", [32] * 3 + [256] * 4),  # unit 3 downsamples a full-resolution input
        ("mobilenetv2", [8] * 4 + [160] * 12),  # widths 16..320; unit 4 is the first stride 2
    ],
)
def test_adaptive_widths(name: str, expected: list[int]) -> None:
    assert aux_widths(meta_units(name)) == expected


def test_classic_widths_are_constant() -> None:
    units = meta_units("vgg16")
    assert aux_widths(units, policy="classic") == [256] * 12
    assert aux_widths(units, policy="classic", classic_filters=128) == [128] * 12


def test_unit_shapes_of_resnet18() -> None:
    assert unit_shapes(meta_units("resnet18")) == [
        (64, 32, 32), (64, 32, 32), (128, 16, 16), (128, 16, 16),
        (256, 8, 8), (256, 8, 8), (512, 4, 4), (512, 4, 4),
    ]  # fmt: skip


def test_unit_shapes_of_mobilenetv2() -> None:
    shapes = unit_shapes(meta_units("mobilenetv2"))
    assert shapes[0] == (16, 32, 32)
    assert [h for _, h, _ in shapes] == [32] * 3 + [16] * 3 + [8] * 7 + [4] * 4
    assert shapes[-1] == (320, 4, 4)


def test_unit_shapes_follow_the_input_shape() -> None:
    assert unit_shapes(meta_units("resnet18"), input_shape=(3, 64, 48))[-1] == (512, 8, 6)


def test_unit_shapes_follow_the_parameter_dtype() -> None:
    units = decompose(create("vgg11", width_mult=0.125).half()).units
    assert unit_shapes(units)[0] == (8, 16, 16)


def test_unit_shapes_leave_real_units_untouched() -> None:
    units = decompose(create("vgg11", width_mult=0.125)).units
    before = [{name: t.clone() for name, t in unit.state_dict().items()} for unit in units]
    unit_shapes(units)
    for unit, state in zip(units, before):
        for name, tensor in unit.state_dict().items():
            assert tensor.device.type == "cpu" and torch.equal(tensor, state[name]), name


def test_unit_shapes_reject_units_that_are_not_feature_maps() -> None:
    with pytest.raises(ValueError, match=r"unit 1 outputs shape \(8192,\)"):
        unit_shapes([nn.Conv2d(3, 8, 3, padding=1), nn.Flatten()])
    with pytest.raises(ValueError, match=r"unit 1 fails on an input of shape \(8, 32, 32\)"):
        unit_shapes([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 8, 3)])
    with pytest.raises(ValueError, match="input_shape"):
        unit_shapes([nn.Conv2d(3, 8, 3)], input_shape=(32, 32))


@pytest.mark.parametrize("resolution", [32, 5, 1])
def test_aux_head_gives_logits_at_any_resolution(resolution: int) -> None:
    head = AuxHead(in_channels=16, filters=8, num_classes=10, pool_size=2)
    assert head[-1].in_features == 8 * 2 * 2
    assert head(torch.randn(3, 16, resolution, resolution)).shape == (3, 10)


def test_aux_head_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="filters must be a positive integer"):
        AuxHead(in_channels=16, filters=0, num_classes=10)


def test_build_aux_heads_fits_every_unit_but_the_last() -> None:
    units = decompose(create("vgg11", width_mult=0.125)).units
    heads = build_aux_heads(units, num_classes=7)
    assert len(heads) == len(units) - 1
    assert [head[0].out_channels for head in heads] == aux_widths(units)
    x = torch.randn(2, 3, 32, 32)
    for unit, head in zip(units, heads):
        x = unit(x)
        assert head(x).shape == (2, 7)


def test_a_single_unit_gets_no_aux_head() -> None:
    units = [nn.Conv2d(3, 8, 3)]
    assert aux_widths(units) == [] and len(build_aux_heads(units, num_classes=10)) == 0


def test_unknown_policy_lists_policies() -> None:
    with pytest.raises(ValueError, match="unknown aux head policy 'fixed'; policies: adaptive, classic"):
        build_aux_heads(meta_units("vgg11"), num_classes=10, policy="fixed")
    with pytest.raises(ValueError, match="classic_filters"):
        aux_widths(meta_units("vgg11"), policy="classic", classic_filters=0)


def test_docstring_examples() -> None:
    assert doctest.testmod(aux_heads).failed == 0


def test_pooled_heads_convolve_at_most_4x4_with_the_adaptive_filters() -> None:
    torch.manual_seed(0)
    units = decompose(create("vgg11", width_mult=0.25)).units
    pooled, adaptive = build_aux_heads(units, 10, policy="pooled"), build_aux_heads(units, 10)
    assert aux_widths(units, policy="pooled") == aux_widths(units)
    seen: list[tuple[int, int]] = []
    hooks = [next(m for m in head if isinstance(m, nn.Conv2d)).register_forward_hook(
        lambda module, args, out: seen.append(tuple(args[0].shape[-2:]))) for head in pooled]  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    for unit, head, plain in zip(units, pooled, adaptive, strict=False):
        x = unit(x)
        assert head(x).shape == (2, 10)
        assert isinstance(head[0], nn.AdaptiveAvgPool2d) == (x.shape[-1] > 4)  # only where the output is larger
        assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in plain.parameters())
    for hook in hooks:
        hook.remove()
    assert seen == [(min(h, 4), min(w, 4)) for _, h, w in unit_shapes(units)[:-1]] and (4, 4) in seen
    assert seen[0] == (4, 4) and unit_shapes(units)[0][1:] == (16, 16)  # unit 0's head: 16x16 pooled to 4x4


def test_adaptive_heads_of_a_wide_network_are_capped_at_the_papers_widest() -> None:
    import torchvision

    with torch.device("meta"):
        units = decompose(torchvision.models.resnet50(num_classes=10)).units  # 256..2048 channels
    assert aux_widths(units, max_filters=None) == [128] + [1024] * 14  # AAN's rule as written
    assert aux_widths(units) == [128] + [256] * 14 == aux_widths(units, policy="pooled")
    assert aux_widths(units, max_filters=64) == [64] * 15
    assert aux_widths(units, policy="classic", max_filters=64) == [256] * 15  # classic heads are fixed
    with pytest.raises(ValueError, match="max_filters"):
        aux_widths(units, max_filters=0)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "256"])
def test_a_bad_aux_max_filters_is_refused(value: object) -> None:
    from nf_lightning.core.options import NeuroFluxOptions

    with pytest.raises(ValueError, match="aux_max_filters"):
        NeuroFluxOptions(aux_max_filters=value)


def test_neuroflux_trains_a_resnet50_where_bp_cannot_and_resumes_with_the_same_heads(tmp_path) -> None:
    import torchvision

    from nf_lightning.core.memory.budget import MemoryBudget
    from nf_lightning.core.options import NeuroFluxOptions
    from nf_lightning.core.plan.partitioner import BudgetTooSmall
    from nf_lightning.core.plan.training_plan import TrainingPlan
    from nf_lightning.core.train.run import BlockwiseRun
    from nf_lightning.lightning.backprop_batch import largest_backprop_batch

    def sgd(params):
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)

    net = torchvision.models.resnet50(num_classes=10)
    budget = MemoryBudget.parse("200MB").tensor_bytes
    assert largest_backprop_batch(net, (3, 32, 32), budget, batch_limit=8, optimizer_factory=sgd)[0] == 0
    parts = decompose(net)
    options = NeuroFluxOptions(batch_limit=8, cache=False)

    def recipe():
        return sgd(net.parameters()), []

    with pytest.raises(BudgetTooSmall):  # the paper's uncapped heads (1,024 filters) need more than BP does
        BlockwiseRun.create(parts, recipe, (3, 32, 32), budget, options.replace(aux_max_filters=None))
    run = BlockwiseRun.create(parts, recipe, (3, 32, 32), budget, options)
    assert run.plan.aux_max_filters == 256 and max(h[0].out_channels for h in run.exits[:-1]) == 256
    resumed = BlockwiseRun.from_state(parts, run.state_dict(), recipe, options)
    assert [h[0].out_channels for h in resumed.exits[:-1]] == [h[0].out_channels for h in run.exits[:-1]]
    saved_before_the_cap = {k: v for k, v in run.plan.to_dict().items() if k != "aux_max_filters"}
    assert TrainingPlan.from_dict(saved_before_the_cap).aux_max_filters is None  # rebuilt as it was built
