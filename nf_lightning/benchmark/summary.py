"""The numbers of a benchmark summary, from its runs' ``record.json`` files (pure: no training, no files).

Every method's runs at its chosen rate are aggregated over seeds; the target
is BP's best validation accuracy (mean over seeds) minus one point; a run
reaches it at its first validation where its *deployable* model does
(:mod:`~nf_lightning.benchmark.curves`); speed-ups are given seed by seed and
as a ratio of mean times.

Example:
    >>> choose_lrs([{"method": "bp", "seed": 0, "lr": 0.1, "status": "ok", "final_val": 0.5},
    ...             {"method": "bp", "seed": 0, "lr": 0.05, "status": "ok", "final_val": 0.6}], ["bp", "neuroflux"])
    {'bp': 0.05, 'neuroflux': None}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nf_lightning.benchmark.baselines import depth_search_seed
from nf_lightning.benchmark.curves import (
    accuracy_at,
    block_convergence,
    convergence,
    crossing,
    raw_curve,
    time_to_target,
    unit_ready,
)
from nf_lightning.benchmark.plan import Known, rates_of
from nf_lightning.benchmark.presets import LOCAL, TARGET_MARGIN
from nf_lightning.benchmark.stats import mean_std, mean_time_to_target, per_seed_speedups, speedup


def run_row(record: Mapping[str, Any], target: float | None = None) -> dict[str, Any]:
    """What the summary keeps of one run's ``record.json`` (``status`` ``ok``, ``cannot_run`` or ``failed``)."""
    spec = record["spec"]
    row: dict[str, Any] = {key: spec.get(key) for key in ("key", "method", "lr", "seed", "unit")}
    results = record.get("results")
    if record.get("status") == "failed" or results is None:
        return {**row, "status": "failed", "error": record.get("error")}
    if not results["could_run"]:
        return {**row, "status": "cannot_run", "reason": results.get("reason")}
    offset = results.get("before_fit_seconds") or 0.0  # BP's profiling runs before fit, where the clock starts
    history = [{**r, "seconds": r["seconds"] + offset} for r in results["history"]]
    exit_ = results.get("exit") or {}
    parameters = {e["unit"]: e["parameters"] for e in exit_.get("exits") or []}
    curve = raw_curve(history, parameters, exit_.get("tolerance") or 0.0)
    probe = record.get("probe") or {}
    steps = probe.get("steps")
    row.update(
        status="ok",
        provenance=record.get("provenance"),
        batch_sizes=results["batch_sizes"],
        best_val=max((a for _, a in curve), default=None),
        final_val=results["final_accuracy"],
        test_acc=probe.get("accuracy"),
        test_images=probe.get("test_images"),
        test_unit=probe.get("unit"),
        parameters=probe.get("parameters"),
        deployed_unit=exit_.get("unit"),
        exit_test_accuracies=probe.get("exit_accuracies"),
        total_seconds=curve[-1][0] if curve else None,  # on the curves' clock: until the final model was validated
        wall_seconds=results["train_seconds"],
        last_seconds=curve[-1][0] if curve else results["train_seconds"],  # no validation: its whole time
        measured_peak_bytes=_max_peak(results),
        predicted_peak_bytes=results.get("predicted_peak_bytes"),
        budget_bytes=results["budget_bytes"],
        steps=steps,
        harness_step_seconds=probe["train_loop_seconds"] / sum(steps) if steps else None,
        exits=exit_.get("exits"),
        polish=results.get("polish"),
        blockwise_test_acc=probe.get("blockwise_accuracy", probe.get("accuracy")),
        full_parameters=exit_.get("full_parameters"),
        plan_blocks=(results.get("plan") or {}).get("blocks"),
        aux_policy=(results.get("plan") or {}).get("aux_policy") or (results.get("model") or {}).get("aux"),
        curve=curve,
        **convergence(curve),
    )
    if row["plan_blocks"]:
        row["blocks_converged"] = [c["converged"] for c in block_convergence(history, row["plan_blocks"])]
    if row["polish"]:
        row["unit_ready"] = unit_ready(history, row["polish"]["unit"])
    if target is not None:
        index = crossing(curve, target)
        row["crossing_validation"] = None if index is None else _history_index(history, curve[index][0])
        row["time_to_target"] = None if index is None else curve[index][0]
    return row


def _history_index(history: Sequence[Mapping[str, Any]], seconds: float) -> int:
    """Position in the run's history of the validation recorded at ``seconds`` (the snapshots count the same way)."""
    return next(i for i, r in enumerate(history) if r["seconds"] == seconds)


def _max_peak(results: Mapping[str, Any]) -> int | None:
    peaks = [results.get("measured_peak_bytes"), (results.get("polish") or {}).get("measured_peak_bytes")]
    return max((p for p in peaks if p is not None), default=None)


def choose_lrs(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, float | None]:
    """Each method's best learning rate: highest final validation accuracy on seed 0 (``None`` if no run ran)."""
    best: dict[str, float | None] = {}
    for method in methods:
        grid = [r for r in rows if r["method"] == method and r["seed"] == 0 and r["status"] == "ok"]
        best[method] = max(grid, key=lambda r: (r["final_val"], -r["lr"]))["lr"] if grid else None
    return best


def target_of(rows: Sequence[Mapping[str, Any]], bp_lr: float | None, seeds: int) -> dict[str, Any]:
    """BP's best validation accuracy over its seeds at its rate, and the target (``None`` without BP runs)."""
    best = mean_std(r["best_val"] for r in rows if r["method"] == "bp" and r["lr"] == bp_lr
                    and r["seed"] < seeds and r["status"] == "ok")  # fmt: skip
    return {"bp_best_val": best, "target": None if best["mean"] is None else best["mean"] - TARGET_MARGIN}


def known_from(records: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> Known:
    """What the finished runs decided that later runs depend on (see :class:`~nf_lightning.benchmark.plan.Known`).

    A rate is chosen once its seed-0 grid is done; the target once every BP seed is done.
    """
    rows = [run_row(r) for r in records]
    done = {(r["method"], r["lr"], r["seed"]) for r in rows}
    lrs, seeds = settings["lrs"], settings["seeds"]
    chosen = choose_lrs(rows, settings["methods"])
    best = {m: lr for m, lr in chosen.items()
            if lr is not None and all((m, g, 0) in done for g in rates_of(m, lrs, settings.get("pinned")))}  # fmt: skip
    deployed = {(r["lr"], r["seed"]): r["deployed_unit"] for r in rows
                if r["method"] == "neuroflux" and r["status"] == "ok" and r["deployed_unit"] is not None}  # fmt: skip
    target = None
    if "bp" in best and all(("bp", best["bp"], s) in done for s in range(seeds)):
        target = target_of(rows, best["bp"], seeds)["target"]
    crossed = {}
    if target is not None:
        for record in records:
            row = run_row(record, target)
            if row["method"] == "depth_search":
                crossed[(row["seed"], row["unit"])] = row["status"] == "ok" and row["time_to_target"] is not None
    return Known(best=best, deployed=deployed, target=target, crossed=crossed)


def summarize(
    records: Sequence[Mapping[str, Any]], methods: Sequence[str], seeds: int, reused: Sequence[str] = ()
) -> dict[str, Any]:
    """Everything the tables say: rates, target, per-method statistics, speed-ups, exits, provenance of the runs."""
    lrs = choose_lrs([run_row(r) for r in records], methods)
    goal = target_of([run_row(r) for r in records], lrs.get("bp"), seeds)
    target = goal["target"]
    rows = [{**run_row(r, target), "reused": r["spec"]["key"] in reused} for r in records]
    final = {m: [r for r in rows if r["method"] == m and r["lr"] == lrs[m] and r["seed"] < seeds] for m in methods}
    ok = {m: sorted((r for r in final[m] if r["status"] == "ok"), key=lambda r: (r["seed"], r["unit"] or 0))
          for m in methods}  # fmt: skip
    nf_time = mean_std(r["total_seconds"] for r in ok.get("neuroflux", []))["mean"]
    stats = {m: method_stats(final[m], ok[m], target, nf_time) for m in methods if m != "depth_search"}
    if "depth_search" in methods:
        stats["depth_search"] = depth_search_stats(final["depth_search"], seeds)
    by_seed = {m: _time_rows(m, ok[m], stats[m]) for m in methods}
    nf_seeds, nf_mean = by_seed.get("neuroflux", {}), (stats.get("neuroflux") or {}).get("time_to_target")
    speedups = {m: {"ratio_of_means": speedup(stats[m].get("time_to_target"), nf_mean),
                    "per_seed": per_seed_speedups(by_seed[m], nf_seeds)}
                for m in methods if m != "neuroflux"}  # fmt: skip
    return {
        "lrs": lrs,
        "grid": [{k: r.get(k) for k in ("method", "lr", "seed", "unit", "status", "final_val", "best_val")}
                 for r in rows if r["seed"] == 0],  # fmt: skip
        **goal,
        "target_rule": f"mean over seeds of BP's best validation accuracy - {TARGET_MARGIN}",
        "equal_time_seconds": nf_time,
        "methods": stats,
        "speedups": speedups,
        "exits": exit_choices(ok.get("neuroflux", []), target),
        "head_start": head_start(ok.get("neuroflux", []), ok.get("scratch_exit", [])),
        "test_images": sorted({r["test_images"] for r in rows if r.get("test_images")}),
        "reused": list(reused),
        "commits": sorted({str(r["provenance"]["code"].get("commit")) for r in rows if r.get("provenance")}),
        "dirty_runs": [r["key"] for r in rows if r.get("provenance") and r["provenance"]["code"].get("dirty")],
        "runs": rows,
    }


def _time_rows(method: str, ok: Sequence[Mapping[str, Any]], stat: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Per seed, the ``time_to_target``/``last_seconds`` pair a speed-up compares (a depth search's summed time)."""
    if method == "depth_search":
        return {s["seed"]: {"time_to_target": s["seconds"] if s["crossed_unit"] is not None else None,
                            "last_seconds": s["seconds"]} for s in stat.get("per_seed", [])}  # fmt: skip
    return {r["seed"]: {"time_to_target": r.get("time_to_target"), "last_seconds": r["last_seconds"]} for r in ok}


def method_stats(
    runs: Sequence[Mapping[str, Any]], ok: Sequence[Mapping[str, Any]], target: float | None, at: float | None
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
        units=[r["unit"] for r in ok] if ok[0]["unit"] is not None else None,
        parameters=[r["parameters"] for r in ok],
        test_acc=mean_std(r["test_acc"] for r in ok),
        best_val=mean_std(r["best_val"] for r in ok),
        final_val=mean_std(r["final_val"] for r in ok),
        total_seconds=mean_std(r["total_seconds"] for r in ok),
        wall_seconds=mean_std(r["wall_seconds"] for r in ok),
        converged=sum(bool(r["converged"]) for r in ok),
        converged_per_seed=[r["converged"] for r in ok],
        blocks_converged=[sum(bool(c) for c in r["blocks_converged"]) for r in ok] if "blocks_converged" in ok[0]
        else None,
        blocks=len(ok[0]["plan_blocks"]) if ok[0].get("plan_blocks") else None,
        time_to_target=mean_time_to_target(ok) if target is not None else None,
        accuracy_at_equal_time=mean_std(accuracy_at(r["curve"], at) for r in ok) if at is not None else None,
        measured_peak_bytes=max(peaks) if peaks else None,
        budget_bytes=ok[0]["budget_bytes"],
        harness_step_seconds=mean_std(r["harness_step_seconds"] for r in ok),
        steps=ok[0]["steps"],
        polish=polish_stats(ok),
    )
    if target is not None and ok[0]["method"] in LOCAL:
        stats["crossings"] = [{"seed": r["seed"], "validation": r["crossing_validation"],
                               "seconds": r["time_to_target"]} for r in ok]  # fmt: skip
    return stats


def depth_search_stats(runs: Sequence[Mapping[str, Any]], seeds: int) -> dict[str, Any]:
    """``depth_search`` over seeds: each seed's summed time and crossing depth, and accuracy against depth."""
    per_seed = [{"seed": s, **depth_search_seed([r for r in runs if r["seed"] == s])} for s in range(seeds)
                if any(r["seed"] == s for r in runs)]  # fmt: skip
    if not per_seed:
        return {"runs": len(runs), "ran": 0, "failed": sum(r["status"] == "failed" for r in runs), "cannot_run": None}
    units = sorted({d["unit"] for s in per_seed for d in s["depths"]})
    by_depth = [{
        "unit": u,
        "seeds": sum(any(d["unit"] == u for d in s["depths"]) for s in per_seed),
        "parameters": next(d["parameters"] for s in per_seed for d in s["depths"] if d["unit"] == u),
        "best_val": mean_std(d["best_val"] for s in per_seed for d in s["depths"] if d["unit"] == u),
        "test_acc": mean_std(d["test_acc"] for s in per_seed for d in s["depths"] if d["unit"] == u),
    } for u in units]  # fmt: skip
    crossed = [s for s in per_seed if s["crossed_unit"] is not None]
    return {
        "runs": len(runs),
        "ran": sum(r["status"] == "ok" for r in runs),
        "failed": sum(r["status"] == "failed" for r in runs),
        "cannot_run": None,
        "per_seed": per_seed,
        "by_depth": by_depth,
        "time_to_target": {"mean": mean_std(s["seconds"] for s in per_seed)["mean"],
                           "lower_bound": len(crossed) < len(per_seed), "reached": len(crossed),
                           "n": len(per_seed)},  # fmt: skip
        "crossed_units": [s["crossed_unit"] for s in per_seed],
        "test_acc": mean_std(s["depths"][-1]["test_acc"] for s in crossed),
        "batch_sizes": sorted({b for r in runs if r["status"] == "ok" for b in r["batch_sizes"]}),
    }


def polish_stats(ok: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """What the polish of the deployed exit did over seeds (``None`` if the runs had none)."""
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


def exit_choices(nf_runs: Sequence[Mapping[str, Any]], target: float | None) -> dict[str, Any] | None:
    """Per NeuroFlux seed, the smallest exit whose final validation accuracy reaches ``target`` (the best if none).

    ``unit`` is the most frequent choice over seeds (the shallower on ties).
    """
    from collections import Counter

    from nf_lightning.core.exits.selection import ExitRecord, select_exit

    if target is None or not nf_runs or not all(r.get("exits") for r in nf_runs):
        return None
    per_seed = []
    for run in nf_runs:
        chosen = select_exit([ExitRecord.from_dict(e) for e in run["exits"]], reference=min(max(target, 0.0), 1.0))
        tests = run.get("exit_test_accuracies") or {}
        per_seed.append({
            "seed": run["seed"], "unit": chosen.unit, "parameters": chosen.parameters,
            "val_acc": chosen.accuracy, "reached": chosen.accuracy >= target - 1e-6,
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


def head_start(nf_runs: Sequence[Mapping[str, Any]], scratch_runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per seed, when NeuroFlux's block that trained the deployed unit ended, its exit's validation accuracy then,
    and when ``scratch_exit`` (the same unit by BP) first reached that accuracy: what the block-wise phase bought.

    >>> nf = [{"seed": 0, "polish": {"unit": 1}, "unit_ready": (50.0, 0.6)}]
    >>> scratch = [{"seed": 0, "unit": 1, "curve": [(20.0, 0.5), (40.0, 0.61)]}]
    >>> head_start(nf, scratch)
    [{'seed': 0, 'unit': 1, 'ready_seconds': 50.0, 'val': 0.6, 'scratch_seconds': 40.0}]
    """
    out = []
    for run in nf_runs:
        ready = run.get("unit_ready")
        if not ready:
            continue
        unit = run["polish"]["unit"]
        same = next((s for s in scratch_runs if s["seed"] == run["seed"] and s["unit"] == unit), None)
        out.append({"seed": run["seed"], "unit": unit, "ready_seconds": ready[0], "val": ready[1],
                    "scratch_seconds": time_to_target(same["curve"], ready[1]) if same else None})  # fmt: skip
    return out
