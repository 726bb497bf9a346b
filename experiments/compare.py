"""A fair benchmark: BP, BP with activation checkpointing and NeuroFlux side by side under one memory budget.

Every method follows the same rules in one invocation:

- **budget**: BP's tightest by default, the smallest budget at which plain BP
  trains at batch 8 by the profiler (the peak of a batch-8 BP step, measured
  on fake tensors by the tracked meter, as ``nf-train method=bp`` sizes its
  batch); ``--budget`` overrides it. Every method gets its batch sizes from the
  same profiler under it, and is held to it by the same meter and rule on the
  same schedule (BP and BP-ckpt: ``BudgetedBackpropStrategy``; NeuroFlux: its
  strategy; both through ``BudgetGuard``): NeuroFlux's default, every step of
  a block's first steps then one in n, or every step of every method with
  ``--meter-every-step``;
- **schedule and convergence**: BP and BP-ckpt decay their rate by a cosine
  over ``--bp-epochs`` epochs (``ClassifierModule(lr_schedule="cosine")``),
  NeuroFlux uses its strategy's own per-block schedule with ``--nf-epochs``
  epochs per block and every other option at its default. A run *converged*
  when its validation accuracy gained no more than 0.5 points over the last
  fifth of its validations; every run reports whether it did;
- **learning rate**: one grid for every method (rates at batch
  ``optim.reference_batch`` = 128, scaled linearly to each method's batch as
  nf-train does), the best chosen on seed 0 by final validation accuracy, then
  the other seeds at each method's best rate;
- **splits**: data subsets fixed across seeds (``--data-seed``); exits chosen
  on the validation split, every number called *test* measured on the data
  set's 10,000-image test split after training;
- **timing**: one torch thread per run, ``--jobs`` runs at once (default 2,
  one per core), methods interleaved so a change in the machine's load hits
  all of them; each method's per-step cost in the harness is compared with a
  bare PyTorch loop of the same steps, timed alone.

It reports, at the budget: final test accuracy (mean and spread over seeds),
wall time to BP's best validation accuracy minus one point, validation
accuracy at equal wall time (NeuroFlux's mean total time), the speed-ups of
NeuroFlux over BP and BP-ckpt, validation curves of every seed (Figure 12)
and the deployable exit: the smallest NeuroFlux exit whose validation accuracy
reaches that target, its parameters, test accuracy and inference speed-up.

    python experiments/compare.py --preset quick          # smoke run, a few minutes
    python experiments/compare.py                         # the default benchmark, hours on 2 cores (see README)
    python experiments/compare.py --preset large          # more data and epochs, for longer machines
    python experiments/compare.py --readme                # README table from the committed default summary

Each run is ``nf-train``'s ``run()`` in its own subprocess (this script with
``--worker``), into ``experiments/out/compare/<preset>/runs/<run>/``; a run
whose ``record.json`` exists with the same overrides is reused, so a killed
benchmark continues where it stopped, and a run that fails is recorded and
the benchmark goes on. Results go to ``experiments/results/compare/<preset>/``:
``summary.json`` (all numbers, per-run records and histories), ``summary.md``
(the table) and ``figure12.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


REPO = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO / "experiments" / "results" / "compare"
WORK_ROOT = REPO / "experiments" / "out" / "compare"
README = REPO / "README.md"
README_BEGIN = "<!-- compare:begin -->"
README_END = "<!-- compare:end -->"

METHODS = ("bp", "bp_ckpt", "neuroflux")
"""The compared methods (``conf/method``); ``--classic-ll`` adds ``classic_ll``."""
LABELS = {"bp": "BP", "bp_ckpt": "BP + checkpointing", "neuroflux": "NeuroFlux", "classic_ll": "classic LL"}
COLOURS = {"bp": "tab:blue", "bp_ckpt": "tab:purple", "neuroflux": "tab:green", "classic_ll": "tab:orange"}
BP_LIKE = ("bp", "bp_ckpt")
"""Methods trained by ordinary Lightning training (cosine over ``--bp-epochs``); the others are local learning."""

BUDGET_BATCH = 8
"""The default budget is the smallest at which plain BP trains at this batch size."""
TARGET_MARGIN = 0.01
"""The target is BP's best validation accuracy minus this (one point)."""
CONVERGENCE_FRACTION = 0.2
CONVERGENCE_GAIN = 0.005
"""A run converged when it gained at most this much validation accuracy over its last fifth."""
ACCURACY_EPSILON = 1e-6

RECORD_FILE = "record.json"
PROBE_FILE = "probe.json"
SPEC_FILE = "spec.json"
LOG_FILE = "log.txt"

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {  # a smoke run of the whole machinery: a few minutes on 2 cores
        "train_subset": 1000, "val_subset": 500, "test_subset": 0, "seeds": 1, "lrs": [0.05],
        "bp_epochs": 4, "nf_epochs": 2, "polish_epochs": 2,
    },
    "default": {  # about an hour on 2 cores: 2 learning rates, BP 30 epochs (cosine) at its tightest budget
        "train_subset": 5000, "val_subset": 1000, "test_subset": 0, "seeds": 3, "lrs": [0.05, 0.1],
        "bp_epochs": 30, "nf_epochs": 10, "polish_epochs": 20,
    },
    "large": {  # all 45,000 training images, 5,000 for validation, longer schedules: for longer machines
        "train_subset": 0, "val_subset": 0, "test_subset": 0, "seeds": 3, "lrs": [0.025, 0.05, 0.1],
        "bp_epochs": 60, "nf_epochs": 20, "polish_epochs": 40,
    },
}  # fmt: skip


# =========================================================================== curves (pure)
def record_accuracy(record: dict[str, Any]) -> float | None:
    """Validation accuracy of one ``history`` record: the module's ``val/acc`` or the best exit's, whichever is higher.

    >>> record_accuracy({"val/acc": 0.3, "neuroflux/acc_exit_2": 0.4, "val/loss": 2.0})
    0.4
    """
    values = [v for k, v in record.items() if k == "val/acc" or k.startswith("neuroflux/acc_exit_")]
    return max(values) if values else None


def raw_curve(history: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(seconds, validation accuracy)`` per validation, in time order."""
    points = [(r["seconds"], record_accuracy(r)) for r in history]
    return sorted((s, a) for s, a in points if a is not None)


def accuracy_curve(history: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(seconds, best validation accuracy so far)`` per validation.

    >>> accuracy_curve([{"seconds": 1.0, "val/acc": 0.3}, {"seconds": 2.0, "val/acc": 0.2}])
    [(1.0, 0.3), (2.0, 0.3)]
    """
    curve, best = [], -math.inf
    for seconds, accuracy in raw_curve(history):
        best = max(best, accuracy)
        curve.append((seconds, best))
    return curve


def time_to_target(history: Sequence[dict[str, Any]], target: float) -> float | None:
    """Seconds until a validation first reached ``target``; ``None`` if none did.

    >>> time_to_target([{"seconds": 5.0, "val/acc": 0.4}, {"seconds": 9.0, "val/acc": 0.6}], 0.5)
    9.0
    """
    return next((s for s, a in accuracy_curve(history) if a >= target - ACCURACY_EPSILON), None)


def accuracy_at(history: Sequence[dict[str, Any]], seconds: float) -> float | None:
    """Best validation accuracy reached by ``seconds``; ``None`` before the first validation.

    >>> accuracy_at([{"seconds": 5.0, "val/acc": 0.4}, {"seconds": 9.0, "val/acc": 0.6}], 8.0)
    0.4
    """
    reached = [a for s, a in accuracy_curve(history) if s <= seconds]
    return reached[-1] if reached else None


def convergence(
    history: Sequence[dict[str, Any]], fraction: float = CONVERGENCE_FRACTION, max_gain: float = CONVERGENCE_GAIN
) -> dict[str, Any]:
    """Whether a run converged: its last ``fraction`` of validations gained at most ``max_gain`` accuracy.

    The gain is the best accuracy of the last fifth (at least one validation)
    over the best before it; ``converged`` is ``None`` with fewer than two
    validations.

    >>> history = [{"seconds": float(i), "val/acc": a} for i, a in enumerate([.3, .5, .6, .62, .62])]
    >>> convergence(history)["converged"], round(convergence(history)["gain"], 3)
    (True, 0.0)
    >>> convergence(history[:4])["converged"]
    False
    """
    accuracies = [a for _, a in raw_curve(history)]
    if len(accuracies) < 2:
        return {"converged": None, "gain": None, "window": len(accuracies)}
    window = max(1, math.ceil(fraction * len(accuracies)))
    gain = max(accuracies[-window:]) - max(accuracies[:-window])
    return {"converged": gain <= max_gain + ACCURACY_EPSILON, "gain": gain, "window": window}


def block_convergence(
    history: Sequence[dict[str, Any]], blocks: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """:func:`convergence` of each local-learning block on its own: its epochs, the best of its own exits.

    >>> history = [{"seconds": 1.0, "block": 0, "neuroflux/acc_exit_0": 0.3},
    ...            {"seconds": 2.0, "block": 0, "neuroflux/acc_exit_0": 0.302},
    ...            {"seconds": 3.0, "block": 1, "neuroflux/acc_exit_0": 0.31, "neuroflux/acc_exit_1": 0.2},
    ...            {"seconds": 4.0, "block": 1, "neuroflux/acc_exit_0": 0.31, "neuroflux/acc_exit_1": 0.4}]
    >>> [c["converged"] for c in block_convergence(history, [{"units": [0]}, {"units": [1]}])]
    [True, False]
    """
    out = []
    for index, block in enumerate(blocks):
        keys = [f"neuroflux/acc_exit_{u}" for u in block["units"]]
        own = [
            {"seconds": r["seconds"], "val/acc": max(r[k] for k in keys if k in r)}
            for r in history
            if r.get("block") == index and any(k in r for k in keys)
        ]
        out.append(convergence(own))
    return out


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation and count of the values that are not ``None``.

    >>> mean_std([0.5, 0.7, None])
    {'mean': 0.6, 'std': 0.1414, 'n': 2}
    """
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": round(std, 4) if len(present) > 1 else 0.0, "n": len(present)}


def mean_time_to_target(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean time to target over seeds; a seed that never reached it counts its last validation time (a lower bound).

    >>> mean_time_to_target([{"time_to_target": 10.0, "last_seconds": 50.0}, {"time_to_target": None, "last_seconds": 40.0}])
    {'mean': 25.0, 'lower_bound': True, 'reached': 1, 'n': 2}
    """
    times = [r["time_to_target"] if r["time_to_target"] is not None else r["last_seconds"] for r in rows]
    reached = sum(r["time_to_target"] is not None for r in rows)
    mean = statistics.fmean(times) if times else None
    return {"mean": mean, "lower_bound": reached < len(rows), "reached": reached, "n": len(rows)}


def speedup(baseline: dict[str, Any], neuroflux: dict[str, Any]) -> dict[str, Any] | None:
    """How many times sooner NeuroFlux reached the target than ``baseline`` (two :func:`mean_time_to_target` results).

    ``bound`` is ``"="`` when both always reached it, ``">"`` when only NeuroFlux did
    (the baseline's time is a lower bound), ``"<"`` when only the baseline did; ``None``
    when neither did or a time is missing.

    >>> speedup({"mean": 30.0, "lower_bound": True, "reached": 1, "n": 2}, {"mean": 10.0, "lower_bound": False})
    {'value': 3.0, 'bound': '>'}
    """
    if not baseline or not neuroflux or not baseline.get("mean") or not neuroflux.get("mean"):
        return None
    if baseline["lower_bound"] and neuroflux["lower_bound"]:
        return None
    bound = ">" if baseline["lower_bound"] else "<" if neuroflux["lower_bound"] else "="
    return {"value": baseline["mean"] / neuroflux["mean"], "bound": bound}


def format_speedup(value: dict[str, Any] | None) -> str:
    """``3.00x``, ``>3.00x`` or ``<3.00x`` (``-`` when unknown)."""
    if value is None:
        return "-"
    return f"{'' if value['bound'] == '=' else value['bound']}{value['value']:.2f}x"


# =========================================================================== one run's row (pure)
def max_peak(results: dict[str, Any]) -> int | None:
    """The run's largest measured step peak, its polish's included.

    >>> max_peak({"measured_peak_bytes": 5, "polish": {"measured_peak_bytes": 7}})
    7
    """
    peaks = [results.get("measured_peak_bytes"), (results.get("polish") or {}).get("measured_peak_bytes")]
    return max((p for p in peaks if p is not None), default=None)


def polish_stats(ok: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """What the polish of the deployed exit did over seeds (None if the runs had none)."""
    runs = [r for r in ok if r.get("polish")]
    if not runs:
        return None
    units = [r["polish"]["unit"] for r in runs]
    sizes = [next((e["parameters"] for e in r["exits"] or [] if e["unit"] == r["polish"]["unit"]), None) for r in runs]
    return {
        "epochs": runs[0]["polish"]["epochs"],
        "units": units,
        "parameters": sizes,
        "full_parameters": runs[0].get("full_parameters"),
        "batch_sizes": [r["polish"]["batch_size"] for r in runs],
        "kept": sum(bool(r["polish"]["kept"]) for r in runs),
        "val_before": mean_std(r["polish"]["val_before"] for r in runs),
        "val_after": mean_std(r["polish"]["val_after"] for r in runs),
        "seconds": mean_std(r["polish"]["seconds"] for r in runs),
        "blockwise_test_acc": mean_std(r["blockwise_test_acc"] for r in runs),
        "test_acc": mean_std(r["test_acc"] for r in runs),
    }


def run_row(record: dict[str, Any], target: float | None = None) -> dict[str, Any]:
    """What the summary keeps of one run's ``record.json`` (``status`` ``ok``, ``cannot_run`` or ``failed``)."""
    spec = record["spec"]
    row: dict[str, Any] = {key: spec[key] for key in ("key", "method", "lr", "seed")}
    results = record.get("results")
    if record.get("status") == "failed" or results is None:
        return {**row, "status": "failed", "error": record.get("error")}
    if not results["could_run"]:
        return {**row, "status": "cannot_run", "reason": results.get("reason")}
    offset = results.get("before_fit_seconds") or 0.0  # BP's profiling runs before fit, where the clock starts
    history = [{**r, "seconds": r["seconds"] + offset} for r in results["history"]]
    probe = record.get("probe") or {}
    wall = results["train_seconds"] - probe.get("test_seconds", 0.0)  # the test pass runs in fit, after training
    curve = raw_curve(history)
    steps = probe.get("steps")
    row.update(
        status="ok",
        batch_sizes=results["batch_sizes"],
        best_val=max((a for _, a in curve), default=None),
        final_val=results["final_accuracy"],
        test_acc=probe.get("accuracy"),
        test_unit=probe.get("unit"),
        exit_test_accuracies=probe.get("exit_accuracies"),
        total_seconds=curve[-1][0] if curve else None,  # on the curves' clock: until the final model was validated
        wall_seconds=wall,  # the whole run, data setup and teardown included
        validation_seconds=results.get("validation_seconds"),
        last_seconds=curve[-1][0] if curve else wall,
        measured_peak_bytes=max_peak(results),
        predicted_peak_bytes=results.get("predicted_peak_bytes"),
        budget_bytes=results["budget_bytes"],
        steps=steps,
        train_loop_seconds=probe.get("train_loop_seconds"),
        metered_steps=probe.get("metered_steps"),
        harness_step_seconds=probe["train_loop_seconds"] / sum(steps) if steps else None,
        exits=(results.get("exit") or {}).get("exits"),
        polish=results.get("polish"),
        blockwise_test_acc=probe.get("blockwise_accuracy", probe.get("accuracy")),
        full_parameters=(results.get("exit") or {}).get("full_parameters"),
        plan_seconds=(results.get("plan") or {}).get("seconds"),
        plan_blocks=(results.get("plan") or {}).get("blocks"),
        curve=curve,
        **convergence(history),
    )
    if row["plan_blocks"]:
        row["blocks_converged"] = [c["converged"] for c in block_convergence(history, row["plan_blocks"])]
    if target is not None:
        row["time_to_target"] = time_to_target(history, target)
    return row


# =========================================================================== the whole comparison (pure)
def choose_lrs(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, float | None]:
    """Each method's best learning rate: highest final validation accuracy on seed 0 (``None`` if no run ran).

    >>> rows = [{"method": "bp", "seed": 0, "lr": 0.1, "status": "ok", "final_val": 0.5},
    ...         {"method": "bp", "seed": 0, "lr": 0.05, "status": "ok", "final_val": 0.6}]
    >>> choose_lrs(rows, ["bp", "neuroflux"])
    {'bp': 0.05, 'neuroflux': None}
    """
    best: dict[str, float | None] = {}
    for method in methods:
        grid = [r for r in rows if r["method"] == method and r["seed"] == 0 and r["status"] == "ok"]
        best[method] = max(grid, key=lambda r: (r["final_val"], -r["lr"]))["lr"] if grid else None
    return best


def summarize(records: Sequence[dict[str, Any]], methods: Sequence[str], seeds: int) -> dict[str, Any]:
    """Everything the tables say, from the runs' records: rates, target, per-method statistics, speed-ups, exits."""
    rows = [run_row(r) for r in records]
    lrs = choose_lrs(rows, methods)
    final = {m: [r for r in rows if r["method"] == m and r["lr"] == lrs[m] and r["seed"] < seeds] for m in methods}
    bp_best = mean_std(r["best_val"] for r in final.get("bp", []) if r["status"] == "ok")
    target = bp_best["mean"] - TARGET_MARGIN if bp_best["mean"] is not None else None
    rows = [run_row(r, target) for r in records]
    final = {m: [r for r in rows if r["method"] == m and r["lr"] == lrs[m] and r["seed"] < seeds] for m in methods}
    ok = {m: sorted((r for r in final[m] if r["status"] == "ok"), key=lambda r: r["seed"]) for m in methods}
    nf_time = mean_std(r["total_seconds"] for r in ok.get("neuroflux", []))["mean"]
    stats = {m: method_stats(m, final[m], ok[m], target, nf_time) for m in methods}
    speedups = {
        m: speedup(stats[m]["time_to_target"], stats.get("neuroflux", {}).get("time_to_target"))
        for m in methods if m != "neuroflux"
    }
    return {
        "lrs": lrs,
        "grid": [{k: r.get(k) for k in ("method", "lr", "seed", "status", "final_val", "best_val")} for r in rows
                 if r["seed"] == 0],
        "bp_best_val": bp_best,
        "target": target,
        "target_rule": f"mean over seeds of BP's best validation accuracy - {TARGET_MARGIN}",
        "equal_time_seconds": nf_time,
        "methods": stats,
        "speedups": speedups,
        "exits": exit_choices(ok.get("neuroflux", []), target),
        "runs": rows,
    }


def method_stats(
    method: str, runs: Sequence[dict[str, Any]], ok: Sequence[dict[str, Any]], target: float | None, at: float | None
) -> dict[str, Any]:
    """One method's line of the table: its runs at its best rate, aggregated over seeds."""
    stats: dict[str, Any] = {
        "runs": len(runs),
        "ran": len(ok),
        "failed": sum(r["status"] == "failed" for r in runs),
        "cannot_run": [r.get("reason") for r in runs if r["status"] == "cannot_run"][:1] or None,
    }
    if not ok:
        return stats
    peaks = [r["measured_peak_bytes"] for r in ok if r["measured_peak_bytes"] is not None]
    stats.update(
        batch_sizes=ok[0]["batch_sizes"],
        test_acc=mean_std(r["test_acc"] for r in ok),
        best_val=mean_std(r["best_val"] for r in ok),
        final_val=mean_std(r["final_val"] for r in ok),
        total_seconds=mean_std(r["total_seconds"] for r in ok),
        wall_seconds=mean_std(r["wall_seconds"] for r in ok),
        converged=sum(bool(r["converged"]) for r in ok),
        blocks_converged=[sum(bool(c) for c in r["blocks_converged"]) for r in ok] if "blocks_converged" in ok[0]
        else None,
        blocks=len(ok[0]["plan_blocks"]) if ok[0].get("plan_blocks") else None,
        time_to_target=mean_time_to_target(ok) if target is not None else None,
        accuracy_at_equal_time=mean_std(accuracy_at_curve(r["curve"], at) for r in ok) if at is not None else None,
        measured_peak_bytes=max(peaks) if peaks else None,
        predicted_peak_bytes=ok[0].get("predicted_peak_bytes"),
        budget_bytes=ok[0]["budget_bytes"],
        harness_step_seconds=mean_std(r["harness_step_seconds"] for r in ok),
        steps=ok[0]["steps"],
        polish=polish_stats(ok),
    )
    return stats


def accuracy_at_curve(curve: Sequence[Sequence[float]], seconds: float) -> float | None:
    """:func:`accuracy_at` on a stored ``(seconds, accuracy)`` curve."""
    return accuracy_at([{"seconds": s, "val/acc": a} for s, a in curve], seconds)


def exit_choices(nf_runs: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any] | None:
    """Per NeuroFlux seed, the smallest exit whose validation accuracy reaches ``target`` (the best exit if none does).

    ``unit`` is the most frequent choice over seeds (the shallower on ties).
    """
    from nf_lightning.core.exits.selection import ExitRecord, select_exit

    if target is None or not nf_runs or not all(r.get("exits") for r in nf_runs):
        return None
    per_seed = []
    for run in nf_runs:
        records = [ExitRecord.from_dict(e) for e in run["exits"]]
        chosen = select_exit(records, reference=min(max(target, 0.0), 1.0))
        tests = run.get("exit_test_accuracies") or {}
        per_seed.append({
            "seed": run["seed"], "unit": chosen.unit, "parameters": chosen.parameters,
            "val_acc": chosen.accuracy, "reached": chosen.accuracy >= target - ACCURACY_EPSILON,
            "test_acc": tests.get(str(chosen.unit)), "full_parameters": run["full_parameters"],
        })  # fmt: skip
    counts = Counter(c["unit"] for c in per_seed)
    unit = min(counts, key=lambda u: (-counts[u], u))
    same = [c for c in per_seed if c["unit"] == unit]
    return {
        "unit": unit,
        "parameters": same[0]["parameters"],
        "full_parameters": same[0]["full_parameters"],
        "compression": same[0]["full_parameters"] / same[0]["parameters"],
        "reached": sum(c["reached"] for c in per_seed),
        "test_acc": mean_std(c["test_acc"] for c in per_seed),
        "per_seed": per_seed,
    }


# =========================================================================== tables (pure)
def _pct(stat: dict[str, Any] | None, spread: bool = True) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{100 * stat['mean']:.1f}"
    return f"{text} ± {100 * stat['std']:.1f}" if spread and stat["n"] > 1 else text


def _seconds(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    if "lower_bound" in stat:
        prefix = ">" if stat["lower_bound"] else ""
        note = f" ({stat['reached']}/{stat['n']} reached)" if stat["lower_bound"] else ""
        return f"{prefix}{stat['mean']:.0f}{note}"
    return f"{stat['mean']:.0f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def _batches(sizes: Sequence[int] | None) -> str:
    if not sizes:
        return "-"
    text = ",".join(map(str, sizes))
    return text if len(text) <= 14 else f"{min(sizes)}..{max(sizes)}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The benchmark's table and its key lines, as Markdown (``summary.md`` and the README section)."""
    s, results = summary["settings"], summary["results"]
    budget = summary["budget"]
    target = results["target"]
    lines = [
        f"{s['model']} x{s['width']} on {s['data']}: {_count(s['train_subset'])} training and "
        f"{_count(s['val_subset'])} validation images (class-balanced, held out of the training split), "
        f"test on {_count(s['test_subset'], 'all 10,000')} test images; budget {budget['text']} "
        f"({budget['rule']}); {s['seeds']} seed(s), learning rates {', '.join(map(str, s['lrs']))} "
        f"at batch 128; BP {s['bp_epochs']} epochs (cosine), NeuroFlux {s['nf_epochs']} epochs per block"
        f"{_polish_text(s.get('polish_epochs'))}; "
        f"one torch thread per run, {s['jobs']} runs at once on {summary['machine']['cpus']} CPU cores; "
        f"{_metering(s.get('meter'))}.",
        "",
        f"Target: BP's best validation accuracy minus one point = "
        f"{'-' if target is None else f'{100 * target:.1f} %'}. "
        f"Equal wall time: NeuroFlux's mean total time, "
        f"{_seconds({'mean': results['equal_time_seconds']})} s.",
        "",
        "| method | batch | lr @128 | converged | test acc % | best val acc % | time to target s | "
        "val acc % at equal time | total s | peak MB (budget) | s/step harness / bare |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    overhead = summary.get("overhead") or {}
    for method, stat in results["methods"].items():
        label = LABELS.get(method, method) + (" + polish" if stat.get("polish") else "")
        if not stat.get("ran"):
            why = (stat.get("cannot_run") or ["failed"])[0]
            lines.append(f"| {label} | cannot run: {why} | | | | | | | | | |")
            continue
        bare = (overhead.get(method) or {}).get("bare_step_seconds")
        harness = stat["harness_step_seconds"]["mean"]
        step_cell = "-" if harness is None else f"{1000 * harness:.1f} ms" + (
            f" / {1000 * bare:.1f} ms ({harness / bare:.1f}x)" if bare else ""
        )
        peak = stat["measured_peak_bytes"]
        peak_cell = f"{_mb(peak)}{'*' if peak and peak > stat['budget_bytes'] else ''} ({_mb(stat['budget_bytes'])})"
        lines.append(
            f"| {label} | {_batches(stat['batch_sizes'])} | {results['lrs'][method]} | "
            f"{_converged(stat)} | {_pct(stat['test_acc'])} | {_pct(stat['best_val'])} | "
            f"{_seconds(stat['time_to_target'])} | {_pct(stat['accuracy_at_equal_time'])} | "
            f"{_seconds(stat['total_seconds'])} | {peak_cell} | {step_cell} |"
        )
    speedups = [f"{format_speedup(v)} vs {LABELS.get(m, m)}" for m, v in results["speedups"].items()]
    reached = (results["methods"].get("neuroflux", {}).get("time_to_target") or {}).get("reached")
    if reached == 0:
        lines += ["", "NeuroFlux reached the target in none of its seeds: its best validation accuracy stayed below "
                  "BP's best minus one point, so there is no time to that accuracy to compare."]  # fmt: skip
    else:
        lines += ["", f"NeuroFlux reached the target {', '.join(speedups) or '-'} (ratio of mean times to target)."]
    exit_ = results.get("exits")
    if exit_:
        tp = summary.get("throughput") or {}
        rows = tp.get("rows") or []
        speed = ", ".join(f"{r['speedup']:.2f}x at batch {r['batch_size']}" for r in rows) or "not measured"
        lines.append(
            f"Deployable exit of the block-wise run (smallest whose validation accuracy reached the target before "
            f"any polish, chosen per seed): unit "
            f"{exit_['unit']} (reached in {exit_['reached']}/{len(exit_['per_seed'])} seeds), "
            f"{exit_['parameters']:,} parameters against {exit_['full_parameters']:,} "
            f"({exit_['compression']:.1f}x fewer), test accuracy {_pct(exit_['test_acc'])} %, inference {speed}."
        )
    polish = (results["methods"].get("neuroflux") or {}).get("polish")
    if polish:
        sizes = ", ".join(f"{p:,}" for p in polish["parameters"] if p)
        lines.append(
            f"Polish ({polish['epochs']} epochs of end-to-end BP on the deployed exit, included in NeuroFlux's row): "
            f"units {', '.join(map(str, polish['units']))} at batch {', '.join(map(str, polish['batch_sizes']))}, "
            f"{sizes} parameters against {polish['full_parameters']:,}; validation {_pct(polish['val_before'])} -> "
            f"{_pct(polish['val_after'])} %, test {_pct(polish['blockwise_test_acc'])} -> {_pct(polish['test_acc'])} %, "
            f"kept in {polish['kept']}/{len(polish['units'])} seeds, {_seconds(polish['seconds'])} s."
        )
    lines += [
        "",
        "time to target and total: mean over seeds of the wall time from `fit`'s start (profiling and planning "
        "included, loading the data set not) until a validation reached the target, and until the last validation; "
        "`>` when some seed never did (its last validation time counts). "
        "converged: runs whose last fifth of validations gained at most 0.5 points (for local learning also per "
        "seed, the blocks whose own exits did so over their own epochs). peak: largest measured "
        "training-step peak (`*` above the budget). s/step: wall time of the training loop per optimizer step "
        "(data loading, hooks, logging and the memory meter included; setup, profiling, validation and cache writes "
        "not) against a bare PyTorch loop of the same steps (no Lightning, no meter, no data loading), timed alone.",
    ]
    return "\n".join(lines)


def _converged(stat: dict[str, Any]) -> str:
    text = f"{stat['converged']}/{stat['ran']}"
    if stat.get("blocks_converged"):
        blocks = stat["blocks"]
        text += " (blocks " + ", ".join(f"{k}/{blocks}" for k in stat["blocks_converged"]) + ")"
    return text


def _metering(meter: dict[str, int] | None) -> str:
    if not meter or meter["sample_every"] == 1:
        return "every training step of every method metered"
    return (
        f"every method metered on NeuroFlux's schedule: every step of the first {meter['full_steps']} "
        f"(per block), then one in {meter['sample_every']}"
    )


def _polish_text(epochs: int | None) -> str:
    if not epochs:
        return ""
    return f", then {epochs} epochs of end-to-end BP on its deployed exit under the budget (its time and validations count)"


def _count(value: int | None, zero: str = "all") -> str:
    return zero if not value else f"{value:,}"


def replace_readme_section(text: str, section: str) -> str:
    """``text`` with everything between the ``compare`` markers replaced by ``section``.

    >>> replace_readme_section("a\\n<!-- compare:begin -->\\nold\\n<!-- compare:end -->\\nb", "new")
    'a\\n<!-- compare:begin -->\\nnew\\n<!-- compare:end -->\\nb'
    """
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < 0 or end < begin:
        raise SystemExit(
            f"README markers not found: the benchmark table goes between a line '{README_BEGIN}' and a later "
            f"line '{README_END}'; add both to the README first"
        )
    return f"{text[: begin + len(README_BEGIN)]}\n{section.strip()}\n{text[end:]}"


def readme_section(summary: dict[str, Any], summary_path: str) -> str:
    """The README's benchmark section, generated from a summary (never pasted by hand)."""
    return "\n".join([
        f"<!-- generated by `python experiments/compare.py --readme` from {summary_path}; do not edit -->",
        "",
        markdown_table(summary),
        "",
        f"Curves of every seed: `{Path(summary_path).with_name('figure12.png').as_posix()}`.",
    ])  # fmt: skip


# =========================================================================== the runs
@dataclass(frozen=True)
class RunSpec:
    """One training run of the benchmark."""

    method: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}_lr{self.lr:g}_seed{self.seed}"


def planned_runs(
    methods: Sequence[str], lrs: Sequence[float], seeds: int, best: dict[str, float | None]
) -> list[RunSpec]:
    """The grid on seed 0 (rates outer, methods inner), then the other seeds of every method whose best rate is known.

    >>> [s.key for s in planned_runs(["bp", "neuroflux"], [0.1, 0.2], 2, {"bp": 0.2})]
    ['bp_lr0.1_seed0', 'neuroflux_lr0.1_seed0', 'bp_lr0.2_seed0', 'neuroflux_lr0.2_seed0', 'bp_lr0.2_seed1']
    """
    grid = [RunSpec(m, lr, 0) for lr in lrs for m in methods]
    more = [RunSpec(m, best[m], seed) for seed in range(1, seeds) for m in methods if best.get(m) is not None]
    return grid + more


def run_overrides(spec: RunSpec, settings: dict[str, Any], budget: str) -> list[str]:
    """nf-train's overrides for one run: the same data, model, budget and recipe for every method."""
    bp_like = spec.method in BP_LIKE
    overrides = [
        f"method={spec.method}",
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
        "+callbacks.probe._target_=compare.BenchmarkProbe",
        f"+callbacks.probe.subset={settings['test_subset'] or 0}",
    ]
    meter = settings.get("meter") or {"full_steps": 0, "sample_every": 1}
    if settings.get("meter_every_step"):
        meter = {"full_steps": 0, "sample_every": 1}
    if bp_like:
        overrides.append("+module.lr_schedule=cosine")
    elif settings.get("polish_epochs"):  # local learning: polish the deployed exit end to end
        overrides.append(f"polish_epochs={settings['polish_epochs']}")
    overrides += [  # every method's strategy meters on the same schedule, by the same guard
        f"+trainer.strategy.meter_full_steps={meter['full_steps']}",
        f"+trainer.strategy.meter_sample_every={meter['sample_every']}",
    ]
    return [*overrides, *settings["set"]]


def run_all(settings: dict[str, Any], budget: str, work: Path, log: Any = print) -> list[dict[str, Any]]:
    """Train every planned run, ``settings['jobs']`` at a time, each in its own subprocess; return their records.

    A run whose ``record.json`` exists with the same overrides is reused. The
    seeds after 0 of a method are planned once its grid is done.
    """
    methods, seeds, jobs = settings["methods"], settings["seeds"], settings["jobs"]
    records: dict[str, dict[str, Any]] = {}
    running: dict[str, tuple[subprocess.Popen, RunSpec, float]] = {}
    while True:
        rows = [run_row(r) for r in records.values()]
        grid_done = {m: all(RunSpec(m, lr, 0).key in records for lr in settings["lrs"]) for m in methods}
        best = {m: lr for m, lr in choose_lrs(rows, methods).items() if grid_done[m]}
        planned = planned_runs(methods, settings["lrs"], seeds, best)
        pending = [s for s in planned if s.key not in records and s.key not in running]
        for spec in pending:
            reused = _reusable(work / "runs" / spec.key, run_overrides(spec, settings, budget))
            if reused is not None:
                log(f"[compare] reusing {spec.key}")
                records[spec.key] = reused
        pending = [s for s in pending if s.key not in records]
        if not running and not pending and all(grid_done.values()):
            return [records[s.key] for s in planned]
        while pending and len(running) < jobs:
            spec = pending.pop(0)
            running[spec.key] = (_start(spec, settings, budget, work), spec, time.perf_counter())
            log(f"[compare] started {spec.key}")
        time.sleep(0.5)
        for key, (process, spec, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            records[key] = _finished(spec, process.returncode, work / "runs" / key, settings, budget)
            status = run_row(records[key])["status"]
            log(f"[compare] finished {key}: {status} in {time.perf_counter() - started:.0f} s")


def _reusable(directory: Path, overrides: list[str]) -> dict[str, Any] | None:
    path = directory / RECORD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record["spec"]["overrides"] == overrides else None


def _start(spec: RunSpec, settings: dict[str, Any], budget: str, work: Path) -> subprocess.Popen:
    directory = work / "runs" / spec.key
    if directory.exists():
        shutil.rmtree(directory)  # a killed or stale run starts over
    directory.mkdir(parents=True)
    payload = {
        "key": spec.key, "method": spec.method, "lr": spec.lr, "seed": spec.seed,
        "overrides": run_overrides(spec, settings, budget), "threads": settings["threads"], "out": str(directory),
    }  # fmt: skip
    (directory / SPEC_FILE).write_text(json.dumps(payload, indent=2))
    threads = str(settings["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    with (directory / LOG_FILE).open("w") as handle:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(directory / SPEC_FILE)],
            stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )


def _finished(spec: RunSpec, returncode: int, directory: Path, settings: dict[str, Any], budget: str) -> dict[str, Any]:
    path = directory / RECORD_FILE
    if returncode == 0 and path.is_file():
        return json.loads(path.read_text())
    log_tail = (directory / LOG_FILE).read_text()[-3000:] if (directory / LOG_FILE).is_file() else ""
    payload = {"key": spec.key, "method": spec.method, "lr": spec.lr, "seed": spec.seed,
               "overrides": run_overrides(spec, settings, budget)}  # fmt: skip
    return {"spec": payload, "status": "failed", "error": f"exit status {returncode}: {log_tail}"}


# =========================================================================== the worker (a subprocess per run)
def neuroflux_metering() -> dict[str, int]:
    """How often NeuroFlux meters its steps by default: every step of a block's first ``full_steps``, then one in
    ``sample_every`` (:class:`~nf_lightning.core.options.NeuroFluxOptions`' ``meter_full_steps``/``meter_sample_every``)."""
    from nf_lightning.core.options import NeuroFluxOptions

    defaults = NeuroFluxOptions()
    return {"full_steps": defaults.meter_full_steps, "sample_every": defaults.meter_sample_every}


class BenchmarkProbe(pl.Callback):
    """What the benchmark measures inside a run, written to ``probe.json`` when ``fit`` ends.

    - the training loop's own wall time: each epoch from its start to its
      validation (or its end), so setup, profiling, validation and what
      happens between epochs (NeuroFlux's cache writes) are left out, and the
      optimizer steps per block (one entry for BP), counted as they run;
    - the test split: the trained model scored after ``fit``. BP: the final
      model. Local learning: every exit in one pass (``unit``/``accuracy`` are
      the exit NeuroFlux selected on validation), so an exit chosen later (the
      smallest reaching a target, say) has its test accuracy too. Eval mode,
      ``no_grad``, batch ``batch_size``, outside the training budget; ``subset``
      > 0 scores every k-th test image only (the split is ordered by class, so
      the subset stays balanced).
    """

    def __init__(self, subset: int = 0, batch_size: int = 500) -> None:
        self.subset = subset
        self.batch_size = batch_size
        self.train_loop_seconds = 0.0
        self.steps: dict[int, int] = {}
        self._epoch_start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        block = getattr(getattr(trainer.strategy, "run", None), "active_block", None) or 0
        self.steps[block] = self.steps.get(block, 0) + 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch()

    def _close_epoch(self) -> None:
        if self._epoch_start is not None:
            self.train_loop_seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        run = getattr(trainer.strategy, "run", None)
        guard = getattr(trainer.strategy, "guard", None) or getattr(run, "guard", None)
        out: dict[str, Any] = {
            "metered_steps": guard.metered_steps if guard is not None else None,
            "train_loop_seconds": self.train_loop_seconds,
            "steps": [self.steps.get(b, 0) for b in range(max(self.steps, default=-1) + 1)],
            **self._score_test_split(trainer, pl_module),
        }
        out["test_seconds"] = time.perf_counter() - start
        (Path(trainer.default_root_dir) / PROBE_FILE).write_text(json.dumps(out, indent=2))

    def _score_test_split(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        from nf_lightning.core.train.run import BlockwiseRun
        from nf_lightning.lightning.early_exit import EarlyExitSelector

        loader = held_out_loader(trainer.datamodule, self.subset, self.batch_size)
        dataset = loader.dataset
        device = trainer.strategy.root_device
        run = getattr(trainer.strategy, "run", None)
        out: dict[str, Any] = {"test_images": len(dataset)}
        with torch.no_grad():
            if isinstance(run, BlockwiseRun):
                units = [u.to(device).eval() for u in run.units]
                exits = [e.to(device).eval() for e in run.exits]
                correct = [0] * len(units)
                for x, y in loader:
                    h, y = x.to(device), y.to(device)
                    for index, (unit, head) in enumerate(zip(units, exits)):
                        h = unit(h)
                        correct[index] += int((head(h).argmax(1) == y).sum())
                selector = next((c for c in trainer.callbacks if isinstance(c, EarlyExitSelector)), None)
                unit = selector.selected.unit if selector and selector.selected else run.deploy_unit
                out["exit_accuracies"] = {str(i): c / len(dataset) for i, c in enumerate(correct)}
                out.update(unit=unit, accuracy=correct[unit] / len(dataset))
            else:
                pl_module.eval()
                correct = 0
                for x, y in loader:
                    correct += int((pl_module(x.to(device)).argmax(1) == y.to(device)).sum())
                out["accuracy"] = correct / len(dataset)
        return out


def worker(spec_path: Path) -> None:
    """Train one run as its spec says (``nf-train``'s ``run()``), score it on the test split, write ``record.json``."""
    from nf_lightning.cli.common import compose_config
    from nf_lightning.cli.train import POLISHED_PROGRAM_FILE, run

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    start = time.perf_counter()
    cfg = compose_config("train", spec["overrides"])
    run(cfg, out)
    results = json.loads((out / "results.json").read_text())
    probe = json.loads((out / PROBE_FILE).read_text()) if (out / PROBE_FILE).is_file() else None
    polish = results.get("polish")
    if probe is not None and polish is not None and polish["kept"]:  # the deployed model is the polished exit
        polished = torch.export.load(str(out / "export" / POLISHED_PROGRAM_FILE)).module()
        probe["blockwise_accuracy"] = probe["accuracy"]
        probe["accuracy"] = score_test_split(polished, cfg, probe["test_images"])
    shutil.rmtree(out / "cache", ignore_errors=True)  # the activation cache: large, and rebuilt by any rerun
    record = {"spec": spec, "status": "ok", "results": results, "probe": probe,
              "process_seconds": time.perf_counter() - start}  # fmt: skip
    tmp = out / f"{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(out / RECORD_FILE)


def held_out_loader(datamodule: Any, subset: int = 0, batch_size: int = 500) -> Any:
    """The test split in order, batch ``batch_size``; ``subset`` > 0 keeps every k-th image only (the split
    is ordered by class, so the subset stays balanced)."""
    from torch.utils.data import DataLoader, Subset

    from nf_lightning.data import collate_batch

    dataset = datamodule.test_dataset()
    if subset and subset < len(dataset):
        step = len(dataset) / subset
        dataset = Subset(dataset, [int(i * step) for i in range(subset)])
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)


def score_test_split(model: torch.nn.Module, cfg: Any, images: int) -> float:
    """Accuracy of ``model`` on the run's test split (every k-th image when ``images`` is fewer), as the probe scores."""
    from hydra.utils import instantiate

    from nf_lightning.core.exits.selection import loader_accuracy

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    return loader_accuracy(model, held_out_loader(datamodule, images))


# =========================================================================== budget, bare loops, throughput
def tightest_bp_budget(settings: dict[str, Any], batch: int = BUDGET_BATCH) -> int:
    """Bytes of the smallest budget at which plain BP trains at ``batch``: its step's peak, as nf-train measures it."""
    from hydra.utils import instantiate

    from nf_lightning.cli.common import compose_config
    from nf_lightning.lightning.backprop_batch import backprop_step_peak
    from nf_lightning.data import KNOWN_DATASETS

    cfg = compose_config("train", run_overrides(RunSpec("bp", settings["lrs"][0], 0), settings, "1GB"))
    data = KNOWN_DATASETS[cfg.data.name]
    net = instantiate(cfg.model, num_classes=data.num_classes)
    module = instantiate(cfg.module, net=net, num_classes=data.num_classes)
    return backprop_step_peak(module, tuple(data.input_shape), batch)


def prepare_data(settings: dict[str, Any]) -> None:
    """Decode the data set once, here, so parallel runs neither race to decode it nor time the decoding."""
    from hydra.utils import instantiate

    from nf_lightning.cli.common import compose_config

    cfg = compose_config("train", run_overrides(RunSpec("bp", settings["lrs"][0], 0), settings, "1GB"))
    instantiate(cfg.data).prepare_data()


def _network(settings: dict[str, Any]) -> torch.nn.Module:
    from nf_lightning import models
    from nf_lightning.data import KNOWN_DATASETS

    num_classes = KNOWN_DATASETS[settings["data"]].num_classes
    return models.create(settings["model"], num_classes=num_classes, width_mult=settings["width"])


def _sgd(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """ClassifierModule's optimizer with nf-train's recipe (the rate does not change a step's cost)."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)


def _median_seconds(step: Any, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_step_seconds(
    settings: dict[str, Any], method: str, stat: dict[str, Any], plan_blocks: Sequence[dict[str, Any]] | None,
    steps: int = 20, warmup: int = 3,
) -> dict[str, Any]:
    """Median seconds of one optimizer step of ``method`` in a bare PyTorch loop: no Lightning, no meter, no data loader.

    BP and BP-ckpt: forward, backward, SGD step of the whole (checkpointed)
    network at its batch. Local learning: one batch through every unit of a
    block, each unit+exit taking its local step, at the block's batch; the
    mean over blocks weighted by their steps in the run.
    """
    import torch.nn.functional as F

    from nf_lightning.core.exits.aux_heads import unit_shapes
    from nf_lightning.core.network.checkpointing import CheckpointedNetwork
    from nf_lightning.core.network.decompose import decompose
    from nf_lightning.core.train.local_learning import LocalBlock
    from nf_lightning.core.exits.aux_heads import build_exits

    torch.manual_seed(0)
    shape = (3, 32, 32)
    net = _network(settings).train()
    if method in BP_LIKE:
        model = CheckpointedNetwork(net) if method == "bp_ckpt" else net
        (batch,) = stat["batch_sizes"]
        optimizer = _sgd(model.parameters())
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

        def step() -> None:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = _median_seconds(step, steps, warmup)
        return {"bare_step_seconds": seconds, "blocks": [{"batch": batch, "seconds": seconds}]}
    parts = decompose(net)
    exits = build_exits(parts, shape, "classic" if method == "classic_ll" else "adaptive")
    shapes = [shape, *unit_shapes(parts.units, shape)]
    blocks = []
    for block, batch, count in zip(plan_blocks or [], stat["batch_sizes"], stat["steps"] or []):
        units = list(block["units"])
        local = LocalBlock(
            [parts.units[u] for u in units], [exits[u] for u in units],
            [_sgd([*parts.units[u].parameters(), *exits[u].parameters()]) for u in units],
        )
        local.train()
        x, y = torch.randn(batch, *shapes[units[0]]), torch.randint(0, 10, (batch,))

        def step(local: LocalBlock = local, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            h = x
            for index in range(len(local.units)):
                h, _ = local.unit_step(index, h, y)

        blocks.append({"units": units, "batch": batch, "steps": count, "seconds": _median_seconds(step, steps, warmup)})
    total = sum(b["steps"] for b in blocks)
    mean = sum(b["steps"] * b["seconds"] for b in blocks) / total if total else None
    return {"bare_step_seconds": mean, "blocks": blocks}


def exit_throughput(settings: dict[str, Any], unit: int, repeats: int) -> dict[str, Any]:
    """Inference speed of NeuroFlux's exit ``unit`` against the full network, batch 1 and 64, one thread.

    Throughput depends on the operations, not on the weights' values, so the
    architecture is built afresh (as ``nf-throughput`` does without a checkpoint).
    """
    from nf_lightning.core.network.decompose import decompose
    from nf_lightning.core.exits.selection import ExitModel
    from nf_lightning.core.exits.aux_heads import build_exits
    from nf_lightning.core.exits.throughput import compare_throughput

    net = _network(settings).eval()
    parts = decompose(net)
    exit_model = ExitModel(parts.units, build_exits(parts, (3, 32, 32), "adaptive"), unit)
    rows = compare_throughput(exit_model, net, (3, 32, 32), batch_sizes=(1, 64), warmup=5, repeats=repeats,
                              num_threads=settings["threads"])  # fmt: skip
    return {"unit": unit, "rows": rows}


# =========================================================================== figure
def figure12(summary: dict[str, Any], path: Path) -> None:
    """Validation accuracy against wall time, every seed of every method at its best rate, with the target."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    results = summary["results"]
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for method in results["methods"]:
        runs = [r for r in results["runs"] if r["method"] == method and r["lr"] == results["lrs"].get(method)
                and r["status"] == "ok" and r["seed"] < summary["settings"]["seeds"]]  # fmt: skip
        for index, run in enumerate(sorted(runs, key=lambda r: r["seed"])):
            seconds, accuracy = zip(*run["curve"]) if run["curve"] else ((), ())
            ax.plot(seconds, [100 * a for a in accuracy], color=COLOURS.get(method), alpha=0.85, linewidth=1.4,
                    marker=".", markersize=3, label=LABELS.get(method, method) if index == 0 else None)  # fmt: skip
    if results["target"] is not None:
        ax.axhline(100 * results["target"], color="grey", linestyle="--", linewidth=1, label="target (BP best - 1)")
    if results["equal_time_seconds"]:
        ax.axvline(results["equal_time_seconds"], color="tab:green", linestyle=":", linewidth=1,
                   label="NeuroFlux mean total time")  # fmt: skip
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{summary['settings']['model']} x{summary['settings']['width']}, budget {summary['budget']['text']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# =========================================================================== main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--model", default="vgg11", help="a conf/model entry")
    parser.add_argument("--width", type=float, default=0.25, help="model.width_mult")
    parser.add_argument("--data", default="cifar10_folder", help="a conf/data entry (data_dir from $NF_DATA_DIR)")
    parser.add_argument("--train-subset", type=int, help="class-balanced training images (0: the whole split)")
    parser.add_argument("--val-subset", type=int, help="class-balanced validation images (0: the whole split)")
    parser.add_argument("--test-subset", type=int, help="test images scored, every k-th (0: all 10,000)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the subsets, the same for every run")
    parser.add_argument("--budget", help=f"memory budget (default: the smallest at which BP trains at batch {BUDGET_BATCH})")
    parser.add_argument("--batch-limit", type=int, default=256)
    parser.add_argument("--bp-epochs", type=int, help="epochs of BP and BP-ckpt (cosine decay over them)")
    parser.add_argument("--nf-epochs", type=int, help="NeuroFlux's epochs per block (its strategy's schedule)")
    parser.add_argument("--polish-epochs", type=int,
                        help="local learning: epochs of end-to-end BP on the deployed exit under the budget (0: none)")
    parser.add_argument("--lrs", type=float, nargs="+", help="learning-rate grid at batch 128, the same for every method")
    parser.add_argument("--seeds", type=int, help="seeds per method (the grid runs on seed 0)")
    parser.add_argument("--classic-ll", action="store_true", help="also run classic local learning")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, "classic_ll"],
                        help=f"the methods to run (default: {', '.join(METHODS)}); bp must be one, it sets the target")
    parser.add_argument("--meter-every-step", action="store_true",
                        help="meter every training step of every method (default: every method on NeuroFlux's "
                        "own schedule, every step of the first ones, then one in n)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--bare-steps", type=int, default=20, help="timed steps of each bare loop")
    parser.add_argument("--throughput-repeats", type=int, default=50)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="more nf-train overrides, for every run")  # fmt: skip
    parser.add_argument("--out", type=Path, help="results directory (default experiments/results/compare/<preset>)")
    parser.add_argument("--work", type=Path, help="run directories (default experiments/out/compare/<preset>)")
    parser.add_argument("--readme", action="store_true",
                        help="only regenerate README.md's benchmark section from the preset's committed summary.json")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or RESULTS_ROOT / args.preset
    args.work = args.work or WORK_ROOT / args.preset
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    methods = list(args.methods or METHODS)
    if args.classic_ll and "classic_ll" not in methods:
        methods.append("classic_ll")
    if "bp" not in methods:
        raise SystemExit("--methods must include bp: BP's best validation accuracy sets the target")
    keys = ("preset", "model", "width", "data", "train_subset", "val_subset", "test_subset", "data_seed",
            "batch_limit", "bp_epochs", "nf_epochs", "polish_epochs", "lrs", "seeds", "jobs", "threads", "set")  # fmt: skip
    meter = {"full_steps": 0, "sample_every": 1} if args.meter_every_step else neuroflux_metering()
    return {**{k: getattr(args, k) for k in keys}, "methods": methods, "meter": meter,
            "meter_every_step": args.meter_every_step}  # fmt: skip


def _git() -> dict[str, Any]:
    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def measure(settings: dict[str, Any], results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Bare-loop step times and the exit's inference throughput, timed alone after the runs (failures recorded)."""
    out: dict[str, Any] = {"overhead": {}, "throughput": None}
    nf_run = next((r for r in results["runs"] if r["method"] == "neuroflux" and r["status"] == "ok"
                   and r["lr"] == results["lrs"].get("neuroflux")), None)  # fmt: skip
    for method, stat in results["methods"].items():
        if not stat.get("ran"):
            continue
        try:
            blocks = None
            if method not in BP_LIKE:
                run = next(r for r in results["runs"] if r["method"] == method and r["status"] == "ok"
                           and r["lr"] == results["lrs"][method])  # fmt: skip
                blocks = run["plan_blocks"]
            out["overhead"][method] = bare_step_seconds(settings, method, stat, blocks, steps=args.bare_steps)
            harness = stat["harness_step_seconds"]["mean"]
            bare = out["overhead"][method]["bare_step_seconds"]
            out["overhead"][method]["harness_over_bare"] = harness / bare if harness and bare else None
        except Exception as error:  # a measurement must not lose the benchmark
            out["overhead"][method] = {"error": repr(error)}
    if results.get("exits") and nf_run is not None:
        try:
            out["throughput"] = exit_throughput(settings, results["exits"]["unit"], args.throughput_repeats)
        except Exception as error:
            out["throughput"] = {"error": repr(error)}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or one worker, or the README update); write and print the summary; return it."""
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return {}
    if args.readme:
        update_readme(args.out / "summary.json")
        return {}
    start = time.perf_counter()
    load_at_start = list(os.getloadavg())  # other work on the machine slows every run (recorded, not corrected)
    settings = settings_of(args)
    torch.set_num_threads(args.threads)
    from nf_lightning.core.memory.budget import format_bytes, parse_bytes

    if args.budget:
        budget, rule = args.budget, "given"
        budget_bytes = parse_bytes(budget)
    else:
        budget_bytes = tightest_bp_budget(settings)
        budget, rule = str(budget_bytes), f"the smallest at which BP trains at batch {BUDGET_BATCH}"
    print(f"[compare] budget {format_bytes(budget_bytes)} ({budget_bytes:,} bytes): {rule}")
    args.work.mkdir(parents=True, exist_ok=True)
    prepare_data(settings)
    records = run_all(settings, budget, args.work)
    results = summarize(records, settings["methods"], settings["seeds"])
    summary: dict[str, Any] = {
        "preset": args.preset,
        "settings": settings,
        "budget": {"bytes": budget_bytes, "text": format_bytes(budget_bytes), "rule": rule},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "parallel_jobs": settings["jobs"],
                    "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg())},
        "git": _git(),
        "results": results,
    }
    summary.update(measure(settings, results, args))
    summary["seconds"] = time.perf_counter() - start
    write_outputs(summary, args.out)
    print(f"\n{markdown_table(summary)}\n")
    print(f"[compare] {summary['seconds']:.0f} s in all -> {args.out / 'summary.json'}")
    return summary


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    """``summary.json``, ``summary.md`` and ``figure12.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary["files"] = ["summary.json", "summary.md", "figure12.png"]
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(out / "summary.json")
    (out / "summary.md").write_text(f"# Benchmark ({summary['preset']} preset)\n\n{markdown_table(summary)}\n")
    figure12(summary, out / "figure12.png")


def update_readme(summary_path: Path, readme: Path = README) -> None:
    """Regenerate ``readme``'s section between the compare markers from ``summary_path``."""
    if not summary_path.is_file():
        raise SystemExit(f"no summary at {summary_path}: run the benchmark first (or pass --preset)")
    summary = json.loads(summary_path.read_text())
    try:
        shown = summary_path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        shown = str(summary_path)
    readme.write_text(replace_readme_section(readme.read_text(), readme_section(summary, shown)))
    print(f"[compare] {readme}: benchmark section regenerated from {shown}")


if __name__ == "__main__":
    main()
