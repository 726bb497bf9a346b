"""Block schedule (horizon, decay, patience, resume mid-block) and feature augmentation, on the pure core."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nf_lightning.core.network.decompose import decompose
from nf_lightning.core.train.feature_augment import augment_features, random_crop
from nf_lightning.core.plan.partitioner import Block
from nf_lightning.core.plan.training_plan import TrainingPlan
from nf_lightning.core.exits.aux_heads import build_exits
from nf_lightning.core.options import NeuroFluxOptions
from nf_lightning.core.plan.training_plan import expand_epochs
from nf_lightning.core.train.block_progress import BlockProgress
from nf_lightning.core.train.run import BlockwiseRun, DataSources
from nf_lightning.core.train.schedule import BlockSchedule, Patience, cosine_factor


def test_horizon_is_lengthened_to_the_minimum_of_steps_and_capped() -> None:
    schedule = BlockSchedule(epochs=(2, 3), min_steps=100, max_epochs=20)
    assert schedule.horizon(0, steps_per_epoch=50) == 2  # 100 steps in 2 epochs already
    assert schedule.horizon(1, steps_per_epoch=50) == 3  # the base wins
    assert schedule.horizon(0, steps_per_epoch=7) == 15  # ceil(100 / 7)
    assert schedule.horizon(0, steps_per_epoch=1) == 20  # capped
    with pytest.raises(ValueError, match="block 2"):
        schedule.horizon(2, steps_per_epoch=5)


@pytest.mark.parametrize(
    ("options", "error"),
    [({"epochs": 0}, "at least one epoch"), ({"patience": 0}, "patience"), ({"decay": "step"}, "decay"),
     ({"lr_scaling": "cubic"}, "lr_scaling"), ({"min_steps": -1}, "min_steps")],
)
def test_bad_schedules_are_refused(options: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        BlockSchedule(**options)


def test_learning_rate_follows_the_batch_size() -> None:
    assert BlockSchedule(lr_scaling="linear").lr_scale(64, 128) == 0.5
    assert BlockSchedule(lr_scaling="sqrt").lr_scale(512, 128) == 2.0
    assert BlockSchedule(lr_scaling="none").lr_scale(512, 128) == 1.0
    assert BlockSchedule().lr_scale(512, None) == 1.0


def test_cosine_factor_and_patience() -> None:
    assert [round(cosine_factor(p), 6) for p in (0.0, 0.25, 0.5, 1.0, 2.0)] == [1.0, 0.853553, 0.5, 0.0, 0.0]
    patience = Patience(patience=2, min_delta=0.01)
    assert [patience.update(a) for a in (0.5, 0.505, 0.52, 0.525, 0.529)] == [False, False, False, False, True]
    assert Patience(patience=None).update(0.0) is False


def tiny_run(
    root: Path | None, options: NeuroFluxOptions, lr: float = 0.1, feature_augment: str = "none"
) -> tuple[BlockwiseRun, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (96,), generator=g)
    x = torch.randn(96, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1)
    data = TensorDataset(x, y)
    parts = decompose(net)
    plan = TrainingPlan(budget=10**8, batch_limit=16, rho=0.0, aux_policy="adaptive", input_shape=(3, 8, 8),
                        unit_models=[], blocks=[Block((0,), 16, 0), Block((1,), 16, 0)],
                        epochs_per_block=expand_epochs(options.epochs_per_block, 2))
    recipe = lambda: (torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9), [])  # noqa: E731
    options = options.replace(cache=root is not None, cache_dir=root, feature_augment=feature_augment)
    run = BlockwiseRun(parts, build_exits(parts, (3, 8, 8)), plan, recipe, options)
    run.attach_data(DataSources(DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=16)))
    return run, net


def train_epoch(run: BlockwiseRun, epoch: int, validate: bool = True) -> str:
    run.begin_epoch()
    for x, y in run.train_loader():
        run.train_batch(x, y)
    if validate:
        run.begin_validation()
        for x, y in run.sources.val:
            run.validate_batch(x, y)
        run.end_validation()
    return run.end_epoch(epoch)


def learning_rates_over(run: BlockwiseRun, epochs: Iterable[int]) -> tuple[list[float], str]:
    """Train ``epochs`` without validating; the first unit's learning rate at every step, and the last epoch's event."""
    seen, event = [], ""
    for epoch in epochs:
        run.begin_epoch()
        for x, y in run.train_loader():
            run.train_batch(x, y)
            seen.append(run.optim.optimizers[0].param_groups[0]["lr"])
        event = run.end_epoch(epoch)
    return seen, event


def test_learning_rate_decays_to_zero_over_the_horizon(tmp_path: Path) -> None:
    run, _ = tiny_run(tmp_path, NeuroFluxOptions(epochs_per_block=1, min_steps_per_block=12, block_patience=None), lr=0.1)
    run.start()
    assert run.num_blocks == 2
    run.begin_epoch()
    assert run.progress.horizon == 2  # 6 steps per epoch (96 / 16), lengthened to 12 steps
    seen, event = learning_rates_over(run, range(2))
    assert event == "next_block" and run.progress.ended_blocks[0]["reason"] == "horizon"
    expected = [0.1 * cosine_factor(step / 12) for step in range(12)]  # lr scaling: loader batch = block batch
    assert seen == pytest.approx(expected)


def test_the_recipes_own_scheduler_replaces_the_decay(tmp_path: Path) -> None:
    net_holder = {}

    def recipe():
        optimizer = torch.optim.SGD(net_holder["net"].parameters(), lr=0.1)
        from nf_lightning.core.train.optim_recipe import SchedulerSpec

        return optimizer, [SchedulerSpec(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))]

    run, net = tiny_run(tmp_path, NeuroFluxOptions(epochs_per_block=2, block_patience=None))
    net_holder["net"] = net
    run.optim.recipe = recipe
    run.start()
    assert not run.optim.decays
    train_epoch(run, 0, validate=False)
    assert run.optim.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)  # StepLR stepped, no cosine


def test_patience_ends_a_block_whose_exits_stopped_improving(tmp_path: Path) -> None:
    # lr 0 and a gain of 0.5 needed: nothing improves after the first epoch
    options = NeuroFluxOptions(epochs_per_block=50, block_patience=1, min_epochs_per_block=2, block_min_delta=0.5, block_anneal_epochs=0)
    run, _ = tiny_run(tmp_path, options, lr=0.0)
    run.start()
    events = [train_epoch(run, epoch) for epoch in range(3)]
    assert events == ["continue", "next_block", "continue"]
    assert run.progress.ended_blocks[0] == {
        "block": 0, "epochs": 2, "horizon": 50, "steps": 12, "reason": "patience",
        "best_accuracy": run.progress.ended_blocks[0]["best_accuracy"], "reference": None, "annealed_from": None,
    }


def test_a_deeper_block_that_never_beats_the_deployed_exit_ends_after_its_patience_unannealed() -> None:
    settings = {"epochs": 50, "patience": 2, "anneal_epochs": 2}
    ends = {}
    for reference in ("own", "deployed"):
        progress = BlockProgress(BlockSchedule(**settings, patience_reference=reference))
        progress.end_block(0, "horizon")
        progress.next_block(deployed_accuracy=0.6)
        reasons = []
        for epoch, accuracy in enumerate((0.50, 0.55, 0.58, 0.58, 0.58, 0.58, 0.58, 0.58)):
            progress.begin_epoch(block=1, steps=10)
            verdict = progress.verdict(block=1, accuracy=accuracy, steps_per_epoch=10, decays=True)
            progress.close_epoch(epoch, verdict)
            reasons.append(verdict.reason)
            if verdict.reason:
                break
        ends[reference] = reasons
    assert ends["deployed"] == [None, "below_deployed"]  # 0.50 and 0.55 never beat the deployed 0.6
    assert ends["own"] == [None] * 6 + ["patience"]  # gains until 0.58, 2 epochs stale, 2 annealing

    beats = BlockProgress(BlockSchedule(**settings, patience_reference="deployed"))
    beats.next_block(deployed_accuracy=0.6)
    for epoch, accuracy in enumerate((0.61, 0.61, 0.61)):  # beat it once, then stalled: anneals as usual
        beats.begin_epoch(block=1, steps=10)
        verdict = beats.verdict(block=1, accuracy=accuracy, steps_per_epoch=10, decays=True)
        beats.close_epoch(epoch, verdict)
    assert verdict.reason is None and beats.anneal is not None
    with pytest.raises(ValueError, match="patience_reference"):
        BlockSchedule(patience_reference="best")


def test_the_deployed_reference_is_the_deployed_exits_accuracy_and_survives_a_resume(tmp_path: Path) -> None:
    # a gain of 0.5 over the deployed exit is out of reach, so block 1 ends after its patience, unannealed
    options = NeuroFluxOptions(epochs_per_block=(2, 50), block_patience=2, block_min_delta=0.5,
                               block_anneal_epochs=2, patience_reference="deployed")
    run, _ = tiny_run(tmp_path, options)
    run.start()
    assert [train_epoch(run, epoch) for epoch in range(2)] == ["continue", "next_block"]
    deployed = run.records[run.deploy_unit].accuracy
    assert run.progress.reference == deployed > 0.5
    assert train_epoch(run, 2) == "continue"
    state = run.state_dict()
    assert state["reference"] == deployed
    assert train_epoch(run, 3) == "done"
    assert run.progress.ended_blocks[1]["reason"] == "below_deployed" and run.progress.ended_blocks[1]["epochs"] == 2
    own, _ = tiny_run(tmp_path / "own", options.replace(patience_reference="own"))
    own.start()
    assert [train_epoch(own, epoch) for epoch in range(4)][-1] == "continue"  # its first epoch was a gain: it goes on


def test_a_block_that_stalls_mid_horizon_anneals_its_rate_to_zero_then_ends(tmp_path: Path) -> None:
    # a gain of 0.5 needed: nothing counts as improving after the first epoch, so epoch 2 stalls at a high rate
    options = NeuroFluxOptions(epochs_per_block=50, block_patience=1, min_epochs_per_block=2, block_min_delta=0.5, block_anneal_epochs=2)
    run, _ = tiny_run(tmp_path, options, lr=0.1)
    run.start()
    assert [train_epoch(run, epoch) for epoch in range(2)] == ["continue", "continue"]  # stalled: annealing
    start = cosine_factor(2 / 50)
    assert run.progress.anneal == {"start": 2, "epochs": 2, "factor": start}
    state = run.state_dict()
    assert state["anneal"] == run.progress.anneal  # a resumed run anneals on
    seen, event = learning_rates_over(run, (2, 3))
    assert event == "next_block" and run.progress.ended_blocks[0]["reason"] == "patience"
    assert run.progress.ended_blocks[0]["annealed_from"] == 2 and run.progress.ended_blocks[0]["epochs"] == 4
    expected = [0.1 * start * cosine_factor(step / 12) for step in range(12)]  # 6 steps per epoch, over 2 epochs
    assert seen == pytest.approx(expected)
    assert run.progress.anneal is None  # the next block starts afresh


def test_with_the_recipes_own_scheduler_a_stalled_block_ends_at_once(tmp_path: Path) -> None:
    from nf_lightning.core.train.optim_recipe import SchedulerSpec

    holder = {}

    def recipe():
        optimizer = torch.optim.SGD(holder["net"].parameters(), lr=0.1)
        return optimizer, [SchedulerSpec(torch.optim.lr_scheduler.StepLR(optimizer, step_size=10))]

    run, net = tiny_run(tmp_path, NeuroFluxOptions(epochs_per_block=50, block_patience=1, min_epochs_per_block=2, block_min_delta=0.5))
    holder["net"], run.optim.recipe = net, recipe
    run.start()
    assert [train_epoch(run, epoch) for epoch in range(2)] == ["continue", "next_block"]
    assert run.progress.ended_blocks[0]["annealed_from"] is None


def test_stop_and_resume_mid_block_continues_the_same_schedule(tmp_path: Path) -> None:
    options = NeuroFluxOptions(epochs_per_block=1, min_steps_per_block=18, block_patience=5)
    run, _ = tiny_run(tmp_path / "a", options)
    run.start()
    train_epoch(run, 0)
    state = run.state_dict()
    uninterrupted = [train_epoch(run, epoch) for epoch in (1, 2, 3)]

    resumed, net = tiny_run(tmp_path / "b", options)
    resumed.decomposition.units[0].load_state_dict(run.decomposition.units[0].state_dict())  # weights travel separately
    resumed = BlockwiseRun.from_state(resumed.decomposition, state, resumed.optim.recipe, resumed.options)
    resumed.attach_data(run.sources)
    resumed.start()
    assert (resumed.progress.horizon, resumed.progress.epochs_in_block, resumed.progress.block_step) == (3, 1, 6)
    assert resumed.progress.patience.best == state["patience"]["best"]
    assert [train_epoch(resumed, epoch) for epoch in (1, 2, 3)][:2] == uninterrupted[:2]
    assert resumed.progress.ended_blocks[0]["steps"] == run.progress.ended_blocks[0]["steps"] == 18


def test_flip_is_a_mirror_and_crop_a_shift_with_zeros() -> None:
    x = torch.randn(64, 3, 8, 8)
    flipped = augment_features(x, "flip", generator=torch.Generator().manual_seed(0))
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
    ones = torch.ones(200, 1, 8, 8)
    cropped = random_crop(ones, 1, generator=torch.Generator().manual_seed(0))
    assert set(cropped.unique().tolist()) <= {0.0, 1.0}
    zeros_per_sample = (cropped == 0).flatten(1).sum(1)
    assert set(zeros_per_sample.tolist()) == {0, 8, 15}  # no shift, one axis, both axes
    shifted = random_crop(torch.arange(64.0).view(1, 1, 8, 8).repeat(50, 1, 1, 1), 1, torch.Generator().manual_seed(1))
    interior = shifted[:, 0, 1:7, 1:7]
    diffs = interior - torch.arange(64.0).view(8, 8)[1:7, 1:7]
    assert set(diffs.flatten().unique().tolist()) <= {-9, -8, -7, -1, 0, 1, 7, 8, 9}  # a shift by at most one


def test_small_maps_are_only_flipped_and_none_is_the_identity() -> None:
    x = torch.randn(4, 2, 3, 3)
    assert augment_features(x, "crop") is x  # round(3 / 8) == 0: nothing to shift
    assert augment_features(x, "none") is x
    assert augment_features(torch.randn(4, 10), "flip_crop").shape == (4, 10)
    with pytest.raises(ValueError, match="feature_augment"):
        augment_features(x, "rotate")


def test_cached_blocks_see_augmented_inputs(tmp_path: Path) -> None:
    run, _ = tiny_run(tmp_path, NeuroFluxOptions(epochs_per_block=1, block_patience=None), lr=0.1, feature_augment="flip_crop")
    run.start()
    train_epoch(run, 0)
    assert run.active_block == 1
    seen = []
    hook = run.units[run.active_units[0]].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x, y = next(iter(run.train_loader()))
    run.train_batch(x, y)
    hook.remove()
    assert seen[0].shape == x.shape and not torch.equal(seen[0], x)
    assert run.options.feature_augment == "flip_crop"
