"""Layers that keep only what a selection of neurons needs for its backward pass.

Stock PyTorch saves a convolution's input whenever anything at or below it
needs a gradient, a training-mode BatchNorm saves its input, and a ReLU saves
its float output. Here a module's class is swapped in place (its identity, name
and ``state_dict`` keys stay) for one that saves less:

- :class:`PartialConv2d`: the selected output channels are a parameter of
  their own (``weight_selected``, ``bias_selected``); the full ``weight`` and
  ``bias`` become buffers, kept equal to the selected rows after each optimizer
  step by :class:`~nf_lightning.neuron_budget.trainable.SelectiveTraining`.
  Its autograd function computes the weight gradient of the selected channels
  only (``torch.nn.grad.conv2d_weight`` on the selected channels of the output
  gradient) and saves the input only if some channel is selected (only the
  selected input channels of a depthwise convolution); a conv with no selected
  channel keeps only a reference to its weight, to pass gradients down.
- :class:`AffineBatchNorm2d`: a frozen BatchNorm is the affine map of its
  running statistics (``x * scale + shift``, as TinyTL and Lin et al. fold it);
  its backward needs only ``scale``.
- :class:`MaskReLU` / :class:`MaskReLU6`: the backward keeps one bit per
  element (:func:`pack_bits`), a 32nd of the float output.

Example:
    >>> import torch
    >>> conv = torch.nn.Conv2d(2, 4, 3)
    >>> _ = make_partial(conv, torch.tensor([1, 3]))   # returns the parameters it replaced
    >>> [name for name, _ in conv.named_parameters()], sorted(conv.state_dict())
    (['weight_selected', 'bias_selected'], ['bias', 'weight'])
    >>> conv(torch.randn(1, 2, 5, 5)).sum().backward()
    >>> conv.weight_selected.grad.shape
    torch.Size([2, 2, 3, 3])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight

ROW_PARAMS = ("weight", "bias")


# ---------------------------------------------------------------- convolution
class _PartialConvFunction(torch.autograd.Function):
    """``conv2d(x, conv.weight)`` whose weight gradient covers ``conv.selected_rows`` only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight_selected: Tensor, bias_selected: Tensor | None, conv: PartialConv2d) -> Tensor:
        rows = conv.selected_rows
        ctx.conv, ctx.rows, ctx.input_shape, ctx.weight = conv, rows, x.shape, conv.weight
        ctx.has_bias = bias_selected is not None
        if weight_selected.requires_grad:
            ctx.save_for_backward(x.index_select(1, rows) if _depthwise(conv) else x)
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        conv, rows = ctx.conv, ctx.rows
        args = (conv.stride, conv.padding, conv.dilation)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input(ctx.input_shape, ctx.weight, grad_out, *args, conv.groups)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_sel = grad_out.index_select(1, rows)
            if ctx.needs_input_grad[1]:
                grad_w = _weight_grad(conv, ctx.saved_tensors[0], grad_sel, grad_out, rows, args)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_sel.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _weight_grad(conv: nn.Conv2d, saved: Tensor, grad_sel: Tensor, grad_out: Tensor, rows: Tensor, args: tuple) -> Tensor:
    """The weight gradient of the selected output channels."""
    kernel = conv.weight.shape[1:]
    if conv.groups == 1:
        return conv2d_weight(saved, (len(rows), *kernel), grad_sel, *args, 1)
    if _depthwise(conv):
        return conv2d_weight(saved, (len(rows), *kernel), grad_sel, *args, len(rows))
    return conv2d_weight(saved, conv.weight.shape, grad_out, *args, conv.groups).index_select(0, rows)


class PartialConv2d(nn.Conv2d):
    """A ``Conv2d`` whose ``selected_rows`` train; made by :func:`make_partial`, undone by :func:`make_whole`."""

    selected_rows: Tensor
    weight_selected: nn.Parameter
    bias_selected: nn.Parameter | None

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight_selected.requires_grad)):
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return _PartialConvFunction.apply(x, self.weight_selected, self.bias_selected, self)

    def sync_rows(self) -> None:
        """Write the selected parameters into the full weight (and bias) buffers."""
        with torch.no_grad():
            for name in ROW_PARAMS:
                selected = getattr(self, f"{name}_selected")
                if selected is not None and len(self.selected_rows):
                    getattr(self, name).index_copy_(0, self.selected_rows, selected)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ROW_PARAMS:
            destination.pop(f"{prefix}{name}_selected", None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for name in ROW_PARAMS:
            if f"{prefix}{name}" in state_dict and getattr(self, f"{name}_selected") is not None:
                state_dict[f"{prefix}{name}_selected"] = state_dict[f"{prefix}{name}"].index_select(
                    0, self.selected_rows.to(state_dict[f"{prefix}{name}"].device))
        super()._load_from_state_dict(state_dict, prefix, *args)


def make_partial(conv: nn.Conv2d, rows: Tensor) -> dict[str, nn.Parameter]:
    """Make ``conv`` train only output channels ``rows`` (sorted indices; may be empty or all).

    Returns the parameters it had before (the originals for a plain conv, the
    previous selection's for a partial one), by name, for the optimizer swap.
    """
    if type(conv) not in (nn.Conv2d, PartialConv2d) or conv.padding_mode != "zeros":
        raise TypeError(f"only plain nn.Conv2d with zero padding can be partly trained, got {conv!r}")
    rows = torch.as_tensor(rows, dtype=torch.int64, device=conv.weight.device).sort().values
    previous = {}
    if type(conv) is nn.Conv2d:
        previous = {name: p for name in ROW_PARAMS if (p := conv._parameters.get(name)) is not None}
        conv.nb_originals = dict(previous)  # restored by make_whole; their storage is the buffers'
        for name, param in previous.items():
            del conv._parameters[name]
            conv.register_buffer(name, param.detach())
        conv.__class__ = PartialConv2d
    else:
        previous = {name: p for name in ROW_PARAMS if (p := conv._parameters.get(f"{name}_selected")) is not None}
    conv.register_buffer("selected_rows", rows, persistent=False)
    for name in ROW_PARAMS:
        full = conv._buffers.get(name)
        selected = None if full is None else nn.Parameter(full.index_select(0, rows), requires_grad=len(rows) > 0)
        conv.register_parameter(f"{name}_selected", selected)
    return previous


def make_whole(conv: PartialConv2d) -> dict[str, nn.Parameter]:
    """Undo :func:`make_partial`: a plain ``Conv2d`` with its original parameters (holding the trained values).

    Returns the selected parameters it had, by name.
    """
    conv.sync_rows()
    selected = {name: p for name in ROW_PARAMS if (p := conv._parameters.pop(f"{name}_selected", None)) is not None}
    del conv._buffers["selected_rows"]
    for name, original in conv.nb_originals.items():
        del conv._buffers[name]
        conv._parameters[name] = original
    del conv.nb_originals
    conv.__class__ = nn.Conv2d
    return selected


# ---------------------------------------------------------------- batch norm and activations
class AffineBatchNorm2d(nn.BatchNorm2d):
    """A frozen ``BatchNorm2d``: ``x * scale + shift`` from its running statistics, in train and eval mode alike."""

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return torch.addcmul(shift.detach().view(shape), x, scale.detach().view(shape))


_BITS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as one bit per element (``uint8``, padded to a multiple of 8).

    >>> mask = torch.tensor([True, False, True, True, False, False, False, False, True])
    >>> pack_bits(mask).tolist(), torch.equal(unpack_bits(pack_bits(mask), mask.shape), mask)
    ([13, 1], True)
    """
    flat = mask.flatten()
    pad = -len(flat) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)
    return packed.unsqueeze(1).bitwise_and(bits).ne(0).flatten()[: shape.numel()].view(shape)


class _MaskClamp(torch.autograd.Function):
    """``clamp(x, 0, top)`` that saves where the gradient passes, one bit per element."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, top: float | None, inplace: bool) -> Tensor:
        out = x.clamp_(0, top) if inplace else x.clamp(0, top)
        if inplace:
            ctx.mark_dirty(x)
        mask = out > 0 if top is None else (out > 0) & (out < top)
        ctx.shape = out.shape
        ctx.save_for_backward(pack_bits(mask))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (packed,) = ctx.saved_tensors
        return grad_out * unpack_bits(packed, ctx.shape), None, None


class MaskReLU(nn.ReLU):
    """``nn.ReLU`` whose backward keeps one bit per element."""

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _MaskClamp.apply(x, None, self.inplace)


class MaskReLU6(nn.ReLU6):
    """``nn.ReLU6`` whose backward keeps one bit per element."""

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _MaskClamp.apply(x, 6.0, self.inplace)


SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.ReLU: MaskReLU, nn.ReLU6: MaskReLU6}


def swap_class(module: nn.Module, new: type[nn.Module]) -> type[nn.Module]:
    """Give ``module`` class ``new`` (a subclass of its own, adding no state); returns the old class."""
    old = type(module)
    module.__class__ = new
    return old
