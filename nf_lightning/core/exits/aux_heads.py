"""Auxiliary networks (eq. 2 of the paper) giving every unit but the last a local loss.

Filter policies (§3):

- ``"adaptive"`` (AAN): half the smallest unit width for the units before the first
  downsampling, half the largest unit width for the others, at most ``AUX_MAX_FILTERS``
  (256, the widest head of the paper's networks). A unit counts as
  *before the first downsampling* when its input still has the network input's
  resolution; the early units form a prefix. So a unit that ends with the first
  pool still gets the small head, as the paper treats the pool as following that
  layer: VGG-16 gets 32 filters for units 1-2 and 256 for the rest. Without the cap a
  ResNet-50 (2,048 channels) would get 1,024-filter heads, 5x the parameters of its units.
- ``"classic"``: the same number of filters everywhere (256 in classic local learning).
- ``"pooled"``: AAN's filters, but each head first averages its unit's output down to
  ``POOLED_SIZE`` x ``POOLED_SIZE`` where it is larger, so no head convolves more than that:
  cheaper heads on the early, high-resolution units, the same head where the output is that small.

Unit widths are the units' output channels, all units counted.

Example:
    >>> from torch import nn
    >>> units = [nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1),
    ...          nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)]
    >>> aux_widths(units), aux_widths(units, policy="classic"), aux_widths(units, policy="pooled")
    ([8, 8, 32], [256, 256, 256], [8, 8, 32])
    >>> [head[0].out_channels for head in build_aux_heads(units, num_classes=10)]
    [8, 8, 32]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from nf_lightning.core.network.decompose import Decomposition

POLICIES: tuple[str, ...] = ("adaptive", "classic", "pooled")
AUX_MAX_FILTERS = 256
"""The widest ``"adaptive"`` or ``"pooled"`` head (VGG-16's in the paper); ``max_filters=None`` below: no cap."""
POOLED_SIZE = 4
"""The ``"pooled"`` policy's head input: the unit's output averaged down to at most this height and width."""
CIFAR_SHAPE: tuple[int, int, int] = (3, 32, 32)


class AuxHead(nn.Sequential):
    """``[AvgPool(input_pool) ->] conv3x3 -> BN -> ReLU -> AdaptiveAvgPool2d(pool_size) -> flatten -> Linear``.

    The adaptive pool fixes the Linear's input at ``filters * pool_size**2``,
    whatever the unit's output resolution; ``input_pool`` (the ``"pooled"`` policy)
    averages the input down first, so the conv runs on that many positions.

    Example:
        >>> import torch
        >>> head = AuxHead(in_channels=64, filters=32, num_classes=10)
        >>> head(torch.randn(2, 64, 32, 32)).shape, head(torch.randn(2, 64, 3, 3)).shape
        (torch.Size([2, 10]), torch.Size([2, 10]))
        >>> AuxHead(64, 32, 10, input_pool=4)[0]
        AdaptiveAvgPool2d(output_size=4)
    """

    def __init__(
        self, in_channels: int, filters: int, num_classes: int, pool_size: int = 2, input_pool: int | None = None
    ) -> None:
        sizes = {"in_channels": in_channels, "filters": filters, "num_classes": num_classes, "pool_size": pool_size,
                 **({} if input_pool is None else {"input_pool": input_pool})}  # fmt: skip
        for name, value in sizes.items():
            _check_positive_int(name, value)
        super().__init__(
            *([] if input_pool is None else [nn.AdaptiveAvgPool2d(input_pool)]),
            nn.Conv2d(in_channels, filters, 3, padding=1, bias=False),
            nn.BatchNorm2d(filters),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(pool_size),
            nn.Flatten(1),
            nn.Linear(filters * pool_size**2, num_classes),
        )


def unit_shapes(
    units: Sequence[nn.Module], input_shape: Sequence[int] = CIFAR_SHAPE
) -> list[tuple[int, int, int]]:
    """Output shape ``(C, H, W)`` of each unit for one sample of ``input_shape``.

    Runs on meta tensors standing in for the parameters and buffers: no real compute,
    and the units (their device, BN statistics) are left untouched.

    Example:
        >>> from torch import nn
        >>> unit_shapes([nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2)])
        [(8, 32, 32), (8, 16, 16)]
    """
    if len(units) == 0:
        raise ValueError("need at least one unit")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    dtype = next((p.dtype for p in units[0].parameters()), torch.get_default_dtype())
    x = torch.empty(2, *input_shape, dtype=dtype, device="meta")  # 2: BatchNorm needs two values per channel
    shapes = []
    for index, unit in enumerate(units):
        tensors = {**dict(unit.named_parameters()), **dict(unit.named_buffers())}
        meta_tensors = {name: tensor.to("meta") for name, tensor in tensors.items()}
        try:
            x = functional_call(unit, meta_tensors, (x,))
        except RuntimeError as error:
            raise ValueError(f"unit {index} fails on an input of shape {tuple(x.shape[1:])}: {error}") from error
        if x.dim() != 4:
            raise ValueError(
                f"unit {index} outputs shape {tuple(x.shape[1:])}; auxiliary heads need (channels, height, width)"
            )
        shapes.append((x.shape[1], x.shape[2], x.shape[3]))
    return shapes


def aux_widths(
    units: Sequence[nn.Module],
    input_shape: Sequence[int] = CIFAR_SHAPE,
    policy: str = "adaptive",
    classic_filters: int = 256,
    max_filters: int | None = AUX_MAX_FILTERS,
) -> list[int]:
    """Filters of each auxiliary head (one per unit except the last) under ``policy``.

    See the module docstring for the policies and an example.
    """
    _check_policy(policy, classic_filters, max_filters)
    return _widths(unit_shapes(units, input_shape), input_shape, policy, classic_filters, max_filters)


def build_aux_heads(
    units: Sequence[nn.Module],
    num_classes: int,
    input_shape: Sequence[int] = CIFAR_SHAPE,
    policy: str = "adaptive",
    classic_filters: int = 256,
    max_filters: int | None = AUX_MAX_FILTERS,
) -> nn.ModuleList:
    """One :class:`AuxHead` per unit except the last, whose exit is the model's own head."""
    _check_policy(policy, classic_filters, max_filters)
    shapes = unit_shapes(units, input_shape)
    widths = _widths(shapes, input_shape, policy, classic_filters, max_filters)
    return nn.ModuleList(
        AuxHead(channels, filters, num_classes, input_pool=_input_pool(policy, height, width))
        for (channels, height, width), filters in zip(shapes[:-1], widths, strict=True)
    )


def _input_pool(policy: str, height: int, width: int) -> int | None:
    """The ``"pooled"`` policy's input pool for a unit output of ``height`` x ``width`` (None: none needed)."""
    return POOLED_SIZE if policy == "pooled" and max(height, width) > POOLED_SIZE else None


def _widths(
    shapes: list[tuple[int, int, int]],
    input_shape: Sequence[int],
    policy: str,
    classic_filters: int,
    max_filters: int | None,
) -> list[int]:
    num_heads = len(shapes) - 1
    if policy == "classic":
        return [classic_filters] * num_heads
    channels = [c for c, _, _ in shapes]
    small, large = max(1, min(channels) // 2), max(1, max(channels) // 2)
    full_resolution = tuple(input_shape[1:])
    head_input_resolutions = ([full_resolution] + [(h, w) for _, h, w in shapes])[:num_heads]
    widths = []
    early = True  # stays False from the first unit whose input is downsampled on
    for resolution in head_input_resolutions:
        early = early and resolution == full_resolution
        widths.append(small if early else large)
    return widths if max_filters is None else [min(width, max_filters) for width in widths]


def _check_policy(policy: str, classic_filters: int, max_filters: int | None = None) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown aux head policy {policy!r}; policies: {', '.join(POLICIES)}")
    _check_positive_int("classic_filters", classic_filters)
    if max_filters is not None:
        _check_positive_int("max_filters", max_filters)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def build_exits(
    decomposition: Decomposition,
    input_shape: Sequence[int],
    aux: str = "adaptive",
    max_filters: int | None = AUX_MAX_FILTERS,
) -> nn.ModuleList:
    """Every unit's classifier: an auxiliary head per unit but the last, then the model's own head.

    >>> from torch import nn
    >>> from nf_lightning.core.network.decompose import Decomposition
    >>> parts = Decomposition([nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)], nn.Sequential(nn.Flatten(), nn.Linear(64, 5)))
    >>> len(build_exits(parts, (3, 8, 8)))
    2
    """
    heads = build_aux_heads(
        decomposition.units, num_classes(decomposition.head), tuple(input_shape), policy=aux, max_filters=max_filters
    )
    return nn.ModuleList([*heads, decomposition.head])


def num_classes(head: nn.Module) -> int:
    """Output classes of a classifier head: its last Linear's outputs, or its last conv's (SqueezeNet's 1x1 classifier).

    >>> num_classes(nn.Sequential(nn.Dropout(), nn.Conv2d(8, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    5
    """
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError("the network's head has no nn.Linear or nn.Conv2d, so the number of classes is unknown")
    last = layers[-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels
