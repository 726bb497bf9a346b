"""What a model hands its network: the input NeuroFlux trains the units on.

A LightningModule's ``forward`` may prepare its inputs before the network sees them (scale
``uint8`` images, normalize, resize) and NeuroFlux trains the network's units directly, so it
must prepare each batch the same way, or the units learn from inputs the deployed model never
gets. :func:`network_input` runs the model's own ``forward`` only up to the network's call and
returns the tensor the network was given.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Scaled(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    ...     def forward(self, x):
    ...         return self.net(x.float() / 255)
    >>> model = Scaled()
    >>> network_input(model, model.net, torch.full((1, 4), 255, dtype=torch.uint8)).tolist()
    [[1.0, 1.0, 1.0, 1.0]]
    >>> x = torch.zeros(1, 4)
    >>> network_input(model.net, model.net, x) is x  # the network itself: its input as given
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class _Reached(Exception):
    """Raised by the stand-in forward: the model's ``forward`` got as far as the network."""

    def __init__(self, inputs: Tensor) -> None:
        super().__init__("the network was reached")
        self.inputs = inputs


def network_input(model: Callable[[Tensor], Any], network: nn.Module, x: Tensor) -> Tensor | None:
    """The first tensor ``model(x)`` passes to ``network``, without running the network (no grad).

    None when ``model`` cannot be called with ``x`` alone or finishes without calling
    ``network`` (it computes through the network's submodules): NeuroFlux then uses ``x``.
    """

    def reached(inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        raise _Reached(inputs)

    if model is network:
        return x
    previous = network.__dict__.get("forward")  # a stand-in already there comes back after
    network.forward = reached  # an instance attribute: torch.compile and hooks call it too
    try:
        with torch.no_grad():
            model(x)
    except _Reached as reached_it:
        return reached_it.inputs
    except Exception:  # noqa: BLE001 - a forward that needs more than the inputs: not ours to judge here
        return None
    finally:
        if previous is None:
            del network.forward
        else:
            network.forward = previous
    return None


class PreparedInputs:
    """``model``'s ``forward`` up to ``network``, as a function of the batch inputs, for
    :attr:`~nf_lightning.core.train.sources.DataSources.inputs`.

    Build it with :meth:`of`, which returns None for a model that hands its network the inputs
    unchanged (then NeuroFlux adds nothing to a step).

    Example:
        >>> class Normalized(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        ...     def forward(self, x):
        ...         return self.net((x - 0.5) / 0.25)
        >>> model = Normalized()
        >>> prepared = PreparedInputs.of(model, model.net, torch.zeros(1, 4))
        >>> prepared.shape, prepared(torch.ones(1, 4)).tolist()
        ((4,), [[2.0, 2.0, 2.0, 2.0]])
        >>> PreparedInputs.of(model.net, model.net, torch.zeros(1, 4)) is None
        True
    """

    def __init__(self, model: Callable[[Tensor], Any], network: nn.Module, shape: tuple[int, ...], digest: str) -> None:
        self.model, self.network = model, network
        self.shape = shape  # one sample's shape as the network gets it
        self.digest = digest  # changes with what the forward does to its inputs (for cache fingerprints)

    @classmethod
    def of(cls, model: Callable[[Tensor], Any], network: nn.Module, sample: Tensor) -> PreparedInputs | None:
        """What ``model`` does to ``sample`` (a batch of the training data's inputs) before ``network``;
        None if it hands it on unchanged (the same tensor or equal values) or cannot be run up to the network."""
        prepared = network_input(model, network, sample)
        if not isinstance(prepared, Tensor) or prepared is sample:
            return None
        if (prepared.shape, prepared.dtype) == (sample.shape, sample.dtype) and torch.equal(prepared, sample):
            return None
        top = 1.0 if sample.is_floating_point() else 255.0  # a ramp over the sample's range, in its type
        ramp = torch.linspace(0, top, sample[:1].numel()).reshape(sample[:1].shape).to(sample.dtype)
        prepared_ramp = network_input(model, network, ramp.to(sample.device))
        values = (prepared_ramp if isinstance(prepared_ramp, Tensor) else prepared[:1]).detach().cpu().float()
        digest = hashlib.blake2b(values.contiguous().numpy().tobytes(), digest_size=8).hexdigest()
        return cls(model, network, tuple(prepared.shape[1:]), digest)

    def __call__(self, x: Tensor) -> Tensor:
        prepared = network_input(self.model, self.network, x)
        if prepared is None:
            raise RuntimeError(
                f"{type(self.model).__name__}.forward did not reach {type(self.network).__name__} with a batch of "
                "inputs, as it did when training began; NeuroFlux trains the network on what that forward hands it"
            )
        return prepared
