"""What a selection of neurons costs in bytes, and a selection that fits a budget in bytes.

A training step holds more than inference does: for the selected channels a
copy, a gradient and the optimizer's state; and the activations the backward
pass needs. With :mod:`~nf_lightning.neuron_budget.partial`'s layers those are
known from the shapes alone (:func:`trace_layers` records them on one sample):

- a conv with a selected channel keeps its input (a depthwise conv only the
  selected channels of it): the first neuron chosen in a layer pays for it;
- from the lowest layer with anything to update upwards (a selected conv, a
  trained BatchNorm, the Linear head), every ReLU keeps a boolean mask, every
  trained BatchNorm its input, a max-pool its input and indices, a Linear its
  input, and the backward pass holds the gradients of one layer's input and
  output at a time (the largest pair is counted);
- below that layer nothing is kept: the backward pass stops there.

:func:`fill_bytes` fills a byte budget in a given neuron order with those
marginal costs, skipping what does not fit (so it is not a prefix of the order);
``NeuronBytes.neuron_bytes`` shares each layer's cost among its channels (velocity per byte);
``NeuronBytes.selection_bytes`` prices any selection; ``NeuronBytes.peak_bytes``
simulates the step for its floor (add weights, buffers and batch).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> trace = trace_layers(net, torch.randn(1, 3, 8, 8))
    >>> costs = NeuronBytes(trace, [net[0], net[2]], batch=2, norm="always", state_tensors=1)
    >>> one = [torch.zeros(8, dtype=torch.bool), torch.tensor([True, False, False, False])]
    >>> costs.selection_bytes(one) == 9 * 12 + 2 * 512 * 4    # its row (copy, gradient, momentum), its input
    True
    >>> parse_bytes("2MB"), parse_bytes("512KiB")
    (2000000, 524288)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def parse_bytes(value: str | int) -> int:
    """``"2MB"``, ``"1.5 MiB"`` or a number of bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if match is None or match.group(2).upper() not in _UNITS:
        raise ValueError(f"a byte budget looks like '2MB', '512KiB' or 2000000, got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class Traced:
    """One leaf module's call: its position in the forward pass, its sizes per sample (elements), and which
    tensor it read (``source`` 0 is the model's input; modules reading the same tensor share a ``source``)."""

    module: nn.Module
    order: int
    in_numel: int
    out_numel: int
    source: int


def trace_layers(model: nn.Module, sample: Tensor) -> list[Traced]:
    """Every leaf module's first call on ``sample`` (one or more samples), in call order (eval mode, no grad)."""
    calls: list[Traced] = []
    sources: dict[int, int] = {sample.data_ptr(): 0}
    alive = [sample]  # no address is reused while the trace runs, so equal addresses are the same tensor
    seen: set[int] = set()

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if id(module) in seen or not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
            return
        seen.add(id(module))
        x, n = inputs[0], len(sample)
        source = sources.setdefault(x.data_ptr(), len(sources))
        alive.append(x)
        calls.append(Traced(module, len(calls), x.numel() // n, output.numel() // n, source))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    return calls


@dataclass(frozen=True)
class InferenceProfile:
    """An inference pass watched call by call: ``live[i]``, the bytes live beyond weights, buffers and the
    input right after call ``i`` (its working set, skip connections included); ``alive[i]``, the sources
    (:attr:`Traced.source`) still referenced then, by a later reader or by a caller's arguments alike."""

    live: list[int]
    alive: list[frozenset[int]]


def inference_profile(model: nn.Module, x: Tensor, trace: Sequence[Traced]) -> InferenceProfile:
    """:class:`InferenceProfile` of an eval-mode pass without gradients on ``x`` (tracked meter)."""
    import weakref

    from nf_lightning.core.memory.meter import TrackedMemoryMeter

    meter = TrackedMemoryMeter(x.device)
    meter.track(model, x)
    base = meter.current_bytes()
    live = [0] * len(trace)
    alive: list[frozenset[int]] = [frozenset()] * len(trace)
    refs: dict[int, weakref.ref] = {}
    noted: set[int] = set()

    def note(t: Traced, inputs: tuple) -> None:
        live[t.order] = max(live[t.order], meter.current_bytes() - base)
        if t.order in noted:  # the module's later calls: the trace has its first
            return
        noted.add(t.order)
        if inputs and isinstance(inputs[0], Tensor):
            refs.setdefault(t.source, weakref.ref(inputs[0]))
        alive[t.order] = frozenset(s for s, ref in refs.items() if ref() is not None)

    hooks = [t.module.register_forward_hook(lambda _m, inputs, _o, t=t: note(t, inputs)) for t in trace]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with meter, torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in flags:
            module.training = training
    return InferenceProfile(live, alive)


def state_tensors(optimizer: Optimizer) -> int:
    """Tensors of state per parameter the optimizer keeps (momentum: 1; Adam's moments: 2, +1 with amsgrad)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    group = inner.param_groups[0] if inner.param_groups else {}
    if isinstance(inner, torch.optim.SGD):
        return 1 if group.get("momentum", 0) else 0
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return 2 + int(bool(group.get("amsgrad", False)))
    return 2


class NeuronBytes:
    """Bytes of a selection over ``convs`` at ``batch``, from a :func:`trace_layers` of the model.

    ``norm``: ``"always"`` (every BatchNorm trains), ``"range"`` (those from the
    lowest updated conv up) or ``"frozen"`` (none: affine maps). ``state_tensors``:
    optimizer state per parameter (:func:`state_tensors`). ``stock=True`` prices stock
    PyTorch layers training in full: no copy of selected rows; an in-place ReLU keeps
    its output, the next conv's input; a ReLU6 keeps a float copy of it.

    :meth:`kept_bytes` is what a selection adds to inference (what a byte budget
    limits); :meth:`peak_bytes` simulates the step call by call (at each layer,
    what the layers so far keep plus the layer's working set: its input and
    output, or their gradients in the backward pass; or, with ``working``, what
    :func:`inference_profile` measured live there, a kept tensor inference still
    holds counted once) for the floor of its peak.
    """

    def __init__(self, trace: Sequence[Traced], convs: Sequence[nn.Conv2d], batch: int, norm: str,
                 state_tensors: int, element_size: int = 4, working: InferenceProfile | None = None,
                 stock: bool = False) -> None:
        self.trace, self.convs, self.batch, self.norm = list(trace), list(convs), int(batch), norm
        self.elem = element_size
        # the selected rows' copy (none for stock layers, whole convs as plain parameters), gradient and state
        self.stock = stock
        self.per_param = element_size * (1 + int(not stock) + state_tensors)
        calls = {id(t.module): t for t in self.trace}
        missing = [c for c in self.convs if id(c) not in calls]
        if missing:
            raise ValueError(f"{len(missing)} convs were not called in the traced forward pass")
        self.calls = [calls[id(c)] for c in self.convs]
        self._io = list(working.live) if working is not None else [
            (t.in_numel + t.out_numel) * self.batch * self.elem for t in self.trace]
        self._alive = working.alive if working is not None else None
        trained = [t.order for t in self.trace if isinstance(t.module, nn.Linear)
                   or (isinstance(t.module, _NORMS) and norm == "always")]
        self._base = min(trained, default=None)
        self._last_read: dict[int, int] = {}
        for t in self.trace:
            self._last_read[t.source] = t.order
        self._fixed = sum(p.numel() for t in self.trace if isinstance(t.module, nn.Linear)
                          for p in t.module.parameters()) * self.per_param  # the head always trains

    def peak_bytes(self, counts: Sequence[int], update_bytes: int = 0) -> int:
        """A training step's peak beyond weights and batch, with ``counts[i]`` selected channels in conv ``i``.

        At each call: its working set, plus what the calls so far keep that
        inference would have freed by then (a kept input still read later, or
        still held by inference as :func:`inference_profile` saw, is part of the
        working set already); the trained parameters' copies and
        state throughout, their gradients once the activations are given back,
        and ``update_bytes`` of the optimizer step's temporaries with them
        (:func:`nf_lightning.core.memory.enforcement.update_overhead` measures those).
        """
        kept = self._kept(counts)
        peak = 0
        for t, working in zip(self.trace, self._io):
            held = sum(new + (shared if self._freed(self.trace[u].source, t.order) else 0)
                       for u, (shared, new) in enumerate(kept[: t.order]))
            peak = max(peak, held + working)
        peak = max(peak, sum(shared + new for shared, new in kept))
        grads = self._params(counts) * self.elem // self.per_param  # from the backward pass to the next step
        return self._params(counts) - grads + max(peak, grads + update_bytes)

    def _freed(self, source: int, order: int) -> bool:
        """Whether inference no longer holds tensor ``source`` right after call ``order``."""
        if self._alive is not None:
            return source not in self._alive[order]
        return self._last_read[source] < order

    def kept_bytes(self, counts: Sequence[int]) -> int:
        """The step's bytes over inference: the activations kept for the backward pass and the trained
        parameters' copies, gradients and state. An upper bound (the kept activations are not all alive at
        inference's peak); exact when the step peaks at the end of the forward pass, as it does once they
        outweigh one layer's working set."""
        return sum(shared + new for shared, new in self._kept(counts)) + self._params(counts)

    def selection_bytes(self, masks: Sequence[Tensor]) -> int:
        """:meth:`kept_bytes` of per-conv boolean channel masks."""
        return self.kept_bytes([int(mask.sum()) for mask in masks])

    def neuron_bytes(self) -> Tensor:
        """Per neuron (flat over the convs), its layer's bytes trained alone and whole, shared by its channels:
        its row's share plus a share of the layer's kept input and of the layers the backward pass reaches.

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> costs = NeuronBytes(trace_layers(net, torch.randn(1, 3, 8, 8)), [net[0], net[2]], 2, "always", 1)
        >>> per = costs.neuron_bytes()   # a 3-channel input shared by 8 channels; an 8-channel one by 4
        >>> per.shape, per[0].item(), per[-1].item()
        (torch.Size([12]), 352.0, 1132.0)
        """
        none = self.kept_bytes([0] * len(self.convs))
        per_layer = []
        for i, conv in enumerate(self.convs):
            whole = [conv.out_channels if j == i else 0 for j in range(len(self.convs))]
            per_layer.append((self.kept_bytes(whole) - none) / conv.out_channels)
        sizes = torch.tensor([conv.out_channels for conv in self.convs])
        return torch.repeat_interleave(torch.tensor(per_layer, dtype=torch.float64), sizes)

    def _params(self, counts: Sequence[int]) -> int:
        return sum(k * _row_params(conv) for k, conv in zip(counts, self.convs)) * self.per_param + self._fixed

    def _reach(self, counts: Sequence[int]) -> int | None:
        orders = [call.order for call, k in zip(self.calls, counts) if k]
        if self._base is not None:
            orders.append(self._base)
        return min(orders, default=None)

    def _kept(self, counts: Sequence[int]) -> list[tuple[int, int]]:
        """Per call, the bytes it keeps for the backward pass: of its input (a tensor inference has too), and new."""
        kept = [(0, 0)] * len(self.trace)
        reach = self._reach(counts)
        if reach is None:
            return kept
        paid = {0}  # the model's input is live anyway
        for t in self.trace[reach:]:
            kept[t.order] = self._region_kept(t, counts, paid)
        return kept

    def _region_kept(self, t: Traced, counts: Sequence[int], paid: set[int]) -> tuple[int, int]:
        n, elem = self.batch, self.elem
        module, whole_input = t.module, t.in_numel * self.batch * self.elem
        if isinstance(module, nn.Conv2d):
            k = counts[self.convs.index(module)] if module in self.convs else module.out_channels
            if k == 0 or t.source in paid:
                return 0, 0
            if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
                return 0, whole_input * k // module.in_channels  # the selected channels, copied
            paid.add(t.source)
            return whole_input, 0
        if isinstance(module, (nn.ReLU, nn.ReLU6)) and self.stock:
            return 0, t.out_numel * n * elem if isinstance(module, nn.ReLU6) else 0
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            return 0, (t.out_numel * n + 7) // 8  # one bit per element
        if isinstance(module, nn.Dropout):
            return 0, t.out_numel * n  # a boolean mask
        if isinstance(module, _NORMS) and self.norm != "frozen":
            return whole_input, 0
        if isinstance(module, nn.MaxPool2d):
            return whole_input, t.out_numel * n * 8  # and the indices
        if isinstance(module, nn.Linear) and t.source not in paid:
            paid.add(t.source)
            return whole_input, 0
        return 0, 0


def _row_params(conv: nn.Conv2d) -> int:
    kh, kw = conv.kernel_size
    return conv.in_channels // conv.groups * kh * kw + (1 if conv.bias is not None else 0)


def fill_bytes(order: Tensor, costs: NeuronBytes, budget: int) -> list[Tensor]:
    """Neurons taken in ``order`` (flat indices over the convs) whenever their marginal bytes still fit.

    A layer's first neuron pays its kept input, a neuron below the lowest so far
    pays for the layers the backward pass now reaches; a neuron that does not
    fit is skipped, not the end of the fill. Returns per-conv masks.
    """
    sizes = [c.out_channels for c in costs.convs]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).tolist()
    masks = [torch.zeros(n, dtype=torch.bool) for n in sizes]
    counts = [0] * len(sizes)
    if costs.kept_bytes(counts) > budget:
        raise ValueError(f"a byte budget of {budget} cannot even hold what trains anyway, "
                         f"{costs.kept_bytes(counts)} bytes (the head and the norm layers)")
    for flat in order.tolist():
        i = layer_of[flat]
        counts[i] += 1
        cost = costs.kept_bytes(counts)
        if cost > budget:
            counts[i] -= 1
            continue
        masks[i][flat - starts[i]] = True
    return masks
