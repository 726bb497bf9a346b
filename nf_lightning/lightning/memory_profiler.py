"""``MemoryProfiler``: the plan before training, the measured peak during it.

Example:
    >>> import lightning.pytorch as pl
    >>> from nf_lightning import MemoryProfiler, NeuroFluxStrategy
    >>> trainer = pl.Trainer(strategy=NeuroFluxStrategy("300MB"), callbacks=[MemoryProfiler()],
    ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from nf_lightning.core.budget import format_bytes
from nf_lightning.core.plan import TrainingPlan, make_plan

if TYPE_CHECKING:
    from nf_lightning.lightning.strategy import NeuroFluxStrategy


class MemoryProfiler(pl.Callback):
    """Profiles every unit, partitions them under the budget and logs peak memory.

    The plan is made once, when ``fit`` starts, and kept in the callback's
    state so a resumed run trains the same blocks at the same batch sizes.
    Every training step logs ``memory/peak_bytes`` (measured: the tracked meter
    on CPU, the CUDA allocator on GPUs) next to ``memory/predicted_bytes`` and
    ``memory/budget_bytes``.
    """

    def __init__(self) -> None:
        self.plan: TrainingPlan | None = None
        self.peaks: dict[int, int] = {}

    def ensure_plan(self, strategy: NeuroFluxStrategy) -> TrainingPlan:
        """The plan, profiling and partitioning first if there is none yet."""
        if self.plan is None:
            assert strategy.decomposition is not None and strategy.input_shape is not None
            self.plan = make_plan(
                strategy.decomposition.units,
                list(strategy.exit_modules()),
                strategy.input_shape,
                strategy.memory_budget,
                epochs_per_block=strategy.epochs_per_block,
                batch_limit=strategy.batch_limit,
                rho=strategy.rho,
                aux_policy=strategy.aux,
                optimizer_factory=strategy.optimizer_factory(),
                device=strategy.root_device,
                single_block=strategy.single_block,
            )
            rank_zero_info(describe_plan(self.plan))
        return self.plan

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        strategy = trainer.strategy
        peak = getattr(strategy, "last_step_peak", None)
        if peak is None or self.plan is None:
            return
        block = strategy.active_block
        self.peaks[block] = max(self.peaks.get(block, 0), peak)
        pl_module.log("memory/peak_bytes", float(peak), reduce_fx="max")
        pl_module.log("memory/predicted_bytes", float(self.plan.blocks[block].predicted_peak), reduce_fx="max")
        pl_module.log("memory/budget_bytes", float(self.plan.budget), reduce_fx="max")

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict() if self.plan else None, "peaks": dict(self.peaks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan = TrainingPlan.from_dict(state_dict["plan"]) if state_dict.get("plan") else None
        self.peaks = {int(k): int(v) for k, v in state_dict.get("peaks", {}).items()}


def describe_plan(plan: TrainingPlan) -> str:
    """A few lines a person can read: blocks, batch sizes, predicted peak vs budget."""
    lines = [f"NeuroFlux plan under {format_bytes(plan.budget)} (made in {plan.seconds:.2f} s):"]
    for index, block in enumerate(plan.blocks):
        units = f"{block.units[0]}-{block.units[-1]}" if len(block.units) > 1 else str(block.units[0])
        lines.append(
            f"  block {index}: units {units:<7} batch {block.batch_size:<4} epochs {plan.epochs_per_block[index]:<3}"
            f" predicted peak {format_bytes(block.predicted_peak)}"
        )
    return "\n".join(lines)
