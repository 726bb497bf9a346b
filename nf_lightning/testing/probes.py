"""Two velocity probes over the same partly trained network, one keeping its copy of the selected rows on the
device and one off it, for checking that where the copy lives changes nothing but where it lives.

Example:
    >>> net, training, on, off, epochs = paired_probes(torch.device("cpu"), epochs=2)  # doctest: +SKIP
    >>> all(torch.equal(a[n], b[n]) for a, b in epochs for n in a)  # doctest: +SKIP
    True
    >>> training.release()  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nf_lightning.models import create
from nf_lightning.neuron_budget.probe import VelocityProbe
from nf_lightning.neuron_budget.trainable import SelectiveTraining


def paired_probes(device: torch.device, epochs: int = 3, fraction: float = 0.3, seed: int = 0) -> tuple[
        nn.Module, SelectiveTraining, VelocityProbe, VelocityProbe, list[tuple[dict[str, Tensor], dict[str, Tensor]]]]:
    """A ResNet-18 at width 0.125 on ``device`` with about ``fraction`` of each conv's channels selected, trained
    ``epochs`` epochs of two SGD steps: the network, its selection (still installed: ``release()`` it), its
    on-device and off-device probes, and from the second epoch on each epoch's velocities of both."""
    torch.manual_seed(seed)
    net = create("resnet18", num_classes=4, width_mult=0.125).to(device)
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    training = SelectiveTraining()
    training.apply({m: torch.rand(m.out_channels, device=device) < fraction for m in convs.values()}, [optimizer])
    on, off = VelocityProbe(convs), VelocityProbe(convs)
    probe_x = torch.randn(6, 3, 32, 32, device=device)
    velocities = []
    for epoch in range(epochs):
        for probe in (on, off):
            if probe.snapshot:
                probe.compare([net], net, probe_x.split(3))
            probe.keep([net], off_device=probe is off)
        if epoch:
            velocities.append((dict(on.velocity), dict(off.velocity)))
        for _ in range(2):
            optimizer.zero_grad()
            x, y = torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 4, (8,), device=device)
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    return net, training, on, off, velocities
