"""Memory meters: live storage bytes and their peak, on real and on fake tensors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from nf_lightning.core.memory.meter import CudaMemoryMeter, MemoryLimitExceeded, TrackedMemoryMeter, meter_for

FLOAT = 4  # bytes per float32


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_allocations_raise_the_total_and_frees_lower_it() -> None:
    meter = TrackedMemoryMeter("cpu")
    with meter:
        a = torch.empty(1000)
        b = torch.empty(500, dtype=torch.float64)
        assert meter.current_bytes() == 8000
        del a
        assert meter.current_bytes() == 4000
        c = torch.empty(250)
    assert (meter.peak_bytes, meter.current_bytes()) == (8000, 5000)
    meter.reset_peak()
    assert meter.peak_bytes == 5000
    del b, c
    assert meter.current_bytes() == 0


def test_views_and_in_place_ops_add_no_storage() -> None:
    with TrackedMemoryMeter("cpu") as meter:
        a = torch.zeros(100, 10)
        views = [a.view(1000), a[::2], a.t(), a.detach(), a[0], a.unsqueeze(0), a.expand(3, 100, 10)]
        a.add_(1).relu_()
        assert meter.current_bytes() == 4000
        b = a.t().contiguous()  # a copy: its own storage
        assert meter.current_bytes() == 8000
        del a
        assert meter.current_bytes() == 8000  # the views keep a's storage alive
        del views
        assert meter.current_bytes() == 4000
    assert b.shape == (10, 100)


def test_storage_resized_in_place_is_remeasured() -> None:
    with TrackedMemoryMeter("cpu") as meter:
        t = torch.empty(10)
        t.resize_(1000)
    assert (meter.peak_bytes, meter.current_bytes()) == (4000, 4000)


def test_tracked_tensors_count_and_zero_grad_frees_gradients() -> None:
    model = nn.Linear(10, 10)  # 110 floats
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 10)).sum().backward()
    optimizer.step()  # momentum buffers: 110 floats
    x = torch.ones(4, 10)
    meter = TrackedMemoryMeter("cpu")
    meter.track(model, optimizer, x)
    params = 110 * FLOAT
    assert meter.current_bytes() == 3 * params + x.nbytes  # params, grads, momentum, batch
    with meter:
        assert meter.peak_bytes == meter.current_bytes()
        optimizer.zero_grad(set_to_none=True)
    assert meter.current_bytes() == 2 * params + x.nbytes
    assert meter.peak_bytes == 3 * params + x.nbytes


def test_untracked_tensors_are_found_when_used_and_counted_from_the_start() -> None:
    old = torch.empty(1000)  # before the window, not tracked
    with TrackedMemoryMeter("cpu") as meter:
        tmp = torch.empty(10)
        del tmp
        total = old.sum()  # `old` was live while `tmp` was: 4000 + 40 at that time
    assert (meter.peak_bytes, meter.current_bytes()) == (4040, 4000 + total.nbytes)


def test_tensor_literals_are_new_tensors() -> None:
    with TrackedMemoryMeter("cpu") as meter:
        a = torch.empty(1000)
        del a
        t = torch.tensor([1.0, 2.0])  # built outside the dispatcher, lifted by an op
    assert (meter.peak_bytes, meter.current_bytes()) == (4000, t.nbytes)


def test_only_the_meters_device_counts() -> None:
    with TrackedMemoryMeter("cpu") as on_cpu, TrackedMemoryMeter("meta") as on_meta:
        m = torch.empty(1000, device="meta")
        c = torch.empty(10)
    assert (on_cpu.current_bytes(), on_meta.current_bytes()) == (c.nbytes, m.nbytes)


def test_going_over_the_limit_raises_an_out_of_memory_error() -> None:
    with TrackedMemoryMeter("cpu", limit=1000) as meter:
        a = torch.empty(250)  # exactly at the limit
    assert meter.peak_bytes == 1000
    with pytest.raises(MemoryLimitExceeded, match="1200 bytes live on cpu, over the limit of 1000"):
        with meter:  # `a` is still live, and counts in the next window
            torch.empty(50)
    assert a.numel() == 250  # kept alive on purpose through the second window
    assert issubclass(MemoryLimitExceeded, torch.cuda.OutOfMemoryError)  # handled like a real OOM


class TestLinearSgdMomentumStep:
    """nn.Linear(D->K) with SGD momentum, batch B: the peak derived by hand.

    P = (K*D + K) floats of parameters, X = B*D floats of input, Y = B int64 labels.
    After a first step, the second one starts with params and momentum resident (grads
    were set to None). Its peak comes at the end of backward, when the bias gradient is
    allocated: params + momentum + both grads (3P), X, Y, the gradient of the logits
    reaching the Linear (B*K floats), the loss and the ones that seeded backward (2 floats).
    The first step peaks in ``optimizer.step``, when the momentum buffers are created from
    the grads (3P again), with X, Y and the loss.
    """

    D, K, B = 1000, 10, 8
    P = (K * D + K) * FLOAT
    X, Y = B * D * FLOAT, B * 8

    def setup(self) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(self.D, self.K)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, torch.randn(self.B, self.D), torch.randint(self.K, (self.B,))

    def second_step_peak(self, model, optimizer, x, y) -> tuple[int, int]:
        sgd_step(model, optimizer, x, y)
        meter = TrackedMemoryMeter("cpu")
        meter.track(model, optimizer, x, y)
        with meter:
            sgd_step(model, optimizer, x, y)
        return meter.peak_bytes, meter.current_bytes()

    def test_second_step(self) -> None:
        peak, after = self.second_step_peak(*self.setup())
        assert peak == 3 * self.P + self.X + self.Y + self.B * self.K * FLOAT + 2 * FLOAT
        assert after == 2 * self.P + self.X + self.Y

    def test_first_step_counts_the_lazily_created_optimizer_state(self) -> None:
        model, optimizer, x, y = self.setup()
        meter = TrackedMemoryMeter("cpu")
        meter.track(model, optimizer, x, y)
        with meter:
            sgd_step(model, optimizer, x, y)
        assert meter.peak_bytes == 3 * self.P + self.X + self.Y + FLOAT
        assert meter.current_bytes() == 2 * self.P + self.X + self.Y

    def test_fake_tensors_give_the_same_numbers(self) -> None:
        real_model, _, _, _ = self.setup()
        mode = FakeTensorMode()
        memo = {id(p): mode.from_tensor(p) for p in real_model.parameters()}
        model = copy.deepcopy(real_model, memo)
        with mode:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            x, y = torch.randn(self.B, self.D), torch.randint(self.K, (self.B,))
            fake = self.second_step_peak(model, optimizer, x, y)
        assert fake == self.second_step_peak(*self.setup())


def test_meter_for_picks_the_backend_by_device() -> None:
    assert isinstance(meter_for("cpu"), TrackedMemoryMeter)
    assert isinstance(meter_for("meta"), TrackedMemoryMeter)
    cuda = meter_for("cuda:0", limit=123)
    assert isinstance(cuda, CudaMemoryMeter) and cuda.limit == 123


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_meter_reads_the_allocator() -> None:
    resident = torch.empty(2**20, device="cuda")
    with CudaMemoryMeter("cuda") as meter:
        temporary = torch.empty(2**20, device="cuda")
        del temporary
    assert meter.peak_bytes >= 2 * resident.nbytes
    assert resident.nbytes <= meter.current_bytes() < meter.peak_bytes
