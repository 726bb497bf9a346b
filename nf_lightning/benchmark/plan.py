"""Which runs the benchmark trains, in which order, and the ``nf-train`` overrides of each.

The order interleaves methods so a change in the machine's load hits all of them:

1. seed 0, the learning-rate grid: rates outer, the base methods (BP, BP-ckpt,
   NeuroFlux...) inner; then ``scratch_exit`` over the grid on the exit
   NeuroFlux deployed at its chosen rate in seed 0 (it runs after that run);
2. every later seed: each base method at its chosen rate, then ``scratch_exit``
   on the exit NeuroFlux deployed in that seed;
3. once every BP seed is done (they set the target) and ``scratch_exit``'s rate
   is chosen: ``depth_search`` per seed, exits of depth 0, 1, 2... at that rate
   (BP's without ``scratch_exit``), each run only after the one before it missed the target.

Overrides for the local-learning runs alone (``--local-set``, an ablation's lever) tag
those runs' keys (:func:`local_tag`), so an ablation reuses the BP-trained runs of an
earlier invocation of the same code and never takes another variant's NeuroFlux run.
Overrides for the scratch-trained exits alone (``--scratch-set``: ``scratch_exit``'s tries over
epochs, as many as the levers NeuroFlux got) tag their runs the same way; the depth search trains
its exits by the same recipe, as it does at ``scratch_exit``'s rate.

Example:
    >>> known = Known(best={"bp": 0.1, "neuroflux": 0.1}, deployed={(0.1, 0): 3})
    >>> [s.key for s in planned_runs(["bp", "neuroflux", "scratch_exit"], [0.1], 1, known, units=8)]
    ['bp_lr0.1_seed0', 'neuroflux_lr0.1_seed0', 'scratch_exit_u3_lr0.1_seed0']
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nf_lightning.benchmark.presets import BP_LIKE, LOCAL, SCRATCH_LIKE, SNAPSHOT_DIR


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method at a rate and seed; ``unit`` is the exit's depth for scratch-trained exits;
    ``tag`` names the overrides given to its method alone (:func:`local_tag`)."""

    method: str
    lr: float
    seed: int
    unit: int | None = None
    tag: str = ""

    @property
    def key(self) -> str:
        depth = "" if self.unit is None else f"_u{self.unit}"
        return f"{self.method}{depth}_lr{self.lr:g}_seed{self.seed}{'_' + self.tag if self.tag else ''}"


def local_tag(overrides: Sequence[str]) -> str:
    """A short name for the overrides given to local-learning runs only; ``""`` for none.

    >>> local_tag([]), local_tag(["polish.lr=0.01"]) == local_tag(["polish.lr=0.01"]), local_tag(["polish.lr=0.01"])[:1]
    ('', True, 'v')
    """
    if not overrides:
        return ""
    return "v" + hashlib.blake2b(" ".join(overrides).encode(), digest_size=4).hexdigest()


@dataclass
class Known:
    """What the finished runs decided so far, which later runs depend on.

    ``best``: a method's chosen rate once its grid is done; ``deployed``: the
    exit unit of NeuroFlux's run at ``(lr, seed)``; ``target``: set once every
    BP seed is done; ``crossed``: whether the depth-search run ``(seed, unit)``
    reached the target.
    """

    best: Mapping[str, float] = field(default_factory=dict)
    deployed: Mapping[tuple[float, int], int] = field(default_factory=dict)
    target: float | None = None
    crossed: Mapping[tuple[int, int], bool] = field(default_factory=dict)


def rates_of(method: str, lrs: Sequence[float], pinned: Mapping[str, float] | None = None) -> list[float]:
    """The rates ``method`` tries on seed 0: the grid, or its one pinned rate.

    >>> rates_of("bp", [0.05, 0.1], {"neuroflux": 0.1}), rates_of("neuroflux", [0.05, 0.1], {"neuroflux": 0.1})
    ([0.05, 0.1], [0.1])
    """
    return [pinned[method]] if pinned and method in pinned else list(lrs)


def planned_runs(
    methods: Sequence[str], lrs: Sequence[float], seeds: int, known: Known, units: int,
    pinned: Mapping[str, float] | None = None, tag: str = "", scratch_tag: str = "",
) -> list[RunSpec]:
    """Every run that can be planned from ``known``, in the order they start (``units``: the network's units;
    ``pinned``: methods trained at one given rate instead of the grid; ``tag``, ``scratch_tag``: of the
    local-learning runs and of the scratch-trained exits').

    >>> known = Known(best={"bp": 0.1}, target=0.5, crossed={(0, 0): False})
    >>> [s.key for s in planned_runs(["bp", "depth_search"], [0.1], 1, known, units=3)]
    ['bp_lr0.1_seed0', 'depth_search_u0_lr0.1_seed0', 'depth_search_u1_lr0.1_seed0']
    """
    base = [m for m in methods if m not in SCRATCH_LIKE]
    every = sorted({lr for m in methods for lr in rates_of(m, lrs, pinned)})
    tags = {m: tag if m in LOCAL else "" for m in base}
    runs = [RunSpec(m, lr, 0, tag=tags[m]) for lr in every for m in base if lr in rates_of(m, lrs, pinned)]
    nf_lr = known.best.get("neuroflux")
    if "scratch_exit" in methods and (nf_lr, 0) in known.deployed:
        runs += [RunSpec("scratch_exit", lr, 0, known.deployed[(nf_lr, 0)], scratch_tag)
                 for lr in rates_of("scratch_exit", lrs, pinned)]  # fmt: skip
    for seed in range(1, seeds):
        runs += [RunSpec(m, known.best[m], seed, tag=tags[m]) for m in base if m in known.best]
        if "scratch_exit" in methods and "scratch_exit" in known.best and (nf_lr, seed) in known.deployed:
            runs.append(RunSpec("scratch_exit", known.best["scratch_exit"], seed, known.deployed[(nf_lr, seed)],
                                scratch_tag))
    depth_lr = known.best.get("scratch_exit" if "scratch_exit" in methods else "bp")
    if "depth_search" in methods and known.target is not None and depth_lr is not None:
        runs += [spec for seed in range(seeds)
                 for spec in depth_search_runs(depth_lr, seed, known.crossed, units, scratch_tag)]  # fmt: skip
    return runs


def depth_search_runs(
    lr: float, seed: int, crossed: Mapping[tuple[int, int], bool], units: int, tag: str = ""
) -> list[RunSpec]:
    """Depth 0, 1, ... of one seed, up to the first that crossed the target (or the one not yet run);
    ``tag`` names the scratch-trained exits' own overrides.

    >>> [s.unit for s in depth_search_runs(0.1, 0, {(0, 0): False, (0, 1): True}, units=5)]
    [0, 1]
    """
    runs = []
    for unit in range(units):
        runs.append(RunSpec("depth_search", lr, seed, unit, tag))
        if crossed.get((seed, unit)) is not False:
            break
    return runs


def run_overrides(
    spec: RunSpec, settings: Mapping[str, Any], budget: str, target: float | None = None
) -> list[str]:
    """nf-train's overrides for one run: the same data, model, budget and recipe for every method.

    Scratch-trained exits are BP (``method=bp``: its profiler batch rule,
    guard and cosine) on :func:`~nf_lightning.benchmark.baselines.exit_network`;
    a ``depth_search`` run stops at its first validation that reaches ``target``.
    """
    bp_like = spec.method in BP_LIKE
    overrides = [
        f"method={'bp' if spec.method in SCRATCH_LIKE else spec.method}",
        f"model={settings['model']}",
        f"model.width_mult={settings['width']}",
        f"data={settings['data']}",
        f"data.train_subset={settings['train_subset'] or 'null'}",
        f"data.val_subset={settings['val_subset'] or 'null'}",
        f"data.seed={settings['data_seed']}",
        f"budget={budget}",
        f"batch_limit={settings['batch_limit']}",
        f"seed={spec.seed}",
        f"optim.lr={spec.lr}",
        f"epochs={settings['bp_epochs'] if bp_like else settings['nf_epochs']}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_checkpointing=false",
        "~callbacks.checkpoint",
        "+callbacks.probe._target_=nf_lightning.benchmark.probe.BenchmarkProbe",
        f"+callbacks.probe.subset={settings['test_subset'] or 0}",
    ]
    if spec.method in SCRATCH_LIKE:
        overrides += ["model._target_=nf_lightning.benchmark.baselines.exit_network", f"+model.unit={spec.unit}"]
        overrides += settings.get("scratch_set") or []
    if spec.method == "depth_search":
        if target is None:
            raise ValueError("a depth_search run needs the target it stops at")
        overrides += ["+callbacks.stop._target_=nf_lightning.benchmark.probe.StopAtTarget",
                      f"+callbacks.stop.target={target}"]  # fmt: skip
    meter = settings.get("meter") or {"full_steps": 0, "sample_every": 1}
    if settings.get("meter_every_step"):
        meter = {"full_steps": 0, "sample_every": 1}
    if bp_like:
        overrides.append("+module.lr_schedule=cosine")
    else:  # local learning: the deployable exit's snapshots, for its test accuracy at the crossing
        for group in ("callbacks", "polish_callbacks"):
            overrides += [f"+{group}.snapshots._target_=nf_lightning.benchmark.probe.DeployableSnapshots",
                          f"+{group}.snapshots.directory=${{paths.output_dir}}/{SNAPSHOT_DIR}"]  # fmt: skip
        if settings.get("polish_epochs"):  # polish the deployed exit end to end
            overrides.append(f"polish_epochs={settings['polish_epochs']}")
        overrides += settings.get("local_set") or []
    overrides += [  # every method's strategy meters on the same schedule, by the same guard
        f"+trainer.strategy.meter_full_steps={meter['full_steps']}",
        f"+trainer.strategy.meter_sample_every={meter['sample_every']}",
    ]
    return [*overrides, *settings["set"]]
