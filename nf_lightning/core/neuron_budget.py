"""Budgeted neuron updates (arXiv 2312.05282), free of Lightning.

Fine-tune a network by updating only a budgeted subset of its *neurons*, the
output channels of its ``Conv2d`` layers, chosen statically (Sparse Update) or
anew every epoch (Velocity, random). This module holds the pieces; the
Lightning callback :class:`nf_lightning.lightning.neuron_budget.NeuronUpdateBudget`
puts them together.

- **Neurons and costs.** A neuron is one output channel of a ``Conv2d``; its
  cost is its parameter count, ``in_channels / groups * kh * kw`` (+1 with a
  bias). BatchNorm and classifiers are not neurons: they are always updated and
  not counted. The budget is a number of conv parameters, usually a fraction of
  all of them (:func:`budget_params`).
- **Filling a budget** (:func:`fill_budget`): neurons are taken in a given
  order, each added while the running total stays within the budget; the first
  neuron that would exceed it ends the fill (as the public reference code does),
  so the budget is never exceeded and the selection is a prefix of the order.
- **Velocity** (NEq, Bragagnolo et al.; :class:`VelocityTracker`): on a fixed
  probe set, every neuron's output is recorded after each epoch. ``phi_t`` is
  the mean over samples of the cosine similarity (over spatial positions)
  between this epoch's and the previous epoch's output of the channel,
  ``delta_t = phi_t - phi_(t-1)`` and the velocity ``v_t = delta_t - mu * v_(t-1)``
  (:func:`velocity_step`). Neurons are ranked by ``|v| / cost``
  (:func:`velocity_order`) and the budget is filled in that order.
- **Random**: a fresh permutation per epoch (:func:`random_order`), filled to the same budget.
- **Sparse Update** (Lin et al.; :func:`parse_sparse_update`,
  :func:`sparse_update_masks`): a static scheme, layer indices and the fraction
  of each layer's channels to update, the channels with the largest weight norm;
  :func:`auto_sparse_update` builds a top-down scheme that fills a budget.
- **Exact freezing** (:class:`ExactFreezer`): frozen rows are *restored* after
  every optimizer step, weights and optimizer state alike, so momentum and
  weight decay cannot move them; a layer frozen entirely gets
  ``requires_grad=False``, so it has no gradient and no optimizer state, and
  the backward pass stops below the lowest layer that still needs one.

The velocity recursion
----------------------
The papers (NEq and the budgeted version) write ``v_t = delta_t - mu * v_(t-1)``.
The public code of the budgeted version computes, per epoch, ``u_t = V + delta_t``
and then stores ``V = mu * u_t - delta_t``, which unrolls to
``u_t = delta_t - delta_(t-1) + mu * u_(t-1)``: a momentum-filtered *second*
difference. The two agree on the first two velocities when ``mu = 0.5`` and
differ from the third on. We use the papers' recursion (``recursion="paper"``),
because it is the method as published and the public code's form is an
algebraic slip of the same intent; ``recursion="public_code"`` reproduces the
code for comparison. Both start from ``phi_0 = 1`` (the outputs before training
are identical to themselves: the code's ``delta_buffer = 0``) and ``v_0 = 0``, so
a velocity exists after the first epoch and only that epoch needs another policy.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 1, bias=False))
    >>> layers = conv_neurons(net.named_modules())
    >>> [(layer.name, layer.out_channels, layer.cost) for layer in layers]
    [('0', 4, 28), ('1', 8, 4)]
    >>> costs = neuron_costs(layers)
    >>> budget = budget_params(layers, 0.5)            # half of 4*28 + 8*4 = 144 parameters
    >>> selected = fill_budget(torch.arange(12), costs, budget)
    >>> budget, int(costs[selected].sum()), selected.int().tolist()
    (72, 56, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

POLICIES = ("velocity", "random", "sparse_update", "full")
FIRST_EPOCH_POLICIES = ("sparse_update", "random", "full")
RECURSIONS = ("paper", "public_code")
NORM_POLICIES = ("always", "range")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


# ---------------------------------------------------------------- neurons and costs
@dataclass(frozen=True)
class ConvNeurons:
    """The neurons (output channels) of one ``Conv2d``, named as in its model."""

    name: str
    module: nn.Conv2d

    @property
    def out_channels(self) -> int:
        return self.module.out_channels

    @property
    def cost(self) -> int:
        """Parameters of one neuron: its filter (``in_channels / groups * kh * kw``) and its bias."""
        return neuron_cost(self.module)

    @property
    def params(self) -> int:
        return self.out_channels * self.cost

    def parameters(self) -> list[nn.Parameter]:
        """The weight, then the bias if any: tensors whose rows (dim 0) are the neurons."""
        return [p for p in (self.module.weight, self.module.bias) if p is not None]


def neuron_cost(conv: nn.Conv2d) -> int:
    """Parameters of one output channel of ``conv``.

    >>> neuron_cost(nn.Conv2d(16, 32, 3)), neuron_cost(nn.Conv2d(16, 16, 3, groups=16, bias=False))
    (145, 9)
    """
    kh, kw = conv.kernel_size
    return conv.in_channels // conv.groups * kh * kw + (1 if conv.bias is not None else 0)


def conv_neurons(named_modules: Iterable[tuple[str, nn.Module]]) -> list[ConvNeurons]:
    """Every ``Conv2d`` among ``named_modules``, in the order given (each module once)."""
    seen: set[int] = set()
    layers = []
    for name, module in named_modules:
        if isinstance(module, nn.Conv2d) and id(module) not in seen:
            seen.add(id(module))
            layers.append(ConvNeurons(name, module))
    return layers


def neuron_costs(layers: Sequence[ConvNeurons]) -> Tensor:
    """The cost of every neuron, layer after layer (int64)."""
    if not layers:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.full((layer.out_channels,), layer.cost, dtype=torch.int64) for layer in layers])


def budget_params(layers: Sequence[ConvNeurons], budget: float) -> int:
    """``budget`` (a fraction in [0, 1]) of all conv parameters of ``layers``, rounded down."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget is a fraction of the conv parameters in [0, 1], got {budget}")
    return math.floor(budget * sum(layer.params for layer in layers) + 1e-9)


def split_by_layer(flat: Tensor, layers: Sequence[ConvNeurons]) -> list[Tensor]:
    """A per-neuron vector cut into one piece per layer."""
    return list(flat.split([layer.out_channels for layer in layers]))


# ---------------------------------------------------------------- filling a budget
def fill_budget(order: Tensor, costs: Tensor, budget: int) -> Tensor:
    """Neurons taken in ``order`` while their total cost stays within ``budget``.

    The fill stops at the first neuron that does not fit (as the public code
    does), so the selection is a prefix of ``order`` and never over budget.
    Returns a boolean mask over all neurons.

    >>> fill_budget(torch.tensor([2, 0, 1]), torch.tensor([5, 3, 4]), 8).tolist()  # 4, then 4 + 5 > 8: stop
    [False, False, True]
    """
    order = torch.as_tensor(order, dtype=torch.int64)
    costs = torch.as_tensor(costs, dtype=torch.int64)
    if budget < 0:
        raise ValueError(f"budget must be >= 0 parameters, got {budget}")
    if sorted(order.tolist()) != list(range(len(costs))):
        raise ValueError("order must be a permutation of the neurons")
    selected = torch.zeros(len(costs), dtype=torch.bool)
    taken = int((costs[order].cumsum(0) <= budget).sum()) if len(costs) else 0
    selected[order[:taken]] = True
    return selected


def velocity_order(velocity: Tensor, costs: Tensor) -> Tensor:
    """Neurons by decreasing ``|velocity| / cost``; ties keep the neurons' own order.

    >>> velocity_order(torch.tensor([0.1, -0.4, 0.2]), torch.tensor([1, 2, 1])).tolist()  # 0.1, 0.2, 0.2
    [1, 2, 0]
    """
    score = velocity.abs().double() / costs.double()
    return torch.sort(-score, stable=True).indices


def random_order(num_neurons: int, generator: torch.Generator) -> Tensor:
    """A fresh random permutation of the neurons (their sizes travel with them)."""
    return torch.randperm(num_neurons, generator=generator)


# ---------------------------------------------------------------- sparse update
def parse_sparse_update(config: Any, num_layers: int) -> dict[int, float]:
    """A Sparse Update scheme as ``{layer index: fraction of its channels}``.

    ``config`` is ``{"layers": [...], "ratios": [...]}`` (one ratio, or one per
    layer), a mapping ``{index: ratio}`` (keys may be strings, as YAML and Hydra
    give them) or a list of ``[index, ratio]`` pairs. Indices count the model's
    convs in order (negative ones from the last); ratios lie in [0, 1].

    >>> parse_sparse_update({"layers": [-1, -2], "ratios": [1.0, 0.5]}, num_layers=5)
    {4: 1.0, 3: 0.5}
    >>> parse_sparse_update({"-1": 0.25, "0": 1}, num_layers=5)
    {4: 0.25, 0: 1.0}
    """
    if hasattr(config, "items") and set(config) == {"layers", "ratios"}:
        layers, ratios = list(config["layers"]), config["ratios"]
        ratios = [ratios] * len(layers) if isinstance(ratios, (int, float)) else list(ratios)
        if len(layers) != len(ratios):
            raise ValueError(f"sparse update: {len(layers)} layers but {len(ratios)} ratios")
        pairs = list(zip(layers, ratios))
    elif hasattr(config, "items"):
        pairs = list(config.items())
    elif isinstance(config, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in config):
        pairs = [tuple(p) for p in config]
    else:
        raise ValueError(
            "a sparse update scheme is {'layers': [...], 'ratios': [...]}, {index: ratio} or [[index, ratio], ...]; "
            f"got {config!r}"
        )
    scheme: dict[int, float] = {}
    for raw_index, raw_ratio in pairs:
        try:
            index, ratio = int(raw_index), float(raw_ratio)
        except (TypeError, ValueError):
            raise ValueError(f"sparse update: bad entry {raw_index!r}: {raw_ratio!r}") from None
        if not -num_layers <= index < num_layers:
            raise ValueError(f"sparse update: layer {index} does not exist (the model has {num_layers} convs)")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sparse update: the ratio of layer {index} must lie in [0, 1], got {ratio}")
        index %= num_layers
        if index in scheme:
            raise ValueError(f"sparse update: layer {index} is given twice")
        scheme[index] = ratio
    return scheme


def channels_for(ratio: float, out_channels: int) -> int:
    """Channels a ratio stands for: ``ratio * out_channels`` rounded half up.

    >>> channels_for(0.5, 3), channels_for(0.1, 8), channels_for(1.0, 8)
    (2, 1, 8)
    """
    return min(out_channels, math.floor(ratio * out_channels + 0.5))


def sparse_update_masks(layers: Sequence[ConvNeurons], scheme: Mapping[int, float]) -> list[Tensor]:
    """Per layer, which channels the scheme updates: those with the largest filter norm (ties: lower index)."""
    masks = [torch.zeros(layer.out_channels, dtype=torch.bool) for layer in layers]
    for index, ratio in scheme.items():
        layer = layers[index]
        k = channels_for(ratio, layer.out_channels)
        if k == 0:
            continue
        norms = layer.module.weight.detach().float().flatten(1).norm(dim=1).cpu()
        top = torch.sort(-norms, stable=True).indices[:k]
        masks[index][top] = True
    return masks


def auto_sparse_update(layers: Sequence[ConvNeurons], budget: int) -> dict[int, float]:
    """A top-down Sparse Update scheme filling ``budget``: whole layers from the last one down,
    then the largest fraction of the next layer that still fits.

    Lin et al. search their scheme per model; this is the simple static rule we
    use where no scheme is given (the layers nearest the classifier first).

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 1))
    >>> auto_sparse_update(conv_neurons(net.named_modules()), 40 + 56)   # layer 1 costs 40, layer 0 4x28
    {1: 1.0, 0: 0.5}
    """
    scheme: dict[int, float] = {}
    left = budget
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        if layer.params <= left:
            scheme[index] = 1.0
            left -= layer.params
            continue
        k = left // layer.cost
        if k > 0:
            scheme[index] = k / layer.out_channels
        break
    return scheme


def masks_params(layers: Sequence[ConvNeurons], masks: Sequence[Tensor]) -> int:
    """Conv parameters the masks update."""
    return sum(int(mask.sum()) * layer.cost for layer, mask in zip(layers, masks))


# ---------------------------------------------------------------- velocity
def channel_cosine(previous: Tensor, current: Tensor) -> Tensor:
    """Per sample and channel, the cosine similarity of two ``(N, C, L)`` outputs over the ``L`` positions.

    As in the public code, two all-zero vectors count as identical (1) and one
    all-zero vector against a non-zero one as orthogonal (0).

    >>> channel_cosine(torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]), torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]]))
    tensor([[0.7071],
            [1.0000]])
    """
    previous, current = previous.float(), current.float()
    dot = (previous * current).sum(-1)
    norms = previous.norm(dim=-1) * current.norm(dim=-1)
    cosine = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
    both_zero = (previous.abs().sum(-1) == 0) & (current.abs().sum(-1) == 0)
    return torch.where(both_zero, torch.ones_like(cosine), cosine)


def velocity_step(
    phi: Tensor, phi_prev: Tensor, velocity_prev: Tensor, delta_prev: Tensor, mu: float, recursion: str = "paper"
) -> tuple[Tensor, Tensor]:
    """One epoch of the velocity recursion; returns ``(delta_t, v_t)``.

    ``paper``: ``v_t = delta_t - mu * v_(t-1)``; ``public_code``:
    ``v_t = delta_t - delta_(t-1) + mu * v_(t-1)`` (see the module docstring).

    >>> one = torch.tensor([1.0])
    >>> velocity_step(torch.tensor([0.9]), one, torch.tensor([0.0]), torch.tensor([0.0]), 0.5)
    (tensor([-0.1000]), tensor([-0.1000]))
    """
    if recursion not in RECURSIONS:
        raise ValueError(f"recursion must be one of {RECURSIONS}, got {recursion!r}")
    delta = phi - phi_prev
    if recursion == "paper":
        return delta, delta - mu * velocity_prev
    return delta, delta - delta_prev + mu * velocity_prev


class VelocityTracker:
    """Every neuron's velocity from its outputs on a fixed probe set, one pass per epoch.

    Per pass, call :meth:`begin_pass`, :meth:`observe` with each layer's output
    of every probe batch (in the same order each pass), then :meth:`end_pass`.
    The first pass only records; each later one yields ``phi``, ``delta`` and the
    velocity of every neuron (:attr:`velocity`). The previous pass's outputs are
    kept on the CPU in ``dtype`` (float32 by default, float16 to halve them):
    :attr:`nbytes` of host memory, nothing on the training device.

    Args:
        names: the layers followed.
        mu: the velocity's momentum (0.5 in the papers).
        recursion: ``"paper"`` or ``"public_code"`` (see :func:`velocity_step`).
        dtype: storage type of the recorded outputs.

    Example:
        >>> tracker = VelocityTracker(["conv"], mu=0.5)
        >>> for scale in (1.0, 2.0):                          # the same direction, so phi = 1
        ...     tracker.begin_pass()
        ...     tracker.observe("conv", scale * torch.ones(2, 3, 4, 4))
        ...     tracker.end_pass()
        >>> tracker.passes, tracker.phi["conv"].tolist(), tracker.velocity["conv"].tolist()
        (2, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    """

    def __init__(
        self, names: Sequence[str], mu: float = 0.5, recursion: str = "paper", dtype: torch.dtype = torch.float32
    ) -> None:
        if recursion not in RECURSIONS:
            raise ValueError(f"recursion must be one of {RECURSIONS}, got {recursion!r}")
        self.names = list(names)
        self.mu = float(mu)
        self.recursion = recursion
        self.dtype = dtype
        self.passes = 0
        self.outputs: dict[str, Tensor] = {}
        self.phi: dict[str, Tensor] = {}
        self.delta: dict[str, Tensor] = {}
        self.velocity: dict[str, Tensor] = {}
        self._pending: dict[str, list[Tensor]] = {}
        self._sums: dict[str, Tensor] = {}
        self._offsets: dict[str, int] = {}
        self._open = False

    @property
    def ready(self) -> bool:
        """Whether a velocity exists (after the second pass)."""
        return self.passes >= 2

    @property
    def nbytes(self) -> int:
        """Host memory of the recorded outputs."""
        return sum(t.numel() * t.element_size() for t in self.outputs.values())

    def begin_pass(self) -> None:
        self._open = True
        self._pending = {name: [] for name in self.names}
        self._sums = {}
        self._offsets = dict.fromkeys(self.names, 0)

    def observe(self, name: str, output: Tensor) -> None:
        """One probe batch's output ``(B, C, ...)`` of layer ``name``."""
        if not self._open:
            raise RuntimeError("call begin_pass() before observe()")
        current = output.detach().flatten(2).to("cpu", self.dtype)
        previous = self.outputs.get(name)
        if previous is None:
            self._pending[name].append(current)
            return
        start = self._offsets[name]
        stop = start + len(current)
        if stop > len(previous) or previous.shape[1:] != current.shape[1:]:
            raise ValueError(f"layer {name}: the probe pass differs from the recorded one (same batches each pass)")
        cosine = channel_cosine(previous[start:stop], current).double().sum(0)
        self._sums[name] = self._sums[name] + cosine if name in self._sums else cosine
        previous[start:stop] = current
        self._offsets[name] = stop

    def end_pass(self) -> None:
        """Close the pass: record the outputs, update ``phi``, ``delta`` and the velocity."""
        if not self._open:
            raise RuntimeError("end_pass() without begin_pass()")
        self._open = False
        if self.passes == 0:
            for name in self.names:
                if not self._pending[name]:
                    raise ValueError(f"layer {name} gave no output in the probe pass")
                self.outputs[name] = torch.cat(self._pending[name])
            self._pending = {}
            self.passes = 1
            return
        for name in self.names:
            samples = self._offsets[name]
            if samples != len(self.outputs[name]):
                raise ValueError(f"layer {name}: {samples} probe samples this pass, {len(self.outputs[name])} before")
            phi = (self._sums[name] / samples).float()
            ones, zeros = torch.ones_like(phi), torch.zeros_like(phi)
            delta, velocity = velocity_step(
                phi,
                self.phi.get(name, ones),
                self.velocity.get(name, zeros),
                self.delta.get(name, zeros),
                self.mu,
                self.recursion,
            )
            self.phi[name], self.delta[name], self.velocity[name] = phi, delta, velocity
        self.passes += 1

    def flat_velocity(self, names: Sequence[str] | None = None) -> Tensor:
        """The velocities of ``names`` (all layers by default), concatenated in that order."""
        return torch.cat([self.velocity[name] for name in (names or self.names)])

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "mu": self.mu,
            "recursion": self.recursion,
            "dtype": str(self.dtype).removeprefix("torch."),
            "passes": self.passes,
            "outputs": {k: v.clone() for k, v in self.outputs.items()},
            "phi": dict(self.phi),
            "delta": dict(self.delta),
            "velocity": dict(self.velocity),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> VelocityTracker:
        tracker = cls(state["names"], state["mu"], state["recursion"], getattr(torch, state["dtype"]))
        tracker.passes = int(state["passes"])
        tracker.outputs = {k: v.clone() for k, v in state["outputs"].items()}
        tracker.phi, tracker.delta, tracker.velocity = dict(state["phi"]), dict(state["delta"]), dict(state["velocity"])
        return tracker


# ---------------------------------------------------------------- exact freezing
def norm_params_below(named_modules: Iterable[tuple[str, nn.Module]], lowest: str | None) -> list[nn.Parameter]:
    """Parameters of the normalization layers that come before the module named ``lowest``
    (all of them if ``lowest`` is None): what ``norm="range"`` freezes so the backward stops there."""
    params: list[nn.Parameter] = []
    for name, module in named_modules:
        if lowest is not None and name == lowest:
            break
        if isinstance(module, _NORMS):
            params += [p for p in module.parameters(recurse=False)]
    return params


@dataclass
class _Snapshot:
    weight: Tensor
    states: dict[int, dict[str, Tensor]]  # id(optimizer) -> state key -> frozen rows before the step


class ExactFreezer:
    """Freezes rows (neurons) of parameters exactly, and whole parameters cheaply.

    :meth:`apply` takes, per parameter, a boolean mask of the rows (dim 0) that
    may change:

    - **all rows**: nothing is done;
    - **no row**: ``requires_grad=False`` and ``grad=None``, and its state is
      dropped from the optimizers (no gradient, no optimizer state; it gets a
      fresh state if a later selection trains it again). Autograd then records
      nothing for it, so the backward pass stops below the lowest layer that
      still needs a gradient;
    - **some rows**: after backward, the frozen rows of its gradient are zeroed
      (so gradient clipping sees only updated neurons) and the frozen rows of the
      weight and of every optimizer state tensor of the weight's shape (momentum,
      Adam's moments) are copied aside; right after the optimizer step they are
      copied back. Momentum and weight decay therefore cannot move a frozen row:
      it stays bit-identical. State a row did not have yet (a first step) is set
      to zero in the frozen rows. The copy lives only from the backward pass to
      the step, on the parameter's device; scalar state (Adam's step count) is
      shared by all rows and not restored.

    The copies are taken in a ``post_accumulate_grad`` hook of the parameter (or
    in the optimizer's step pre-hook if a gradient came from elsewhere) and put
    back in the optimizer's step post-hook, so any driver that calls
    ``optimizer.step()`` works: Lightning's automatic optimization, NeuroFlux's
    per-unit optimizers, a plain loop. :meth:`release` undoes everything.

    Example:
        >>> conv = nn.Conv2d(1, 2, 1)
        >>> opt = torch.optim.SGD(conv.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
        >>> before = conv.weight.detach().clone()
        >>> freezer = ExactFreezer()
        >>> freezer.apply({conv.weight: torch.tensor([True, False]), conv.bias: torch.tensor([True, False])}, [opt])
        >>> for _ in range(3):
        ...     opt.zero_grad(); conv(torch.randn(4, 1, 3, 3)).sum().backward(); opt.step()
        >>> torch.equal(conv.weight[1], before[1]), torch.equal(conv.weight[0], before[0])
        (True, False)
    """

    def __init__(self) -> None:
        self._partial: dict[int, tuple[nn.Parameter, Tensor]] = {}
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        self._holders: dict[int, list[Optimizer]] = {}
        self._pending: dict[int, _Snapshot] = {}
        self._handles: list[Any] = []
        self._warned: set[tuple[str, str]] = set()

    @property
    def frozen_params(self) -> list[nn.Parameter]:
        """Parameters frozen entirely (``requires_grad=False``)."""
        return [p for p, _ in self._frozen]

    @property
    def partial_params(self) -> list[nn.Parameter]:
        """Parameters with some frozen rows."""
        return [p for p, _ in self._partial.values()]

    def pending_bytes(self) -> int:
        """Bytes of the copies held now (between a backward pass and its step)."""
        total = 0
        for snap in self._pending.values():
            total += snap.weight.numel() * snap.weight.element_size()
            total += sum(t.numel() * t.element_size() for s in snap.states.values() for t in s.values())
        return total

    def apply(
        self,
        rows: Mapping[nn.Parameter, Tensor] | Iterable[tuple[nn.Parameter, Tensor]],
        optimizers: Sequence[Optimizer],
        frozen: Iterable[nn.Parameter] = (),
    ) -> None:
        """Freeze the rows of each parameter whose mask is False, and every parameter of ``frozen``.

        Replaces what an earlier call did (that is released first). ``optimizers``
        are the ones that may step these parameters (raw torch optimizers).
        """
        self.release()
        optimizers = [getattr(opt, "optimizer", opt) for opt in optimizers]
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    self._holders.setdefault(id(p), []).append(opt)
        pairs = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
        for param, mask in pairs:
            mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
            if mask.shape != param.shape[:1]:
                raise ValueError(f"a row mask of shape {tuple(mask.shape)} for a parameter of shape {tuple(param.shape)}")
            if bool(mask.all()):
                continue
            if not bool(mask.any()):
                self._freeze(param)
                continue
            frozen_rows = (~mask).nonzero().flatten().to(param.device)
            self._partial[id(param)] = (param, frozen_rows)
            self._handles.append(param.register_post_accumulate_grad_hook(self._after_grad))
        seen = {id(p) for p, _ in self._frozen}
        for param in frozen:
            if id(param) not in seen and id(param) not in self._partial:
                seen.add(id(param))
                self._freeze(param)
        for opt in optimizers:
            held = [
                self._partial[id(p)] for group in opt.param_groups for p in group["params"] if id(p) in self._partial
            ]
            if held:
                self._handles.append(opt.register_step_pre_hook(self._pre_step_hook(held)))
                self._handles.append(opt.register_step_post_hook(self._post_step_hook(held)))

    def release(self) -> None:
        """Remove the hooks and give frozen parameters their ``requires_grad`` back."""
        for handle in self._handles:
            handle.remove()
        for param, requires_grad in self._frozen:
            param.requires_grad_(requires_grad)
        self._handles, self._frozen = [], []
        self._partial, self._holders, self._pending = {}, {}, {}

    # -------------------------------------------------------------- internals
    def _freeze(self, param: nn.Parameter) -> None:
        self._frozen.append((param, param.requires_grad))
        param.requires_grad_(False)
        param.grad = None
        for opt in self._holders.get(id(param), []):
            opt.state.pop(param, None)

    def _after_grad(self, param: Tensor) -> None:
        entry = self._partial.get(id(param))
        if entry is not None:
            self._snapshot(*entry)

    def _snapshot(self, param: nn.Parameter, rows: Tensor) -> None:
        if param.grad is not None:
            param.grad.index_fill_(0, rows, 0)
        if id(param) in self._pending:
            return  # an earlier copy (gradient accumulation, a retried step) still holds the rows as they were
        with torch.no_grad():
            states: dict[int, dict[str, Tensor]] = {}
            for opt in self._holders.get(id(param), []):
                state = opt.state.get(param, {})
                states[id(opt)] = {
                    key: value.index_select(0, rows)
                    for key, value in state.items()
                    if isinstance(value, Tensor) and value.shape == param.shape
                }
            self._pending[id(param)] = _Snapshot(param.detach().index_select(0, rows), states)

    def _pre_step_hook(self, held: list[tuple[nn.Parameter, Tensor]]) -> Any:
        def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            for param, rows in held:
                if param.grad is not None and id(param) not in self._pending:
                    self._snapshot(param, rows)

        return hook

    def _post_step_hook(self, held: list[tuple[nn.Parameter, Tensor]]) -> Any:
        def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            with torch.no_grad():
                for param, rows in held:
                    snap = self._pending.pop(id(param), None)
                    if snap is None:
                        continue
                    param.index_copy_(0, rows, snap.weight)
                    saved = snap.states.get(id(optimizer), {})
                    for key, value in optimizer.state.get(param, {}).items():
                        if not isinstance(value, Tensor) or value.ndim == 0:
                            continue
                        if value.shape != param.shape:
                            self._warn_once(type(optimizer).__name__, key)
                            continue
                        if key in saved:
                            value.index_copy_(0, rows, saved[key])
                        else:
                            value.index_fill_(0, rows, 0)

        return hook

    def _warn_once(self, optimizer: str, key: str) -> None:
        if (optimizer, key) not in self._warned:
            self._warned.add((optimizer, key))
            warnings.warn(
                f"{optimizer} state {key!r} is not shaped like its parameter, so its frozen rows cannot be restored "
                "(the frozen weights still are)",
                stacklevel=3,
            )


def probe_forward(modules: Sequence[nn.Module], x: Tensor) -> Tensor:
    """``x`` through ``modules`` in turn, each in eval mode, without gradients, on its own device.

    Training flags are restored afterwards, module by module.
    """
    with torch.no_grad():
        for module in modules:
            device = next((p.device for p in module.parameters()), x.device)
            flags = [(m, m.training) for m in module.modules()]
            module.eval()
            try:
                x = module(x.to(device))
            finally:
                for m, training in flags:
                    m.training = training
    return x
